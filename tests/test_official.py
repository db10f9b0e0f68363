"""The official detectors in one command, against a local Hub (the CLIP) and a local raw-file host (the checkpoint).

The "official" files here are tiny: the CLIP of the reference-parity fixture, published on the local Hub under
the official id, and the fixture's reference CoPS checkpoint, served at the reference repository's paths. Their git
blob SHA-1 is computed here and passed in through the override, as a mirror of the real files would be verified.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file

from cops_hf import CoPSForAnomalyDetection, CoPSProcessor
from cops_hf.cli import main
from cops_hf.conversion import convert_original_checkpoint, load_clip_model
from cops_hf.data.meta import META_DATASET_KEY, make_record
from cops_hf.official import (
    BASE_URL_ENV,
    OFFICIAL_CLIP,
    OFFICIAL_IMAGE_SIZE,
    OfficialReleaseError,
    git_blob_sha1,
    load_official,
)
from cops_hf.training import cops_model_for_training
from tests.data_fakes import write_image, write_mask
from tests.hub_server import LocalHub, StaticFileServer, git_blob_id
from tests.test_conversion import (
    FIXTURE_NAMES,
    _ScriptedStateDict,
    fixture_clip_config,
    load_fixture,
    reference_weights,
)

WORKTREE = Path(__file__).resolve().parents[1]
VISA_PATH, MVTEC_PATH = "/results/models/visa/epoch_10.pth", "/results/models/mvtec/epoch_5.pth"
IMAGE_SIZE = 98  # the fixture's input size (the official 518 works too, only slower)


@dataclass
class OfficialHosts:
    """The local servers holding the tiny "official" files, and what a client needs to use them."""

    env: dict[str, str]
    files: StaticFileServer
    hub: LocalHub
    assets: Path
    meta: dict
    clip_state: dict[str, torch.Tensor]
    cops: dict[str, torch.Tensor]
    visa_sha1: str
    mvtec_sha1: str


def _checkpoint_bytes(cops: dict[str, torch.Tensor], padding: int = 0) -> bytes:
    """A reference checkpoint file; ``padding`` float32 values in an unused key the reference also saves."""
    state = dict(cops)
    if padding:
        state["projector.weight"] = torch.arange(padding, dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save({"prompt_learner": state}, buffer)
    return buffer.getvalue()


@pytest.fixture
def official(
    hub_env: dict[str, str], hub_server: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> OfficialHosts:
    meta, tensors = load_fixture(FIXTURE_NAMES[0])
    clip_state, cops = reference_weights(meta, tensors)
    clip_folder = tmp_path / "clip"
    load_clip_model(clip_state, clip_config=fixture_clip_config(meta)).save_pretrained(clip_folder)
    hub_server.upload_files(OFFICIAL_CLIP, {path.name: path.read_bytes() for path in clip_folder.iterdir()})
    visa, mvtec = _checkpoint_bytes(cops), _checkpoint_bytes(cops, padding=7)
    assets = Path(hub_env["HF_HOME"]) / "assets"
    with StaticFileServer({VISA_PATH: visa, MVTEC_PATH: mvtec}) as files:
        monkeypatch.setenv(BASE_URL_ENV, files.url)
        monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(assets))
        yield OfficialHosts(
            {**hub_env, BASE_URL_ENV: files.url}, files, hub_server, assets, meta, clip_state, cops,
            git_blob_id(visa), git_blob_id(mvtec),
        )  # fmt: skip


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `cops-hf ARGS` in a fresh interpreter with the worktree's cops_hf and the environment ``env``."""
    child_env = {**env, "PYTHONPATH": str(WORKTREE)}
    return subprocess.run(
        [sys.executable, "-m", "cops_hf.cli", *args], env=child_env, capture_output=True, text=True, timeout=300
    )


def _files_under(folder: Path) -> list[Path]:
    """The files under ``folder`` but lock files (kept for the next download, as the Hub client keeps them)."""
    if not folder.exists():
        return []
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix != ".lock")


def _manual_conversion(official: OfficialHosts) -> CoPSForAnomalyDetection:
    """The same release converted by hand from the same files, with the same preset."""
    model = convert_original_checkpoint(
        official.clip_state, official.cops, clip_config=fixture_clip_config(official.meta), image_size=IMAGE_SIZE
    )
    model.config = model.config.with_preset(test_dataset="general", train_dataset="visa")
    return model


def test_convert_official_then_rerun_offline_from_the_cache(
    official: OfficialHosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["convert", "--official", "visa", "--image-size", str(IMAGE_SIZE), "--checkpoint-sha1", official.visa_sha1]
    # Online in a fresh process configured as a user would: HF_ENDPOINT, HF_HOME and the base URL variable.
    online = _cli([*args, "--output", str(tmp_path / "online")], official.env)
    assert online.returncode == 0, online.stderr
    cached = _files_under(official.assets)
    assert [path.name for path in cached] == ["epoch_10.pth"]
    assert git_blob_sha1(cached[0]) == official.visa_sha1 and official.visa_sha1 in str(cached[0])

    # Offline (HF_HUB_OFFLINE=1 as huggingface_hub read it) with both servers gone: the cache alone.
    official.files.stop()
    official.hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main([*args, "--output", str(tmp_path / "offline")]) == 0

    expected = _manual_conversion(official).state_dict()
    for folder in ("online", "offline"):
        weights = load_file(str(tmp_path / folder / "model.safetensors"))
        assert set(weights) == set(expected)
        for name, tensor in expected.items():
            # Exact: conversion copies tensors; no arithmetic runs.
            assert torch.equal(weights[name], tensor), (folder, name)
        model = CoPSForAnomalyDetection.from_pretrained(tmp_path / folder)
        assert model.config.test_preset == "general"
        assert model.config.source_checkpoint == f"github.com/cqylunlun/CoPS{VISA_PATH}@{official.visa_sha1}"
        assert (model.config.test_kernel_size, model.config.distance_alpha, model.config.image_score_beta) == (
            5, 0.26, 0.9,
        )  # fmt: skip
        assert CoPSProcessor.from_pretrained(tmp_path / folder).image_processor.size == IMAGE_SIZE
    assert [request for request in official.files.requests if request[0] == "GET"] == [("GET", VISA_PATH, None)]


def test_load_official_mvtec_matches_the_reference_and_records_its_preset(official: OfficialHosts) -> None:
    model, processor = load_official("mvtec", blob_sha1=official.mvtec_sha1, image_size=IMAGE_SIZE)
    config = model.config
    assert config.test_preset == "visa"
    assert (config.test_kernel_size, config.distance_alpha, config.image_score_beta) == (3, 0.35, 1.0)
    assert (config.train_kernel_size, config.use_recon_loss) == (3, True)
    assert config.source_checkpoint.endswith(f"{MVTEC_PATH}@{official.mvtec_sha1}")
    assert processor.image_processor.size == IMAGE_SIZE and OFFICIAL_IMAGE_SIZE == 518  # the release's default
    # Same weights as converting the files by hand; outputs as the reference computed them (general preset there).
    general = model.config.with_preset(test_dataset="general")
    _, tensors = load_fixture(FIXTURE_NAMES[0])
    model.config = general
    with torch.no_grad():
        outputs = model(tensors["input.pixel_values"].float(), vae_noise=tensors["input.test_noise"])
    torch.testing.assert_close(outputs.image_scores, tensors["output.image_scores"], atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.anomaly_maps, tensors["output.anomaly_maps"], atol=1e-4, rtol=0)


def test_evaluate_uses_the_preset_the_official_model_records(
    official: OfficialHosts, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, processor = load_official("mvtec", blob_sha1=official.mvtec_sha1, image_size=IMAGE_SIZE)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    data = tmp_path / "data"
    records = []
    for index, anomaly in enumerate((0, 0, 1, 1)):
        write_image(data / f"{index}.png", size=(16, 16), value=60 * index)
        mask = str(write_mask(data / f"{index}_mask.png", size=(16, 16)).name) if anomaly else ""
        records.append(make_record(f"{index}.png", cls_name="part", anomaly=anomaly, mask_path=mask))
    (data / "meta.json").write_text(json.dumps({"test": {"part": records}}))

    output = tmp_path / "evaluation"
    args = ["evaluate", "--model", str(tmp_path / "model"), "--data", str(data), "--output", str(output)]
    assert main([*args, "--num-visualizations", "0", "--cpu"]) == 0
    assert "Test preset: visa (the preset the model's config records)" in capsys.readouterr().out
    protocol = json.loads((output / "metrics.json").read_text())["protocol"]
    assert (protocol["test_preset"], protocol["test_kernel_size"], protocol["image_score_beta"]) == ("visa", 3, 1.0)
    # Told otherwise: the dataset meta.json records decides, as the reference's test.py does, and so does --preset.
    (data / "meta.json").write_text(json.dumps({"test": {"part": records}, META_DATASET_KEY: "mvtec"}))
    assert main([*args, "--num-visualizations", "0", "--cpu"]) == 0
    assert "Test preset: mvtec (the dataset" in capsys.readouterr().out
    assert json.loads((output / "metrics.json").read_text())["protocol"]["test_kernel_size"] == 5
    assert main([*args, "--num-visualizations", "0", "--cpu", "--preset", "visa"]) == 0
    assert json.loads((output / "metrics.json").read_text())["protocol"]["test_kernel_size"] == 3


def test_a_corrupted_checkpoint_is_refused_and_nothing_is_cached(
    official: OfficialHosts, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupted = bytearray(official.files.files[VISA_PATH])
    corrupted[len(corrupted) // 2] ^= 0xFF
    official.files.files[VISA_PATH] = bytes(corrupted)
    with pytest.raises(OfficialReleaseError, match=f"git blob SHA-1 is {git_blob_id(bytes(corrupted))}"):
        load_official("visa", blob_sha1=official.visa_sha1, image_size=IMAGE_SIZE)
    assert _files_under(official.assets) == [] and not official.assets.exists()

    output = tmp_path / "model"
    code = main(["convert", "--official", "visa", "--checkpoint-sha1", official.visa_sha1, "--output", str(output)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert error.startswith("cops-hf convert: error: ") and f"expected {official.visa_sha1}" in error
    assert not output.exists() and not official.assets.exists()
    # The published SHA-1 is the default: the tiny file is not the real release either.
    with pytest.raises(OfficialReleaseError, match="9b658b4cf04d05b69af77c151d22b10b24786fc2"):
        load_official("visa")
    assert not official.assets.exists()
    # A mirror without the file: one line, nothing left behind either.
    del official.files.files[VISA_PATH]
    with pytest.raises(OfficialReleaseError, match="404") as raised:
        load_official("visa", blob_sha1=official.visa_sha1)
    assert "\n" not in str(raised.value) and not official.assets.exists()


def test_a_killed_download_resumes_with_a_range_request(official: OfficialHosts, tmp_path: Path) -> None:
    content = _checkpoint_bytes(official.cops, padding=3 << 20)  # 12 MiB: more than one 10 MiB download chunk
    official.files.files[VISA_PATH] = content
    official.files.stall_after = len(content) - (1 << 20)
    args = ["convert", "--official", "visa", "--checkpoint-sha1", git_blob_id(content), "--output", str(tmp_path)]
    process = subprocess.Popen(
        [sys.executable, "-m", "cops_hf.cli", *args],
        env={**official.env, "PYTHONPATH": str(WORKTREE)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert official.files.stalled.wait(timeout=120), "the download never started"
        deadline = time.monotonic() + 60
        while not any(path.stat().st_size >= constants.DOWNLOAD_CHUNK_SIZE for path in _files_under(official.assets)):
            assert time.monotonic() < deadline, "the first chunk never reached the disk"
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    (partial,) = _files_under(official.assets)
    assert partial.name == "epoch_10.pth.incomplete"  # a killed download never looks complete
    received = partial.stat().st_size

    official.files.stall_after = None
    official.files.resume.set()
    model, _ = load_official("visa", blob_sha1=git_blob_id(content), image_size=IMAGE_SIZE)
    assert official.files.requests[-1] == ("GET", VISA_PATH, f"bytes={received}-")
    (checkpoint,) = _files_under(official.assets)
    assert checkpoint.name == "epoch_10.pth" and checkpoint.read_bytes() == content
    expected = _manual_conversion(official).state_dict()
    # Exact: conversion copies tensors; no arithmetic runs.
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in expected.items())


def test_offline_without_the_files_names_both_and_the_manual_way(
    official: OfficialHosts, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code = main(["convert", "--official", "visa", "--output", str(tmp_path / "model")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error, error
    assert OFFICIAL_CLIP in error and f"{official.files.url}{VISA_PATH}" in error
    assert "cops-hf convert --clip ViT-L-14-336px.pt --checkpoint epoch_10.pth --output DIR" in error
    assert official.files.requests == [] and not any("/resolve/" in line for line in official.hub.requests)


def test_clip_in_its_three_forms_gives_identical_models(
    official: OfficialHosts, tmp_path: Path, hub_server: LocalHub
) -> None:
    """An OpenAI TorchScript archive, a transformers folder and a Hub id of the same CLIP convert identically."""
    archive = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(_ScriptedStateDict(official.clip_state)), str(archive))
    folder = tmp_path / "clip-folder"
    load_clip_model(official.clip_state).save_pretrained(folder)  # configuration read off the OpenAI shapes
    hub_server.upload_files("someone/tiny-clip", {path.name: path.read_bytes() for path in folder.iterdir()})
    checkpoint = tmp_path / "epoch_1.pth"
    checkpoint.write_bytes(_checkpoint_bytes(official.cops))

    outputs = {}
    for name, clip in (("archive", archive), ("folder", folder), ("hub", "someone/tiny-clip")):
        output = tmp_path / name
        args = ["convert", "--clip", str(clip), "--checkpoint", str(checkpoint), "--image-size", str(IMAGE_SIZE)]
        assert main([*args, "--output", str(output)]) == 0
        outputs[name] = output
    reference = load_file(str(outputs["archive"] / "model.safetensors"))
    reference_config = CoPSForAnomalyDetection.from_pretrained(outputs["archive"]).config.to_diff_dict()
    for name in ("folder", "hub"):
        weights = load_file(str(outputs[name] / "model.safetensors"))
        assert set(weights) == set(reference)
        # Exact: conversion copies tensors; no arithmetic runs.
        assert all(torch.equal(weights[key], tensor) for key, tensor in reference.items()), name
        config = CoPSForAnomalyDetection.from_pretrained(outputs[name]).config.to_diff_dict()
        recorded = {"_name_or_path": None, "clip_model_id": None}
        assert {**config, **recorded} == {**reference_config, **recorded}, name
    assert CoPSForAnomalyDetection.from_pretrained(outputs["hub"]).config.clip_model_id == "someone/tiny-clip"
    assert CoPSForAnomalyDetection.from_pretrained(outputs["folder"]).config.clip_model_id is None
    # Training starts from the same CLIP whichever form names it.
    clips = [cops_model_for_training(clip).clip.state_dict() for clip in (archive, folder, "someone/tiny-clip")]
    for other in clips[1:]:
        # Exact: each form loads the same stored tensors.
        assert all(torch.equal(other[key], tensor) for key, tensor in clips[0].items())

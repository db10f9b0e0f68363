"""Sharing CoPS on the Hub end to end, against the local hub: push, pull in fresh processes, remote code, card, CLI.

Loading is checked in subprocesses with an empty cache, as a user on another machine would do it. The remote-code
subprocess cannot import cops_hf at all (a meta path finder refuses it, ahead of the editable install's finder),
so everything it runs comes from the files stored in the repository.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel, CLIPConfig, CLIPModel, pipeline

from cops_hf import AnomalyDetectionPipeline, CoPSForAnomalyDetection, CoPSImageProcessor, CoPSProcessor
from cops_hf.cli import main
from cops_hf.hub import push_cops_to_hub
from tests.conftest import CLIENT_TOKEN
from tests.hub_server import USER_NAME, LocalHub

from .tiny_models import tiny_config, tiny_model

REPO_ID = f"{USER_NAME}/tiny-cops"
WORKTREE = Path(__file__).resolve().parents[1]
EVALUATION = {"VisA": {"I-AUROC": 0.912, "P-AUROC": 0.955}, "BTAD": {"I-AUROC": 0.9}}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
REMOTE_CODE_FILES = {
    "configuration_cops.py",
    "modeling_cops.py",
    "losses.py",
    "processing_cops.py",
    "pipeline_anomaly_detection.py",
}

# Run first in every subprocess: refuse to resolve any host but the loopback one (the local hub).
_LOOPBACK_ONLY = """
import socket
_resolve = socket.getaddrinfo
def _loopback_only(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in ("127.0.0.1", "localhost", "::1"):
        raise OSError(f"test subprocess refused to resolve {name!r}")
    return _resolve(host, *args, **kwargs)
socket.getaddrinfo = _loopback_only
"""

# Run first in the remote-code subprocess: make cops_hf unimportable, whatever sys.path or .pth finders say.
_WITHOUT_COPS_HF = """
import sys
class _RefuseCoPSHF:
    def find_spec(self, name, path=None, target=None):
        if name == "cops_hf" or name.startswith("cops_hf."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None
sys.meta_path.insert(0, _RefuseCoPSHF())
try:
    import cops_hf
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("cops_hf is importable in the remote-code subprocess")
"""


def _run_python(script: str, env: dict[str, str], cwd: Path, *, with_cops_hf: bool) -> str:
    """Run ``script`` in a fresh interpreter with the hub environment ``env``; return its output, fail on errors.

    With ``with_cops_hf``, the worktree's cops_hf is importable; without it, the interpreter runs isolated (``-I``:
    no PYTHONPATH, no current folder on sys.path) and cops_hf imports are refused.
    """
    child_env = {name: value for name, value in env.items() if name != "PYTHONPATH"}
    if with_cops_hf:
        child_env["PYTHONPATH"] = str(WORKTREE)
        command = [sys.executable, "-c", _LOOPBACK_ONLY + textwrap.dedent(script)]
    else:
        command = [sys.executable, "-I", "-c", _LOOPBACK_ONLY + _WITHOUT_COPS_HF + textwrap.dedent(script)]
    completed = subprocess.run(command, env=child_env, cwd=cwd, capture_output=True, text=True, timeout=300)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    return output


def _inputs(model: CoPSForAnomalyDetection, path: Path) -> dict[str, torch.Tensor]:
    """Random pixel values and seeded VAE noise for two images, also written to ``path`` for a subprocess."""
    generator = torch.Generator().manual_seed(7)
    size = model.config.image_size
    tensors = {
        "pixel_values": torch.randn(2, 3, size, size, generator=generator),
        "vae_noise": model.seeded_prior_noise(2, seed=3).contiguous(),
    }
    save_file(tensors, str(path))
    return tensors


def _outputs(model: CoPSForAnomalyDetection, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        outputs = model(**inputs)
    return {"image_scores": outputs.image_scores, "anomaly_maps": outputs.anomaly_maps}


def _assert_same_outputs(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0.0, atol=1e-6, msg=name)


def _images(folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for index, shape in enumerate([(60, 70, 3), (98, 98, 3)]):
        path = folder / f"part{index}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _all_uploaded_files(hub: LocalHub) -> dict[str, bytes]:
    """Every file of every commit on the hub, keyed ``repo@sha:path``."""
    return {
        f"{repository.repo_id}@{sha}:{path}": content
        for repository in hub.repositories.values()
        for sha, commit in repository.commits.items()
        for path, content in commit.files.items()
    }


def test_push_then_pull_in_a_fresh_process_with_revision_pinning(
    hub_env: dict[str, str], hub_server: LocalHub, tmp_path: Path
) -> None:
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    first_commit = push_cops_to_hub(first, REPO_ID)
    # transformers' own methods on our classes, on top: the second model becomes main.
    second.push_to_hub(REPO_ID)
    CoPSProcessor(CoPSImageProcessor(size=98)).push_to_hub(REPO_ID)
    inputs = _inputs(first, tmp_path / "inputs.safetensors")
    image = _images(tmp_path)[0]

    _run_python(
        f"""
        import torch
        from safetensors.torch import load_file, save_file
        from cops_hf import CoPSForAnomalyDetection, CoPSProcessor

        inputs = load_file("inputs.safetensors")
        outputs = {{}}
        for name, revision in (("first", {first_commit.oid!r}), ("main", None)):
            model = CoPSForAnomalyDetection.from_pretrained({REPO_ID!r}, revision=revision).eval()
            with torch.no_grad():
                result = model(**inputs)
            outputs[name + ".image_scores"] = result.image_scores
            outputs[name + ".anomaly_maps"] = result.anomaly_maps
        processor = CoPSProcessor.from_pretrained({REPO_ID!r})
        outputs["pixel_values"] = processor(images={image!r})["pixel_values"]
        save_file({{name: tensor.contiguous() for name, tensor in outputs.items()}}, "outputs.safetensors")
        """,
        hub_env,
        tmp_path,
        with_cops_hf=True,
    )

    snapshots = Path(hub_env["HF_HUB_CACHE"]) / f"models--{REPO_ID.replace('/', '--')}" / "snapshots"
    assert (snapshots / first_commit.oid / "model.safetensors").is_file()  # pinned revisions are cached by sha
    pulled = load_file(str(tmp_path / "outputs.safetensors"))
    for name, model in (("first", first), ("main", second)):
        expected = _outputs(model, inputs)
        _assert_same_outputs({key: pulled[f"{name}.{key}"] for key in expected}, expected)
    assert not torch.allclose(pulled["first.image_scores"], pulled["main.image_scores"])
    expected_pixels = CoPSProcessor(CoPSImageProcessor(size=98))(images=image)["pixel_values"]
    # Exact: the same preprocessing code on the same image, one image at a time.
    assert torch.equal(pulled["pixel_values"], expected_pixels)


def test_remote_code_without_cops_hf_gives_the_same_scores(
    hub_env: dict[str, str], hub_server: LocalHub, tmp_path: Path
) -> None:
    """`push_cops_to_hub`, transformers' own `push_to_hub` and a plain `save_pretrained` folder all load with
    `trust_remote_code=True` in a process that cannot import cops_hf."""
    model = tiny_model()
    processor = CoPSProcessor.for_image_size(model.config.image_size)
    native_repo = f"{USER_NAME}/tiny-cops-native"
    push_cops_to_hub(model, REPO_ID)
    model.push_to_hub(native_repo)
    processor.push_to_hub(native_repo)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    sources = {"cops-push": REPO_ID, "native-push": native_repo, "folder": str(tmp_path / "saved")}
    inputs = _inputs(model, tmp_path / "inputs.safetensors")
    images = _images(tmp_path)
    # cops_hf installed: the registered task serves the repository, no trust_remote_code needed.
    detector = pipeline("anomaly-detection", model=REPO_ID)
    expected_results = detector(images)

    output = _run_python(
        f"""
        import sys
        import numpy as np
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel, pipeline

        try:
            AutoModel.from_pretrained({sources["folder"]!r})
        except ValueError as error:
            print("without trust_remote_code:", str(error).replace("\\n", " "))
        outputs = {{}}
        for name, source in {sources!r}.items():
            model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
            with torch.no_grad():
                result = model(**load_file("inputs.safetensors"))
            detector = pipeline("anomaly-detection", model=source, trust_remote_code=True)
            results = detector({images!r})
            outputs.update({{
                name + ".image_scores": result.image_scores.contiguous(),
                name + ".anomaly_maps": result.anomaly_maps.contiguous(),
                name + ".pipeline_scores": torch.tensor([item["score"] for item in results], dtype=torch.float64),
                name + ".pipeline_map": torch.from_numpy(results[0]["anomaly_map"]),
            }})
            print(name, "model class", type(model).__module__, type(model).__name__)
            print(name, "pipeline class", type(detector).__module__, type(detector).__name__)
            print(name, "processor class", type(detector.processor).__module__, type(detector.processor).__name__)
        save_file(outputs, "outputs.safetensors")
        print("cops_hf modules", [name for name in sys.modules if name.startswith("cops_hf")])
        """,
        hub_env,
        tmp_path,
        with_cops_hf=False,
    )

    assert "without trust_remote_code:" in output and "trust_remote_code=True" in output
    assert "upgrade transformers" not in output
    assert "cops_hf modules []" in output
    remote = load_file(str(tmp_path / "outputs.safetensors"))
    expected_scores = torch.tensor([item["score"] for item in expected_results], dtype=torch.float64)
    for name in sources:
        assert f"{name} model class transformers_modules." in output and "CoPSForAnomalyDetection" in output
        assert f"{name} pipeline class transformers_modules." in output and "AnomalyDetectionPipeline" in output
        assert f"{name} processor class transformers_modules." in output and "CoPSProcessor" in output
        _assert_same_outputs({key: remote[f"{name}.{key}"] for key in ("image_scores", "anomaly_maps")},
                             _outputs(model, inputs))  # fmt: skip
        torch.testing.assert_close(remote[f"{name}.pipeline_scores"], expected_scores, rtol=0.0, atol=1e-6)
        torch.testing.assert_close(
            remote[f"{name}.pipeline_map"], torch.from_numpy(expected_results[0]["anomaly_map"]), rtol=0.0, atol=1e-6
        )


def test_installed_cops_hf_wins_over_the_code_copies_in_a_folder(tmp_path: Path) -> None:
    """Where cops_hf is imported, the code files saved beside a model are never run, even with trust_remote_code."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    CoPSProcessor.for_image_size(model.config.image_size).save_pretrained(tmp_path)
    for copy in tmp_path.glob("*.py"):
        copy.write_text('raise RuntimeError("a stale code copy ran")\n')
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is CoPSForAnomalyDetection
    detector = pipeline("anomaly-detection", model=str(tmp_path), trust_remote_code=True)
    assert type(detector) is AnomalyDetectionPipeline and type(detector.processor) is CoPSProcessor
    assert not hasattr(loaded.config, "custom_pipelines")
    for name, tensor in model.state_dict().items():
        # Exact: weights are stored and read back, never computed.
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_pushed_repository_files_and_card(hub_env: dict[str, str], hub_server: LocalHub, tmp_path: Path) -> None:
    model = tiny_model()

    commit = push_cops_to_hub(model, REPO_ID, evaluation=EVALUATION, training_dataset="mvtec-ad")

    api = HfApi(endpoint=hub_server.url)
    files = set(api.list_repo_files(REPO_ID))
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files
    assert REMOTE_CODE_FILES <= files
    assert "handler.py" in files  # deployable as a custom-handler Inference Endpoint
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    assert commit.oid == api.model_info(REPO_ID).sha and commit.commit_url.endswith(commit.oid)
    config = json.loads(Path(hf_hub_download(REPO_ID, "config.json", endpoint=hub_server.url)).read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cops.CoPSConfig",
        "AutoModel": "modeling_cops.CoPSForAnomalyDetection",
    }
    assert config["custom_pipelines"]["anomaly-detection"]["impl"] == (
        "pipeline_anomaly_detection.AnomalyDetectionPipeline"
    )
    assert getattr(model.config, "auto_map", None) is None  # the caller's model is left as it was

    card = ModelCard.load(hf_hub_download(REPO_ID, "README.md", endpoint=hub_server.url))
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-segmentation"
    assert {"anomaly-detection", "zero-shot"} <= set(card.data.tags)
    assert card.data.base_model is None  # a random CLIP is not called ViT-L/14@336px
    assert "not a published checkpoint" in card.text and "pip install cops-hf" not in card.text
    assert card.data.datasets == ["mvtec-ad"]
    results = {(result.dataset_name, result.metric_name): result.metric_value for result in card.data.eval_results}
    assert results == {("VisA", "I-AUROC"): 0.912, ("VisA", "P-AUROC"): 0.955, ("BTAD", "I-AUROC"): 0.9}
    assert "| `image_size` | `98` |" in card.text
    assert f'pipeline("anomaly-detection", model="{REPO_ID}", trust_remote_code=True)' in card.text


def test_cli_push_to_a_private_branch(
    hub_env: dict[str, str],
    hub_server: LocalHub,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    CoPSProcessor(CoPSImageProcessor(size=98)).save_pretrained(tmp_path / "model")
    (tmp_path / "eval.json").write_text(json.dumps(EVALUATION))

    code = main(
        ["push", str(tmp_path / "model"), "cli-cops", "--private", "--revision", "dev",
         "--eval-json", str(tmp_path / "eval.json"), "--training-dataset", "mvtec-ad"]
    )  # fmt: skip

    captured = capsys.readouterr()
    assert code == 0, captured.err
    repository = hub_server.repositories[f"{USER_NAME}/cli-cops"]
    assert repository.private_token == CLIENT_TOKEN
    assert f"/{USER_NAME}/cli-cops/commit/{repository.branches['dev']}" in captured.out
    assert set(repository.resolve("main").files) == {".gitattributes"}
    dev_files = repository.resolve("dev").files
    assert REMOTE_CODE_FILES <= set(dev_files)
    assert "model-index" in dev_files["README.md"].decode()
    pulled = CoPSForAnomalyDetection.from_pretrained(f"{USER_NAME}/cli-cops", revision="dev")
    for name, tensor in model.state_dict().items():
        # Exact: weights are stored and read back, never computed.
        assert torch.equal(pulled.state_dict()[name], tensor), name
    for text in (captured.out, captured.err, caplog.text):
        assert CLIENT_TOKEN not in text
    for name, content in _all_uploaded_files(hub_server).items():
        assert CLIENT_TOKEN.encode() not in content, name


def test_missing_repository_message_from_the_cli(
    hub_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _images(tmp_path)[0]

    code = main(["predict", "--model", f"{USER_NAME}/no-such-model", image, "--output", str(tmp_path / "out")])

    assert code == 2
    error = capsys.readouterr().err
    assert f"no model repository '{USER_NAME}/no-such-model'" in error and "Check the id" in error


def test_another_model_type_is_refused_by_name(
    hub_env: dict[str, str], hub_server: LocalHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cops_config = tiny_config()
    clip_config = CLIPConfig(
        text_config=cops_config.text_config.to_dict(),
        vision_config=cops_config.vision_config.to_dict(),
        projection_dim=cops_config.projection_dim,
    )
    CLIPModel(clip_config).push_to_hub(f"{USER_NAME}/tiny-clip")

    with pytest.raises(ValueError, match="holds a 'clip' model, not a CoPS anomaly detector"):
        CoPSForAnomalyDetection.from_pretrained(f"{USER_NAME}/tiny-clip")
    with pytest.raises(ValueError, match="holds a 'clip' model, not a CoPS anomaly detector"):
        pipeline("anomaly-detection", model=f"{USER_NAME}/tiny-clip")
    code = main(["predict", "--model", f"{USER_NAME}/tiny-clip", _images(tmp_path)[0], "--output", str(tmp_path)])
    assert code == 2 and "'clip' model" in capsys.readouterr().err

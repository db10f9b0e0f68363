"""`cops_hf.hub.save_detector`, the one way to write a detector folder: what it holds; all or nothing."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from cops_hf import CoPSForAnomalyDetection, CoPSProcessor
from cops_hf.cli import main
from cops_hf.file_utils import STAGING_PREFIX
from cops_hf.hub import save_detector

from .test_conversion import FIXTURE_NAMES, load_fixture, reference_weights
from .tiny_models import tiny_model

# Every file of a saved detector folder: weights and configuration, the processor (with CLIP's tokenizer: the
# processor tokenizes `text=`), and the code files transformers needs for trust_remote_code: the core modules and
# the layer-1 helpers they import (hub_errors: the model checks its source; image_utils, schema).
DETECTOR_FILES = [
    "config.json",
    "configuration_cops.py",
    "handler.py",  # the Inference Endpoints handler (cops_hf.hub.write_endpoint_handler)
    "hub_errors.py",  # modeling_cops imports check_model_source from it, so the remote code carries it
    "image_utils.py",
    "losses.py",
    "model.safetensors",
    "modeling_cops.py",
    "pipeline_anomaly_detection.py",
    "processing_cops.py",
    "processor_config.json",
    "schema.py",
    "tokenizer.json",
    "tokenizer_config.json",
]


def _relative_imports(source: Path) -> set[str]:
    """The sibling modules a code file imports relatively ("from .x import y"), anywhere in it."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level and node.module}


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_saved_detector_holds_exactly_its_files_and_self_contained_code(tmp_path: Path) -> None:
    model = tiny_model()
    folder = save_detector(model, None, tmp_path / "detector")

    assert sorted(path.name for path in folder.iterdir()) == DETECTOR_FILES
    for code in folder.glob("*.py"):
        assert _relative_imports(code) <= {path.stem for path in folder.glob("*.py")}, code.name
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))  # nothing left beside it
    loaded = CoPSForAnomalyDetection.from_pretrained(folder)
    assert CoPSProcessor.from_pretrained(folder).image_processor.size == model.config.image_size
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name  # saved as is: identical by construction


def test_an_existing_folder_is_refused_unless_overwrite_and_then_replaced_whole(tmp_path: Path) -> None:
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    folder = save_detector(first, None, tmp_path / "detector")
    (folder / "stale.txt").write_text("from an earlier save")

    with pytest.raises(FileExistsError, match=f"{folder} already holds files: choose a new folder, or replace it"):
        save_detector(second, None, folder)
    save_detector(second, None, folder, overwrite=True)

    assert sorted(path.name for path in folder.iterdir()) == DETECTOR_FILES  # the stale file went with the old folder
    loaded = CoPSForAnomalyDetection.from_pretrained(folder)
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in second.state_dict().items())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["detector"]


def test_a_failed_save_leaves_the_old_folder_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_detector(tiny_model(seed=0), None, tmp_path / "detector")
    before = _folder_bytes(folder)

    def full_disk(self, save_directory, **kwargs) -> None:
        (Path(save_directory) / "processor_config.json").write_text("{")  # half-written when the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CoPSProcessor, "save_pretrained", full_disk)
    with pytest.raises(OSError, match=f"could not write {folder} \\(No space left on device\\); the model folder"):
        save_detector(tiny_model(seed=1), None, folder, overwrite=True)

    assert _folder_bytes(folder) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["detector"]


def test_into_existing_keeps_the_other_files_of_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "train_log.jsonl").write_text('{"epoch": 1}\n')

    save_detector(tiny_model(), None, run, into_existing=True)

    assert sorted(path.name for path in run.iterdir()) == sorted([*DETECTOR_FILES, "checkpoints", "train_log.jsonl"])
    assert (run / "train_log.jsonl").read_text() == '{"epoch": 1}\n'


def test_convert_over_a_model_on_a_full_disk_leaves_the_old_model_loading(
    small_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meta, tensors = load_fixture(FIXTURE_NAMES[0])
    clip, cops = reference_weights(meta, tensors)
    torch.save(clip, tmp_path / "clip.pt")
    torch.save({"prompt_learner": cops}, tmp_path / "cops.pth")
    output = small_disk / "model"
    argv = ["convert", "--clip", str(tmp_path / "clip.pt"), "--output", str(output), "--image-size", "98"]
    assert main([*argv, "--checkpoint", str(tmp_path / "cops.pth")]) == 0
    before = _folder_bytes(output)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(bytes(free - 16_384))
    capsys.readouterr()

    assert main([*argv, "--overwrite"]) == 2  # fresh CoPS modules this time: other weights

    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"cops-hf convert: error: could not write {output} (")
    assert "No space left on device" in message and f"the model folder {output} is left as it was" in message
    assert _folder_bytes(output) == before
    assert sorted(path.name for path in small_disk.iterdir()) == ["filler", "model"]
    CoPSForAnomalyDetection.from_pretrained(output)  # still loads

"""Training against faults: folders of earlier runs, damaged checkpoints, resuming another run's checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest

from cops_hf.cli import main
from cops_hf.data import make_synthetic_dataset
from cops_hf.file_utils import STAGING_PREFIX
from cops_hf.testing_utils import random_clip_model
from cops_hf.training import (
    TrainingConfig,
    TrainingResult,
    cops_model_for_training,
    list_checkpoints,
    load_training_dataset,
    processor_for,
    train_cops,
)

IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), images_per_category=4, image_size=32)


def _train(root: Path, output_dir: Path, clip_seed: int = 0, image_size: int = IMAGE_SIZE, **settings: Any):
    settings = {"num_epochs": 2, "batch_size": 4, "progress_bar": False, "cache_vision_features": False, **settings}
    model = cops_model_for_training(random_clip_model("tiny", seed=clip_seed), image_size=image_size)
    dataset: datasets.Dataset = load_training_dataset(root)
    return train_cops(model, processor_for(model), dataset, TrainingConfig(output_dir=output_dir, **settings))


@pytest.fixture(scope="module")
def finished_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch run: checkpoints of epochs 1 and 2, the final model and the log."""
    output_dir = tmp_path_factory.mktemp("run") / "run"
    _train(data_root, output_dir)
    return output_dir


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_a_final_model_is_not_overwritten_without_asking(finished_run, data_root, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    weights = (run / "model.safetensors").read_bytes()
    argv = ["train", "--random-clip", "tiny", "--data", str(data_root), "--output", str(run), "--epochs", "1",
            "--image-size", str(IMAGE_SIZE), "--no-cache"]  # fmt: skip

    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cops-hf train: error: {run} holds the final model of an earlier run: pass overwrite=True (--overwrite) to "
        "replace it, or choose another output_dir."
    )
    assert (run / "model.safetensors").read_bytes() == weights
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 2
    assert main([*argv, "--overwrite"]) == 0
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 1


def test_interrupted_saves_are_cleaned_on_the_next_run(finished_run, data_root, tmp_path):
    run = _copy(finished_run, tmp_path)
    staging = run / f"{STAGING_PREFIX}run-abc123"  # save_detector's staging folder of the final model
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"\0" * 10)
    (run / "checkpoints" / ".epoch-0007.tmp").mkdir()

    result = _train(data_root, run, num_epochs=3, resume=True)

    assert result.resumed_from_epoch == 2
    assert not list(run.glob(f"{STAGING_PREFIX}*")) and not list((run / "checkpoints").glob(".epoch-*"))


@pytest.mark.parametrize(
    ("change", "difference"),
    [
        ({"clip_seed": 1}, "the CLIP weights"),
        ({"image_size": 84}, "image_size: was 56, now 84"),
        ({"data": "same-size"}, "the training data (image and mask paths, file sizes or labels)"),
    ],
    ids=["clip", "image-size", "data"],
)
def test_resuming_another_run_is_refused_naming_what_differs(finished_run, data_root, tmp_path, change, difference):
    run = _copy(finished_run, tmp_path)
    root = data_root
    if change.pop("data", None):  # another dataset of the same size: one image re-encoded
        root = Path(shutil.copytree(data_root, tmp_path / "other_data"))
        image = sorted(root.rglob("*.png"))[0]
        image.write_bytes(image.read_bytes() + b"\0")

    with pytest.raises(ValueError, match="Cannot resume from .*epoch-0002: the run's settings changed") as error:
        _train(root, run, num_epochs=3, resume=True, **change)
    assert difference in str(error.value)


@pytest.mark.parametrize("damage", ["trainer_state", "optimizer", "weights"])
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(finished_run, data_root, tmp_path, caplog, damage):
    run = _copy(finished_run, tmp_path)
    last = list_checkpoints(run)[-1]
    target = {"trainer_state": "trainer_state.json", "optimizer": "optimizer.bin", "weights": "model.safetensors"}
    (last / target[damage]).write_bytes(b"{ truncated")

    with caplog.at_level(logging.WARNING, logger="cops_hf.training"):
        result: TrainingResult = _train(data_root, run, num_epochs=3, resume=True)

    assert result.resumed_from_epoch == 1 and [record["epoch"] for record in result.history] == [2, 3]
    assert f"Checkpoint epoch-0002 is damaged ({last}" in caplog.text
    assert [json.loads(line)["epoch"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_no_intact_checkpoint_is_a_clear_error(finished_run, data_root, tmp_path):
    run = _copy(finished_run, tmp_path)
    for checkpoint in list_checkpoints(run):
        (checkpoint / "trainer_state.json").write_text("[]")
    with pytest.raises(ValueError, match=f"No intact checkpoint in {run / 'checkpoints'}"):
        _train(data_root, run, num_epochs=3, resume=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, so that a disk can really fill up; skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the disk-full test needs a small real disk")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_names_the_checkpoint_and_keeps_the_last_good_one(small_disk, data_root, capsys):
    run = small_disk / "run"
    argv = ["train", "--random-clip", "tiny", "--data", str(data_root), "--output", str(run), "--resume",
            "--image-size", str(IMAGE_SIZE), "--no-cache"]  # fmt: skip
    assert main([*argv, "--epochs", "1"]) == 0
    first = run / "checkpoints" / "epoch-0001"
    kept = {path.name: path.read_bytes() for path in first.iterdir()}
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(bytes(free - 16_384))
    capsys.readouterr()

    assert main([*argv, "--epochs", "2"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"cops-hf train: error: could not write {run / 'checkpoints' / 'epoch-0002'} (")
    assert "No space left on device" in message
    assert f"the last complete checkpoint {first} is kept: free disk space, then rerun with --resume" in message
    assert list_checkpoints(run) == [first]
    assert {path.name: path.read_bytes() for path in first.iterdir()} == kept
    assert not list((run / "checkpoints").glob(".epoch-*"))

    (small_disk / "filler").unlink()
    assert main([*argv, "--epochs", "2"]) == 0
    assert [checkpoint.name for checkpoint in list_checkpoints(run)][-1] == "epoch-0002"

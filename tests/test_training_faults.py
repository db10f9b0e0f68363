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
from cops_hf.file_utils import LOCK_FILENAME, STAGING_PREFIX
from cops_hf.testing_utils import random_clip_model
from cops_hf.training import (
    CoPSTrainer,
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


@pytest.mark.parametrize("fingerprint", [{"data": "x"}, "abc", {"data": 1, "clip": "y", "config": {}}])
def test_a_malformed_fingerprint_is_a_damaged_checkpoint(finished_run, data_root, tmp_path, caplog, fingerprint):
    run = _copy(finished_run, tmp_path)
    state_file = list_checkpoints(run)[-1] / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "fingerprint": fingerprint}))

    with caplog.at_level(logging.WARNING, logger="cops_hf.training"):
        result: TrainingResult = _train(data_root, run, num_epochs=3, resume=True)

    assert result.resumed_from_epoch == 1
    expected = f"{state_file} is malformed: its 'fingerprint' must be an object with 'data' and 'clip' strings"
    assert expected in caplog.text


def test_a_truncated_feature_cache_file_is_recomputed(data_root, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = _train(data_root, tmp_path / "first", num_epochs=1, cache_vision_features=True, cache_dir=cache)
    damaged = sorted(cache.glob("*.safetensors"))[0]
    damaged.write_bytes(damaged.read_bytes()[:-100])

    with caplog.at_level(logging.WARNING, logger="cops_hf.training"):
        second = _train(data_root, tmp_path / "second", num_epochs=1, cache_vision_features=True, cache_dir=cache)

    assert f"Feature cache file {damaged} is damaged (" in caplog.text and "rebuilding the cache" in caplog.text
    # Same data, seed and weights, the features recomputed the same way: the same epoch, up to float rounding.
    assert second.history[0]["loss"] == pytest.approx(first.history[0]["loss"], rel=1e-5)


@pytest.mark.parametrize("command", ["convert", "calibrate"])
def test_a_full_disk_while_saving_a_model_saves_nothing(small_disk, data_root, tmp_path, capsys, command):
    model_dir = tmp_path / "model"
    if command == "calibrate":
        model = cops_model_for_training(random_clip_model("tiny"), image_size=IMAGE_SIZE)
        model.save_pretrained(model_dir)
        processor_for(model).save_pretrained(model_dir)
        normal = sorted(data_root.rglob("*.png"))[0]
        argv = ["calibrate", "--model", str(model_dir), "--normal", str(normal)]
    else:
        clip = random_clip_model("tiny")
        clip.save_pretrained(model_dir)
        argv = ["convert", "--clip", str(model_dir), "--image-size", str(IMAGE_SIZE)]
    output = small_disk / "out"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(bytes(free - 16_384))
    capsys.readouterr()

    assert main([*argv, "--output", str(output)]) == 2

    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"cops-hf {command}: error: could not write {output} (")
    assert "No space left on device" in message or "os error 28" in message
    assert message.endswith("; nothing was saved") and not output.exists()


# ---------------------------------------------------------------- round two: no silent overwrite, no stale features


def test_resume_into_a_final_model_without_checkpoints_never_replaces_it(finished_run, data_root, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    weights = (run / "model.safetensors").read_bytes()
    argv = ["train", "--random-clip", "tiny", "--data", str(data_root), "--output", str(run), "--epochs", "1",
            "--image-size", str(IMAGE_SIZE), "--no-cache", "--resume"]  # fmt: skip

    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cops-hf train: error: {run} holds the final model of an earlier run and no checkpoint to resume from: pass "
        "overwrite=True (--overwrite) to replace it, or choose another output_dir."
    )
    assert (run / "model.safetensors").read_bytes() == weights
    assert main([*argv, "--overwrite"]) == 0
    assert (run / "model.safetensors").read_bytes() != weights


@pytest.mark.parametrize("torn", ['{"epoch": 3, "step": 6, "lo', "\0\0\0\0", '{"epoch": 3}{"epo'])
def test_a_torn_last_log_line_is_dropped_with_a_warning(finished_run, data_root, tmp_path, caplog, torn):
    run = _copy(finished_run, tmp_path)
    log = run / "train_log.jsonl"
    log.write_text(log.read_text() + torn)  # a crash or a full disk in the middle of an append

    with caplog.at_level(logging.WARNING, logger="cops_hf.training"):
        result = _train(data_root, run, num_epochs=3, resume=True)

    assert result.resumed_from_epoch == 2
    assert f"Dropping line 3 of {log}: it is not a complete log record" in caplog.text
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]


def _cached_epochs(run: Path) -> list[bool]:
    return [json.loads(line)["cached_features"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_the_feature_cache_sees_images_replaced_in_place(data_root, tmp_path, caplog):
    root = Path(shutil.copytree(data_root, tmp_path / "data"))
    cache = tmp_path / "features"
    _train(root, tmp_path / "first", cache_vision_features=True, cache_dir=cache)
    assert _cached_epochs(tmp_path / "first") == [False, True]
    _train(root, tmp_path / "same", cache_vision_features=True, cache_dir=cache)
    assert _cached_epochs(tmp_path / "same") == [True, True]  # nothing changed: the cache serves from epoch 1

    first, second = (Path(path) for path in load_training_dataset(root)["image_path"][:2])  # training images
    first.write_bytes(second.read_bytes())  # same path, other pixels
    with caplog.at_level(logging.WARNING, logger="cops_hf.training"):
        _train(root, tmp_path / "replaced", cache_vision_features=True, cache_dir=cache)
    assert _cached_epochs(tmp_path / "replaced") == [False, True]
    assert "was made for other image or mask files (paths, sizes or modification times)" in caplog.text
    assert "rebuilding the cache" in caplog.text

    caplog.clear()
    os.utime(second, ns=(second.stat().st_atime_ns, second.stat().st_mtime_ns + 10**9))  # touched: maybe rewritten
    with caplog.at_level(logging.WARNING, logger="cops_hf.training"):
        _train(root, tmp_path / "touched", cache_vision_features=True, cache_dir=cache)
    assert _cached_epochs(tmp_path / "touched") == [False, True] and "rebuilding the cache" in caplog.text


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(["sleep", "120"])
    yield process
    process.kill()
    process.wait()


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_pid(data_root, tmp_path, capsys, other_process):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILENAME).write_text(str(other_process.pid))  # a live run writing into this folder
    argv = ["train", "--random-clip", "tiny", "--data", str(data_root), "--output", str(run), "--epochs", "1",
            "--image-size", str(IMAGE_SIZE), "--no-cache"]  # fmt: skip

    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cops-hf train: error: {run} is being written by another cops-hf train (PID {other_process.pid}): wait for "
        f"it to end, or choose another output folder; if no such process runs, delete {run / LOCK_FILENAME}."
    )
    assert sorted(path.name for path in run.iterdir()) == [LOCK_FILENAME]
    assert main([*argv, "--resume"]) == 2 and main([*argv, "--overwrite"]) == 2


def test_a_running_run_holds_the_lock_and_a_dead_ones_lock_is_taken_over(
    data_root, tmp_path, caplog, monkeypatch, other_process
):
    run = tmp_path / "run"
    run.mkdir()
    other_process.kill()
    other_process.wait()
    (run / LOCK_FILENAME).write_text(str(other_process.pid))  # left by a run killed with -9
    holders = []
    save = CoPSTrainer._save_checkpoint
    monkeypatch.setattr(
        CoPSTrainer, "_save_checkpoint",
        lambda self, epoch: (holders.append((run / LOCK_FILENAME).read_text()), save(self, epoch))[1],
    )  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="cops_hf"):
        result = _train(data_root, run)

    assert len(result.history) == 2 and holders == [str(os.getpid())] * 2  # held while writing, by this process
    assert f"Taking over {run / LOCK_FILENAME}: the process that wrote it ({other_process.pid}) no longer runs" in (
        caplog.text
    )
    assert not (run / LOCK_FILENAME).exists()  # released at the end

    with pytest.raises(ValueError, match="holds checkpoints"):  # a refusal before locking leaves no lock either
        _train(data_root, run)
    assert not (run / LOCK_FILENAME).exists()

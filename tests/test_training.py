"""Tests of the training loop, feature cache, checkpoints and resume, the distributed run, and the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from safetensors.torch import load_file

from cops_hf import CoPSForAnomalyDetection, CoPSProcessor
from cops_hf.cli import SUBCOMMANDS, build_parser, main
from cops_hf.data import DataError, make_synthetic_dataset
from cops_hf.demo import run_demo
from cops_hf.training import (
    LOSS_TERMS,
    RANDOM_CLIP_CONFIGS,
    TRAIN_LOG_FILENAME,
    CoPSTrainer,
    TrainingConfig,
    TrainingResult,
    TrainingSamples,
    cops_model_for_training,
    cops_state_dict,
    epoch_batches,
    list_checkpoints,
    load_training_dataset,
    processor_for,
    random_clip_model,
    train_cops,
)

IMAGE_SIZE = 56  # 4 x 4 patches of the tiny CLIP
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training images (2 categories, half anomalous with masks) and 16 test images."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), images_per_category=8, image_size=64)


@pytest.fixture(scope="module")
def train_set(synthetic_root: Path) -> datasets.Dataset:
    return load_training_dataset(synthetic_root)


def tiny_model(**cops_fields: Any) -> CoPSForAnomalyDetection:
    return cops_model_for_training(random_clip_model("tiny", seed=0), image_size=IMAGE_SIZE, **cops_fields)


def train(dataset: datasets.Dataset, output_dir: Path, **settings: Any) -> TrainingResult:
    settings = {"num_epochs": 2, "batch_size": 4, "progress_bar": False, **settings}
    model = tiny_model()
    return train_cops(model, processor_for(model), dataset, TrainingConfig(output_dir=output_dir, **settings))


@pytest.fixture(scope="module")
def four_epoch_run(train_set: datasets.Dataset, tmp_path_factory: pytest.TempPathFactory) -> TrainingResult:
    """One default run of 4 epochs, every checkpoint kept, shared by the tests that need a trained model or the
    state after a given epoch (the first epochs of a longer run are those of a shorter one)."""
    return train(train_set, tmp_path_factory.mktemp("four_epochs"), num_epochs=4, keep_checkpoints=4)


@pytest.fixture(scope="module")
def uncached_run(train_set: datasets.Dataset, tmp_path_factory: pytest.TempPathFactory) -> TrainingResult:
    """A default 2-epoch run without the vision feature cache: every epoch computes the frozen tower's features
    in that epoch's own batches, so a resumed run sees exactly the batches an uninterrupted one does."""
    return train(train_set, tmp_path_factory.mktemp("uncached"), cache_vision_features=False, keep_checkpoints=2)


def weights_after_epoch(run: TrainingResult, epoch: int) -> dict[str, torch.Tensor]:
    """The CoPS weights a run had after `epoch`, from its checkpoint."""
    return load_file(str(run.output_dir / "checkpoints" / f"epoch-{epoch:04d}" / "model.safetensors"))


def max_weight_difference(
    first: CoPSForAnomalyDetection | dict[str, torch.Tensor], second: CoPSForAnomalyDetection | dict[str, torch.Tensor]
) -> float:
    first_state, second_state = (
        weights if isinstance(weights, dict) else cops_state_dict(weights) for weights in (first, second)
    )
    assert first_state.keys() == second_state.keys()
    return max((first_state[name] - second_state[name]).abs().max().item() for name in first_state)


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / TRAIN_LOG_FILENAME).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_saves_a_loadable_model(four_epoch_run: TrainingResult) -> None:
    clip_before = tiny_model().clip.state_dict()
    result, tmp_path = four_epoch_run, four_epoch_run.output_dir

    losses = [record["loss"] for record in result.history]
    assert losses[-1] < 0.75 * losses[0], losses
    log = read_log(tmp_path)
    assert log == result.history
    assert [record["epoch"] for record in log] == [1, 2, 3, 4]
    assert [record["step"] for record in log] == [4, 8, 12, 16]  # 16 images, batches of 4
    assert [record["cached_features"] for record in log] == [False, True, True, True]
    assert all(record["images"] == 16 and record["images_per_second"] > 0 for record in log)
    assert all(set(LOSS_TERMS) <= record.keys() for record in log)
    assert log[0]["seg"] > 0 and log[0]["gather"] > 0  # the masks reached the loss

    for name, tensor in result.model.clip.state_dict().items():
        # Exact: the frozen CLIP is never updated, so its weights stay bit copies.
        assert torch.equal(tensor, clip_before[name]), f"frozen CLIP weight {name} changed"
    loaded = CoPSForAnomalyDetection.from_pretrained(tmp_path)
    # Exact: weights are saved and read back, never computed.
    assert max_weight_difference(loaded, result.model) == 0.0
    assert CoPSProcessor.from_pretrained(tmp_path).image_processor.size == IMAGE_SIZE
    assert [path.name for path in list_checkpoints(tmp_path)] == [f"epoch-000{epoch}" for epoch in (1, 2, 3, 4)]
    checkpoint_weights = load_file(str(list_checkpoints(tmp_path)[-1] / "model.safetensors"))
    assert checkpoint_weights.keys() == cops_state_dict(result.model).keys()  # the frozen CLIP is left out


# Bound on weight differences between runs whose vision features went through different batch compositions: a
# CPU matmul over other rows may round by an ulp (seen: 7e-9 with 2 threads on AMD EPYC), never by 1e-6.
BATCHING_TOLERANCE = 1e-6


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(
    train_set: datasets.Dataset, uncached_run: TrainingResult, four_epoch_run: TrainingResult, tmp_path: Path
) -> None:
    interrupted = tmp_path / "interrupted"
    train(train_set, interrupted, num_epochs=1, cache_vision_features=False)
    # The kill came while epoch 2 was being logged and saved: a log line and a half-written temporary checkpoint.
    partial = interrupted / "checkpoints" / ".epoch-0002.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    with open(interrupted / TRAIN_LOG_FILENAME, "a") as log:
        log.write(json.dumps({"epoch": 2, "step": 99}) + "\n")

    resumed = train(train_set, interrupted, resume=True, keep_checkpoints=1, cache_vision_features=False)
    assert resumed.resumed_from_epoch == 1
    assert [record["epoch"] for record in resumed.history] == [2]
    # Exact by construction: without the feature cache both runs compute epoch 2's features in the same batches,
    # from the same weights and random generator states, in the same process: the resumed run is bit-identical.
    assert max_weight_difference(resumed.model, uncached_run.model) == 0.0
    assert resumed.history[0]["loss"] == uncached_run.history[1]["loss"]
    assert resumed.history[0]["step"] == uncached_run.history[1]["step"]
    # The cached default run's epoch 2 read features computed in epoch 1's batches: equal within rounding only.
    assert max_weight_difference(resumed.model, weights_after_epoch(four_epoch_run, 2)) <= BATCHING_TOLERANCE
    assert [record["epoch"] for record in read_log(interrupted)] == [1, 2]
    assert [path.name for path in list_checkpoints(interrupted)] == ["epoch-0002"]  # keep_checkpoints=1

    with pytest.raises(ValueError, match="batch_size: checkpoint 4, now 8"):
        train(train_set, interrupted, resume=True, num_epochs=3, batch_size=8)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        train(train_set, interrupted)
    (list_checkpoints(interrupted)[-1] / "random_states_0.pkl").unlink()
    with pytest.raises(ValueError, match="random_states_0.pkl is missing"):
        train(train_set, interrupted, resume=True, num_epochs=3)


def test_resume_without_a_checkpoint_starts_fresh(
    train_set: datasets.Dataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cops_hf.training"):
        result = train(train_set, tmp_path, num_epochs=1, resume=True)
    assert result.resumed_from_epoch == 0 and len(result.history) == 1
    assert "starting a fresh run" in caplog.text


def test_cached_and_uncached_paths_give_the_same_losses(
    train_set: datasets.Dataset, four_epoch_run: TrainingResult, uncached_run: TrainingResult, tmp_path: Path
) -> None:
    in_memory_history = four_epoch_run.history[:2]  # the in-memory cache is the default
    uncached = uncached_run
    on_disk = train(train_set, tmp_path / "disk", cache_dir=tmp_path / "cache")
    reused = train(train_set, tmp_path / "reused", cache_dir=tmp_path / "cache")

    assert [record["cached_features"] for record in in_memory_history] == [False, True]
    assert [record["cached_features"] for record in uncached.history] == [False, False]
    assert [record["cached_features"] for record in reused.history] == [True, True]  # the disk cache outlives its run
    assert sorted(path.suffix for path in (tmp_path / "cache").iterdir()) == [".json"] + [".safetensors"] * 4
    for other in (uncached, on_disk, reused):
        for expected, record in zip(in_memory_history, other.history, strict=True):
            for name in ("loss", *LOSS_TERMS):
                assert record[name] == pytest.approx(expected[name], abs=BATCHING_TOLERANCE), name
        assert max_weight_difference(other.model, weights_after_epoch(four_epoch_run, 2)) <= BATCHING_TOLERANCE


def test_gradient_accumulation_steps_once_per_group(train_set: datasets.Dataset, tmp_path: Path) -> None:
    result = train(train_set, tmp_path, num_epochs=1, gradient_accumulation_steps=3)
    assert result.history[0]["step"] == 2  # 4 batches: a group of 3 and a last group of 1
    assert max_weight_difference(result.model, tiny_model()) > 0


def test_epoch_batches_are_deterministic_sharded_and_reshuffled() -> None:
    first = epoch_batches(10, 4, seed=0, epoch=1)
    assert first == epoch_batches(10, 4, seed=0, epoch=1)
    assert [len(batch) for batch in first] == [4, 4, 2]
    assert sorted(sum(first, [])) == list(range(10))
    assert first != epoch_batches(10, 4, seed=0, epoch=2)
    assert first != epoch_batches(10, 4, seed=1, epoch=1)

    shards = [set(sum(epoch_batches(9, 2, 0, epoch, process, 2), [])) for epoch in (1, 2) for process in (0, 1)]
    assert shards[0] == shards[2] and shards[1] == shards[3]  # fixed per process, so its cache stays valid
    assert shards[0] | shards[1] == set(range(9))
    assert [len(epoch_batches(9, 2, 0, 1, process, 2)) for process in (0, 1)] == [3, 3]  # padded to equal steps


# ---------------------------------------------------------------------------------------------- data checks


def test_a_split_without_anomalous_or_normal_samples_is_refused(train_set: datasets.Dataset) -> None:
    image_processor = processor_for(tiny_model()).image_processor
    normal_only = train_set.filter(lambda label: label == 0, input_columns="gt_label")
    with pytest.raises(ValueError, match="no anomalous sample"):
        TrainingSamples(normal_only, image_processor)
    anomalous_only = train_set.filter(lambda label: label == 1, input_columns="gt_label")
    with pytest.raises(ValueError, match="no normal sample"):
        TrainingSamples(anomalous_only, image_processor)
    with pytest.raises(ValueError, match=r"lacks the columns \['mask'\]"):
        TrainingSamples(train_set.remove_columns("mask"), image_processor)
    with pytest.raises(ValueError, match="empty"):
        TrainingSamples(train_set.select([]), image_processor)


def test_an_anomalous_image_without_mask_gets_a_zero_mask_and_a_warning(
    train_set: datasets.Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    first_anomalous = list(train_set["gt_label"]).index(1)

    def drop_mask(row: dict[str, Any], index: int) -> dict[str, Any]:
        return {"mask": None, "mask_path": ""} if index == first_anomalous else row

    partly_masked = train_set.map(drop_mask, with_indices=True)
    with caplog.at_level(logging.WARNING, logger="cops_hf.training"):
        samples = TrainingSamples(partly_masked, processor_for(tiny_model()).image_processor)
    assert "1 of 8 anomalous training images have no mask" in caplog.text
    assert samples[first_anomalous]["label"] == 1
    assert samples[first_anomalous]["mask"].sum() == 0
    assert samples[first_anomalous + 1]["mask"].sum() > 0


def test_image_level_data_trains_the_image_loss_only(train_set: datasets.Dataset, tmp_path: Path) -> None:
    image_level = train_set.map(lambda row: {"mask": None, "mask_path": ""})
    result = train(image_level, tmp_path, num_epochs=1)
    record = result.history[0]
    # Exact: without masks the pixel terms are not computed; they are logged as 0.0.
    assert record["seg"] == record["gather"] == record["scatter"] == 0.0
    assert record["cls"] > 0


def test_configuration_errors_are_clear(train_set: datasets.Dataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TrainingConfig(output_dir=tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        TrainingConfig(output_dir=tmp_path, mixed_precision="fp8")
    with pytest.raises(ValueError, match="cache_dir is set"):
        TrainingConfig(output_dir=tmp_path, cache_vision_features=False, cache_dir=tmp_path)
    model = tiny_model()
    with pytest.raises(ValueError, match="processor resizes to 518 px but the model expects 56 px"):
        CoPSTrainer(model, CoPSProcessor(), train_set, TrainingConfig(output_dir=tmp_path))
    with pytest.raises(DataError, match="build_"):
        load_training_dataset(tmp_path)
    with pytest.raises(ValueError, match="Unknown training dataset preset 'imagenet'"):
        cops_model_for_training(random_clip_model("tiny"), preset="imagenet")


def test_random_clip_from_preset_dict_or_json(tmp_path: Path) -> None:
    config_file = tmp_path / "clip.json"
    config_file.write_text(json.dumps(RANDOM_CLIP_CONFIGS["tiny"]))
    from_preset, from_file = random_clip_model("tiny", seed=3), random_clip_model(config_file, seed=3)
    assert from_preset.config.vision_config.hidden_size == 64
    # Exact: the same seeded initialisation of the same shapes.
    assert all(torch.equal(a, b) for a, b in zip(from_preset.parameters(), from_file.parameters(), strict=True))
    with pytest.raises(ValueError, match="neither a preset"):
        random_clip_model("huge")
    model = cops_model_for_training(from_preset, preset="visa", image_size=70)
    assert (model.config.image_size, model.config.use_recon_loss, model.config.deep_prompt_depth) == (70, False, 3)


# ---------------------------------------------------------------------------------------------- distributed


def test_torchrun_two_cpu_processes_end_with_identical_weights(synthetic_root: Path, tmp_path: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPOSITORY / "tests" / "distributed_training_job.py"), str(synthetic_root), str(tmp_path),
    ]  # fmt: skip
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "distributed_type=MULTI_CPU num_processes=2" in completed.stdout

    first, second = (load_file(str(tmp_path / f"weights-process{index}.safetensors")) for index in (0, 1))
    assert first.keys() == second.keys()
    # Exact: DDP all-reduces gradients, so both processes apply identical updates.
    assert all(torch.equal(first[name], second[name]) for name in first)
    log = read_log(tmp_path)
    assert [record["step"] for record in log] == [2, 4, 6]  # 16 images in global batches of 2 x 4
    assert all(record["images"] == 16 for record in log)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]


# ---------------------------------------------------------------------------------------------- CLI and demo


def test_cli_train_then_resume(synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    arguments = ["train", "--random-clip", "tiny", "--data", str(synthetic_root), "--output", str(tmp_path)]
    arguments += ["--image-size", str(IMAGE_SIZE), "--batch-size", "8", "--preset", "mvtec"]
    assert main([*arguments, "--epochs", "1"]) == 0
    assert main([*arguments, "--epochs", "2", "--resume", "--no-cache"]) == 0
    assert [record["epoch"] for record in read_log(tmp_path)] == [1, 2]
    assert "Saved the trained model and processor" in capsys.readouterr().out
    model = CoPSForAnomalyDetection.from_pretrained(tmp_path)
    assert (model.config.train_kernel_size, model.config.image_size) == (3, IMAGE_SIZE)


def test_cli_train_and_demo_are_registered() -> None:
    parser = build_parser()
    assert {"train", "demo"} <= {name for name, *_ in SUBCOMMANDS}
    demo = parser.parse_args(["demo", "--epochs", "3"])
    assert (demo.command, demo.epochs, demo.output) == ("demo", 3, "cops-demo")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "x", "--output", "y"])  # a CLIP is required


def test_demo_trains_and_scores_unseen_images(tmp_path: Path) -> None:
    result = run_demo(tmp_path, num_epochs=2, images_per_category=6, image_size=IMAGE_SIZE, progress_bar=False)
    losses = [record["loss"] for record in result.training.history]
    assert losses[-1] < losses[0]
    assert [row["gt_label"] for row in result.test_scores] == [0, 1, 0, 1, 0, 1]
    assert all(0.0 <= row["score"] <= 1.0 for row in result.test_scores)
    assert {row["cls_name"] for row in result.test_scores} <= {"checker", "ring"}

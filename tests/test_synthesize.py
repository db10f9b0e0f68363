"""Normal-only adaptation (`cops-hf train --synthesize`): synthetic defects on a user's own normal images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cops_hf import CoPSForAnomalyDetection, CoPSProcessor
from cops_hf.cli import main
from cops_hf.data import (
    DEFECT_TYPES,
    DataError,
    apply_defect,
    load_meta_dataset,
    make_record,
    normal_split,
    render_synthetic_sample,
    write_meta_json,
)
from cops_hf.evaluation import pixel_auroc
from cops_hf.training import (
    TRAIN_LOG_FILENAME,
    TrainingConfig,
    TrainingSamples,
    cops_model_for_training,
    load_training_dataset,
    processor_for,
    random_clip_model,
    train_cops,
)
from cops_hf.training.data import synthetic_defect

IMAGE_SIZE = 56  # 4 x 4 patches of the tiny CLIP
NUM_NORMALS = 8


@pytest.fixture(scope="module")
def normal_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder of good parts only (procedural discs), prepared with `cops-hf data prepare folder`."""
    root = tmp_path_factory.mktemp("good_parts")
    (root / "good").mkdir()
    for index in range(NUM_NORMALS):
        Image.fromarray(render_synthetic_sample("disc", index, image_size=64).image).save(
            root / "good" / f"{index}.png"
        )
    assert main(["data", "prepare", "folder", str(root), "--normal", "good"]) == 0
    return root


def tiny_model() -> CoPSForAnomalyDetection:
    return cops_model_for_training(random_clip_model("tiny", seed=0), image_size=IMAGE_SIZE)


def photo_like(height: int = 40, width: int = 52) -> np.ndarray:
    """A smooth colour gradient with noise: not one of the procedural categories."""
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack([rows * 255 / height, cols * 255 / width, (rows + cols) * 127 / (height + width)], axis=-1)
    return np.clip(base + np.random.default_rng(0).normal(0, 5, base.shape), 0, 255).astype(np.uint8)


def test_the_package_defects_apply_to_any_image_with_an_exact_mask() -> None:
    image = photo_like()
    original = image.copy()
    for defect in DEFECT_TYPES:
        sample = apply_defect(image, defect, np.random.default_rng(3))
        assert sample is not None and sample.defect_type == defect
        assert np.array_equal(sample.mask, np.any(sample.image != image, axis=-1))  # exact by construction
        assert sample.mask.sum() >= 8 and np.array_equal(image, original)
    # A flat black image: a re-lit cut-paste changes nothing, so no sample; synthetic_defect falls back to another.
    black = np.zeros((32, 32, 3), np.uint8)
    assert apply_defect(black, "cutpaste", np.random.default_rng(0)) is None
    defective, mask = synthetic_defect(Image.fromarray(black), seed=0, epoch=1, index=0)
    assert mask.any() and np.array_equal(mask, np.any(np.asarray(defective) != 0, axis=-1))
    with pytest.raises(ValueError, match="16\\+ pixels"):
        apply_defect(np.zeros((8, 8, 3), np.uint8), "blob", np.random.default_rng(0))


def test_synthetic_samples_are_seeded_by_seed_epoch_and_index(normal_folder: Path) -> None:
    dataset = load_training_dataset(normal_folder, synthesize=True)
    processor = processor_for(tiny_model()).image_processor
    samples = TrainingSamples(dataset, processor, synthesize=True, seed=0)
    assert (len(samples), samples.num_real, samples.num_synthetic) == (16, 8, 8)
    assert samples.labels == [0] * 8 + [1] * 8 and samples.uses_masks

    def pixels(seed: int, epoch: int, index: int) -> torch.Tensor:
        other = TrainingSamples(dataset, processor, synthesize=True, seed=seed)
        other.set_epoch(epoch)
        return other[index]["pixel_values"]

    # The same (seed, epoch, index) runs the same code on the same bytes: identical.
    assert torch.equal(pixels(0, 1, 9), pixels(0, 1, 9))
    assert not torch.equal(pixels(0, 1, 9), pixels(0, 2, 9))
    assert not torch.equal(pixels(0, 1, 9), pixels(1, 1, 9))
    assert not torch.equal(pixels(0, 1, 9), pixels(0, 1, 10))
    assert torch.equal(pixels(0, 1, 3), pixels(5, 7, 3))  # real images do not change
    samples.set_epoch(1)
    item = samples[9]
    assert item["label"] == 1 and item["mask"].sum() > 0
    assert samples[1]["label"] == 0 and samples[1]["mask"].sum() == 0


def test_no_normal_image_is_refused_in_one_line(normal_folder: Path, tmp_path: Path) -> None:
    records = []
    for index in range(2):
        shutil.copy(normal_folder / "good" / f"{index}.png", tmp_path / f"{index}.png")
        records.append(make_record(f"{index}.png", cls_name="parts", anomaly=1, specie_name="dent"))
    write_meta_json(tmp_path, {"train": {}, "test": {"parts": records}})
    with pytest.raises(
        DataError, match=r"\(train: 0 normal, 0 anomalous, test: 0 normal, 2 anomalous\): --synthesize"
    ):
        normal_split(tmp_path)
    with pytest.raises(ValueError, match="no normal image .* --synthesize puts defects on normal images"):
        TrainingSamples(load_meta_dataset(tmp_path), processor_for(tiny_model()).image_processor, synthesize=True)


def synthetic_test_set(folder: Path) -> tuple[list[Image.Image], list[np.ndarray]]:
    """The normals and held-out synthetic copies (an epoch no run reaches), with their masks."""
    normals = [Image.open(folder / "good" / f"{index}.png").convert("RGB") for index in range(NUM_NORMALS)]
    copies = [synthetic_defect(image, 0, 1000, NUM_NORMALS + index) for index, image in enumerate(normals)]
    masks = [np.zeros((64, 64), bool)] * NUM_NORMALS + [mask for _, mask in copies]
    return normals + [image for image, _ in copies], masks


def pixel_auroc_of(model: CoPSForAnomalyDetection, images: list, masks: list) -> float:
    features = CoPSProcessor.for_image_size(IMAGE_SIZE)(images=images, masks=masks)
    with torch.no_grad():
        outputs = model.eval()(
            pixel_values=features["pixel_values"], vae_noise=model.seeded_prior_noise(len(images), 0)
        )
    return pixel_auroc(outputs.anomaly_maps.numpy(), features["masks"].numpy())


def test_synthesize_trains_from_a_normal_only_folder(normal_folder: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "run"
    arguments = ["train", "--random-clip", "tiny", "--data", str(normal_folder), "--synthesize", "--image-size"]
    assert main([*arguments, str(IMAGE_SIZE), "--epochs", "10", "--batch-size", "4", "--output", str(output)]) == 0
    assert "8 normal and 0 anomalous images, plus 8 synthetic anomalous copies per epoch" in capsys.readouterr().out

    log = [json.loads(line) for line in (output / TRAIN_LOG_FILENAME).read_text().splitlines()]
    assert {(record["real_images"], record["synthetic_images"]) for record in log} == {(8, 8)}
    trained = CoPSForAnomalyDetection.from_pretrained(output)
    assert (trained.config.train_real_images, trained.config.train_synthetic_images) == (8, 8)
    # Held-out defects: the trained maps rank defect pixels well above normal ones, far better than at the start
    # (measured: 0.54 untrained, 0.71 after 10 epochs).
    images, masks = synthetic_test_set(normal_folder)
    untrained, adapted = pixel_auroc_of(tiny_model(), images, masks), pixel_auroc_of(trained, images, masks)
    assert adapted >= 0.65 and adapted >= untrained + 0.1, (untrained, adapted)


def test_cache_serves_real_features_only_and_resume_is_exact(normal_folder: Path, tmp_path: Path) -> None:
    dataset = load_training_dataset(normal_folder, synthesize=True)

    def run(output: str, epochs: int, **settings) -> object:
        model = tiny_model()
        config = TrainingConfig(
            output_dir=tmp_path / output, num_epochs=epochs, batch_size=4, progress_bar=False, synthesize=True,
            **settings,
        )  # fmt: skip
        return train_cops(model, processor_for(model), dataset, config)

    cached = run("cached", 2)
    uncached = run("uncached", 2, cache_vision_features=False)
    assert [record["cached_features"] for record in cached.history] == [False, True]
    # Epoch 2 reads the real images' features from the cache and recomputes the new synthetic ones: the losses
    # match the uncached run up to float rounding (batch order differs); stale synthetic features would not.
    for expected, record in zip(uncached.history, cached.history, strict=True):
        assert record["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    run("resumed", 1, cache_vision_features=False)
    resumed = run("resumed", 2, cache_vision_features=False, resume=True)
    assert resumed.resumed_from_epoch == 1
    # Same code path, same batches, same synthetic images from (seed, epoch, index): bit-identical.
    assert resumed.history[0]["loss"] == uncached.history[1]["loss"]
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, uncached.model.state_dict()[name]), name

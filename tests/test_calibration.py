"""Threshold calibration: quantiles of normal images, F1-optimal thresholds, and the one decision rule (`>=`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cops_hf import CoPSAnomalyDetectionOutput, CoPSImageProcessor, CoPSProcessor
from cops_hf.data import load_meta_dataset, make_synthetic_dataset
from cops_hf.evaluation.calibration import calibrate_thresholds
from cops_hf.evaluation.inference import predict_images

from .tiny_models import tiny_model


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[int], list[str | None]]:
    """A small synthetic test split: image paths, labels and masks (None where an image has none)."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"),
        train_categories=["stripes"],
        test_categories=["checker", "ring"],
        images_per_category=5,
        image_size=64,
    )
    dataset = load_meta_dataset(root, split="test")
    return dataset["image_path"], dataset["gt_label"], [path or None for path in dataset["mask_path"]]


@pytest.fixture
def model_and_processor():
    return tiny_model(), CoPSProcessor(CoPSImageProcessor(size=98))


def f1(predicted: np.ndarray, labels: np.ndarray) -> float:
    return 2 * (predicted & (labels == 1)).sum() / (predicted.sum() + labels.sum())


def test_calibration_from_normal_images_is_a_quantile(model_and_processor) -> None:
    model, processor = model_and_processor
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    thresholds = calibrate_thresholds(model, processor, images, quantile=0.5, batch_size=4)
    assert thresholds.method == "quantile"
    scores = [prediction.pred_score for prediction in predict_images(model, processor, images, batch_size=4)]
    assert thresholds.image_threshold == pytest.approx(float(np.median(scores)), abs=1e-6)
    assert model.config.image_threshold == thresholds.image_threshold
    assert model.config.pixel_threshold == thresholds.pixel_threshold


def test_calibration_from_labels_is_f1_optimal(model_and_processor, labelled) -> None:
    model, processor = model_and_processor
    images, labels, masks = labelled
    thresholds = calibrate_thresholds(model, processor, images, labels, masks)
    assert thresholds.method == "f1"
    # The scores calibration saw: the same scoring loop and batching, so the same floats on any CPU.
    scores = np.asarray([prediction.pred_score for prediction in predict_images(model, processor, images)])
    labels = np.asarray(labels)
    best = max(f1(scores >= threshold, labels) for threshold in scores)
    assert f1(scores >= thresholds.image_threshold, labels) == pytest.approx(best)
    assert thresholds.image_threshold in scores  # an attained score, so the decision rule must be `>=`
    with pytest.raises(ValueError, match="labelled anomalous"):
        calibrate_thresholds(model, processor, images[:2], [1, 1])


def test_thresholds_do_not_depend_on_the_batch_size(model_and_processor, labelled) -> None:
    model, processor = model_and_processor
    images, labels, masks = labelled
    normal = [image for image, label in zip(images, labels, strict=True) if label == 0]
    for calibration_set in ((normal, None, None), (images, labels, masks)):
        by_eight, by_three = (
            calibrate_thresholds(model, processor, *calibration_set, batch_size=size, update_config=False)
            for size in (8, 3)
        )
        # Scores may differ across batchings by float rounding only; the sampled pixels are the same.
        assert by_three.image_threshold == pytest.approx(by_eight.image_threshold, abs=1e-5)
        assert by_three.pixel_threshold == pytest.approx(by_eight.pixel_threshold, abs=1e-5)


def test_values_at_the_threshold_are_anomalous() -> None:
    processor = CoPSProcessor(CoPSImageProcessor(size=28))
    outputs = CoPSAnomalyDetectionOutput(
        image_scores=torch.tensor([0.5, 0.25]), anomaly_maps=torch.tensor([0.5, 0.25]).view(2, 1, 1).expand(2, 4, 4)
    )
    results = processor.post_process_anomaly_detection(outputs, threshold=0.5, image_threshold=0.5)
    assert [result["label"] for result in results] == ["anomalous", "normal"]
    assert results[0]["mask"].all() and not results[1]["mask"].any()

"""Decision thresholds for deployment: calibrated on normal images (a quantile) or a labelled set (F1-optimal).

The thresholds are stored in the model config (`image_threshold`, `pixel_threshold`), saved with the model, and
used by the pipeline and the CLI to emit labels and masks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data import load_meta_dataset
from ..image_utils import ImageLike, expand_image_sources
from ..modeling_cops import CoPSForAnomalyDetection
from ..processing_cops import CoPSProcessor
from ..schema import GT_LABEL, IMAGE_PATH
from .inference import predict_images
from .metrics import f1_max_threshold

# Pixels drawn per image for pixel quantiles and F1 search, keeping calibration memory bounded.
PIXELS_PER_IMAGE = 4096


@dataclass
class Thresholds:
    """Calibrated thresholds and how they were obtained (`method`: "quantile" or "f1")."""

    image_threshold: float
    pixel_threshold: float | None
    method: str


def _score_images(
    model: CoPSForAnomalyDetection,
    processor: CoPSProcessor,
    images: Sequence[ImageLike],
    masks: Sequence[ImageLike | None] | None,
    batch_size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scores `[N]`, sampled map pixels `[N, K]` and the matching mask pixels `[N, K]` (or None).

    Image i's pixels are drawn by a generator seeded with `(seed, i)`, so the sample does not depend on the batching.
    """
    scores, map_pixels, mask_pixels = [], [], []
    for prediction in predict_images(model, processor, images, masks, batch_size=batch_size, seed=seed):
        anomaly_map = prediction.anomaly_map.ravel()
        sampler = np.random.default_rng([seed, prediction.index])
        picks = sampler.choice(anomaly_map.size, size=min(PIXELS_PER_IMAGE, anomaly_map.size), replace=False)
        scores.append(prediction.pred_score)
        map_pixels.append(anomaly_map[picks])
        if prediction.gt_mask is not None:
            mask_pixels.append(prediction.gt_mask.ravel()[picks])
    return np.asarray(scores), np.stack(map_pixels), np.stack(mask_pixels) if mask_pixels else None


def calibrate_thresholds(
    model: CoPSForAnomalyDetection,
    processor: CoPSProcessor,
    images: Sequence[ImageLike],
    labels: Sequence[int] | None = None,
    masks: Sequence[ImageLike | None] | None = None,
    *,
    quantile: float = 0.99,
    batch_size: int = 8,
    seed: int = 0,
    update_config: bool = True,
) -> Thresholds:
    """Calibrate thresholds and (by default) store them in `model.config`.

    Args:
        images: calibration images. Without `labels` they must all be normal: the thresholds are the `quantile`
            of their scores and of their map pixels (a false-positive budget of 1 - quantile).
        labels: 1 = anomalous. Given (with both classes), the image threshold maximizes F1; the pixel threshold
            maximizes pixel F1 when `masks` are given, else it is the quantile over the normal images' pixels.
        masks: ground-truth masks aligned with `images`, read by `load_mask`. A None entry is an all-zero mask
            for a normal image; an anomalous image with None counts at image level only.
        seed: class-token noise seed, the same the pipeline uses by default (0).
    """
    if not images:
        raise ValueError("Calibration needs at least one image.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}.")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"Got {len(labels)} labels for {len(images)} images.")
    scores, map_pixels, mask_pixels = _score_images(model, processor, images, masks, batch_size, seed)
    label_array = np.asarray(labels, dtype=int) if labels is not None else np.zeros(len(scores), dtype=int)
    if label_array.min() == label_array.max():
        if label_array[0] == 1:
            raise ValueError("All calibration images are labelled anomalous; add normal images.")
        thresholds = Thresholds(
            image_threshold=float(np.quantile(scores, quantile)),
            pixel_threshold=float(np.quantile(map_pixels, quantile)),
            method="quantile",
        )
    else:
        _, image_threshold = f1_max_threshold(scores, label_array)
        # An anomalous image without a mask counts at image level only (docs/protocol.md, mask rules).
        with_mask = (label_array == 0) | np.asarray([mask is not None for mask in masks]) if masks else None
        if mask_pixels is not None and mask_pixels[with_mask].any():
            _, pixel_threshold = f1_max_threshold(
                map_pixels[with_mask].ravel(), mask_pixels[with_mask].ravel().astype(int)
            )
        else:
            pixel_threshold = float(np.quantile(map_pixels[label_array == 0], quantile))
        thresholds = Thresholds(float(image_threshold), float(pixel_threshold), method="f1")
    if update_config:
        model.config.image_threshold = thresholds.image_threshold
        model.config.pixel_threshold = thresholds.pixel_threshold
    return thresholds


@dataclass(frozen=True)
class CalibrationSet:
    """What to calibrate on (see `calibration_set`): images, and for a labelled set their labels and masks."""

    images: list[str]
    labels: list[int] | None = None
    masks: list[str | None] | None = None


def calibration_set(
    *,
    normal: Sequence[str | os.PathLike[str]] | None = None,
    data: str | os.PathLike[str] | None = None,
    split: str = "test",
) -> CalibrationSet:
    """The images to calibrate on: normal images (quantile thresholds) or a labelled dataset (F1-optimal ones).

    Args:
        normal: image files, folders (searched recursively) or glob patterns, all of normal images.
        data: a dataset root holding meta.json, with labels and masks.
        split: the split of `data` to calibrate on.

    Raises:
        ValueError: both or neither of `normal` and `data` given, or a source without images.
    """
    if (normal is None) == (data is None):
        raise ValueError("calibrate on normal images or on a labelled dataset: give one of normal= and data=")
    if data is None:
        return CalibrationSet(expand_image_sources(normal))
    dataset = load_meta_dataset(data, split=split)
    masks = [path or None for path in dataset["mask_path"]]
    return CalibrationSet(list(dataset[IMAGE_PATH]), [int(label) for label in dataset[GT_LABEL]], masks)


def calibrate_on(
    model: CoPSForAnomalyDetection, processor: CoPSProcessor, source: CalibrationSet, **options: object
) -> Thresholds:
    """`calibrate_thresholds` on a `CalibrationSet` (`options`: `quantile`, `batch_size`, `seed`, `update_config`)."""
    return calibrate_thresholds(model, processor, source.images, source.labels, source.masks, **options)


__all__ = ["CalibrationSet", "Thresholds", "calibrate_on", "calibrate_thresholds", "calibration_set"]

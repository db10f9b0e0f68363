"""Metrics of zero-shot anomaly detection (ZSAD).

Image level: AUROC, average precision (AP) and the maximal F1 score over all thresholds, computed from one
anomaly score and one binary label per image.

Pixel level: the same three metrics over all pixels of a category pooled together, plus AUPRO, the area under
the per-region-overlap curve up to a false positive rate of 0.3 (Bergmann et al., "The MVTec Anomaly Detection
Dataset", IJCV 2021).

All metrics are exact, ties included: AUROC equals `sklearn.metrics.roc_auc_score` and AP equals
`sklearn.metrics.average_precision_score`. They are computed without sorting or copying the whole input:
the distinct scores of the anomalous samples define the thresholds at which the curves change, and the normal
samples are counted against those thresholds chunk by chunk (each chunk sorted on its own). A category of VisA
at 518x518 (about 1e8 pixels) therefore needs little more memory than its maps and masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.ndimage
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[float] | Sequence[int] | Sequence[bool]

DEFAULT_CHUNK_SIZE = 1 << 22
"""Number of pixels counted at once: bounds the temporary memory of the pixel-level metrics."""

EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)
"""Structuring element that joins pixels touching by an edge or a corner into one anomalous region."""

ScoreTransform = Callable[[np.ndarray], np.ndarray]


def to_numpy(values: ArrayLike) -> np.ndarray:
    """Converts a tensor (any device, any floating dtype) or an array-like to a numpy array.

    Nothing is copied when that can be avoided.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.is_floating_point() and values.dtype not in (torch.float32, torch.float64):
            values = values.float()
        return values.numpy()
    return np.asarray(values)


def _as_scores(values: ArrayLike) -> np.ndarray:
    scores = to_numpy(values)
    if scores.dtype == np.float16:
        return scores.astype(np.float32)
    if not np.issubdtype(scores.dtype, np.floating):
        return scores.astype(np.float64)
    return scores


def as_binary(values: ArrayLike, name: str = "labels") -> np.ndarray:
    """Converts binary labels or masks (bool, or numbers that are all 0 or 1) to a boolean array.

    Raises:
        ValueError: if a value is neither 0 nor 1.
    """
    array = to_numpy(values)
    if array.dtype == np.bool_:
        return array
    if not np.logical_or(array == 0, array == 1).all():
        raise ValueError(f"{name} must be binary (0/1 or bool); found values other than 0 and 1")
    return array == 1


def _check_no_nan(scores: np.ndarray) -> None:
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")


@dataclass(frozen=True)
class _ThresholdCounts:
    """How the normal and anomalous samples fall around each distinct anomalous score.

    ``thresholds`` are the distinct scores of anomalous samples in descending order. At threshold ``k`` (predict
    "anomalous" when score >= thresholds[k]) the ROC and PR curves change; between thresholds only the number of
    false positives grows.

    Attributes:
        thresholds: distinct anomalous scores, descending, shape [K].
        positive_weight: summed weight of the anomalous samples scored exactly thresholds[k] (their count when
            unweighted), shape [K].
        negatives_tied: normal samples scored exactly thresholds[k], shape [K].
        negatives_above: normal samples scored strictly between thresholds[k] and thresholds[k - 1] (above
            thresholds[0] for k = 0), shape [K].
        negatives_below: normal samples scored below the smallest threshold.
    """

    thresholds: np.ndarray
    positive_weight: np.ndarray
    negatives_tied: np.ndarray
    negatives_above: np.ndarray
    negatives_below: int

    @property
    def total_positive_weight(self) -> float:
        return float(self.positive_weight.sum())

    @property
    def true_positives(self) -> np.ndarray:
        """(Weighted) anomalous samples at or above each threshold."""
        return np.cumsum(self.positive_weight)

    @property
    def false_positives(self) -> np.ndarray:
        """Normal samples at or above each threshold."""
        return np.cumsum(self.negatives_above + self.negatives_tied)

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Vertices of the ROC curve from (0, 0) to (1, 1), as (false positive rate, true positive rate).

        Each threshold contributes two vertices: a horizontal step for the normal samples strictly above it, then
        a (diagonal when tied) step for the samples exactly at it, exactly as sklearn's ``roc_curve`` links its
        points.
        """
        num_thresholds = len(self.thresholds)
        false_positive_steps = np.zeros(2 * num_thresholds + 1, dtype=np.float64)
        false_positive_steps[0:-1:2] = self.negatives_above
        false_positive_steps[1:-1:2] = self.negatives_tied
        false_positive_steps[-1] = self.negatives_below
        true_positive_steps = np.zeros(2 * num_thresholds + 1, dtype=np.float64)
        true_positive_steps[1:-1:2] = self.positive_weight
        false_positives = np.concatenate([[0.0], np.cumsum(false_positive_steps)])
        true_positives = np.concatenate([[0.0], np.cumsum(true_positive_steps)])
        return false_positives / false_positives[-1], true_positives / true_positives[-1]


def _count_around_thresholds(
    scores: np.ndarray,
    is_anomalous: np.ndarray,
    anomalous_weights: np.ndarray | None = None,
    score_transform: ScoreTransform | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> _ThresholdCounts:
    """Counts normal samples around the distinct anomalous scores, ``chunk_size`` samples at a time.

    Args:
        scores: anomaly scores, any shape.
        is_anomalous: boolean ground truth of the same shape.
        anomalous_weights: optional weight of each anomalous sample, in the C order of ``scores[is_anomalous]``.
        score_transform: optional elementwise map applied to the scores before counting (used for binning).
        chunk_size: number of samples counted at once.

    Raises:
        ValueError: on shape mismatch, NaN scores, or when either class is absent.
    """
    if scores.shape != is_anomalous.shape:
        raise ValueError(f"scores have shape {tuple(scores.shape)} but labels have shape {tuple(is_anomalous.shape)}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    flat_scores = scores.reshape(-1)
    flat_is_anomalous = is_anomalous.reshape(-1)
    anomalous_scores = flat_scores[flat_is_anomalous]
    if anomalous_scores.size == 0 or anomalous_scores.size == flat_scores.size:
        raise ValueError("both normal and anomalous samples are needed; the labels contain only one class")
    if score_transform is not None:
        anomalous_scores = score_transform(anomalous_scores)
    _check_no_nan(anomalous_scores)
    ascending_thresholds, threshold_index = np.unique(anomalous_scores, return_inverse=True)
    num_thresholds = len(ascending_thresholds)
    positive_weight = np.bincount(threshold_index, weights=anomalous_weights, minlength=num_thresholds)

    # Normal scores below, and at or below, each ascending threshold, counted on each sorted chunk.
    normals_below = np.zeros(num_thresholds, dtype=np.int64)
    normals_at_or_below = np.zeros(num_thresholds, dtype=np.int64)
    num_normals = 0
    for start in range(0, flat_scores.size, chunk_size):
        normal_scores = flat_scores[start : start + chunk_size][~flat_is_anomalous[start : start + chunk_size]]
        if score_transform is not None:
            normal_scores = score_transform(normal_scores)
        normal_scores.sort()  # a copy made by the boolean indexing; NaN sorts last
        _check_no_nan(normal_scores[-1:])
        normals_below += np.searchsorted(normal_scores, ascending_thresholds, side="left")
        normals_at_or_below += np.searchsorted(normal_scores, ascending_thresholds, side="right")
        num_normals += normal_scores.size
    # negatives_between[j]: normal scores strictly between ascending_thresholds[j - 1] and ascending_thresholds[j].
    negatives_between = np.diff(normals_below, prepend=0, append=num_normals)
    negatives_between[1:] -= normals_at_or_below - normals_below
    return _ThresholdCounts(
        thresholds=ascending_thresholds[::-1],
        positive_weight=positive_weight[::-1].astype(np.float64),
        negatives_tied=(normals_at_or_below - normals_below)[::-1],
        negatives_above=negatives_between[:0:-1],
        negatives_below=int(negatives_between[0]),
    )


def _auroc(counts: _ThresholdCounts) -> float:
    false_positive_rate, true_positive_rate = counts.roc_curve()
    return float(np.trapezoid(true_positive_rate, false_positive_rate))


def _average_precision(counts: _ThresholdCounts) -> float:
    true_positives = counts.true_positives
    precision = true_positives / (true_positives + counts.false_positives)
    return float(np.sum(counts.positive_weight * precision) / counts.total_positive_weight)


def _f1_max_threshold(counts: _ThresholdCounts) -> tuple[float, float]:
    # F1 = 2 TP / (TP + FP + P); it peaks at a distinct anomalous score, where TP has just grown.
    true_positives = counts.true_positives
    f1 = 2 * true_positives / (true_positives + counts.false_positives + counts.total_positive_weight)
    best = int(np.argmax(f1))
    return float(f1[best]), float(counts.thresholds[best])


def _binary_counts(
    scores: ArrayLike, labels: ArrayLike, chunk_size: int = DEFAULT_CHUNK_SIZE, labels_name: str = "labels"
) -> _ThresholdCounts:
    return _count_around_thresholds(_as_scores(scores), as_binary(labels, labels_name), chunk_size=chunk_size)


class BinaryMetrics(NamedTuple):
    """The threshold-free metrics of one set of scores and binary labels."""

    auroc: float
    ap: float
    f1_max: float
    f1_threshold: float
    """Scores ``>= f1_threshold`` are predicted anomalous at the maximal F1."""


def binary_metrics(scores: ArrayLike, labels: ArrayLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BinaryMetrics:
    """AUROC, AP and maximal F1 (with its threshold) in one pass over the data.

    Equal to `image_auroc`, `image_ap` and `f1_max_threshold` on images, and to
    `pixel_auroc`, `pixel_ap` and `pixel_f1_max` on maps and masks of any equal shape; use it
    to get all three on a large category at the cost of one.
    """
    counts = _binary_counts(scores, labels, chunk_size)
    return BinaryMetrics(_auroc(counts), _average_precision(counts), *_f1_max_threshold(counts))


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of image anomaly scores (1 = anomalous), ties counted half.

    Raises:
        ValueError: if ``labels`` contain a single class or ``scores`` contain NaN.
    """
    return _auroc(_binary_counts(scores, labels))


def image_ap(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision of image anomaly scores, defined as `sklearn.metrics.average_precision_score`.

    Raises:
        ValueError: if ``labels`` contain a single class or ``scores`` contain NaN.
    """
    return _average_precision(_binary_counts(scores, labels))


def f1_max_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Maximal F1 score over all thresholds of the precision-recall curve, and the threshold reaching it.

    Returns:
        ``(f1, threshold)``: samples scored ``>= threshold`` are predicted anomalous; among equally good
        thresholds the highest is returned.

    Raises:
        ValueError: if ``labels`` contain a single class or ``scores`` contain NaN.
    """
    return _f1_max_threshold(_binary_counts(scores, labels))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Maximal F1 score over all thresholds (see `f1_max_threshold`)."""
    return f1_max_threshold(scores, labels)[0]


def pixel_auroc(maps: ArrayLike, masks: ArrayLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """AUROC over all pixels pooled.

    Args:
        maps: anomaly maps, [N, H, W] (any shape equal to ``masks``).
        masks: binary ground-truth masks (1 = anomalous pixel).
        chunk_size: pixels counted at once; bounds the temporary memory.
    """
    return _auroc(_binary_counts(maps, masks, chunk_size, "masks"))


def pixel_ap(maps: ArrayLike, masks: ArrayLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Average precision over all pixels pooled (arguments as `pixel_auroc`)."""
    return _average_precision(_binary_counts(maps, masks, chunk_size, "masks"))


def pixel_f1_max(maps: ArrayLike, masks: ArrayLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Maximal F1 score over all thresholds, all pixels pooled (arguments as `pixel_auroc`)."""
    return _f1_max_threshold(_binary_counts(maps, masks, chunk_size, "masks"))[0]


def anomalous_pixel_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Numbers the 8-connected anomalous regions of each mask, and gives the region of every anomalous pixel.

    Args:
        masks: boolean masks, [N, H, W].

    Returns:
        ``(regions, num_regions)``: the region (1..num_regions, regions of all images numbered consecutively) of
        each anomalous pixel in the order of ``masks[masks]``, and the number of regions.
    """
    regions = [np.zeros(0, dtype=np.int32)]
    num_regions = 0
    for mask in masks:
        image_regions, num_image_regions = scipy.ndimage.label(mask, structure=EIGHT_CONNECTIVITY)
        regions.append(image_regions[mask] + num_regions)
        num_regions += num_image_regions
    return np.concatenate(regions), num_regions


def _as_image_stack(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 4 and array.shape[1] == 1:
        return array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{name} must have shape [N, H, W] or [N, 1, H, W], got {tuple(array.shape)}")
    return array


def _binning(maps: np.ndarray, num_thresholds: int) -> ScoreTransform:
    """Rounds scores down onto ``num_thresholds`` evenly spaced thresholds.

    The thresholds span the smallest to the largest score, so that ``binned >= t`` equals ``score >= t`` for every
    grid threshold ``t``.
    """
    if num_thresholds < 2:
        raise ValueError("num_thresholds must be at least 2")
    grid = np.linspace(np.min(maps), np.max(maps), num_thresholds, dtype=np.float64)

    def round_down_to_grid(scores: np.ndarray) -> np.ndarray:
        return grid[np.clip(np.searchsorted(grid, scores, side="right") - 1, 0, num_thresholds - 1)]

    return round_down_to_grid


def _partial_area(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoidal area under the polyline (x, y) for x in [0, x_limit].

    x is non-decreasing from 0; the curve is linearly interpolated at ``x_limit``.
    """
    inside = int(np.searchsorted(x, x_limit, side="right"))
    x_inside, y_inside = x[:inside], y[:inside]
    if x_inside[-1] < x_limit:
        y_at_limit = np.interp(x_limit, x[inside - 1 : inside + 1], y[inside - 1 : inside + 1])
        x_inside = np.append(x_inside, x_limit)
        y_inside = np.append(y_inside, y_at_limit)
    return float(np.trapezoid(y_inside, x_inside))


def aupro(
    maps: ArrayLike,
    masks: ArrayLike,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, divided by ``fpr_limit``.

    Ground-truth regions are the 8-connected components of each mask (anomalib's connectivity). At a threshold
    ``t`` the PRO is the mean over all regions of the category of the fraction of the region scored ``>= t``, and
    the false positive rate is the fraction of all normal pixels scored ``>= t``. The curve links its values at
    every distinct score from (0, 0) to (1, 1); its area up to ``fpr_limit`` (interpolated there) is normalized
    so that a perfect map scores 1 and a constant map scores ``fpr_limit / 2``.

    Args:
        maps: anomaly maps, [N, H, W] or [N, 1, H, W].
        masks: binary ground-truth masks of the same shape.
        fpr_limit: upper limit of the false positive rate, in (0, 1].
        num_thresholds: ``None`` for the exact curve at every distinct score; otherwise the curve is evaluated at
            that many evenly spaced thresholds between the smallest and largest score (anomalib's binned mode),
            which is faster on maps with many distinct values.
        chunk_size: pixels counted at once; bounds the temporary memory.

    Raises:
        ValueError: on bad shapes, an ``fpr_limit`` outside (0, 1], or masks with a single class.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps_array = _as_image_stack(_as_scores(maps), "maps")
    masks_array = _as_image_stack(as_binary(masks, "masks"), "masks")
    if maps_array.shape != masks_array.shape:
        raise ValueError(f"maps have shape {maps_array.shape} but masks have shape {masks_array.shape}")
    regions, num_regions = anomalous_pixel_regions(masks_array)
    region_sizes = np.bincount(regions, minlength=num_regions + 1)
    overlap_weights = 1.0 / (num_regions * region_sizes[regions])
    score_transform = None if num_thresholds is None else _binning(maps_array, num_thresholds)
    counts = _count_around_thresholds(maps_array, masks_array, overlap_weights, score_transform, chunk_size)
    false_positive_rate, per_region_overlap = counts.roc_curve()
    return _partial_area(false_positive_rate, per_region_overlap, fpr_limit) / fpr_limit

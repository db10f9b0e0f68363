"""Image and pixel metrics against sklearn, hand-built cases and a straightforward AUPRO written here."""

import numpy as np
import pytest
import scipy.ndimage
import torch
from sklearn.metrics import auc, average_precision_score, f1_score, precision_recall_curve, roc_auc_score

from cops_hf.evaluation import (
    anomalous_pixel_regions,
    aupro,
    binary_metrics,
    f1_max,
    f1_max_threshold,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, where=denominator > 0, out=np.zeros_like(recall))
    return float(np.max(f1))


def random_scores(rng: np.random.Generator, size: int, distinct_values: int, labels: np.ndarray) -> np.ndarray:
    """Scores mildly correlated with the labels, on a grid of ``distinct_values`` values so that ties occur."""
    noise = np.floor(rng.random(size) * distinct_values) / distinct_values
    return (noise + 0.15 * labels).astype(np.float32)


@pytest.mark.parametrize(
    ("size", "distinct_values", "anomalous_fraction"), [(40, 4, 0.5), (500, 10**6, 0.1), (3000, 9, 0.3)]
)
def test_image_metrics_equal_sklearn(size: int, distinct_values: int, anomalous_fraction: float) -> None:
    rng = np.random.default_rng(size)
    labels = rng.random(size) < anomalous_fraction
    scores = random_scores(rng, size, distinct_values, labels)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert f1_max(scores, labels) == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-9)


def test_f1_max_threshold_is_the_threshold_reaching_it() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(200) < 0.3
    scores = random_scores(rng, 200, 12, labels)
    best_f1, threshold = f1_max_threshold(scores, labels)
    assert f1_score(labels, scores >= threshold) == pytest.approx(best_f1, abs=1e-12)
    assert threshold in scores[labels]


def test_image_metrics_hand_built_case() -> None:
    # Anomalous 0.9, 0.4; normal 0.6, 0.1: one of four pairs is misordered.
    scores, labels = [0.9, 0.6, 0.4, 0.1], [1, 0, 1, 0]
    assert image_auroc(scores, labels) == pytest.approx(0.75)
    assert image_ap(scores, labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert f1_max_threshold(scores, labels) == pytest.approx((0.8, 0.4))  # F1 = 2 * 2 / (3 + 2) at 0.4


def test_all_tied_scores_give_chance_level() -> None:
    labels = np.array([0, 1, 0, 0, 1])
    scores = np.full(5, 0.5)
    assert image_auroc(scores, labels) == 0.5
    assert image_ap(scores, labels) == pytest.approx(0.4)


def test_inputs_may_be_tensors_lists_or_integer_scores() -> None:
    labels = [0, 1, 1, 0, 1]
    scores = [3, 5, 4, 1, 2]
    expected = roc_auc_score(labels, scores)
    assert image_auroc(torch.tensor(scores, dtype=torch.bfloat16), torch.tensor(labels).bool()) == expected
    assert image_auroc(scores, labels) == expected


def test_single_class_nan_and_non_binary_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match="one class"):
        image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        image_ap([0.1, np.nan, 0.3], [0, 1, 0])
    with pytest.raises(ValueError, match="binary"):
        f1_max([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="shape"):
        image_auroc([0.1, 0.2, 0.3], [0, 1])


def random_maps_and_masks(rng: np.random.Generator, num_images: int = 6, side: int = 24, distinct_values: int = 20):
    """Masks made of random rectangles (some images normal) and tied maps brighter inside the rectangles."""
    masks = np.zeros((num_images, side, side), dtype=bool)
    for mask in masks[: num_images - 2]:
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, side - 4, size=2)
            height, width = rng.integers(1, 8, size=2)
            mask[top : top + height, left : left + width] = True
    noise = np.floor(rng.random(masks.shape) * distinct_values) / distinct_values
    return (noise + 0.3 * masks).astype(np.float32), masks


@pytest.mark.parametrize("chunk_size", [1 << 22, 7])
def test_pixel_metrics_equal_sklearn_on_pooled_pixels(chunk_size: int) -> None:
    maps, masks = random_maps_and_masks(np.random.default_rng(2))
    pixels, truth = maps.ravel(), masks.ravel()
    assert pixel_auroc(maps, masks, chunk_size=chunk_size) == pytest.approx(roc_auc_score(truth, pixels), abs=1e-9)
    expected_ap = average_precision_score(truth, pixels)
    assert pixel_ap(maps, masks, chunk_size=chunk_size) == pytest.approx(expected_ap, abs=1e-9)
    assert pixel_f1_max(maps, masks, chunk_size=chunk_size) == pytest.approx(sklearn_f1_max(truth, pixels), abs=1e-9)


def test_binary_metrics_gives_the_three_metrics_of_one_pass() -> None:
    maps, masks = random_maps_and_masks(np.random.default_rng(9))
    combined = binary_metrics(maps, masks, chunk_size=50)
    assert combined.auroc == pixel_auroc(maps, masks)
    assert combined.ap == pixel_ap(maps, masks)
    assert (combined.f1_max, combined.f1_threshold) == f1_max_threshold(maps.ravel(), masks.ravel())


def test_pixel_metrics_accept_torch_maps_and_float_masks() -> None:
    maps, masks = random_maps_and_masks(np.random.default_rng(3))
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks).float()) == pytest.approx(expected, abs=1e-9)


def reference_aupro(
    maps: np.ndarray, masks: np.ndarray, fpr_limit: float, thresholds: np.ndarray | None = None
) -> float:
    """Straightforward AUPRO: one full pass over the pixels per threshold, one mask per region."""
    regions = []
    for image_index, mask in enumerate(masks):
        labelled, count = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
        for region_label in range(1, count + 1):
            region = np.zeros(masks.shape, dtype=bool)
            region[image_index] = labelled == region_label
            regions.append(region)
    if thresholds is None:
        thresholds = np.unique(maps)
    false_positive_rates, overlaps = [0.0], [0.0]
    for threshold in np.sort(thresholds)[::-1]:
        predicted = maps >= threshold
        false_positive_rates.append(predicted[~masks].mean())
        overlaps.append(np.mean([predicted[region].mean() for region in regions]))
    fpr, pro = np.array(false_positive_rates), np.array(overlaps)
    inside = fpr <= fpr_limit
    fpr_inside, pro_inside = list(fpr[inside]), list(pro[inside])
    if fpr_inside[-1] < fpr_limit:
        after = int(np.argmax(fpr > fpr_limit))
        slope = (pro[after] - pro[after - 1]) / (fpr[after] - fpr[after - 1])
        fpr_inside.append(fpr_limit)
        pro_inside.append(pro[after - 1] + slope * (fpr_limit - fpr[after - 1]))
    return auc(fpr_inside, pro_inside) / fpr_limit


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("seed", [4, 5])
def test_aupro_equals_straightforward_implementation(fpr_limit: float, seed: int) -> None:
    maps, masks = random_maps_and_masks(np.random.default_rng(seed))
    expected = reference_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit, chunk_size=100) == pytest.approx(expected, abs=1e-9)


def test_binned_aupro_equals_straightforward_implementation_on_the_same_thresholds() -> None:
    rng = np.random.default_rng(6)
    maps, masks = random_maps_and_masks(rng, distinct_values=10**6)
    grid = np.linspace(maps.min(), maps.max(), 15)
    expected = reference_aupro(maps.astype(np.float64), masks, 0.3, thresholds=grid)
    assert aupro(maps, masks, num_thresholds=15) == pytest.approx(expected, abs=1e-9)
    assert aupro(maps, masks, num_thresholds=15) != pytest.approx(aupro(maps, masks), abs=1e-4)


def two_regions() -> np.ndarray:
    """One image with a 1-pixel region and a 9-pixel region."""
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 3:6, 3:6] = True
    return masks


def test_aupro_of_a_perfect_map_is_one() -> None:
    masks = two_regions()
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.1])
def test_aupro_of_a_constant_map_is_half_the_limit(fpr_limit: float) -> None:
    # Only (0, 0) and (1, 1) are reached: the PRO curve is the diagonal.
    assert aupro(np.zeros((1, 6, 6)), two_regions(), fpr_limit) == pytest.approx(fpr_limit / 2)


@pytest.mark.parametrize("detected_region", ["small", "large"])
def test_aupro_averages_regions_not_pixels(detected_region: str) -> None:
    # Detecting either region alone gives a PRO of 1/2 at FPR 0, then the curve rises linearly to (1, 1):
    # area (0.5 + 0.65) / 2 * 0.3, normalized by 0.3. Pixel averaging would give a TPR of 0.1 or 0.9 instead.
    masks = two_regions()
    maps = np.zeros(masks.shape, dtype=np.float32)
    if detected_region == "small":
        maps[0, 0, 0] = 1
    else:
        maps[0, 3:6, 3:6] = 1
    assert aupro(maps, masks) == pytest.approx((0.5 + 0.65) / 2)


def test_diagonal_pixels_form_one_region() -> None:
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True
    regions, num_regions = anomalous_pixel_regions(masks)
    assert (regions.tolist(), num_regions) == ([1, 1], 1)
    # Half of the single region detected at FPR 0: 4-connectivity would see one fully detected region of two.
    maps = np.zeros(masks.shape)
    maps[0, 1, 1] = 1
    assert aupro(maps, masks) == pytest.approx((0.5 + 0.65) / 2)


def test_regions_are_numbered_across_images() -> None:
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 3, 3] = True
    masks[2, 1:3, 1:3] = True
    regions, num_regions = anomalous_pixel_regions(masks)
    assert num_regions == 3
    assert regions.tolist() == [1, 2, 3, 3, 3, 3]


def test_aupro_with_a_single_region_and_full_limit_is_the_pixel_auroc() -> None:
    rng = np.random.default_rng(7)
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[1, 4:9, 3:12] = True
    maps = np.floor(rng.random(masks.shape) * 30) / 30 + 0.2 * masks
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)


def test_aupro_accepts_channel_dimension_and_tensors() -> None:
    maps, masks = random_maps_and_masks(np.random.default_rng(8))
    expected = aupro(maps, masks)
    with_channel = aupro(torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None])
    assert with_channel == pytest.approx(expected, abs=1e-12)


def test_aupro_rejects_bad_inputs() -> None:
    masks = two_regions()
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks.astype(float), masks, fpr_limit=0)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        aupro(masks[0].astype(float), masks[0])
    with pytest.raises(ValueError, match="one class"):
        aupro(np.zeros((1, 6, 6)), np.zeros((1, 6, 6)))

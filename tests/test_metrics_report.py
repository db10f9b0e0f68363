"""Per-category aggregation: values, None rules, warnings, means, counts and formatting."""

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cops_hf.evaluation import (
    IMAGE_METRICS,
    METRIC_NAMES,
    PIXEL_METRICS,
    CategoryRecord,
    UndefinedMetricWarning,
    ZSADReport,
    aupro,
    compute_zsad_metrics,
    f1_max,
)


def full_record(rng: np.random.Generator) -> CategoryRecord:
    """Four normal and four anomalous images with masks and maps."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    masks = np.zeros((8, 12, 12), dtype=bool)
    for index in range(4, 8):
        masks[index, index : index + 3, 2:7] = True
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
    scores = maps.reshape(8, -1).max(axis=1)
    return CategoryRecord(image_scores=scores, image_labels=labels, anomaly_maps=maps, gt_masks=masks)


def test_full_category_values_equal_independent_computations() -> None:
    record = full_record(np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = compute_zsad_metrics({"bottle": record})
    values = report.per_category["bottle"]
    pixels, truth = record.anomaly_maps.ravel(), record.gt_masks.ravel()
    assert values["image_auroc"] == pytest.approx(roc_auc_score(record.image_labels, record.image_scores))
    assert values["image_ap"] == pytest.approx(average_precision_score(record.image_labels, record.image_scores))
    assert values["image_f1_max"] == pytest.approx(f1_max(record.image_scores, record.image_labels))
    assert values["pixel_auroc"] == pytest.approx(roc_auc_score(truth, pixels))
    assert values["pixel_ap"] == pytest.approx(average_precision_score(truth, pixels))
    assert values["pixel_aupro"] == pytest.approx(aupro(record.anomaly_maps, record.gt_masks))
    assert report.mean == values
    assert report.counts == dict.fromkeys(METRIC_NAMES, 1)


def mixed_report() -> ZSADReport:
    """A full category, an image-level-only category, and a category whose labels are all anomalous."""
    rng = np.random.default_rng(1)
    image_only = {"image_scores": [0.2, 0.7, 0.4, 0.9], "image_labels": [0, 1, 1, 0]}
    one_class = CategoryRecord(image_scores=[0.3, 0.8], image_labels=[1, 1])
    return compute_zsad_metrics({"bottle": full_record(rng), "cable": image_only, "screw": one_class})


def test_missing_masks_give_none_silently_and_single_class_labels_warn() -> None:
    with pytest.warns(UndefinedMetricWarning, match="'screw'") as recorded:
        report = mixed_report()
    assert len(recorded) == 1
    assert all(report.per_category["cable"][name] is None for name in PIXEL_METRICS)
    assert report.per_category["cable"]["image_auroc"] == pytest.approx(0.5)
    assert all(value is None for value in report.per_category["screw"].values())


def test_mean_averages_the_defined_values_and_counts_them() -> None:
    with pytest.warns(UndefinedMetricWarning):
        report = mixed_report()
    bottle, cable = report.per_category["bottle"], report.per_category["cable"]
    for name in IMAGE_METRICS:
        assert report.mean[name] == pytest.approx((bottle[name] + cable[name]) / 2)
        assert report.counts[name] == 2
    for name in PIXEL_METRICS:
        assert report.mean[name] == bottle[name]
        assert report.counts[name] == 1


def test_masks_without_anomalous_pixels_give_none_pixel_metrics_with_a_warning() -> None:
    record = full_record(np.random.default_rng(2))
    record.gt_masks = np.zeros_like(record.gt_masks)
    with pytest.warns(UndefinedMetricWarning, match="'carpet'.*ground-truth masks"):
        report = compute_zsad_metrics({"carpet": record})
    assert all(report.per_category["carpet"][name] is None for name in PIXEL_METRICS)
    assert report.per_category["carpet"]["image_auroc"] is not None
    assert report.mean["pixel_aupro"] is None
    assert report.counts["pixel_aupro"] == 0


def test_rows_dict_and_json_carry_the_same_values() -> None:
    with pytest.warns(UndefinedMetricWarning):
        report = mixed_report()
    rows = report.to_rows()
    assert [row["category"] for row in rows] == ["bottle", "cable", "screw", "mean"]
    assert rows[-1] == {"category": "mean", **report.mean}
    assert json.loads(report.to_json()) == report.to_dict()
    assert report.to_dict()["counts"]["pixel_auroc"] == 1


def hand_report() -> ZSADReport:
    return ZSADReport(
        {
            "bottle": {**dict.fromkeys(METRIC_NAMES), "image_auroc": 0.98765, "pixel_auroc": 0.5},
            "cable": {**dict.fromkeys(METRIC_NAMES), "image_auroc": 0.5},
        }
    )


def test_markdown_table_shows_available_metrics_as_percentages() -> None:
    assert hand_report().to_markdown().splitlines() == [
        "| category | I-AUROC | P-AUROC |",
        "| --- | ---: | ---: |",
        "| bottle | 98.8 | 50.0 |",
        "| cable | 50.0 | - |",
        "| mean | 74.4 | 50.0 |",
        "| categories averaged | 2 | 1 |",
    ]


def test_plain_table_is_aligned() -> None:
    lines = hand_report().format_table().splitlines()
    assert lines[0].split() == ["category", "I-AUROC", "P-AUROC"]
    assert lines[3].split() == ["mean", "74.4", "50.0"]
    assert len({len(line) for line in lines}) == 1

"""Per-category ZSAD metrics and their mean over categories, as reported in zero-shot anomaly detection papers."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from cops_hf.evaluation.metrics import (
    DEFAULT_CHUNK_SIZE,
    ArrayLike,
    as_binary,
    aupro,
    binary_metrics,
    to_numpy,
)

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS
"""Keys of every metric dictionary, in table order."""
METRIC_DISPLAY_NAMES = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1_max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1_max": "P-F1max",
    "pixel_aupro": "AUPRO",
}
"""Column titles of the metrics in tables (the paper's)."""

MEAN_ROW = "mean"

MetricValues = dict[str, float | None]


class UndefinedMetricWarning(UserWarning):
    """A metric of a category is undefined (ground truth with a single class) and is reported as None."""


@dataclass
class CategoryRecord:
    """Predictions and ground truth of one category.

    Attributes:
        image_scores: anomaly score of each image, [N].
        image_labels: 1 for an anomalous image, 0 for a normal one, [N].
        anomaly_maps: optional anomaly maps, [N, H, W]; pixel metrics need both maps and masks.
        gt_masks: optional binary ground-truth masks, [N, H, W].
    """

    image_scores: ArrayLike
    image_labels: ArrayLike
    anomaly_maps: ArrayLike | None = None
    gt_masks: ArrayLike | None = None


@dataclass(frozen=True)
class ZSADReport:
    """Metrics of each category and their mean over categories.

    Attributes:
        per_category: category -> metric name -> value in [0, 1], or None when unavailable or undefined.
        mean: metric name -> mean of the categories' non-None values (None when no category has one).
        counts: metric name -> number of categories averaged into ``mean``.
    """

    per_category: dict[str, MetricValues]
    mean: MetricValues = field(init=False)
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        mean: MetricValues = {}
        counts: dict[str, int] = {}
        for name in METRIC_NAMES:
            values = [metrics[name] for metrics in self.per_category.values() if metrics.get(name) is not None]
            counts[name] = len(values)
            mean[name] = float(np.mean(values)) if values else None
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "counts", counts)

    @property
    def available_metrics(self) -> tuple[str, ...]:
        """Metric names with a value for at least one category."""
        return tuple(name for name in METRIC_NAMES if self.counts[name] > 0)

    def to_dict(self) -> dict[str, dict]:
        """``{"per_category": ..., "mean": ..., "counts": ...}`` with plain Python values."""
        return {
            "per_category": {category: dict(metrics) for category, metrics in self.per_category.items()},
            "mean": dict(self.mean),
            "counts": dict(self.counts),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The `to_dict` content as JSON (None becomes null)."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_rows(self) -> list[dict[str, str | float | None]]:
        """One row per category then a ``"mean"`` row, each ``{"category": name, <metric>: value, ...}``."""
        rows: list[dict[str, str | float | None]] = [
            {"category": category, **metrics} for category, metrics in self.per_category.items()
        ]
        rows.append({"category": MEAN_ROW, **self.mean})
        return rows

    def _table_cells(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of text cells: percentages with one decimal, "-" for None, only available metrics.

        When a metric's mean averages fewer categories than reported, a last row gives each metric's count.
        """
        metrics = self.available_metrics
        header = ["category", *(METRIC_DISPLAY_NAMES[name] for name in metrics)]
        rows = [[str(row["category"]), *(format_percent(row[name]) for name in metrics)] for row in self.to_rows()]
        if any(self.counts[name] < len(self.per_category) for name in metrics):
            rows.append(["categories averaged", *(str(self.counts[name]) for name in metrics)])
        return header, rows

    def to_markdown(self) -> str:
        """The table of `_table_cells` as GitHub-flavoured markdown."""
        return render_table(*self._table_cells(), markdown=True)

    def format_table(self) -> str:
        """The table of `_table_cells` as aligned plain text, for a terminal."""
        return render_table(*self._table_cells())


def format_percent(value: float | None) -> str:
    """A metric in [0, 1] as a percentage with one decimal; "-" for None (not available)."""
    return "-" if value is None else f"{100 * value:.1f}"


def render_table(header: list[str], rows: list[list[str]], *, markdown: bool = False) -> str:
    """Text cells as a table: GitHub-flavoured markdown, or aligned plain text for a terminal.

    The first column (names) is left-aligned, the others (numbers) right-aligned, in both forms.
    """
    if markdown:
        lines = [header, ["---"] + ["---:"] * (len(header) - 1), *rows]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    )


def _has_both_classes(truth: np.ndarray) -> bool:
    return bool(truth.any()) and not bool(truth.all())


def category_metrics(
    category: str,
    record: CategoryRecord,
    fpr_limit: float = 0.3,
    aupro_num_thresholds: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> MetricValues:
    """All ZSAD metrics of one category.

    Image metrics are None, with an `UndefinedMetricWarning` naming the category, when the image labels
    contain a single class. Pixel metrics are None silently when maps or masks are not given (image-level data),
    and with a warning when the masks contain a single class (e.g. only normal images).
    """
    values: MetricValues = dict.fromkeys(METRIC_NAMES)
    labels = as_binary(record.image_labels, "image_labels")
    if _has_both_classes(labels):
        image_level = binary_metrics(record.image_scores, labels)
        values.update(image_auroc=image_level.auroc, image_ap=image_level.ap, image_f1_max=image_level.f1_max)
    else:
        _warn_undefined(category, "image labels", IMAGE_METRICS)
    if record.anomaly_maps is None or record.gt_masks is None:
        return values
    maps = to_numpy(record.anomaly_maps)
    masks = as_binary(record.gt_masks, "gt_masks")
    if _has_both_classes(masks):
        pixel_level = binary_metrics(maps, masks, chunk_size=chunk_size)
        values.update(pixel_auroc=pixel_level.auroc, pixel_ap=pixel_level.ap, pixel_f1_max=pixel_level.f1_max)
        values["pixel_aupro"] = aupro(maps, masks, fpr_limit, aupro_num_thresholds, chunk_size=chunk_size)
    else:
        _warn_undefined(category, "ground-truth masks", PIXEL_METRICS)
    return values


def _warn_undefined(category: str, truth_name: str, metrics: tuple[str, ...]) -> None:
    warnings.warn(
        f"category {category!r}: the {truth_name} contain a single class, so {', '.join(metrics)} are undefined "
        "and reported as None",
        UndefinedMetricWarning,
        stacklevel=3,
    )


def compute_zsad_metrics(
    records: Mapping[str, CategoryRecord | Mapping[str, ArrayLike | None]],
    *,
    fpr_limit: float = 0.3,
    aupro_num_thresholds: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ZSADReport:
    """Metrics of every category and their mean over categories.

    The mean is that of the per-category values, as ZSAD papers report.

    Args:
        records: category name -> `CategoryRecord`, or a mapping with its field names as keys.
        fpr_limit: false positive rate limit of AUPRO.
        aupro_num_thresholds: ``None`` for the exact AUPRO, otherwise the number of binned thresholds.
        chunk_size: pixels counted at once by the pixel metrics.

    Returns:
        A `ZSADReport`; see `category_metrics` for when a value is None.
    """
    per_category = {
        category: category_metrics(
            category,
            record if isinstance(record, CategoryRecord) else CategoryRecord(**record),
            fpr_limit,
            aupro_num_thresholds,
            chunk_size,
        )
        for category, record in records.items()
    }
    return ZSADReport(per_category)

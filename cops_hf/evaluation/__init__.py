"""Evaluation of zero-shot anomaly detection.

Exact image and pixel metrics, per-category reports, and an ``evaluate`` module.
"""

from cops_hf.evaluation.loading import ZSAD_METRIC_PATH, load_zsad_metric
from cops_hf.evaluation.metrics import (
    BinaryMetrics,
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
from cops_hf.evaluation.report import (
    IMAGE_METRICS,
    METRIC_NAMES,
    PIXEL_METRICS,
    CategoryRecord,
    UndefinedMetricWarning,
    ZSADReport,
    category_metrics,
    compute_zsad_metrics,
)

__all__ = [
    "IMAGE_METRICS",
    "METRIC_NAMES",
    "PIXEL_METRICS",
    "ZSAD_METRIC_PATH",
    "BinaryMetrics",
    "CategoryRecord",
    "UndefinedMetricWarning",
    "ZSADReport",
    "anomalous_pixel_regions",
    "aupro",
    "binary_metrics",
    "category_metrics",
    "compute_zsad_metrics",
    "f1_max",
    "f1_max_threshold",
    "image_ap",
    "image_auroc",
    "load_zsad_metric",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
]

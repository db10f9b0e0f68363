"""ZSAD metrics as a Hugging Face ``evaluate`` module.

Load it with `cops_hf.evaluation.load_zsad_metric` (offline: it is a local file), then::

    metric = load_zsad_metric()
    for batch in batches:
        metric.add_batch(predictions=image_scores, references=image_labels, categories=names,
                         anomaly_maps=maps, gt_masks=masks)
    results = metric.compute()

``categories``, ``anomaly_maps`` and ``gt_masks`` are optional (a missing category is ``"all"``; missing maps
or masks leave the pixel metrics None). ``compute`` returns the mean over categories of every metric at the top
level, plus ``"per_category"`` and ``"counts"`` (see `cops_hf.evaluation.ZSADReport`).

Limit: ``evaluate`` writes every input to an Arrow table and hands it back to ``_compute`` as nested Python
lists (its "numpy" format only takes scalar features), so pixel data costs about 1.3 s of conversion per million
pixels (measured on 64 maps of 256x256) plus its size on disk. A VisA category at 518x518 (about 1e8 pixels,
400 MB of float32 maps) is impractical through this module: call `cops_hf.evaluation.compute_zsad_metrics`
on the arrays directly: same numbers, about 15-25 s for 1e8 pixels on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
import numpy as np

from cops_hf.evaluation.report import CategoryRecord, compute_zsad_metrics

DEFAULT_CATEGORY = "all"

_DESCRIPTION = """Zero-shot anomaly detection metrics of CoPS: image AUROC, AP and F1-max, pixel AUROC, AP, F1-max
and AUPRO, computed per category and averaged over categories."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): anomaly score of each image.
    references (`list` of `int`): 1 for an anomalous image, 0 for a normal one.
    categories (`list` of `str`, *optional*): category of each image; defaults to "all".
    anomaly_maps (`list` of [H, W] arrays, *optional*): anomaly map of each image.
    gt_masks (`list` of [H, W] binary arrays, *optional*): ground-truth mask of each image.
    fpr_limit (`float`, defaults to 0.3): false positive rate limit of AUPRO.
    aupro_num_thresholds (`int`, *optional*): binned AUPRO thresholds; exact when None.
Returns:
    the mean over categories of image_auroc, image_ap, image_f1_max, pixel_auroc, pixel_ap, pixel_f1_max and
    pixel_aupro (None when no category has the metric), "per_category" (category -> metric -> value) and
    "counts" (metric -> number of categories averaged).
"""

_OPTIONAL_INPUTS = ("categories", "anomaly_maps", "gt_masks")


def _image_feature(value_type: str) -> datasets.List:
    return datasets.List(datasets.List(datasets.Value(value_type)))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZSADMetric(evaluate.Metric):
    """Per-category ZSAD metrics and their mean, accumulated batch by batch."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("float32"),
                    "references": datasets.Value("int32"),
                    "categories": datasets.Value("string"),
                    "anomaly_maps": _image_feature("float32"),
                    "gt_masks": _image_feature("uint8"),
                }
            ),
        )

    @staticmethod
    def _with_optional_inputs(predictions: Sequence[Any] | None, inputs: dict[str, Any]) -> dict[str, Any]:
        """Fills the optional inputs that were not given: default category, no maps, no masks."""
        size = 0 if predictions is None else len(predictions)
        defaults = {"categories": DEFAULT_CATEGORY, "anomaly_maps": None, "gt_masks": None}
        return {name: [defaults[name]] * size if inputs.get(name) is None else inputs[name] for name in defaults}

    def add_batch(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> None:
        """Adds a batch of image scores and labels, with optional categories, anomaly maps and masks."""
        optional_inputs = self._with_optional_inputs(predictions, kwargs)
        super().add_batch(predictions=predictions, references=references, **optional_inputs)

    def add(self, *, prediction: Any = None, reference: Any = None, **kwargs: Any) -> None:
        """Adds one image score and label.

        Optional: ``categories`` (its category), ``anomaly_maps`` (its map) and ``gt_masks`` (its mask), named like
        the features as ``evaluate`` does.
        """
        unknown_inputs = sorted(set(kwargs) - set(_OPTIONAL_INPUTS))
        if unknown_inputs:
            raise ValueError(f"Bad inputs for evaluation module: {unknown_inputs}; optional: {_OPTIONAL_INPUTS}")
        optional_input = {name: [value] for name, value in kwargs.items() if value is not None}
        self.add_batch(predictions=[prediction], references=[reference], **optional_input)

    def compute(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> dict[str, Any] | None:
        """Computes the metrics of everything added (and of the inputs given here, if any)."""
        compute_kwargs = {name: value for name, value in kwargs.items() if name not in _OPTIONAL_INPUTS}
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references, **kwargs)
        return super().compute(**compute_kwargs)

    def _compute(
        self,
        predictions: Sequence[float],
        references: Sequence[int],
        categories: Sequence[str],
        anomaly_maps: Sequence[Any],
        gt_masks: Sequence[Any],
        fpr_limit: float = 0.3,
        aupro_num_thresholds: int | None = None,
    ) -> dict[str, Any]:
        records = {
            category: _category_record(category, indices, predictions, references, anomaly_maps, gt_masks)
            for category, indices in _indices_by_category(categories).items()
        }
        report = compute_zsad_metrics(records, fpr_limit=fpr_limit, aupro_num_thresholds=aupro_num_thresholds)
        return {**report.mean, "per_category": report.per_category, "counts": report.counts}


def _indices_by_category(categories: Sequence[str]) -> dict[str, list[int]]:
    """Example indices of each category, categories in order of first appearance."""
    indices: dict[str, list[int]] = {}
    for index, category in enumerate(categories):
        indices.setdefault(category, []).append(index)
    return indices


def _stack_images(category: str, name: str, images: list[Any]) -> np.ndarray | None:
    """Stacks the maps or masks of a category, or None when none was given."""
    given = [image is not None for image in images]
    if not any(given):
        return None
    if not all(given):
        raise ValueError(f"category {category!r}: {name} were given for some of its images only")
    return np.stack([np.asarray(image) for image in images])


def _category_record(
    category: str,
    indices: list[int],
    predictions: Sequence[float],
    references: Sequence[int],
    anomaly_maps: Sequence[Any],
    gt_masks: Sequence[Any],
) -> CategoryRecord:
    return CategoryRecord(
        image_scores=np.asarray([predictions[index] for index in indices], dtype=np.float32),
        image_labels=np.asarray([references[index] for index in indices]),
        anomaly_maps=_stack_images(category, "anomaly_maps", [anomaly_maps[index] for index in indices]),
        gt_masks=_stack_images(category, "gt_masks", [gt_masks[index] for index in indices]),
    )

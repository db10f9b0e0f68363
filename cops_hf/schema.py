"""The one vocabulary: field names of results, records and the files we write, and the two decisions.

anomalib's names are used throughout: a prediction carries `pred_score`, `pred_label`, `anomaly_map` and
`pred_mask`; ground truth carries `gt_label` and `gt_mask`. Evaluation, predict, reports, the app, serving and
every file they write use these constants, never their own spellings.
"""

from __future__ import annotations

import warnings
from typing import Any

NORMAL = "normal"
"""The decision, and ground-truth class name, of an image without a defect."""

ANOMALOUS = "anomalous"
"""The decision, and ground-truth class name, of an image with a defect."""

LABEL_NAMES = (NORMAL, ANOMALOUS)
"""Class names by integer label: 0 is normal, 1 is anomalous."""

IMAGE_PATH = "image_path"
PRED_SCORE = "pred_score"
PRED_LABEL = "pred_label"
ANOMALY_MAP = "anomaly_map"
PRED_MASK = "pred_mask"
GT_LABEL = "gt_label"
GT_MASK = "gt_mask"
ERROR = "error"

# Few-shot evaluation (metrics.json of `cops-hf evaluate --shots K`).
SHOTS = "shots"
"""Normal reference images per category (K); 0 is zero-shot."""
SHOT_SEEDS = "shot_seeds"
"""The seeds of the reference draws, one evaluation each."""
PER_SEED = "per_seed"
"""Each seed's metrics (`mean`, `per_category`)."""
REFERENCES = "references"
"""Per seed and category, the reference image paths (relative to the data root)."""
REFERENCE_SPLIT = "reference_split"
"""Per category, the split the references were drawn from."""
STD = "std"
"""Standard deviation over the shot seeds, beside each `mean`."""
DEPRECATED_RESULT_KEYS = {"score": PRED_SCORE, "label": PRED_LABEL, "mask": PRED_MASK, "image": IMAGE_PATH}
"""Former result keys (and predict's former CSV columns) -> their schema names; they keep working for one release."""


class Prediction(dict):
    """One image's result, keyed by the schema names; the `DEPRECATED_RESULT_KEYS` still read, with a warning.

    It is a plain `dict` in every other way: iterating, `keys()`, `==` and `json.dumps` see the schema names only.
    """

    def _key(self, key: Any) -> Any:
        if key in DEPRECATED_RESULT_KEYS and not dict.__contains__(self, key):
            new = DEPRECATED_RESULT_KEYS[key]
            warnings.warn(
                f"The result key {key!r} is deprecated and will be removed in the next release; use {new!r} "
                "(cops_hf.schema).",
                DeprecationWarning,
                stacklevel=3,
            )
            return new
        return key

    def __getitem__(self, key: Any) -> Any:
        return dict.__getitem__(self, self._key(key))

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, self._key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        """`dict.get`, reading a deprecated key under its schema name (with a warning)."""
        return dict.get(self, self._key(key), default)


def dataset_key(name: str) -> str:
    """The canonical spelling of a dataset or preset name ("MVTec-AD" -> "mvtec_ad").

    Case, surrounding spaces, and "-" or " " versus "_" do not matter. Aliases are resolved by
    `cops_hf.data.registry`, the one dataset registry.
    """
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def decision_label(score: float, image_threshold: float) -> str:
    """The decision for an image score: `ANOMALOUS` when `score >= image_threshold`, else `NORMAL`.

    This is the one decision rule (pipeline, predict, evaluation, calibration, serving, ONNX runner).
    """
    return ANOMALOUS if score >= image_threshold else NORMAL


__all__ = [
    "ANOMALOUS",
    "DEPRECATED_RESULT_KEYS",
    "Prediction",
    "ANOMALY_MAP",
    "ERROR",
    "GT_LABEL",
    "GT_MASK",
    "IMAGE_PATH",
    "LABEL_NAMES",
    "NORMAL",
    "PER_SEED",
    "PRED_LABEL",
    "PRED_MASK",
    "PRED_SCORE",
    "REFERENCES",
    "REFERENCE_SPLIT",
    "SHOTS",
    "SHOT_SEEDS",
    "STD",
    "dataset_key",
    "decision_label",
]

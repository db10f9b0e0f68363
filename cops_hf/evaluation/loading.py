"""Loading the ZSAD ``evaluate`` module from its local file (works offline)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate

ZSAD_METRIC_PATH = Path(__file__).with_name("zsad_metric.py")
"""Path of the ``evaluate`` module script defining `cops_hf.evaluation.zsad_metric.ZSADMetric`."""


def load_zsad_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` of the local ZSAD metric script; no network access is needed.

    Args:
        **kwargs: forwarded to `evaluate.load` (e.g. ``keep_in_memory=True``, ``experiment_id=...``).
    """
    import evaluate

    return evaluate.load(str(ZSAD_METRIC_PATH), **kwargs)

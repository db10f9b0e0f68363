"""The ``evaluate`` module: offline loading and the same numbers as :func:`compute_zsad_metrics`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cops_hf.evaluation import CategoryRecord, UndefinedMetricWarning, compute_zsad_metrics
from cops_hf.evaluation.zsad_metric import ZSADMetric

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]

LOAD_OFFLINE_AND_COMPUTE = """
import json, sys
import numpy as np
from cops_hf.evaluation import load_zsad_metric

inputs = np.load(sys.argv[1])
metric = load_zsad_metric()
for start in (0, 4):
    batch = slice(start, start + 4)
    metric.add_batch(
        predictions=inputs["scores"][batch],
        references=inputs["labels"][batch],
        categories=["bottle"] * 4,
        anomaly_maps=inputs["maps"][batch],
        gt_masks=inputs["masks"][batch],
    )
metric.add_batch(predictions=inputs["scores"][8:], references=inputs["labels"][8:], categories=["cable"] * 4)
print(json.dumps(metric.compute()))
"""


def example_inputs() -> dict[str, np.ndarray]:
    """Category "bottle": 8 images with 6x6 maps and masks; category "cable": 4 images, image level only."""
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
    masks = np.zeros((8, 6, 6), dtype=np.uint8)
    for index in np.flatnonzero(labels[:8]):
        masks[index, index % 4 : index % 4 + 2, 1:4] = 1
    maps = (rng.random(masks.shape) + 0.4 * masks).astype(np.float32)
    scores = rng.random(12).astype(np.float32) + 0.3 * labels
    return {"scores": scores.astype(np.float32), "labels": labels, "maps": maps, "masks": masks}


def flatten(results: dict, prefix: str = "") -> dict[str, float | int | None]:
    """Nested result dictionaries as one level of "outer/inner" keys, for ``pytest.approx``."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def expected_results(inputs: dict[str, np.ndarray]) -> dict:
    report = compute_zsad_metrics(
        {
            "bottle": CategoryRecord(inputs["scores"][:8], inputs["labels"][:8], inputs["maps"], inputs["masks"]),
            "cable": CategoryRecord(inputs["scores"][8:], inputs["labels"][8:]),
        }
    )
    return flatten({**report.mean, "per_category": report.per_category, "counts": report.counts})


def test_metric_loads_offline_and_equals_the_functions(tmp_path: Path) -> None:
    inputs = example_inputs()
    np.savez(tmp_path / "inputs.npz", **inputs)
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH")])),
    }
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_OFFLINE_AND_COMPUTE, str(tmp_path / "inputs.npz")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert flatten(results) == pytest.approx(expected_results(inputs))
    assert results["per_category"]["cable"]["pixel_aupro"] is None
    assert results["counts"]["pixel_aupro"] == 1


@pytest.fixture
def metric(tmp_path: Path) -> ZSADMetric:
    return ZSADMetric(keep_in_memory=True, cache_dir=str(tmp_path))


def test_examples_added_one_by_one_give_the_batch_results(metric: ZSADMetric) -> None:
    inputs = example_inputs()
    for index in range(12):
        pixel_inputs = {"anomaly_maps": inputs["maps"][index], "gt_masks": inputs["masks"][index]} if index < 8 else {}
        metric.add(
            prediction=inputs["scores"][index],
            reference=inputs["labels"][index],
            categories="bottle" if index < 8 else "cable",
            **pixel_inputs,
        )
    assert flatten(metric.compute()) == pytest.approx(expected_results(inputs))


def test_compute_on_direct_inputs_uses_one_default_category(metric: ZSADMetric) -> None:
    inputs = example_inputs()
    results = metric.compute(predictions=inputs["scores"], references=inputs["labels"], fpr_limit=0.1)
    expected = compute_zsad_metrics({"all": CategoryRecord(inputs["scores"], inputs["labels"])})
    assert list(results["per_category"]) == ["all"]
    assert results["image_auroc"] == pytest.approx(expected.mean["image_auroc"])


def test_compute_forwards_the_aupro_options(metric: ZSADMetric) -> None:
    inputs = example_inputs()
    metric.add_batch(
        predictions=inputs["scores"][:8],
        references=inputs["labels"][:8],
        anomaly_maps=inputs["maps"],
        gt_masks=inputs["masks"],
    )
    results = metric.compute(fpr_limit=0.1, aupro_num_thresholds=5)
    expected = compute_zsad_metrics(
        {"all": CategoryRecord(inputs["scores"][:8], inputs["labels"][:8], inputs["maps"], inputs["masks"])},
        fpr_limit=0.1,
        aupro_num_thresholds=5,
    )
    assert results["pixel_aupro"] == pytest.approx(expected.mean["pixel_aupro"])


def test_single_class_category_warns_through_the_metric(metric: ZSADMetric) -> None:
    metric.add_batch(predictions=[0.1, 0.9, 0.4], references=[0, 1, 1], categories=["bottle", "bottle", "screw"])
    with pytest.warns(UndefinedMetricWarning, match="'screw'"):
        results = metric.compute()
    assert results["per_category"]["screw"]["image_auroc"] is None
    assert results["counts"]["image_auroc"] == 1


def test_unknown_inputs_are_rejected(metric: ZSADMetric) -> None:
    with pytest.raises(ValueError, match="category"):
        metric.add(prediction=0.5, reference=1, category="bottle")


def test_maps_for_part_of_a_category_are_rejected(metric: ZSADMetric) -> None:
    inputs = example_inputs()
    metric.add_batch(
        predictions=inputs["scores"][:2],
        references=inputs["labels"][:2],
        anomaly_maps=inputs["maps"][:2],
        gt_masks=inputs["masks"][:2],
    )
    metric.add_batch(predictions=inputs["scores"][2:4], references=inputs["labels"][2:4])
    with pytest.raises(ValueError, match="some of its images only"):
        metric.compute()

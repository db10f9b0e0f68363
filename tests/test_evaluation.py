"""Evaluator, `cops-hf evaluate` (single and two processes) and `cops-hf calibrate` on synthetic data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from cops_hf import CoPSImageProcessor, CoPSProcessor
from cops_hf.cli import main
from cops_hf.data import make_synthetic_dataset
from cops_hf.evaluation.evaluator import evaluate_dataset

from .tiny_models import tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, train_categories=["stripes"], test_categories=["checker", "ring"],
                                  images_per_category=5, image_size=64)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    tiny_model().save_pretrained(directory)
    CoPSProcessor(CoPSImageProcessor(size=98)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def evaluated(dataset_root, tmp_path_factory):
    output = tmp_path_factory.mktemp("evaluation")
    processor = CoPSProcessor(CoPSImageProcessor(size=98))
    result = evaluate_dataset(
        tiny_model(), processor, dataset_root, batch_size=3, output_dir=output, test_preset="visa"
    )
    return result, output


def test_report_matches_an_independent_computation(evaluated):
    result, _ = evaluated
    assert set(result.report.per_category) == {"checker", "ring"}
    for category in ("checker", "ring"):
        chosen = [index for index, name in enumerate(result.categories) if name == category]
        expected = roc_auc_score(result.image_labels[chosen], result.image_scores[chosen])
        assert result.report.per_category[category]["image_auroc"] == pytest.approx(expected)
    pixel_values = [result.report.per_category[c]["pixel_auroc"] for c in ("checker", "ring")]
    assert all(value is not None and 0 <= value <= 1 for value in pixel_values)
    assert result.report.mean["pixel_auroc"] == pytest.approx(np.mean(pixel_values))


def test_protocol_is_recorded_and_preset_applied(evaluated):
    result, output = evaluated
    assert result.protocol["test_preset"] == "visa"
    assert (result.protocol["test_kernel_size"], result.protocol["distance_alpha"]) == (3, 0.35)
    saved = json.loads((output / "metrics.json").read_text())
    assert saved["protocol"] == result.protocol
    assert saved["mean"]["image_auroc"] == pytest.approx(result.report.mean["image_auroc"])


def test_files_are_written_and_pictures_are_real(evaluated):
    result, output = evaluated
    rows = list(csv.DictReader(open(output / "metrics.csv")))
    assert [row["category"] for row in rows] == ["checker", "ring", "mean"]
    predictions = list(csv.DictReader(open(output / "predictions.csv")))
    assert len(predictions) == len(result.image_paths) == 10
    for name in ("roc.png", "pr.png"):
        picture = np.asarray(Image.open(output / name).convert("L"))
        assert picture.shape[0] > 200 and picture.std() > 10
    overlays = sorted((output / "visualizations").glob("*/*.png"))
    assert len(overlays) == 10
    panel = np.asarray(Image.open(overlays[-1]).convert("RGB"))
    assert panel.shape[1] > 2 * panel.shape[0] and panel.std() > 5  # three titled panels side by side


def test_calibrated_panels_carry_the_decision_and_results_name_the_dataset(dataset_root, tmp_path):
    """A calibrated model's panels print its decision in the decision colour; metrics.json names the evaluated
    dataset, which becomes the card's model-index dataset (it was "evaluation")."""
    from cops_hf.data import meta_dataset_name
    from cops_hf.hub import evaluation_for_card
    from cops_hf.visualization import DECISION_COLOURS

    processor = CoPSProcessor(CoPSImageProcessor(size=98))
    red = np.asarray(Image.new("RGB", (1, 1), DECISION_COLOURS["anomalous"]))[0, 0].astype(int)

    def caption_red_pixels(model, output):
        evaluate_dataset(model, processor, dataset_root, categories=["ring"], output_dir=output, num_visualizations=1)
        panel = np.asarray(Image.open(next((output / "visualizations").glob("*/*.png"))).convert("RGB"))
        caption = panel[-60:].astype(int)  # below the pictures: the decision line and the legend
        return int((np.abs(caption - red).max(axis=-1) <= 20).sum())

    calibrated = tiny_model()
    calibrated.config.image_threshold = 0.0  # every score is >= 0: the decision is "anomalous"
    assert caption_red_pixels(calibrated, tmp_path / "calibrated") > 20
    assert caption_red_pixels(tiny_model(), tmp_path / "uncalibrated") == 0
    saved = json.loads((tmp_path / "calibrated" / "metrics.json").read_text())
    expected = meta_dataset_name(dataset_root) or Path(dataset_root).resolve().name
    assert saved["protocol"]["dataset"] == expected and str(Path(dataset_root).resolve()) not in json.dumps(saved)
    assert list(evaluation_for_card(saved)) == [expected]


def test_evaluate_cli_single_and_two_processes_agree(model_dir, dataset_root, tmp_path):
    assert main(["evaluate", "--model", str(model_dir), "--data", str(dataset_root), "--output",
                 str(tmp_path / "one"), "--batch-size", "2", "--cpu"]) == 0  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cops_hf.cli",
               "evaluate", "--model", str(model_dir), "--data", str(dataset_root), "--output", str(tmp_path / "two"),
               "--batch-size", "2", "--cpu"]  # fmt: skip
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    double = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # Same images and noise; only float round-off of batched/threaded kernels may differ.
    for category, metrics in single["per_category"].items():
        assert double["per_category"][category] == pytest.approx(metrics, abs=1e-5)
    one, two = (list(csv.DictReader(open(tmp_path / run / "predictions.csv"))) for run in ("one", "two"))
    assert [{**row, "pred_score": None} for row in two] == [{**row, "pred_score": None} for row in one]
    assert [float(row["pred_score"]) for row in two] == pytest.approx(
        [float(row["pred_score"]) for row in one], abs=1e-5
    )


def test_calibrate_cli_stores_thresholds_used_by_predict(model_dir, dataset_root, tmp_path):
    normal_dir = Path(dataset_root) / "checker" / "test" / "good"
    assert main(["calibrate", "--model", str(model_dir), "--normal", str(normal_dir), "--output",
                 str(tmp_path / "calibrated")]) == 0  # fmt: skip
    config = json.loads((tmp_path / "calibrated" / "config.json").read_text())
    assert config["image_threshold"] is not None and config["pixel_threshold"] is not None
    image = sorted(normal_dir.iterdir())[0]
    assert main(["predict", "--model", str(tmp_path / "calibrated"), str(image), "--output", str(tmp_path / "p")]) == 0
    row = next(csv.DictReader(open(tmp_path / "p" / "scores.csv")))
    assert row["label"] in {"normal", "anomalous"}

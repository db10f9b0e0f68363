"""End-to-end `cops-hf` subcommands, run as a user would (console-script entry point)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from cops_hf import CoPSForAnomalyDetection, CoPSProcessor
from cops_hf.cli import main
from cops_hf.conversion import convert_original_checkpoint

from .test_conversion import FIXTURE_NAMES, load_fixture, reference_weights
from .tiny_models import tiny_model


def test_convert_writes_a_loadable_model(tmp_path):
    meta, tensors = load_fixture(FIXTURE_NAMES[0])
    clip, cops = reference_weights(meta, tensors)
    torch.save(clip, tmp_path / "clip.pt")
    torch.save({"prompt_learner": cops}, tmp_path / "cops.pth")
    output = tmp_path / "converted"
    code = main(
        ["convert", "--clip", str(tmp_path / "clip.pt"), "--checkpoint", str(tmp_path / "cops.pth"),
         "--output", str(output), "--image-size", "98", "--test-preset", "visa"]
    )  # fmt: skip
    assert code == 0
    model = CoPSForAnomalyDetection.from_pretrained(output)
    assert model.config.test_kernel_size == 3 and model.config.distance_alpha == 0.35
    assert CoPSProcessor.from_pretrained(output).image_processor.size == 98
    expected = convert_original_checkpoint(clip, cops, image_size=98)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_convert_reports_bad_files(tmp_path, capsys):
    code = main(["convert", "--clip", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "missing.pt' does not exist" in capsys.readouterr().err


def test_predict_writes_overlays_and_scores(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(2):
        path = tmp_path / f"part{index}.png"
        Image.fromarray(rng.integers(0, 256, (50 + index * 10, 70, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    broken = tmp_path / "broken.png"
    broken.write_text("no image")
    output = tmp_path / "predictions"
    code = main(
        ["predict", "--model", str(model_dir), *paths, str(broken), "--output", str(output),
         "--image-threshold", "0.5", "--skip-invalid", "--batch-size", "2"]
    )  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(open(output / "scores.csv")))
    assert [row["image"] for row in rows] == [*paths, str(broken)]
    assert all(0.0 <= float(row["score"]) <= 1.0 for row in rows[:2])
    assert {row["label"] for row in rows[:2]} <= {"anomalous", "normal"}
    assert "broken.png" in rows[2]["error"]
    overlay = Image.open(output / rows[1]["overlay"])
    assert overlay.size == (70, 60)
    assert np.asarray(overlay).std() > 5  # a real picture, not a blank


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "convert" in capsys.readouterr().out

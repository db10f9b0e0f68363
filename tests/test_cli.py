"""End-to-end `cops-hf` subcommands, run as a user would (console-script entry point)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cops_hf
from cops_hf import CoPSForAnomalyDetection, CoPSProcessor
from cops_hf.cli import main
from cops_hf.conversion import convert_original_checkpoint

from .test_conversion import FIXTURE_NAMES, load_fixture, reference_weights
from .tiny_models import tiny_model


def _env() -> dict[str, str]:
    """This process's environment with the checkout first on the path, so subprocesses import this code."""
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


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
        # Exact: conversion copies tensors; no arithmetic runs between the two.
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
    assert overlay.width > overlay.height >= 320  # drawn large enough to read, with a colour bar at the side
    assert np.asarray(overlay).std() > 5  # a real picture, not a blank
    # The README's quick start names the first overlay of `predict ... part.png`: that name is the one written.
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    named = next(line for line in readme.splitlines() if "predict --model" in line and "overlay.png" in line)
    assert rows[0]["overlay"].replace("part0", "part") in named


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "convert" in capsys.readouterr().out


def test_help_imports_neither_torch_nor_transformers():
    """`cops-hf --help` and every subcommand's --help stay light (no torch, transformers, accelerate, and none of the
    optional Ray extra): measured in a fresh interpreter."""
    script = (
        "import sys, contextlib, io\n"
        "from cops_hf.cli import SUBCOMMANDS, main\n"
        "for argv in [['--help'], *[[name, '--help'] for name, *_ in SUBCOMMANDS]]:\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "heavy = {'torch', 'transformers', 'accelerate', 'ray', 'fastapi'}\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & heavy))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", script], capture_output=True, text=True, check=True, env=_env()
    )
    assert completed.stdout.strip() == "[]"
    imported = {line.rsplit("|", 1)[-1].strip() for line in completed.stderr.splitlines() if "|" in line}
    assert "cops_hf.cli" in imported and not imported & {"torch", "transformers", "ray", "fastapi"}


def test_every_option_has_help_and_shows_its_default(capsys):
    """Each option of each subcommand says what it does (issue 20: --epochs, --seed, --lr, --split, --suite and
    --quantile had none); --quantile's default is printed."""
    import argparse

    from cops_hf.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    undocumented = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, parser in subcommands.items()
        for action in parser._actions
        if action.option_strings and not action.help
    ]
    assert undocumented == []
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    assert "(default: 0.99)" in " ".join(capsys.readouterr().out.split())


def test_demo_score_table_has_a_heading():
    """The demo's normal/anomalous column is the ground truth, and its heading says so (it read like a decision)."""
    from cops_hf.demo import format_test_scores

    lines = format_test_scores(
        [{"pred_score": 0.0123, "gt_label": 1, "cls_name": "ring", "image_path": "data/ring/1.png"}]
    ).splitlines()
    assert lines[0].split() == ["score", "truth", "category", "image"]
    assert lines[1].split() == ["0.0123", "anomalous", "ring", "data/ring/1.png"]


def test_version_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"cops-hf {cops_hf.__version__}"
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    help_text = capsys.readouterr().out
    assert "examples:\n  cops-hf predict --model" in help_text and "--dtype {fp32,bf16,fp16}" in help_text


@pytest.mark.parametrize("command", ["predict", "evaluate", "benchmark", "calibrate"])
def test_missing_cuda_is_one_line(tmp_path, capsys, command):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    image = tmp_path / "part.png"
    Image.new("RGB", (32, 32)).save(image)
    target = {
        "predict": [str(image), "--output", str(tmp_path / "out")],
        "evaluate": ["--data", str(tmp_path), "--output", str(tmp_path / "out")],
        "benchmark": ["--data-root", str(tmp_path), "--output", str(tmp_path / "out")],
        "calibrate": ["--normal", str(image), "--output", str(tmp_path / "out")],
    }[command]
    capsys.readouterr()
    code = main([command, "--model", str(model_dir), *target, "--device", "cuda", "--dtype", "bf16"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and error.startswith(f"cops-hf {command}: error: --device cuda: ")
    assert "use --device cpu" in error
    assert main([command, "--model", str(model_dir), *target, "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_benchmark_that_evaluates_nothing_fails(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    (tmp_path / "data").mkdir()
    capsys.readouterr()
    code = main(
        ["benchmark", "--model", str(model_dir), "--data-root", str(tmp_path / "data"), "--output",
         str(tmp_path / "out"), "--device", "cpu"]
    )  # fmt: skip
    assert code == 2
    assert "no dataset of suite 'all' was evaluated" in capsys.readouterr().err


def test_predict_expands_folders_and_globs_and_writes_json_and_masks(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    rng = np.random.default_rng(1)
    for relative in ["imgs/a.png", "imgs/sub/b.jpg", "imgs/.hidden/c.png", "more/d.png", "more/e.png"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / relative)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    output = tmp_path / "out"
    capsys.readouterr()
    code = main(
        ["-q", "predict", "--model", str(model_dir), str(tmp_path / "imgs"), str(tmp_path / "more" / "*.png"),
         "--output", str(output), "--format", "json", "--threshold", "0.5", "--image-threshold", "0.5"]
    )  # fmt: skip
    assert code == 0 and capsys.readouterr().out == ""
    rows = json.loads((output / "scores.json").read_text())
    names = [Path(row["image"]).relative_to(tmp_path).as_posix() for row in rows]
    assert names == ["imgs/a.png", "imgs/sub/b.jpg", "more/d.png", "more/e.png"]
    assert all(isinstance(row["score"], float) and row["label"] in ("normal", "anomalous") for row in rows)
    mask = np.asarray(Image.open(output / rows[0]["mask"]))
    assert mask.shape == (40, 48) and set(np.unique(mask)) <= {0, 255}
    assert main(["predict", "--model", str(model_dir), str(tmp_path / "nowhere"), "--output", str(output)]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err

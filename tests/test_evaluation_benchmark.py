"""`cops-hf data` and `cops-hf benchmark` on two fake datasets: one pixel-level, one image-level only."""

from __future__ import annotations

import json

import pytest

from cops_hf.cli import main
from cops_hf.data import make_synthetic_dataset, read_meta_json
from cops_hf.evaluation.benchmark import find_dataset_roots
from cops_hf.evaluation.report import METRIC_DISPLAY_NAMES

from .data_fakes import write_image
from .tiny_models import tiny_model


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    make_synthetic_dataset(root / "MVTec-AD", train_categories=[], test_categories=["checker", "ring"],
                           images_per_category=4, image_size=56)  # fmt: skip
    for index in range(3):  # HeadCT download layout, no masks
        write_image(root / "HeadCT" / "brain" / "test" / "good" / f"{index:03d}.png", (40, 40), 60 + 40 * index)
        write_image(root / "HeadCT" / "brain" / "test" / "hemorrhage" / f"{index:03d}.png", (40, 40), 90 + 50 * index)
    (root / "notes").mkdir()
    return root


def test_dataset_folders_are_found_by_alias(data_root):
    assert set(find_dataset_roots(data_root)) == {"mvtec", "headct"}


def test_data_prepare_and_validate(tmp_path, data_root, capsys):
    layout = tmp_path / "headct"
    for index in range(2):
        write_image(layout / "brain" / "test" / "good" / f"{index}.png")
        write_image(layout / "brain" / "test" / "hemorrhage" / f"{index}.png")
    assert main(["data", "prepare", "HeadCT", str(layout)]) == 0
    assert len(read_meta_json(layout)["test"]["brain"]) == 4
    assert main(["data", "validate", str(layout)]) == 0
    (layout / "brain" / "test" / "good" / "0.png").unlink()
    assert main(["data", "validate", str(layout)]) == 1
    assert "0.png" in capsys.readouterr().out


def test_benchmark_table_and_json(tmp_path, data_root, capsys):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    output = tmp_path / "results"
    assert main(["benchmark", "--model", str(model_dir), "--suite", "all", "--data-root", str(data_root),
                 "--output", str(output), "--batch-size", "4", "--cpu"]) == 0  # fmt: skip
    saved = json.loads((output / "benchmark.json").read_text())
    assert list(saved["metrics"]) == ["mvtec", "headct"]
    assert all(value is not None for value in saved["metrics"]["mvtec"].values())
    headct = saved["metrics"]["headct"]
    assert headct["image_auroc"] is not None and headct["pixel_auroc"] is None and headct["pixel_aupro"] is None
    assert saved["protocols"]["headct"]["test_preset"] == "headct"
    assert saved["protocols"]["mvtec"]["test_kernel_size"] == 5
    assert set(saved["missing"]) == {"visa", "btad", "mpdd", "dtd_synthetic", "brainmri", "br35h", "isic",
                                     "cvc_colondb", "cvc_clinicdb", "kvasir", "endo"}  # fmt: skip
    lines = (output / "benchmark.md").read_text().splitlines()
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert table[0] == ["dataset", *METRIC_DISPLAY_NAMES.values()]
    headct_row = next(row for row in table if row[0] == "headct")
    assert headct_row[4:] == ["-", "-", "-", "-"] and headct_row[1] != "-"
    assert "not found: visa" in capsys.readouterr().out
    assert (output / "mvtec" / "metrics.json").is_file() and (output / "headct" / "roc.png").is_file()

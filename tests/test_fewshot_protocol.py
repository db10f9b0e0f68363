"""The few-shot protocol: `cops-hf evaluate --shots K --shot-seeds S...` and `cops-hf benchmark --shots K`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_hf import CoPSProcessor
from cops_hf.cli import main
from cops_hf.data import DEFECT_TYPES, make_record, render_synthetic_sample, write_meta_json
from cops_hf.evaluation.fewshot import draw_references, evaluate_few_shot
from cops_hf.evaluation.report import METRIC_NAMES
from cops_hf.schema import PER_SEED, REFERENCE_SPLIT, REFERENCES, SHOT_SEEDS, SHOTS, STD

from .tiny_models import tiny_model


def _sample(root: Path, split: str, category: str, index: int, defect: str | None) -> dict:
    sample = render_synthetic_sample(category, index, image_size=56, defect_type=defect)
    image = f"{category}/{split}/{defect or 'good'}/{index:03d}.png"
    (root / image).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample.image).save(root / image)
    mask = ""
    if defect:
        mask = f"{category}/ground_truth/{index:03d}_mask.png"
        (root / mask).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample.mask.astype(np.uint8) * 255).save(root / mask)
    return make_record(
        image, cls_name=category, anomaly=int(bool(defect)), specie_name=defect or "good", mask_path=mask
    )


def write_dataset(root: Path) -> Path:
    """`checker` has 6 normal train images; `ring` has no train split, so its 4 test normals are the pool."""
    test = {
        category: [_sample(root, "test", category, i, None if i < 4 else DEFECT_TYPES[i % 4]) for i in range(7)]
        for category in ("checker", "ring")
    }
    train = {"checker": [_sample(root, "train", "checker", 100 + i, None) for i in range(6)]}
    write_meta_json(root, {"train": train, "test": test})
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("fewshot") / "MVTec-AD")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    model = tiny_model()
    model.save_pretrained(directory)
    CoPSProcessor.for_image_size(model.config.image_size).save_pretrained(directory)
    return directory


def test_the_same_seed_draws_the_same_references_and_another_seed_others() -> None:
    pool = [f"good/{index}.png" for index in range(10)]
    first = draw_references(pool, 3, seed=0, category="bottle")
    assert first == draw_references(list(reversed(pool)), 3, seed=0, category="bottle")  # order does not matter
    assert len(set(first)) == 3 and set(first) <= set(pool)
    assert first != draw_references(pool, 3, seed=1, category="bottle")
    assert first != draw_references(pool, 3, seed=0, category="cable")
    assert draw_references(pool, 10, seed=4, category="bottle") == sorted(pool)
    with pytest.raises(ValueError, match="^--shots 11 is more than the 10 normal images of category 'bottle'"):
        draw_references(pool, 11, seed=0, category="bottle")


@pytest.fixture(scope="module")
def three_shot(data_root: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("three_shot")
    argv = ["evaluate", "--model", str(model_dir), "--data", str(data_root), "--output", str(output), "--shots", "3"]
    assert main([*argv, "--shot-seeds", "0", "1", "--num-visualizations", "0", "--cpu"]) == 0
    return output


def test_metrics_json_fields_and_seed_statistics(three_shot: Path) -> None:
    metrics = json.loads((three_shot / "metrics.json").read_text())
    assert {"mean", "per_category", STD, SHOTS, SHOT_SEEDS, PER_SEED, REFERENCES, REFERENCE_SPLIT} <= set(metrics)
    assert metrics[SHOTS] == 3 and metrics[SHOT_SEEDS] == [0, 1] and list(metrics[PER_SEED]) == ["0", "1"]
    assert metrics[REFERENCE_SPLIT] == {"checker": "train", "ring": "test"}
    for name in METRIC_NAMES:
        seed_means = [metrics[PER_SEED][seed]["mean"][name] for seed in ("0", "1")]
        assert metrics["mean"][name] == pytest.approx(np.mean(seed_means), abs=1e-9)
        assert metrics[STD][name] == pytest.approx(np.std(seed_means), abs=1e-9)
    references = metrics[REFERENCES]
    assert references["0"]["checker"][0].startswith("checker/train/good/")  # relative to the data root
    assert all(path.startswith("ring/test/good/") for path in references["0"]["ring"])
    assert references["0"] != references["1"]
    assert (three_shot / "seed-0" / "metrics.json").is_file() and (three_shot / "metrics.csv").is_file()


def test_test_normals_used_as_references_are_left_out_of_scoring(three_shot: Path, data_root: Path) -> None:
    metrics = json.loads((three_shot / "metrics.json").read_text())
    for seed in ("0", "1"):
        with open(three_shot / f"seed-{seed}" / "predictions.csv") as handle:
            scored = {str(Path(row["image_path"]).relative_to(data_root)) for row in csv.DictReader(handle)}
        assert not set(metrics[REFERENCES][seed]["ring"]) & scored
        assert len(scored) == 14 - 3  # only ring's three references are test images
        protocol = json.loads((three_shot / f"seed-{seed}" / "metrics.json").read_text())["protocol"]
        assert protocol["left_out_of_scoring"] == 3


def test_zero_shots_is_todays_evaluation(data_root: Path, model_dir: Path, tmp_path: Path) -> None:
    argv = ["evaluate", "--model", str(model_dir), "--data", str(data_root), "--num-visualizations", "0"]
    assert main([*argv, "--output", str(tmp_path / "zero")]) == 0
    metrics = json.loads((tmp_path / "zero" / "metrics.json").read_text())
    assert set(metrics) == {"per_category", "mean", "counts", "protocol"}
    assert "left_out_of_scoring" not in metrics["protocol"]
    assert main([*argv, "--output", str(tmp_path / "x"), "--shot-seeds", "1"]) == 2


def test_a_model_with_references_is_refused_and_the_memory_is_cleared(data_root: Path) -> None:
    model = tiny_model()
    processor = CoPSProcessor.for_image_size(model.config.image_size)
    result = evaluate_few_shot(model, processor, data_root, shots=1, shot_seeds=[0, 2], num_visualizations=0)
    assert model.num_references == 0 and result.shot_seeds == [0, 2]
    model.set_references(processor(images=[str(data_root / "checker/train/good/100.png")])["pixel_values"])
    with pytest.raises(ValueError, match="already holds 1 references"):
        evaluate_few_shot(model, processor, data_root, shots=1, num_visualizations=0)


def test_benchmark_takes_shots_and_says_k_shot(data_root: Path, model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "bench"
    argv = ["benchmark", "--model", str(model_dir), "--data-root", str(data_root.parent), "--output", str(output)]
    assert main([*argv, "--suite", "industrial", "--shots", "2", "--shot-seeds", "0", "1", "--cpu"]) == 0
    saved = json.loads((output / "benchmark.json").read_text())
    assert saved[SHOTS] == 2 and set(saved[STD]) == {"mvtec"}
    assert (output / "benchmark.md").read_text().startswith("| dataset (2-shot) |")
    references = json.loads((output / "mvtec" / "metrics.json").read_text())[REFERENCES]
    direct = json.loads((output / "mvtec" / "seed-1" / "metrics.json").read_text())["protocol"]
    assert set(references) == {"0", "1"} and direct["left_out_of_scoring"] == 2

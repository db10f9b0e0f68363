"""The few-shot protocol as the literature runs it (WinCLIP+, the VAND challenge): k normal references per category.

For each category and each shot seed, `draw_references` picks K normal images: from the category's `train` split
when meta.json has normal images there, else from the test split's normals, which are then left out of scoring.
Each seed is one full evaluation (`evaluate_dataset` with `references`); the metrics are averaged over the seeds,
with their standard deviation (population, `ddof=0`: 0 for a single seed).

Files (with an output folder): `OUT/seed-<S>/` holds each seed's evaluation files, and `OUT/metrics.json` /
`OUT/metrics.csv` the seed average. metrics.json keeps the zero-shot keys (`mean`, `per_category`, `counts`,
`protocol`) and adds `std`, `per_category_std`, `shots`, `shot_seeds`, `per_seed` (each seed's `mean` and
`per_category`), `references` (per seed and category, the reference paths relative to the data root) and
`reference_split` (per category: `train`, or the test split when the references came from its normals).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import load_meta_dataset, read_meta_json
from ..file_utils import csv_writer
from ..modeling_cops import CoPSForAnomalyDetection
from ..processing_cops import CoPSProcessor
from ..schema import PER_SEED, REFERENCE_SPLIT, REFERENCES, SHOT_SEEDS, SHOTS, STD
from .evaluator import EvaluationResult, evaluate_dataset
from .report import METRIC_NAMES, MetricValues, ZSADReport

logger = logging.getLogger(__name__)

REFERENCE_SOURCE_SPLIT = "train"
"""The split references are drawn from when it holds normal images of the category."""


@dataclass
class FewShotResult:
    """What a few-shot evaluation produced (on the main process).

    Attributes:
        report: per-category metrics averaged over the seeds, and their mean over categories.
        std: per metric, the standard deviation over seeds of the mean over categories.
        per_category_std: per category and metric, the standard deviation over seeds.
        shots: references per category (K).
        shot_seeds: the seeds, one evaluation each.
        per_seed: each seed's full `EvaluationResult`.
        references: per seed and category, the reference paths relative to the data root.
        reference_split: per category, the split its references came from.
        files: the files written (empty without an output folder).
    """

    report: ZSADReport
    std: MetricValues
    per_category_std: dict[str, MetricValues]
    shots: int
    shot_seeds: list[int]
    per_seed: dict[int, EvaluationResult]
    references: dict[int, dict[str, list[str]]]
    reference_split: dict[str, str]
    files: list[Path] = field(default_factory=list)

    @property
    def protocol(self) -> dict[str, Any]:
        """The first seed's protocol, with the shots, seeds and where the references came from."""
        first = self.per_seed[self.shot_seeds[0]].protocol
        return {**first, SHOTS: self.shots, SHOT_SEEDS: self.shot_seeds, REFERENCE_SPLIT: self.reference_split}

    def to_dict(self) -> dict[str, Any]:
        """The content of metrics.json (see the module docstring)."""
        return {
            **self.report.to_dict(),
            STD: self.std,
            "per_category_std": self.per_category_std,
            SHOTS: self.shots,
            SHOT_SEEDS: self.shot_seeds,
            PER_SEED: {str(seed): _seed_summary(result) for seed, result in self.per_seed.items()},
            REFERENCES: {str(seed): paths for seed, paths in self.references.items()},
            REFERENCE_SPLIT: self.reference_split,
            "protocol": self.protocol,
        }


def draw_references(normal_paths: Sequence[str], shots: int, seed: int, category: str) -> list[str]:
    """K normal images of one category for one seed: the one sampling rule of `evaluate` and `benchmark`.

    The draw depends only on the set of paths, `seed` and `category` (not on their order or on the other
    categories), so the same seed draws the same references.

    Args:
        normal_paths: the category's normal images to draw from.
        shots: K, at least 1.
        seed: the shot seed (>= 0).
        category: the category name (mixed into the seed).

    Returns:
        K distinct paths, sorted.

    Raises:
        ValueError: `shots` is below 1 or above the number of normal images, or `seed` is negative.
    """
    if shots < 1 or seed < 0:
        raise ValueError(f"--shots must be >= 1 and --shot-seeds >= 0 for few-shot references; got {shots}, {seed}.")
    pool = sorted(set(normal_paths))
    if shots > len(pool):
        raise ValueError(
            f"--shots {shots} is more than the {len(pool)} normal images of category {category!r}: lower --shots or "
            "add normal images (a `train` split of good images, or more test normals)."
        )
    rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
    return [pool[position] for position in sorted(rng.choice(len(pool), size=shots, replace=False).tolist())]


def reference_pools(
    data_root: str | os.PathLike[str],
    split: str = "test",
    categories: Sequence[str] | None = None,
    skip_invalid: bool = False,
) -> dict[str, tuple[str, list[str]]]:
    """Per evaluated category: the split its references come from and that split's normal image paths (absolute).

    A category's `train` split is used when it holds normal images of it; otherwise the evaluated split's own
    normals are the pool (and `evaluate_dataset` leaves the drawn ones out of scoring).
    """
    evaluated = load_meta_dataset(data_root, split=split, categories=categories, skip_invalid=skip_invalid)
    evaluated_normals = _normal_paths(evaluated)
    train_records = (
        read_meta_json(data_root).get(REFERENCE_SOURCE_SPLIT, {}) if split != REFERENCE_SOURCE_SPLIT else {}
    )
    names = list(dict.fromkeys(evaluated["cls_name"]))
    from_train = [name for name in names if any(record.get("anomaly") == 0 for record in train_records.get(name, []))]
    train_normals = {}
    if from_train:
        train = load_meta_dataset(data_root, REFERENCE_SOURCE_SPLIT, categories=from_train, skip_invalid=skip_invalid)
        train_normals = _normal_paths(train)
    return {
        name: (REFERENCE_SOURCE_SPLIT, train_normals.get(name, []))
        if name in from_train
        else (split, evaluated_normals.get(name, []))
        for name in names
    }


def _normal_paths(dataset: Any) -> dict[str, list[str]]:
    """Per category, the paths of a meta.json dataset's normal images."""
    normals: dict[str, list[str]] = {}
    for path, label, category in zip(dataset["image_path"], dataset["gt_label"], dataset["cls_name"], strict=True):
        if label == 0:
            normals.setdefault(category, []).append(path)
    return normals


def evaluate_few_shot(
    model: CoPSForAnomalyDetection,
    processor: CoPSProcessor,
    data_root: str | os.PathLike[str],
    *,
    shots: int,
    shot_seeds: Sequence[int] = (0,),
    split: str = "test",
    categories: list[str] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    skip_invalid: bool = False,
    **evaluate_options: Any,
) -> FewShotResult | None:
    """Evaluate `model` K-shot: one `evaluate_dataset` run per shot seed, averaged over the seeds.

    Every draw is made (and a too-large `shots` refused) before anything is scored.

    Args:
        shots: K normal references per category (>= 1).
        shot_seeds: the seeds of the draws (distinct, >= 0); each is one full evaluation.
        split, categories, skip_invalid: as for `evaluate_dataset`.
        output_dir: each seed's files go to `output_dir/seed-<S>/`, the seed average to `metrics.json` and
            `metrics.csv` here.
        **evaluate_options: other `evaluate_dataset` options (test_preset, batch_size, seed, accelerator, ...).

    Returns:
        The result on the main process; `None` on the other processes.

    Raises:
        ValueError: `shots` < 1 or above a category's normal images, repeated or negative seeds.
    """
    if not shot_seeds or len(set(shot_seeds)) != len(shot_seeds):
        raise ValueError(f"--shot-seeds must be distinct seeds, got {list(shot_seeds)}.")
    pools = reference_pools(data_root, split, categories, skip_invalid)
    draws = {
        seed: {category: draw_references(paths, shots, seed, category) for category, (_, paths) in pools.items()}
        for seed in shot_seeds
    }
    per_seed = {}
    for seed, references in draws.items():
        seed_dir = Path(output_dir) / f"seed-{seed}" if output_dir is not None else None
        result = evaluate_dataset(
            model, processor, data_root, split=split, categories=categories, output_dir=seed_dir,
            skip_invalid=skip_invalid, references=references, **evaluate_options,
        )  # fmt: skip
        if result is not None:
            per_seed[seed] = result
    if not per_seed:
        return None
    root = os.path.abspath(data_root)
    result = FewShotResult(
        report=ZSADReport(_seed_average(per_seed, np.mean)),
        std=_metric_spread([result.report.mean for result in per_seed.values()], np.std),
        per_category_std=_seed_average(per_seed, np.std),
        shots=shots,
        shot_seeds=list(shot_seeds),
        per_seed=per_seed,
        references={
            seed: {category: [os.path.relpath(path, root) for path in paths] for category, paths in drawn.items()}
            for seed, drawn in draws.items()
        },
        reference_split={category: source for category, (source, _) in pools.items()},
    )
    if output_dir is not None:
        result.files = _write_outputs(Path(output_dir), result)
    return result


def _seed_summary(result: EvaluationResult) -> dict[str, Any]:
    return {"mean": result.report.mean, "per_category": result.report.per_category}


def _metric_spread(values: list[MetricValues], reduce: Any) -> MetricValues:
    """Per metric, `reduce` over the dictionaries' values; None when any of them lacks the metric."""
    return {
        name: None
        if any(item.get(name) is None for item in values)
        else float(reduce([item[name] for item in values]))
        for name in METRIC_NAMES
    }


def _seed_average(per_seed: dict[int, EvaluationResult], reduce: Any) -> dict[str, MetricValues]:
    """Per category (those of the first seed), `reduce` of each metric over the seeds."""
    categories = next(iter(per_seed.values())).report.per_category
    return {
        category: _metric_spread(
            [result.report.per_category.get(category, {}) for result in per_seed.values()], reduce
        )
        for category in categories
    }


def _write_outputs(output_dir: Path, result: FewShotResult) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_json, metrics_csv = output_dir / "metrics.json", output_dir / "metrics.csv"
    metrics_json.write_text(json.dumps(result.to_dict(), indent=2))
    with open(metrics_csv, "w", newline="") as handle:
        writer = csv_writer(handle)
        writer.writerow(["category", *METRIC_NAMES, *(f"{name}_std" for name in METRIC_NAMES)])
        rows = [*result.per_category_std.items(), ("mean", result.std)]
        averages = [*result.report.per_category.values(), result.report.mean]
        for (category, spread), average in zip(rows, averages, strict=True):
            writer.writerow([category, *(average[name] for name in METRIC_NAMES), *spread.values()])
    return [metrics_json, metrics_csv] + [path for seed in result.per_seed.values() for path in seed.files]


__all__ = ["REFERENCE_SOURCE_SPLIT", "FewShotResult", "draw_references", "evaluate_few_shot", "reference_pools"]

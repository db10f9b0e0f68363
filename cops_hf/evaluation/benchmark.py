"""The paper's protocol in one call: evaluate every prepared benchmark dataset under a root, with its preset.

Each dataset is evaluated with the reference's test-time switches for its name (`TEST_DATASET_PRESETS`), and the
protocol is recorded per dataset. The table has one row per dataset (means over categories) and "-" where a
metric does not exist for that dataset (image-level-only sets have no pixel metrics; sets whose test images are
all anomalous have no image metrics), as in the paper.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..data import DataError, meta_json_path, prepare_dataset
from ..data.registry import REGISTRY, SUITES, benchmark_name
from ..file_utils import csv_writer
from ..modeling_cops import CoPSForAnomalyDetection
from ..processing_cops import CoPSProcessor
from ..schema import SHOTS, STD
from .evaluator import evaluate_dataset
from .fewshot import evaluate_few_shot
from .report import METRIC_DISPLAY_NAMES, METRIC_NAMES, format_percent, render_table

logger = logging.getLogger(__name__)

# The benchmark table's column titles (the old name of `METRIC_DISPLAY_NAMES`).
TABLE_COLUMNS = METRIC_DISPLAY_NAMES


@dataclass
class BenchmarkResult:
    """Per dataset: mean metrics (None = not available), the protocol used, and the datasets not found.

    With `shots` > 0 (few-shot), `metrics` are the means over the shot seeds and `std` their standard deviations.
    """

    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    protocols: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    shots: int = 0
    std: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (what `benchmark.json` holds); few-shot runs add `shots` and `std`."""
        content = {"metrics": self.metrics, "protocols": self.protocols, "missing": self.missing}
        return content | ({SHOTS: self.shots, STD: self.std} if self.shots else {})

    @property
    def dataset_heading(self) -> str:
        """The first column's title: "dataset", or "dataset (K-shot)" for a few-shot run."""
        return f"dataset ({self.shots}-shot)" if self.shots else "dataset"

    def _table_cells(self) -> tuple[list[str], list[list[str]]]:
        header = [self.dataset_heading, *METRIC_DISPLAY_NAMES.values()]
        rows = [
            [name, *(format_percent(values[key]) for key in METRIC_DISPLAY_NAMES)]
            for name, values in self.metrics.items()
        ]
        return header, rows

    def format_table(self, markdown: bool = False) -> str:
        """Paper-style table in percent with one decimal, "-" where a metric does not exist.

        The datasets not found are listed below it.
        """
        table = render_table(*self._table_cells(), markdown=markdown)
        if self.missing:
            table += "\n\nnot found: " + ", ".join(f"{name} ({why})" for name, why in self.missing.items())
        return table


def find_dataset_roots(data_root: str | Path) -> dict[str, Path]:
    """Map benchmark names to the folders under `data_root` named after them (any alias, any case)."""
    found: dict[str, Path] = {}
    for folder in sorted(Path(data_root).iterdir()) if Path(data_root).is_dir() else []:
        try:
            name = benchmark_name(folder.name)
        except ValueError:
            continue
        if folder.is_dir():
            found.setdefault(name, folder)
    return found


def run_benchmark(
    model: CoPSForAnomalyDetection,
    processor: CoPSProcessor,
    data_root: str | Path,
    *,
    suite: str = "all",
    output_dir: str | Path | None = None,
    batch_size: int = 8,
    seed: int = 0,
    num_visualizations: int = 4,
    accelerator: Accelerator | None = None,
    shots: int = 0,
    shot_seeds: Sequence[int] = (0,),
) -> BenchmarkResult | None:
    """Evaluate `model` on each dataset of `suite` found under `data_root` (one folder per dataset).

    A folder without meta.json is prepared from its download layout first; datasets absent or not preparable are
    listed in `missing` and skipped. With `output_dir`, each dataset's files go to `output_dir/<name>/` and the
    table to `benchmark.csv`, `benchmark.md` and `benchmark.json` (the JSON the model card embeds).

    With `shots` > 0, each dataset is evaluated K-shot (`cops_hf.evaluation.fewshot.evaluate_few_shot`, the same
    reference draws as `cops-hf evaluate --shots`), averaged over `shot_seeds`.

    Returns:
        The result on the main process, `None` on the others.
    """
    if suite not in SUITES:
        raise ValueError(f"Unknown suite {suite!r}; choose one of {sorted(SUITES)}.")
    accelerator = accelerator or Accelerator()
    roots = find_dataset_roots(data_root)
    base_config = model.config
    result = BenchmarkResult(shots=shots)
    few_shot = {"shots": shots, "shot_seeds": shot_seeds} if shots else {}
    for name in SUITES[suite]:
        if name not in roots:
            result.missing[name] = "no folder"
            continue
        if not meta_json_path(roots[name]).is_file():
            try:
                if accelerator.is_main_process:
                    prepare_dataset(name, roots[name])
            except DataError as error:
                result.missing[name] = f"cannot prepare: {error}"
                continue
            accelerator.wait_for_everyone()
        model.config = base_config
        evaluation = (evaluate_few_shot if shots else evaluate_dataset)(
            model, processor, roots[name], test_preset=REGISTRY[name].test_preset, batch_size=batch_size, seed=seed,
            output_dir=Path(output_dir) / name if output_dir is not None else None,
            num_visualizations=num_visualizations, accelerator=accelerator, **few_shot,
        )  # fmt: skip
        if evaluation is not None:
            result.metrics[name] = {key: evaluation.report.mean.get(key) for key in METRIC_NAMES}
            result.protocols[name] = evaluation.protocol
            if shots:
                result.std[name] = evaluation.std
    model.config = base_config
    if not accelerator.is_main_process:
        return None
    for name, why in result.missing.items():
        logger.warning("Skipped %s: %s", name, why)
    if output_dir is not None:
        _write_tables(Path(output_dir), result)
    return result


def _write_tables(output_dir: Path, result: BenchmarkResult) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmark.json").write_text(json.dumps(result.to_dict(), indent=2))
    (output_dir / "benchmark.md").write_text(result.format_table(markdown=True) + "\n")
    with open(output_dir / "benchmark.csv", "w", newline="") as handle:
        writer = csv_writer(handle)
        writer.writerow([result.dataset_heading, *METRIC_DISPLAY_NAMES.values()])
        for name, values in result.metrics.items():
            writer.writerow(
                [name, *("-" if values[key] is None else f"{values[key]:.6f}" for key in METRIC_DISPLAY_NAMES)]
            )


__all__ = ["SUITES", "TABLE_COLUMNS", "BenchmarkResult", "find_dataset_roots", "run_benchmark"]

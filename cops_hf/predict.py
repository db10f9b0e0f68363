"""Scoring many image files: folder and glob expansion, and a writer that streams rows as images are scored.

Used by `cops-hf predict` and `examples/infer.py`. The pipeline is fed a generator, so results come one at a
time and each row is written (and flushed) as it comes: memory stays flat however many images there are.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .file_utils import bounded_filename, csv_dict_writer
from .image_utils import expand_image_sources
from .schema import DEPRECATED_RESULT_KEYS, ERROR, IMAGE_PATH, PRED_LABEL, PRED_MASK, PRED_SCORE
from .visualization import DEFAULT_ALPHA, DEFAULT_COLORMAP

OUTPUT_FORMATS = ("csv", "json")
"""The formats `write_predictions` writes the table of scores in."""

RESULT_COLUMNS = (IMAGE_PATH, PRED_SCORE, PRED_LABEL, "overlay", PRED_MASK, ERROR)
"""One row per image (`cops_hf.schema`'s names): its path, score, label (when an image threshold is known), the
overlay and binary-mask PNG file names (relative to the output folder; the mask only when a pixel threshold is
known), and the error of an unreadable image (other fields empty)."""

DEPRECATED_COLUMNS = ("image", "score", "label", "mask")
"""The former names of `image_path`, `pred_score`, `pred_label` and `pred_mask`: written as well, after the others,
for one release (a file cannot warn its reader), then dropped."""

TABLE_COLUMNS = RESULT_COLUMNS + DEPRECATED_COLUMNS
"""The columns of `scores.csv` / the keys of `scores.json` rows."""


def load_model_and_processor(
    model_name: str | os.PathLike[str], *, device: str | None = None, dtype: str | None = None
) -> tuple[Any, Any]:
    """A CoPS model (eval mode, on `device` in `dtype`) and its processor, from a folder or Hub id.

    Args:
        device: "cpu", "cuda", "cuda:1", ... checked by `resolve_device` (default: a GPU when there is one).
        dtype: one of `DTYPE_NAMES` (default fp32).

    Returns:
        `(CoPSForAnomalyDetection, CoPSProcessor)`; the processor saved with the model, else the default one at
        the model's input size.
    """
    from .devices import resolve_device, resolve_dtype
    from .hub_errors import friendly_hub_errors
    from .modeling_cops import CoPSForAnomalyDetection

    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    with friendly_hub_errors(os.fspath(model_name)):
        model = CoPSForAnomalyDetection.from_pretrained(model_name, dtype=torch_dtype)
    return model.to(torch_device).eval(), load_processor(model_name, model.config.image_size)


def load_processor(model_name: str | os.PathLike[str], image_size: int) -> Any:
    """The `CoPSProcessor` saved with a model, else the default one at the model's `image_size`."""
    from .processing_cops import CoPSProcessor

    try:
        return CoPSProcessor.from_pretrained(model_name)
    except (OSError, ValueError):
        return CoPSProcessor.for_image_size(image_size)


def load_detector(model_name: str | os.PathLike[str], *, device: str | None = None, dtype: str | None = None) -> Any:
    """The "anomaly-detection" pipeline of `model_name` on `device` in `dtype` (see `load_model_and_processor`)."""
    from transformers import pipeline

    model, processor = load_model_and_processor(model_name, device=device, dtype=dtype)
    return pipeline("anomaly-detection", model=model, processor=processor, device=model.device)


@dataclass
class PredictionSummary:
    """What `write_predictions` did: images scored and failed, and the table it wrote."""

    table_path: Path
    num_scored: int = 0
    num_failed: int = 0
    errors: list[str] = field(default_factory=list)


def write_predictions(
    detector: Any,
    images: Sequence[str],
    output_dir: str | os.PathLike[str],
    *,
    output_format: str = "csv",
    batch_size: int = 1,
    skip_invalid: bool = False,
    threshold: float | None = None,
    image_threshold: float | None = None,
    overlays: bool = True,
    colormap_name: str = DEFAULT_COLORMAP,
    alpha: float = DEFAULT_ALPHA,
    on_row: Callable[[dict[str, str]], None] | None = None,
    progress: bool = True,
    first_index: int = 0,
    table_name: str | None = None,
) -> PredictionSummary:
    """Score `images` with `detector` (an "anomaly-detection" pipeline) and write one row per image as it is scored.

    Args:
        output_dir: created if needed; receives `scores.csv` or `scores.json` (columns `RESULT_COLUMNS`) and, with
            `overlays`, `NNNNN_<stem>_overlay.png` for every image (see `cops_hf.visualization.render_prediction`)
            and `NNNNN_<stem>_mask.png` (the binary predicted mask) when a pixel threshold is known.
        threshold, image_threshold: pixel and score thresholds (default: the ones calibrated into the model).
        colormap_name, alpha: colormap and opacity of the overlays.
        on_row: called with each row once it is written (the CLI prints it).
        progress: show a tqdm bar.
        first_index: number of the first image in the overlay and mask file names (a shard's offset).
        table_name: file name of the table (default `scores.csv` / `scores.json`).
    """
    from tqdm.auto import tqdm

    from .image_utils import load_image
    from .visualization import check_style, render_prediction

    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    check_style(colormap_name, alpha)
    config = detector.model.config
    image_threshold_used = image_threshold if image_threshold is not None else config.image_threshold
    pixel_threshold_used = threshold if threshold is not None else config.pixel_threshold
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    summary = PredictionSummary(table_path=output / (table_name or f"scores.{output_format}"))
    options = {"batch_size": batch_size, "skip_invalid": skip_invalid}
    options.update({"threshold": threshold} if threshold is not None else {})
    options.update({"image_threshold": image_threshold} if image_threshold is not None else {})
    with (
        open(summary.table_path, "w", newline="") as handle,
        tqdm(total=len(images), unit="image", disable=not progress) as bar,
    ):
        table = _TableWriter(handle, output_format)
        try:
            results = detector((path for path in images), **options)  # a stream: one result alive at a time
            for index, (path, result) in enumerate(zip(images, results, strict=True), start=first_index):
                row = dict.fromkeys(RESULT_COLUMNS, "") | {IMAGE_PATH: path}
                if ERROR in result:
                    row[ERROR] = result[ERROR]
                    summary.num_failed += 1
                    summary.errors.append(result[ERROR])
                else:
                    row[PRED_SCORE] = f"{result[PRED_SCORE]:.6f}"
                    row[PRED_LABEL] = result.get(PRED_LABEL, "")
                    if overlays:
                        stem = f"{index:05d}_{Path(path).stem}"
                        row["overlay"] = bounded_filename(stem, "_overlay.png")
                        render_prediction(
                            load_image(path), result, image_threshold=image_threshold_used,
                            pixel_threshold=pixel_threshold_used, title=Path(path).name,
                            colormap_name=colormap_name, alpha=alpha,
                        ).save(output / row["overlay"])  # fmt: skip
                        if PRED_MASK in result:
                            row[PRED_MASK] = bounded_filename(stem, "_mask.png")
                            _save_mask(result[PRED_MASK], output / row[PRED_MASK])
                    summary.num_scored += 1
                table.write(row | {old: row[DEPRECATED_RESULT_KEYS[old]] for old in DEPRECATED_COLUMNS})
                bar.update(1)
                if on_row is not None:
                    on_row(row)
        finally:  # an aborted run still leaves a valid table of the rows written so far
            table.close()
    return summary


def write_predictions_sharded(
    detector: Any, images: Sequence[str], output_dir: str | os.PathLike[str], *, output_format: str = "csv",
    state: Any = None, **options: Any,
) -> PredictionSummary | None:
    """`write_predictions` over the processes of `accelerate launch` / `torchrun`: one table, in input order.

    Every process scores a contiguous shard of `images` (overlays and masks numbered as in a single-process run) and
    writes its rows to a hidden shard table; the main process then merges the shards, in process order, into
    `scores.csv` / `scores.json` (written atomically) and removes them. In a single process this is
    `write_predictions`.

    Args:
        state: the `accelerate.PartialState` (default: the current one).
        options: the other arguments of `write_predictions`.

    Returns:
        The summary of the whole run on the main process; `None` on the others.
    """
    from accelerate import PartialState

    from .file_utils import atomic_write

    state = state or PartialState()
    if state.num_processes == 1:
        return write_predictions(detector, images, output_dir, output_format=output_format, **options)
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    output = Path(output_dir)
    with state.split_between_processes(list(range(len(images)))) as indices:
        write_predictions(
            detector, [images[index] for index in indices], output, output_format="csv",
            first_index=indices[0] if indices else 0, table_name=_shard_table_name(state.process_index),
            **options | {"progress": options.get("progress", True) and state.is_local_main_process},
        )  # fmt: skip
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    summary = PredictionSummary(table_path=output / f"scores.{output_format}")
    shard_tables = [output / _shard_table_name(rank) for rank in range(state.num_processes)]
    with atomic_write(summary.table_path) as temporary, open(temporary, "w", newline="") as handle:
        table = _TableWriter(handle, output_format)
        for shard_table in shard_tables:
            with open(shard_table, newline="") as shard:
                for row in csv.DictReader(shard):
                    table.write(row)
                    summary.num_failed += bool(row[ERROR])
                    summary.num_scored += not row[ERROR]
                    summary.errors += [row[ERROR]] if row[ERROR] else []
        table.close()
    for shard_table in shard_tables:
        shard_table.unlink()
    return summary


def _shard_table_name(process_index: int) -> str:
    return f".scores-process{process_index:03d}.csv"


def _save_mask(mask: Any, path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(path)


_SCORE_COLUMNS = (PRED_SCORE, "score")  # written as numbers in JSON


class _TableWriter:
    """Rows to CSV (header first) or to a JSON list, flushed after each row."""

    def __init__(self, handle: IO[str], output_format: str) -> None:
        self.handle, self.format, self.rows = handle, output_format, 0
        if output_format == "csv":
            self.csv = csv_dict_writer(handle, TABLE_COLUMNS)
            self.csv.writeheader()
        else:
            handle.write("[")

    def write(self, row: dict[str, str]) -> None:
        if self.format == "csv":
            self.csv.writerow(row)
        else:
            values = {key: (float(value) if key in _SCORE_COLUMNS and value else value) for key, value in row.items()}
            self.handle.write(("," if self.rows else "") + "\n  " + json.dumps(values))
        self.rows += 1
        self.handle.flush()

    def close(self) -> None:
        if self.format == "json":
            self.handle.write("\n]\n")


__all__ = [
    "OUTPUT_FORMATS",
    "DEPRECATED_COLUMNS",
    "RESULT_COLUMNS",
    "TABLE_COLUMNS",
    "PredictionSummary",
    "expand_image_sources",
    "load_detector",
    "load_model_and_processor",
    "load_processor",
    "write_predictions",
    "write_predictions_sharded",
]

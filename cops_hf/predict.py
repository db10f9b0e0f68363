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
    from .processing_cops import CoPSProcessor

    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    with friendly_hub_errors(os.fspath(model_name)):
        model = CoPSForAnomalyDetection.from_pretrained(model_name, dtype=torch_dtype)
    try:
        processor = CoPSProcessor.from_pretrained(model_name)
    except (OSError, ValueError):
        processor = CoPSProcessor.for_image_size(model.config.image_size)
    return model.to(torch_device).eval(), processor


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
    summary = PredictionSummary(table_path=output / f"scores.{output_format}")
    options = {"batch_size": batch_size, "skip_invalid": skip_invalid}
    options.update({"threshold": threshold} if threshold is not None else {})
    options.update({"image_threshold": image_threshold} if image_threshold is not None else {})
    with (
        open(summary.table_path, "w", newline="") as handle,
        tqdm(total=len(images), unit="image", disable=not progress) as bar,
    ):
        table = _TableWriter(handle, output_format)
        results = detector((path for path in images), **options)  # a stream: one result alive at a time
        for index, (path, result) in enumerate(zip(images, results, strict=True)):
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
                    row["overlay"] = f"{stem}_overlay.png"
                    render_prediction(
                        load_image(path), result, image_threshold=image_threshold_used,
                        pixel_threshold=pixel_threshold_used, title=Path(path).name,
                        colormap_name=colormap_name, alpha=alpha,
                    ).save(output / row["overlay"])  # fmt: skip
                    if PRED_MASK in result:
                        row[PRED_MASK] = f"{stem}_mask.png"
                        _save_mask(result[PRED_MASK], output / row[PRED_MASK])
                summary.num_scored += 1
            table.write(row | {old: row[DEPRECATED_RESULT_KEYS[old]] for old in DEPRECATED_COLUMNS})
            bar.update(1)
            if on_row is not None:
                on_row(row)
        table.close()
    return summary


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
            self.csv = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
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
    "write_predictions",
]

"""Scoring many image files: folder and glob expansion, and a writer that streams rows as images are scored.

Used by `cops-hf predict` and `examples/infer.py`. The pipeline is fed a generator, so results come one at a
time and each row is written (and flushed) as it comes: memory stays flat however many images there are.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .image_utils import IMAGE_SUFFIXES, is_image_file
from .visualization import DEFAULT_ALPHA, DEFAULT_COLORMAP

OUTPUT_FORMATS = ("csv", "json")
"""The formats `write_predictions` writes the table of scores in."""

RESULT_COLUMNS = ("image", "score", "label", "overlay", "mask", "error")
"""One row per image: its path, score, label (when an image threshold is known), the overlay and binary-mask PNG
file names (relative to the output folder; the mask only when a pixel threshold is known), and the error of an
unreadable image (other fields empty)."""


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

    Raises:
        ValueError: the saved processor resizes to another size than the model's `config.image_size`.
    """
    from .devices import resolve_device, resolve_dtype
    from .hub import friendly_hub_errors
    from .modeling_cops import CoPSForAnomalyDetection
    from .processing_cops import CoPSProcessor, check_processor_matches_model

    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    with friendly_hub_errors(os.fspath(model_name)):
        model = CoPSForAnomalyDetection.from_pretrained(model_name, dtype=torch_dtype)
    try:
        processor = CoPSProcessor.from_pretrained(model_name)
    except (OSError, ValueError):
        processor = CoPSProcessor.for_image_size(model.config.image_size)
    check_processor_matches_model(processor, model.config.image_size, f"'{os.fspath(model_name)}'")
    return model.to(torch_device).eval(), processor


def load_detector(model_name: str | os.PathLike[str], *, device: str | None = None, dtype: str | None = None) -> Any:
    """The "anomaly-detection" pipeline of `model_name` on `device` in `dtype` (see `load_model_and_processor`)."""
    from transformers import pipeline

    model, processor = load_model_and_processor(model_name, device=device, dtype=dtype)
    return pipeline("anomaly-detection", model=model, processor=processor, device=model.device)


def expand_image_sources(sources: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Image paths from files, folders (searched recursively, sorted, hidden entries skipped) and glob patterns.

    Raises:
        ValueError: a source that is neither an existing file, nor a folder, nor a pattern matching files; or a
            folder or pattern without any image file (by suffix).
    """
    paths: list[str] = []
    for source in sources:
        text = os.fspath(source)
        if Path(text).is_file():
            paths.append(text)
        elif Path(text).is_dir():
            found = _images_under(Path(text))
            if not found:
                raise ValueError(f"{text}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            found = [match for match in matches if Path(match).is_file() and _is_image(Path(match))]
            found += [image for match in matches if Path(match).is_dir() for image in _images_under(Path(match))]
            if not found:
                raise ValueError(f"{text}: the pattern matches no image files")
            paths.extend(found)
        else:
            raise ValueError(f"{text}: no such file or folder; pass image files, folders or glob patterns")
    return paths


def _is_image(path: Path) -> bool:
    return is_image_file(path) and not path.name.startswith(".")


def _images_under(folder: Path) -> list[str]:
    return [
        str(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and _is_image(path)
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]


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
            row = dict.fromkeys(RESULT_COLUMNS, "") | {"image": path}
            if "error" in result:
                row["error"] = result["error"]
                summary.num_failed += 1
                summary.errors.append(result["error"])
            else:
                row["score"] = f"{result['score']:.6f}"
                row["label"] = result.get("label", "")
                if overlays:
                    stem = f"{index:05d}_{Path(path).stem}"
                    row["overlay"] = f"{stem}_overlay.png"
                    render_prediction(
                        load_image(path), result, image_threshold=image_threshold_used,
                        pixel_threshold=pixel_threshold_used, title=Path(path).name,
                        colormap_name=colormap_name, alpha=alpha,
                    ).save(output / row["overlay"])  # fmt: skip
                    if "mask" in result:
                        row["mask"] = f"{stem}_mask.png"
                        _save_mask(result["mask"], output / row["mask"])
                summary.num_scored += 1
            table.write(row)
            bar.update(1)
            if on_row is not None:
                on_row(row)
        table.close()
    return summary


def _save_mask(mask: Any, path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(path)


class _TableWriter:
    """Rows to CSV (header first) or to a JSON list, flushed after each row."""

    def __init__(self, handle: IO[str], output_format: str) -> None:
        self.handle, self.format, self.rows = handle, output_format, 0
        if output_format == "csv":
            self.csv = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
            self.csv.writeheader()
        else:
            handle.write("[")

    def write(self, row: dict[str, str]) -> None:
        if self.format == "csv":
            self.csv.writerow(row)
        else:
            values = {key: (float(value) if key == "score" and value else value) for key, value in row.items()}
            self.handle.write(("," if self.rows else "") + "\n  " + json.dumps(values))
        self.rows += 1
        self.handle.flush()

    def close(self) -> None:
        if self.format == "json":
            self.handle.write("\n]\n")


__all__ = [
    "OUTPUT_FORMATS",
    "RESULT_COLUMNS",
    "PredictionSummary",
    "expand_image_sources",
    "load_detector",
    "load_model_and_processor",
    "write_predictions",
]

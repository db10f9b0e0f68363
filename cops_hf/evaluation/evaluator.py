"""Run a CoPS model over a meta.json dataset and report the ZSAD metrics, tables and pictures.

Single process by default; under `accelerate launch` / `torchrun` every process scores its own shard of the
dataset and the main process gathers the results, so the metrics equal a single-process run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from ..data import has_masks, load_meta_dataset, meta_dataset_name
from ..data.registry import resolve_test_preset
from ..file_utils import csv_dict_writer, csv_writer
from ..image_utils import load_image
from ..modeling_cops import CoPSForAnomalyDetection
from ..processing_cops import CoPSProcessor
from ..schema import ANOMALY_MAP, GT_LABEL, GT_MASK, IMAGE_PATH, LABEL_NAMES, PRED_SCORE, dataset_key, decision_label
from ..visualization import (
    DEFAULT_ALPHA,
    DEFAULT_COLORMAP,
    ColourScale,
    check_style,
    comparison_panel,
    plot_curve_pair,
)
from .inference import predict_images
from .report import CategoryRecord, ZSADReport, compute_zsad_metrics

logger = logging.getLogger(__name__)

PROTOCOL_FIELDS = ("test_kernel_size", "distance_alpha", "image_score_beta", "gaussian_sigma", "vae_samples")


@dataclass
class EvaluationResult:
    """What an evaluation produced.

    Attributes:
        report: per-category metrics and their mean.
        protocol: the test-time fields used (kernel, alpha, beta, ...), the preset name and the seed.
        image_paths, categories, image_scores, image_labels: one entry per image, in dataset order.
        files: paths of the files written (empty when no output directory was given).
    """

    report: ZSADReport
    protocol: dict[str, Any]
    image_paths: list[str]
    categories: list[str]
    image_scores: np.ndarray
    image_labels: np.ndarray
    files: list[Path] = field(default_factory=list)
    test_preset: PresetChoice | None = None


AUTO_PRESET = "auto"
"""`evaluate_dataset(test_preset=AUTO_PRESET)`: the data decides, else the model's record (`choose_test_preset`)."""


@dataclass(frozen=True)
class PresetChoice:
    """The test preset an evaluation uses and why.

    Attributes:
        name: the `TEST_DATASET_PRESETS` key, or `None` to score with the model's config as it is.
        source: where it came from, for people ("--preset", "the dataset ... records", ...).
    """

    name: str | None
    source: str

    def describe(self) -> str:
        """One line for a log or the terminal, e.g. "Test preset: visa (the dataset /data/visa/meta.json records)"."""
        if self.name is None:
            return "Test preset: none recorded, the model's config as is"
        return f"Test preset: {self.name} ({self.source})"


def choose_test_preset(
    test_preset: str | None, model: CoPSForAnomalyDetection, data_root: str | Path, *, source: str = "test_preset"
) -> PresetChoice:
    """The test preset of an evaluation: the one asked for, or with `AUTO_PRESET` the test data's, else the model's.

    As in the reference's test.py, the test data decides: `"auto"` takes the dataset `data_root/meta.json` records
    (written by `cops-hf data prepare`), else the preset the model's config records (an official release's
    intended one), else none. A name goes through the dataset registry, so aliases work ("mvtec_ad").

    Args:
        test_preset: a dataset name or alias, "general", `AUTO_PRESET`, or `None` (the model's config as it is).
        model: the model to evaluate (its `config.test_preset` is the fallback of "auto").
        data_root: the dataset root holding meta.json.
        source: how the caller names an explicit choice in `PresetChoice.source` (the CLI: "--preset").
    """
    if test_preset is None:
        return PresetChoice(None, "not asked for")
    if dataset_key(test_preset) != AUTO_PRESET:
        return PresetChoice(resolve_test_preset(test_preset), source)
    if recorded := meta_dataset_name(data_root):
        return PresetChoice(resolve_test_preset(recorded), f"the dataset {data_root}/meta.json records")
    if model.config.test_preset:
        return PresetChoice(resolve_test_preset(model.config.test_preset), "the preset the model's config records")
    return PresetChoice(None, "none recorded")


def evaluate_dataset(
    model: CoPSForAnomalyDetection,
    processor: CoPSProcessor,
    data_root: str | Path,
    *,
    split: str = "test",
    categories: list[str] | None = None,
    test_preset: str | None = None,
    batch_size: int = 8,
    seed: int = 0,
    output_dir: str | Path | None = None,
    num_visualizations: int = 8,
    accelerator: Accelerator | None = None,
    skip_invalid: bool = False,
    colormap_name: str = DEFAULT_COLORMAP,
    alpha: float = DEFAULT_ALPHA,
    references: Mapping[str, Sequence[str]] | None = None,
) -> EvaluationResult | None:
    """Evaluate `model` on `data_root/meta.json` and (on the main process) write the report files.

    Args:
        test_preset: score with the reference's test-time switches for this dataset name or alias (see
            `cops_hf.data.registry`), or `AUTO_PRESET` ("auto": the dataset meta.json records, else the model's
            recorded preset; see `choose_test_preset`); the caller's `model.config` is not changed. `None` keeps
            the model's config.
        seed: seed of the VAE class-token noise (the same samples for every image), so results are reproducible
            and independent of batching and sharding.
        output_dir: where to write `metrics.csv`, `metrics.json`, `predictions.csv` (`image_path`, `category`,
            `gt_label`, `pred_score`), overlay PNGs (`visualizations/<category>/`) and `roc.png` / `pr.png`.
        num_visualizations: overlays per category (spread over normal and anomalous images); they show the
            predicted mask when the model's config holds a calibrated pixel threshold.
        colormap_name, alpha: colormap and opacity of the overlays (see `cops_hf.visualization`).
        accelerator: shards the dataset over its processes; `None` creates one (single process unless launched
            with `accelerate launch` / `torchrun`).
        skip_invalid: drop invalid meta.json records (missing or unreadable files, duplicates, ...) with a
            warning instead of refusing the dataset.
        references: few-shot scoring (`cops_hf.evaluation.fewshot` draws them): per category, the absolute paths
            of normal images set as the model's reference memory (`model.set_references`) before that category's
            images are scored. Test images among them are left out of scoring (`protocol["left_out_of_scoring"]`
            counts them). The memory is cleared afterwards; a model that already holds references is refused.

    Returns:
        The result on the main process; `None` on the other processes.
    """
    if batch_size < 1 or num_visualizations < 0:
        raise ValueError(f"Need batch_size >= 1 and num_visualizations >= 0; got {batch_size}, {num_visualizations}.")
    check_style(colormap_name, alpha)
    accelerator = accelerator or Accelerator()
    preset = choose_test_preset(test_preset, model, data_root)
    logger.info(preset.describe())
    if preset.name is not None:
        # A shallow copy shares the weights but not the config: the caller's model.config stays as it is.
        model, config = copy.copy(model), model.config.with_preset(test_dataset=preset.name)
        model.config = config
    dataset = load_meta_dataset(data_root, split=split, categories=categories, skip_invalid=skip_invalid)
    pixel_level = has_masks(dataset) or any(path for path in dataset["mask_path"])
    columns = dataset.select_columns(["image_path", "mask_path", "gt_label", "cls_name"]).to_dict()
    rows = [
        {"index": index, **{name: values[index] for name, values in columns.items()}} for index in range(len(dataset))
    ]
    reference_paths = {path for paths in (references or {}).values() for path in paths}
    scored_rows = [row for row in rows if row[IMAGE_PATH] not in reference_paths]
    if len(scored_rows) < len(rows):
        logger.warning("%d test images serve as references: left out of scoring.", len(rows) - len(scored_rows))
    rows, num_left_out = scored_rows, len(rows) - len(scored_rows)
    model = model.to(accelerator.device).eval()
    scoring = {"batch_size": batch_size, "seed": seed, "show_progress": accelerator.is_local_main_process}
    with accelerator.split_between_processes(rows) as shard:
        shard_results = _score_rows(model, processor, shard, pixel_level, references, scoring)
    gathered = accelerator.gather_for_metrics(shard_results, use_gather_object=True)
    if not accelerator.is_main_process:
        return None
    by_index = {result["index"]: result for result in gathered}
    ordered = [by_index[row["index"]] for row in rows]
    protocol = {name: getattr(model.config, name) for name in PROTOCOL_FIELDS}
    protocol.update({"test_preset": preset.name, "seed": seed, "split": split, "pixel_level": pixel_level})
    # The dataset's name for reports and model cards: the benchmark meta.json records, else the root's folder name
    # (never its full path, which would publish this machine's layout).
    protocol["dataset"] = meta_dataset_name(data_root) or Path(data_root).resolve().name
    if references is not None:
        protocol["left_out_of_scoring"] = num_left_out
    records, pixel_records = _category_records(rows, ordered, pixel_level)
    result = EvaluationResult(
        report=compute_zsad_metrics(pixel_records),
        protocol=protocol,
        image_paths=[row[IMAGE_PATH] for row in rows],
        categories=[row["cls_name"] for row in rows],
        image_scores=np.asarray([item[PRED_SCORE] for item in ordered]),
        image_labels=np.asarray([int(row[GT_LABEL]) for row in rows]),
        test_preset=preset,
    )
    if output_dir is not None:
        style = {
            "colormap_name": colormap_name,
            "alpha": alpha,
            "image_threshold": model.config.image_threshold,
            "pixel_threshold": model.config.pixel_threshold,
        }
        result.files = _write_outputs(Path(output_dir), result, records, rows, num_visualizations, style)
    return result


def _category_records(
    rows: list[dict[str, Any]], ordered: list[dict[str, Any]], pixel_level: bool
) -> tuple[dict[str, CategoryRecord], dict[str, CategoryRecord]]:
    """Group the scored rows by category: all images, and those that count at pixel level (for the pixel metrics)."""
    grouped: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for row, result in zip(rows, ordered, strict=True):
        group = grouped[row["cls_name"]]
        group[PRED_SCORE].append(result[PRED_SCORE])
        group[GT_LABEL].append(int(row[GT_LABEL]))
        if pixel_level:
            group[ANOMALY_MAP].append(result[ANOMALY_MAP])
            group[GT_MASK].append(result[GT_MASK])
            # An anomalous image without a mask counts at image level only (docs/protocol.md, mask rules).
            group["pixel_level"].append(bool(row["mask_path"]) or not row[GT_LABEL])
    records = {
        name: CategoryRecord(
            image_scores=np.asarray(group[PRED_SCORE]),
            image_labels=np.asarray(group[GT_LABEL]),
            anomaly_maps=np.stack(group[ANOMALY_MAP]) if pixel_level else None,
            gt_masks=np.stack(group[GT_MASK]) if pixel_level else None,
        )
        for name, group in grouped.items()
    }
    pixel_records = {
        name: dataclasses.replace(
            record,
            anomaly_maps=record.anomaly_maps[grouped[name]["pixel_level"]],
            gt_masks=record.gt_masks[grouped[name]["pixel_level"]],
        )
        if pixel_level
        else record
        for name, record in records.items()
    }
    return records, pixel_records


def _score_rows(
    model: CoPSForAnomalyDetection,
    processor: CoPSProcessor,
    rows: list[dict],
    pixel_level: bool,
    references: Mapping[str, Sequence[str]] | None,
    scoring: dict[str, Any],
) -> list[dict[str, Any]]:
    """Score `rows` with `predict_images` (`scoring`'s options).

    With `references`, category by category, each against its own reference memory.
    """
    if references is None:
        return _predictions(model, processor, rows, pixel_level, scoring)
    if model.num_references:
        raise ValueError(
            f"The model already holds {model.num_references} references; few-shot evaluation draws its own: "
            "evaluate it zero-shot (--shots 0), or clear them first (model.clear_references())."
        )
    results = []
    try:
        for category in dict.fromkeys(row["cls_name"] for row in rows):
            paths = list(references[category])
            pixel_values = processor(images=paths)["pixel_values"]
            model.set_references(pixel_values.to(model.device, model.dtype), sources=paths)
            category_rows = [row for row in rows if row["cls_name"] == category]
            results += _predictions(model, processor, category_rows, pixel_level, scoring)
    finally:
        model.clear_references()
    return results


def _predictions(
    model: CoPSForAnomalyDetection, processor: CoPSProcessor, rows: list[dict], pixel_level: bool, scoring: dict
) -> list[dict[str, Any]]:
    predictions = predict_images(
        model,
        processor,
        [row["image_path"] for row in rows],
        [row["mask_path"] or None for row in rows] if pixel_level else None,
        **scoring,
    )
    return [
        {"index": rows[prediction.index]["index"], PRED_SCORE: prediction.pred_score}
        | ({ANOMALY_MAP: prediction.anomaly_map, GT_MASK: prediction.gt_mask} if pixel_level else {})
        for prediction in predictions
    ]


def _write_outputs(
    output_dir: Path,
    result: EvaluationResult,
    records: dict[str, CategoryRecord],
    rows: list[dict],
    num_visualizations: int,
    style: dict[str, Any],
) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    files = [output_dir / "metrics.csv", output_dir / "metrics.json", output_dir / "predictions.csv"]
    table_rows = result.report.to_rows()
    with open(files[0], "w", newline="") as handle:
        writer = csv_dict_writer(handle, list(table_rows[0]))
        writer.writeheader()
        writer.writerows(table_rows)
    files[1].write_text(json.dumps({**result.report.to_dict(), "protocol": result.protocol}, indent=2))
    with open(files[2], "w", newline="") as handle:
        writer = csv_writer(handle)
        writer.writerow([IMAGE_PATH, "category", GT_LABEL, PRED_SCORE])
        for path, category, label, score in zip(
            result.image_paths, result.categories, result.image_labels, result.image_scores, strict=True
        ):
            writer.writerow([path, category, int(label), f"{score:.6f}"])
    pixel_level = bool(records) and next(iter(records.values())).anomaly_maps is not None
    per_category = result.report.per_category
    for kind, metric in (("roc", "auroc"), ("pr", "ap")):
        levels = {
            f"image-level {kind.upper()}": (
                [(name, record.image_scores, record.image_labels) for name, record in records.items()],
                {name: per_category[name].get(f"image_{metric}") for name in records},
            )
        }
        if pixel_level:
            levels[f"pixel-level {kind.upper()}"] = (
                [(name, *_pixel_sample(record)) for name, record in records.items()],
                {name: per_category[name].get(f"pixel_{metric}") for name in records},
            )
        files.append(plot_curve_pair(levels, output_dir / f"{kind}.png", kind=kind))
    if pixel_level:
        files.extend(_write_visualizations(output_dir / "visualizations", records, rows, num_visualizations, style))
    return files


_PIXELS_PER_CURVE = 200_000
"""Pixels drawn per category in the pixel-level curves (an even stride; the legends carry the exact metrics)."""


def _pixel_sample(record: CategoryRecord) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = record.anomaly_maps.reshape(-1), record.gt_masks.reshape(-1)
    stride = max(1, scores.size // _PIXELS_PER_CURVE)
    return scores[::stride], labels[::stride]


def _write_visualizations(
    directory: Path,
    records: dict[str, CategoryRecord],
    rows: list[dict],
    per_category: int,
    style: dict[str, Any],
) -> list[Path]:
    """Titled image | ground truth | overlay panels for a spread of each category's images (anomalous first).

    The colours of a category share one scale (anchored to the pixel threshold, else the range of all its maps),
    so that its panels compare. A calibrated model's panels carry its decision (`schema.decision_label` at the
    image threshold) beside the ground truth. `style`: `render_panels` options (colormap_name, alpha,
    image_threshold, pixel_threshold).
    """
    written = []
    for name, record in records.items():
        category_rows = [row for row in rows if row["cls_name"] == name]
        order = np.argsort(-np.asarray(record.image_labels), kind="stable")
        chosen = order[np.linspace(0, len(order) - 1, min(per_category, len(order))).astype(int)]
        scale = ColourScale.for_maps(
            record.anomaly_maps, style["pixel_threshold"], span_of=f"the range of all {name} maps"
        )
        (directory / name).mkdir(parents=True, exist_ok=True)
        for position in sorted(set(chosen.tolist())):
            row = category_rows[position]
            truth = LABEL_NAMES[int(record.image_labels[position])]
            score = float(record.image_scores[position])
            label = decision_label(score, style["image_threshold"]) if style["image_threshold"] is not None else None
            panel = comparison_panel(
                load_image(row["image_path"]), record.anomaly_maps[position], record.gt_masks[position],
                scale=scale, score=score, label=label,
                title=f"{name} / {Path(row['image_path']).name} (truth: {truth})", **style,
            )  # fmt: skip
            path = directory / name / f"{Path(row['image_path']).stem}_{position:04d}.png"
            panel.save(path)
            written.append(path)
    return written


__all__ = ["PROTOCOL_FIELDS", "EvaluationResult", "evaluate_dataset"]

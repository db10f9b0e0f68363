"""The bad-input matrix: every hostile or broken input gives one clear line and the right exit code, never a trace.

Each CLI case runs `cops-hf` in this process and checks the exit code and the first line of the message
(``cops-hf CMD: error: ...``); Python API cases check the exception and its message. Everything is tiny: one model
folder per module, 16 px images, and most cases stop before any scoring.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import pipeline

from cops_hf import CoPSConfig, CoPSForAnomalyDetection
from cops_hf.cli import main
from cops_hf.data import make_record, read_meta_json, write_meta_json
from cops_hf.evaluation.inference import predict_images
from cops_hf.file_utils import read_json_file
from cops_hf.image_utils import IMAGE_SUFFIXES, ImageLoadError, expand_image_sources, load_image, load_mask
from cops_hf.processing_cops import CoPSProcessor
from tests.data_fakes import write_image, write_mask
from tests.tiny_models import tiny_model

PIL_LIMIT = Image.MAX_IMAGE_PIXELS

SUFFIX_LIST = ", ".join(sorted(IMAGE_SUFFIXES))


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A small PNG file declaring `width` x `height` grey pixels (a decompression bomb when large)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    content = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content + chunk(b"IEND", b""))
    return path


def write_float_tiff(path: Path, bad_value: float) -> Path:
    """A 16x16 float TIFF with one `bad_value` pixel (NaN, inf): min-max scaling would turn the whole image black."""
    pixels = np.linspace(0.0, 1.0, 256, dtype=np.float32).reshape(16, 16)
    pixels[3, 5] = bad_value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="F").save(path)
    return path


def _save_model(directory: Path, model: torch.nn.Module) -> Path:
    model.save_pretrained(directory)
    CoPSProcessor.for_image_size(model.config.image_size).save_pretrained(directory)
    return directory


def _edit_config(source: Path, target: Path, **fields) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **fields}))
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every input the matrix needs, built once: model folders (good and broken), images, weights files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = _save_model(root / "model", tiny_model())
    paths = {"root": root, "model": model}
    broken = tiny_model()
    with torch.no_grad():
        for parameter in broken.parameters():
            parameter.fill_(float("nan"))
    paths["nan_model"] = _save_model(root / "nan_model", broken)
    weights = model / "model.safetensors"
    for name, content in {
        "truncated_model": weights.read_bytes()[:1000],
        "empty_model": b"",
        "garbage_model": b"garbage " * 64,
    }.items():
        shutil.copytree(model, root / name)
        (root / name / "model.safetensors").write_bytes(content)
        paths[name] = root / name
    shutil.copytree(model, root / "incomplete_model")
    tensors = load_file(str(weights))
    clip_only = {key: value for key, value in tensors.items() if key.startswith("clip.")}
    save_file(clip_only, str(root / "incomplete_model" / "model.safetensors"), metadata={"format": "pt"})
    paths["incomplete_model"] = root / "incomplete_model"
    paths["num_cops_weights"] = len(tensors) - len(clip_only)
    paths["string_size_model"] = _edit_config(model, root / "string_size_model", image_size="abc")
    paths["nan_threshold_model"] = _edit_config(model, root / "nan_threshold_model", image_threshold=float("nan"))
    paths["big_threshold_model"] = _edit_config(model, root / "big_threshold_model", pixel_threshold=2.0)
    for name, fields in {
        "text_list_model": {"text_config": [1, 2]},
        "vae_huge_model": {"vae_samples": 10**12},
        "suffix_huge_model": {"prompt_suffix_token_ids": [10**12]},
        "suffix_oov_model": {"prompt_suffix_token_ids": [49408]},
    }.items():
        paths[name] = _edit_config(model, root / name, **fields)
    config = json.loads((model / "config.json").read_text())
    for name, tower, field, value in (("text_string_model", "text_config", "hidden_size", "48"),
                                      ("vision_string_model", "vision_config", "num_hidden_layers", "3"),
                                      ("eos_oov_model", "text_config", "eos_token_id", 10**6)):  # fmt: skip
        paths[name] = _edit_config(model, root / name, **{tower: {**config[tower], field: value}})
    shutil.copytree(model, root / "deep_config_model")
    (root / "deep_config_model" / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    paths["deep_config_model"] = root / "deep_config_model"
    shutil.copytree(model, root / "no_config_model")
    (root / "no_config_model" / "config.json").unlink()
    paths["no_config_model"] = root / "no_config_model"
    shutil.copytree(model, root / "wrong_shape_model")
    save_file({**tensors, "state_prototypes.normal_queries": torch.zeros(3, 5)},
              str(root / "wrong_shape_model" / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    paths["wrong_shape_model"] = root / "wrong_shape_model"
    shutil.copytree(model, root / "other_size_processor_model")
    CoPSProcessor.for_image_size(112).save_pretrained(root / "other_size_processor_model")
    paths["other_size_processor_model"] = root / "other_size_processor_model"
    shutil.copytree(model, root / "json_garbage_model")
    (root / "json_garbage_model" / "config.json").write_text("{not json")
    paths["json_garbage_model"] = root / "json_garbage_model"

    paths["image"] = write_image(root / "images" / "good.png", size=(16, 16))
    paths["text"] = root / "images" / "notes.txt"
    paths["text"].write_text("not an image")
    truncated = write_image(root / "images" / "truncated.png", size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:-40])
    paths["truncated"] = truncated
    paths["bomb"] = write_png_header(root / "images" / "bomb.png", 30000, 30000)  # over twice PIL's limit
    paths["big"] = write_png_header(root / "images" / "big.png", 10000, 10000)  # over the limit, under twice it
    for name, value in (("nan_tiff", np.nan), ("inf_tiff", np.inf), ("minus_inf_tiff", -np.inf)):
        paths[name] = write_float_tiff(root / "images" / f"{name}.tif", value)
    paths["text_pt"] = root / "weights" / "text.pt"
    paths["text_pt"].parent.mkdir()
    paths["text_pt"].write_text("hello")
    paths["empty_pt"] = root / "weights" / "empty.pt"
    paths["empty_pt"].write_bytes(b"")
    paths["list_pt"] = root / "weights" / "list.pt"
    torch.save([1, 2, 3], paths["list_pt"])
    paths["not_clip_pt"] = root / "weights" / "not_clip.pt"
    torch.save({"weight": torch.ones(2)}, paths["not_clip_pt"])
    paths["truncated_pt"] = root / "weights" / "truncated.pt"
    torch.save({"weight": torch.ones(1000)}, paths["truncated_pt"])
    paths["truncated_pt"].write_bytes(paths["truncated_pt"].read_bytes()[:500])
    for name, content in {
        "list_json": [1, 2],
        "string_metric_json": {"visa": {"I-AUROC": "high"}},
        "percent_json": {"visa": {"I-AUROC": 95.0}},
    }.items():
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(content))
    paths["broken_json"] = root / "broken.json"
    paths["broken_json"].write_text("{")
    paths["clip_field_json"] = root / "clip_field.json"
    paths["clip_field_json"].write_text(json.dumps({"text_config": {"hidden_size": "wide"}}))
    return paths


def _dataset(root: Path, extra: list[dict] | None = None, category: str = "bottle") -> Path:
    """A valid dataset (2 normal, 2 anomalous with masks, in both splits) plus `extra` records."""
    records = []
    for index in range(4):
        image = f"{category}/{index}.png"
        write_image(root / image, size=(16, 16), value=60 + 40 * index)
        mask = f"{category}/{index}_mask.png" if index % 2 else ""
        if mask:
            write_mask(root / mask, size=(16, 16))
        specie = "crack" if index % 2 else "good"
        records.append(make_record(image, cls_name=category, anomaly=index % 2, specie_name=specie, mask_path=mask))
    records += extra or []
    write_meta_json(root, {"train": {category: records}, "test": {category: records}})
    return root


def _anomalous_dataset(root: Path) -> Path:
    """A dataset without any normal image: the anomalous records of `_dataset`."""
    records = [record for record in read_meta_json(_dataset(root))["test"]["bottle"] if record["anomaly"]]
    write_meta_json(root, {"train": {"bottle": records}, "test": {"bottle": records}})
    return root


def _write_raw_meta(root: Path, edit: Callable[[dict], object]) -> Path:
    """The valid dataset with its meta.json edited by hand (`edit` changes the parsed document in place)."""
    _dataset(root)
    meta = json.loads((root / "meta.json").read_text())
    edit(meta)
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _nested_meta(root: Path) -> Path:
    _dataset(root)
    (root / "meta.json").write_text('{"test": ' * 100_000 + "{}" + "}" * 100_000)
    return root


def _long_category(root: Path) -> Path:
    """The valid dataset's test records filed under a 300-character category (the images stay in bottle/)."""
    name = "c" * 300

    def rename(meta: dict) -> None:
        meta["test"] = {name: [{**record, "cls_name": name} for record in meta["test"]["bottle"]]}

    return _write_raw_meta(root, rename)


RAW_DATASETS: dict[str, Callable[[Path], Path]] = {
    "dataset_object": lambda root: _write_raw_meta(root, lambda meta: meta.update(dataset={"name": "visa"})),
    "dataset_number": lambda root: _write_raw_meta(root, lambda meta: meta.update(dataset=7)),
    "nested_meta": _nested_meta,
    "long_category": _long_category,
}
"""Hand-made datasets whose meta.json is refused as a whole (the CLI cases name them as {data_<name>})."""

_LONG_CATEGORY_PROBLEM = (
    f"split 'test': category {'c' * 40!r}... is 300 bytes long, over the 255 bytes a file or folder name may have"
)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The first line of the CLI's error message (progress bars on stderr are not part of it)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cops-hf ")]
    return lines[0] if lines else ""


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse refusals
        return int(exit_.code)


# ---------------------------------------------------------------- the CLI matrix

OUT = ["--output", "{tmp}/out"]


def _predict(model: str, *images: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["predict", "--model", model, *images, *OUT, *extra]


CLI_CASES: list[tuple[str, list[str], int, str]] = [
    # convert: weights files
    ("convert-missing-clip", ["convert", "--clip", "{tmp}/missing.pt", *OUT], 2,
     "cops-hf convert: error: CLIP file '{tmp}/missing.pt' does not exist."),
    ("convert-directory-clip", ["convert", "--clip", "{tmp}", *OUT], 2,
     "cops-hf convert: error: Error no file named model.safetensors, or pytorch_model.bin, found in directory {tmp}."),
    ("convert-text-clip", ["convert", "--clip", "{text_pt}", *OUT], 2,
     "cops-hf convert: error: CLIP file '{text_pt}' cannot be read as a PyTorch checkpoint ("),
    ("convert-empty-clip", ["convert", "--clip", "{empty_pt}", *OUT], 2,
     "cops-hf convert: error: CLIP file '{empty_pt}' cannot be read as a PyTorch checkpoint (EOFError)."),
    ("convert-truncated-clip", ["convert", "--clip", "{truncated_pt}", *OUT], 2,
     "cops-hf convert: error: CLIP file '{truncated_pt}' cannot be read as a PyTorch checkpoint ("),
    ("convert-list-clip", ["convert", "--clip", "{list_pt}", *OUT], 2,
     "cops-hf convert: error: '{list_pt}' holds no state dict of tensors (found list)."),
    ("convert-not-clip", ["convert", "--clip", "{not_clip_pt}", *OUT], 2,
     "cops-hf convert: error: Not an OpenAI ViT CLIP state dict: key 'visual.conv1.weight' is missing."),
    ("convert-image-size-zero", ["convert", "--clip", "{text_pt}", *OUT, "--image-size", "0"], 2,
     "cops-hf convert: error: argument --image-size: must be an integer >= 1, got '0'"),
    ("convert-image-size-text", ["convert", "--clip", "{text_pt}", *OUT, "--image-size", "abc"], 2,
     "cops-hf convert: error: argument --image-size: must be an integer >= 1, got 'abc'"),
    # predict: images
    ("predict-folder-without-images", _predict("{model}", "{root}/weights"), 2,
     "cops-hf predict: error: {root}/weights: folder holds no image files (" + SUFFIX_LIST + ")"),
    ("predict-missing-image", _predict("{model}", "{tmp}/gone.png"), 2,
     "cops-hf predict: error: {tmp}/gone.png: no such file or folder; pass image files, folders or glob patterns"),
    ("predict-text-image", _predict("{model}", "{text}"), 2,
     "cops-hf predict: error: Image file '{text}' cannot be read (cannot identify image file"),
    ("predict-truncated-image", _predict("{model}", "{truncated}"), 2,
     "cops-hf predict: error: Image file '{truncated}' cannot be read ("),
    ("predict-bomb", _predict("{model}", "{bomb}"), 2,
     f"cops-hf predict: error: Image file '{{bomb}}' declares more than {2 * PIL_LIMIT} pixels, over the limit of "
     f"{PIL_LIMIT} pixels that guards against decompression bombs; if the image is genuine, raise "
     "PIL.Image.MAX_IMAGE_PIXELS (COPS_HF_MAX_IMAGE_PIXELS for the CLI)."),
    ("predict-big-image", _predict("{model}", "{big}"), 2,
     f"cops-hf predict: error: Image file '{{big}}' is 10000x10000 pixels, over the limit of {PIL_LIMIT} pixels"),
    ("predict-skip-invalid-all-failed", _predict("{model}", "{text}", "{bomb}", extra=("--skip-invalid",)), 2,
     "cops-hf predict: error: no image could be scored (Image file '{text}' cannot be read"),
    # predict and references: normal references (few-shot)
    ("predict-references-no-images", _predict("{model}", "{image}", extra=("--references", "{root}/weights")), 2,
     "cops-hf predict: error: --references {root}/weights: folder holds no image files (.bmp, .jpeg, .jpg, .png, "),
    ("predict-references-unreadable", _predict("{model}", "{image}", extra=("--references", "{text}")), 2,
     "cops-hf predict: error: Reference images: Image file '{text}' cannot be read (cannot identify image file"),
    ("references-missing-images", ["references", "--model", "{model}", "--images", "{tmp}/gone", *OUT], 2,
     "cops-hf references: error: --images {tmp}/gone: no such file or folder; pass image files, folders or glob "
     "patterns"),
    ("references-truncated-image", ["references", "--model", "{model}", "--images", "{truncated}", *OUT], 2,
     "cops-hf references: error: Reference images: Image file '{truncated}' cannot be read ("),
    # predict: flags, refused before any work
    *[(f"predict-{flag[2:]}-{value}", _predict("{model}", "{image}", extra=(flag, value)), 2,
       f"cops-hf predict: error: argument {flag}: must be a finite number in [0, 1], got '{value}'")
      for flag in ("--threshold", "--image-threshold") for value in ("2", "-0.1", "nan", "inf", "abc")],
    *[(f"predict-batch-size-{value}", _predict("{model}", "{image}", extra=("--batch-size", value)), 2,
       f"cops-hf predict: error: argument --batch-size: must be an integer >= 1, got '{value}'")
      for value in ("0", "-1", "1.5")],
    # predict and evaluate: tiling flags, refused before any work
    *[(f"{command}-tile-{value}", [*head, "--tile", value], 2,
       f"cops-hf {command}: error: argument --tile: must be an integer >= 1, got '{value}'")
      for command, head in (("predict", _predict("{model}", "{image}")),
                            ("evaluate", ["evaluate", "--model", "{model}", "--data", "{data}", *OUT]))
      for value in ("0", "-518", "abc")],
    *[(f"{command}-tile-overlap-{value}", [*head, "--tile", "98", "--tile-overlap", value], 2,
       f"cops-hf {command}: error: argument --tile-overlap: must be a fraction in [0, 1), got '{value}'")
      for command, head in (("predict", _predict("{model}", "{image}")),
                            ("evaluate", ["evaluate", "--model", "{model}", "--data", "{data}", *OUT]))
      for value in ("1.5", "1", "-0.1", "nan", "abc")],
    ("predict-tile-overlap-without-tile", _predict("{model}", "{image}", extra=("--tile-overlap", "0.5")), 2,
     "cops-hf predict: error: --tile-overlap applies to tiles: give --tile too (e.g. --tile 518)"),
    ("predict-tile-with-batch-size", _predict("{model}", "{image}", extra=("--tile", "98", "--batch-size", "2")), 2,
     "cops-hf predict: error: --tile scores each image's tiles as one batch: leave out --batch-size"),
    # predict: model folders
    ("predict-missing-model", _predict("{tmp}/no/such/model", "{image}"), 2,
     "cops-hf predict: error: Model folder '{tmp}/no/such/model' does not exist (nor is it a Hub id, "
     "namespace/name): check the path."),
    ("predict-nan-model", _predict("{nan_model}", "{image}"), 2,
     "cops-hf predict: error: The model gave a non-finite anomaly score (nan) for image #0 of the batch: its "
     "weights hold NaN or infinite values."),
    *[(f"predict-{name}", _predict(f"{{{name}}}", "{image}"), 2,
       f"cops-hf predict: error: The weights of '{{{name}}}' cannot be read (")
      for name in ("truncated_model", "empty_model", "garbage_model")],
    ("predict-incomplete-model", _predict("{incomplete_model}", "{image}"), 2,
     "cops-hf predict: error: '{incomplete_model}' lacks {num_cops_weights} weights (e.g. "
     "'class_token_vae.decoder.0.bias'), which would be random: it is not a complete CoPS checkpoint."),
    *[(f"predict-{name}", _predict(f"{{{name}}}", "{image}"), 2,
       f"cops-hf predict: error: The config.json of '{{{name}}}' is invalid: {problem}. Fix the file or save the "
       "model again.")
      for name, problem in (("string_size_model", "image_size must be an integer, got 'abc'"),
                            ("nan_threshold_model", "image_threshold must be a finite number or null, got nan"),
                            ("big_threshold_model", "pixel_threshold must lie in [0, 1], got 2.0"))],
    ("predict-garbage-config", _predict("{json_garbage_model}", "{image}"), 2,
     "cops-hf predict: error: It looks like the config file at '{json_garbage_model}/config.json' is not a valid "
     "JSON file."),
    # evaluate: flags and models
    *[(f"evaluate-{flag[2:]}-{value}", ["evaluate", "--model", "{model}", "--data", "{data}", *OUT, flag, value], 2,
       f"cops-hf evaluate: error: argument {flag}: must be an integer >= {minimum}, got '{value}'")
      for flag, minimum, values in (("--batch-size", 1, ("0", "-1")), ("--num-visualizations", 0, ("-1",)))
      for value in values],
    ("evaluate-string-size-config", ["evaluate", "--model", "{string_size_model}", "--data", "{data}", *OUT], 2,
     "cops-hf evaluate: error: The config.json of '{string_size_model}' is invalid: image_size must be an integer, "
     "got 'abc'. Fix the file or save the model again."),
    ("evaluate-incomplete-model", ["evaluate", "--model", "{incomplete_model}", "--data", "{data}", *OUT], 2,
     "cops-hf evaluate: error: '{incomplete_model}' lacks {num_cops_weights} weights"),
    ("evaluate-missing-model", ["evaluate", "--model", "./no/such/model", "--data", "{data}", *OUT], 2,
     "cops-hf evaluate: error: Model folder './no/such/model' does not exist"),
    ("evaluate-nan-model", ["evaluate", "--model", "{nan_model}", "--data", "{data}", *OUT], 2,
     "cops-hf evaluate: error: The model gave a non-finite anomaly score (nan) for '{data}/bottle/0.png'"),
    ("evaluate-missing-data", ["evaluate", "--model", "{model}", "--data", "{tmp}/nowhere", *OUT], 2,
     "cops-hf evaluate: error: No meta.json at {tmp}/nowhere/meta.json."),
    ("evaluate-unknown-category", ["evaluate", "--model", "{model}", "--data", "{data}", *OUT, "--categories", "x"],
     2, "cops-hf evaluate: error: {data}/meta.json split 'test' has no categories ['x']; available: ['bottle']"),
    ("evaluate-shots-above-normals", ["evaluate", "--model", "{model}", "--data", "{data}", *OUT, "--shots", "3"], 2,
     "cops-hf evaluate: error: --shots 3 is more than the 2 normal images of category 'bottle': lower --shots or add "
     "normal images (a `train` split of good images, or more test normals)."),
    ("evaluate-shot-seeds-without-shots", ["evaluate", "--model", "{model}", "--data", "{data}", *OUT,
                                           "--shot-seeds", "1"], 2,
     "cops-hf evaluate: error: --shot-seeds needs --shots K (K >= 1): seeds draw few-shot references"),
    ("evaluate-shots-negative", ["evaluate", "--model", "{model}", "--data", "{data}", *OUT, "--shots", "-1"], 2,
     "cops-hf evaluate: error: argument --shots: must be an integer >= 0, got '-1'"),
    # calibrate
    *[(f"calibrate-batch-size-{value}", ["calibrate", "--model", "{model}", "--normal", "{image}", *OUT,
                                          "--batch-size", value], 2,
       f"cops-hf calibrate: error: argument --batch-size: must be an integer >= 1, got '{value}'")
      for value in ("0", "-1")],
    ("calibrate-quantile", ["calibrate", "--model", "{model}", "--normal", "{image}", *OUT, "--quantile", "1.5"], 2,
     "cops-hf calibrate: error: quantile must lie in (0, 1), got 1.5."),
    ("calibrate-no-images", ["calibrate", "--model", "{model}", "--normal", "{root}/weights", *OUT], 2,
     "cops-hf calibrate: error: {root}/weights: folder holds no image files (" + SUFFIX_LIST + ")"),
    ("calibrate-bomb", ["calibrate", "--model", "{model}", "--normal", "{image}", "{bomb}", *OUT], 2,
     f"cops-hf calibrate: error: Image file '{{bomb}}' declares more than {2 * PIL_LIMIT} pixels"),
    ("calibrate-missing-image", ["calibrate", "--model", "{model}", "--normal", "{tmp}/gone.png", *OUT], 2,
     "cops-hf calibrate: error: {tmp}/gone.png: no such file or folder; pass image files, folders or glob patterns"),
    # train: flags and the training configuration, before any file is written
    *[(f"train-{flag[2:]}-{value}", ["train", "--random-clip", "tiny", "--data", "{data}", *OUT, flag, value], 2,
       f"cops-hf train: error: argument {flag}: must be an integer >= {minimum}, got '{value}'")
      for flag, minimum, value in (("--epochs", 1, "0"), ("--epochs", 1, "-2"), ("--batch-size", 1, "0"),
                                   ("--grad-accum", 1, "0"), ("--image-size", 1, "0"))],
    *[(f"train-lr-{value}", ["train", "--random-clip", "tiny", "--data", "{data}", *OUT, "--lr", value], 2,
       "cops-hf train: error: Invalid TrainingConfig: learning_rate must be finite and > 0, and adam_betas in [0, 1).")
      for value in ("nan", "inf", "0", "-1")],
    ("train-report-to-nonsense", ["train", "--random-clip", "tiny", "--data", "{data}", *OUT, "--report-to",
                                  "nonsense"], 2,
     "cops-hf train: error: argument --report-to: invalid choice: 'nonsense' (choose from "),  # quoting: per Python
    ("train-missing-data", ["train", "--random-clip", "tiny", "--data", "{tmp}/nowhere", *OUT], 2,
     "cops-hf train: error: No meta.json at {tmp}/nowhere/meta.json."),
    ("train-synthesize-without-normal-images", ["train", "--random-clip", "tiny", "--data", "{anomalous_data}",
                                                "--synthesize", *OUT], 2,
     "cops-hf train: error: No split of {anomalous_data}/meta.json holds a normal image (train: 0 normal, 2 "
     "anomalous, test: 0 normal, 2 anomalous): --synthesize puts defects on normal images; list good ones, e.g. "
     "with `cops-hf data prepare folder ROOT --normal good`."),
    # export
    *[(f"export-opset-{value}", ["export", "--model", "{model}", "--output", "{tmp}/m.onnx", "--opset", value], 2,
       f"cops-hf export: error: ONNX opset {value} is not supported: use 14..20 (default 17).")
      for value in ("1", "13", "99")],
    *[(f"export-vae-samples-{value}", ["export", "--model", "{model}", "--output", "{tmp}/m.onnx",
                                       "--vae-samples", value], 2,
       f"cops-hf export: error: argument --vae-samples: must be an integer >= 1, got '{value}'")
      for value in ("0", "-1")],
    ("export-incomplete-model", ["export", "--model", "{incomplete_model}", "--output", "{tmp}/m.onnx"], 2,
     "cops-hf export: error: '{incomplete_model}' lacks {num_cops_weights} weights"),
    # push: the card's evaluation file is checked before anything is uploaded
    ("push-eval-json-list", ["push", "{model}", "me/x", "--eval-json", "{list_json}"], 2,
     'cops-hf push: error: Evaluation results must be a JSON object (benchmark.json, metrics.json or {{"dataset": '
     '{{"metric": value}}}}), got a list.'),
    ("push-eval-json-string-metric", ["push", "{model}", "me/x", "--eval-json", "{string_metric_json}"], 2,
     'cops-hf push: error: Evaluation results must be benchmark.json, metrics.json or {{"dataset": {{"metric": '
     "value}}}}; 'visa' holds {{'I-AUROC': 'high'}}."),
    ("push-eval-json-percent", ["push", "{model}", "me/x", "--eval-json", "{percent_json}"], 2,
     "cops-hf push: error: Evaluation values must be fractions in [0, 1]; got I-AUROC=95.0 on visa."),
    ("push-eval-json-broken", ["push", "{model}", "me/x", "--eval-json", "{broken_json}"], 2,
     "cops-hf push: error: --eval-json '{broken_json}' cannot be read as JSON: Expecting property name enclosed in "
     "double quotes: line 1 column 2 (char 1)."),
    ("push-eval-json-missing", ["push", "{model}", "me/x", "--eval-json", "{tmp}/none.json"], 2,
     "cops-hf push: error: --eval-json '{tmp}/none.json' cannot be read as JSON: No such file or directory."),
    # app --write-space: the Hub id goes into the Space card's YAML, the folder may hold someone's work
    ("app-space-id-with-newline", ["app", "--model", "me/x\nlicense: other", "--write-space", "{tmp}/space"], 2,
     "cops-hf app: error: --model 'me/x\\nlicense: other' is neither a model folder on this machine nor a Hub id"),
    ("app-space-missing-folder", ["app", "--model", "{tmp}/gone", "--write-space", "{tmp}/space"], 2,
     "cops-hf app: error: --model '{tmp}/gone' is neither a model folder on this machine nor a Hub id"),
    ("app-space-not-empty", ["app", "--model", "me/x", "--write-space", "{root}"], 2,
     "cops-hf app: error: {root} is not empty; choose a new folder or pass --overwrite"),
    ("app-space-no-model", ["app", "--write-space", "{tmp}/space"], 2,
     "cops-hf app: error: a Space needs at least one model: --model FOLDER or --model namespace/name"),
    # demo and data
    *[(f"demo-epochs-{value}", ["demo", *OUT, "--epochs", value], 2,
       f"cops-hf demo: error: argument --epochs: must be an integer >= 1, got '{value}'") for value in ("0", "-3")],
    ("data-prepare-without-root", ["data", "prepare", "mvtec"], 2,
     "cops-hf data: error: usage: cops-hf data prepare NAME ROOT"),
    ("data-validate-missing", ["data", "validate", "{tmp}/nowhere"], 2,
     "cops-hf data: error: No meta.json at {tmp}/nowhere/meta.json."),
    ("benchmark-batch-size-0", ["benchmark", "--model", "{model}", "--data-root", "{tmp}", *OUT, "--batch-size", "0"],
     2, "cops-hf benchmark: error: argument --batch-size: must be an integer >= 1, got '0'"),
    # config.json values of the wrong type or out of range, refused at load (not deep in the forward)
    *[(f"predict-{name.removesuffix('_model').replace('_', '-')}", _predict(f"{{{name}}}", "{image}"), 2,
       f"cops-hf predict: error: The config.json of '{{{name}}}' is invalid: {problem}. Fix the file or save the "
       "model again.")
      for name, problem in (
          ("text_list_model", "text_config must be an object of CLIPTextConfig fields, got list"),
          ("text_string_model", "text_config.hidden_size must be an integer, got '48'"),
          ("vision_string_model", "vision_config.num_hidden_layers must be an integer, got '3'"),
          ("vae_huge_model", "vae_samples must be at most 1000, got 1000000000000"),
          ("suffix_huge_model", "prompt_suffix_token_ids must hold token ids in 0..49407 (the text vocabulary), got "
                                "[1000000000000]"),
          ("suffix_oov_model", "prompt_suffix_token_ids must hold token ids in 0..49407 (the text vocabulary), got "
                               "[49408]"),
          ("eos_oov_model", "text_config.eos_token_id must hold token ids in 0..49407 (the text vocabulary), got "
                            "1000000"))],
    ("evaluate-text-config-list", ["evaluate", "--model", "{text_list_model}", "--data", "{data}", *OUT], 2,
     "cops-hf evaluate: error: The config.json of '{text_list_model}' is invalid: text_config must be an object"),
    ("export-vae-huge-config", ["export", "--model", "{vae_huge_model}", "--output", "{tmp}/m.onnx"], 2,
     "cops-hf export: error: The config.json of '{vae_huge_model}' is invalid: vae_samples must be at most 1000"),
    ("predict-deep-config", _predict("{deep_config_model}", "{image}"), 2,
     "cops-hf predict: error: The config.json of '{deep_config_model}' is nested too deeply to be read: it is not a "
     "model configuration. Fix the file or save the model again."),
    ("predict-no-config", _predict("{no_config_model}", "{image}"), 2,
     "cops-hf predict: error: '{no_config_model}' has no config.json, so it is not a saved model: give the folder "
     "written by save_pretrained or `cops-hf convert` (config.json next to model.safetensors)."),
    ("export-no-config", ["export", "--model", "{no_config_model}", "--output", "{tmp}/m.onnx"], 2,
     "cops-hf export: error: '{no_config_model}' has no config.json, so it is not a saved model"),
    ("predict-wrong-weight-shape", _predict("{wrong_shape_model}", "{image}"), 2,
     "cops-hf predict: error: The weight 'state_prototypes.normal_queries' of '{wrong_shape_model}' has shape [3, 5] "
     "but its config.json implies [6, 48] (1 mismatched in all): the weights and the config do not belong "
     "together. Save or download the model again."),
    *[(f"{command}-processor-size-mismatch", [command, "--model", "{other_size_processor_model}", *inputs, *OUT], 2,
       f"cops-hf {command}: error: The processor of '{{other_size_processor_model}}' resizes images to 112 px but the "
       "model's config.json says image_size=98: scores would silently change. Use the processor saved with the "
       "model, or CoPSProcessor.for_image_size(98) (save both again to fix the folder).")
      for command, inputs in (("predict", ["{image}"]), ("evaluate", ["--data", "{data}"]),
                              ("calibrate", ["--normal", "{image}"]))],
    # flags out of range, refused before any work
    *[(f"{command}-batch-size-huge", [command, *inputs, *OUT, "--batch-size", "99999999999999999999"], 2,
       f"cops-hf {command}: error: argument --batch-size: must be an integer in 1..4096, got '99999999999999999999'; "
       "a batch that large would not fit in memory")
      for command, inputs in (("predict", ["--model", "{model}", "{image}"]),
                              ("evaluate", ["--model", "{model}", "--data", "{data}"]),
                              ("calibrate", ["--model", "{model}", "--normal", "{image}"]),
                              ("train", ["--random-clip", "tiny", "--data", "{data}"]))],
    *[(f"{command}-seed-{value}", [command, *inputs, *OUT, "--seed", value], 2,
       f"cops-hf {command}: error: argument --seed: must be an integer in 0..4294967295, got '{value}'")
      for command, inputs in (("evaluate", ["--model", "{model}", "--data", "{data}"]),
                              ("train", ["--random-clip", "tiny", "--data", "{data}"]),
                              ("benchmark", ["--model", "{model}", "--data-root", "{tmp}"]))
      for value in ("4294967296", "-1")],
    ("demo-seed-huge", ["demo", *OUT, "--seed", "99999999999999999999"], 2,
     "cops-hf demo: error: argument --seed: must be an integer in 0..4294967295, got '99999999999999999999'"),
    ("train-random-clip-broken-json", ["train", "--random-clip", "{broken_json}", "--data", "{data}", *OUT], 2,
     "cops-hf train: error: --random-clip: Random CLIP config '{broken_json}' cannot be read as JSON: Expecting "
     "property name enclosed in double quotes: line 1 column 2 (char 1)."),
    ("train-random-clip-list-json", ["train", "--random-clip", "{list_json}", "--data", "{data}", *OUT], 2,
     "cops-hf train: error: --random-clip: Random CLIP config '{list_json}' must be a JSON object of CLIPConfig "
     "fields."),
    ("train-random-clip-bad-field", ["train", "--random-clip", "{clip_field_json}", "--data", "{data}", *OUT], 2,
     "cops-hf train: error: --random-clip: Random CLIP config '{clip_field_json}' is not a valid CLIPConfig: Field "
     "'hidden_size' expected int, got str (value: 'wide')"),
    # meta.json refused as a whole, naming the file and what is wrong
    *[(f"{command}-dataset-{kind}", [*argv, f"{{data_dataset_{kind}}}", *extra], 2,
       f"cops-hf {argv[0]}: error: {{data_dataset_{kind}}}/meta.json: field 'dataset' must be a benchmark name (a "
       f"string such as \"visa\"), got {shown}")
      for kind, shown in (("object", "\"{{'name': 'visa'}}\""), ("number", "'7'"))
      for command, argv, extra in (("evaluate", ["evaluate", "--model", "{model}", "--data"], OUT),
                                   ("validate", ["data", "validate"], []))],
    *[(f"{command}-nested-meta", [*argv, "{data_nested_meta}", *extra], 2,
       f"cops-hf {argv[0]}: error: {{data_nested_meta}}/meta.json is not a meta.json: it is nested too deeply to be "
       "read")
      for command, argv, extra in (("evaluate", ["evaluate", "--model", "{model}", "--data"], OUT),
                                   ("validate", ["data", "validate"], []))],
    *[(f"{command}-long-category", [*argv, "{data_long_category}", *extra], 2,
       f"cops-hf {argv[0]}: error: {{data_long_category}}/meta.json: {_LONG_CATEGORY_PROBLEM}")
      for command, argv, extra in (("evaluate", ["evaluate", "--model", "{model}", "--data"], OUT),
                                   ("calibrate", ["calibrate", "--model", "{model}", "--data"], OUT),
                                   ("validate", ["data", "validate"], []))],
]  # fmt: skip


RESOURCE_CASES: list[tuple[str, list[str], int, str]] = [
    # ranges: worker processes and ports, in one shared argparse type
    *[(f"train-num-workers-{value}", ["train", "--random-clip", "tiny", "--data", "{data}", *OUT, "--num-workers",
                                      value], 2,
       f"cops-hf train: error: argument --num-workers: must be an integer in [0, 64], got '{value}'")
      for value in ("100000", "65", "-1", "1e3")],
    *[(f"app-port-{value}", ["app", "--model", "{model}", "--port", value], 2,
       f"cops-hf app: error: argument --port: must be an integer in [1, 65535], got '{value}'")
      for value in ("99999", "65536", "0", "-1", "http", "80.5")],
    # the checkpoint SHA-1 names a cache folder: 40 hex digits and nothing else
    *[(f"convert-checkpoint-sha1-{name}", ["convert", "--official", "visa", *OUT, "--checkpoint-sha1", value], 2,
       f"cops-hf convert: error: argument --checkpoint-sha1: must be a SHA-1 of 40 hex digits, got '{value}'")
      for name, value in (("parent", "../../x"), ("short", "9b658b4c"), ("absolute", "/" + "0" * 39),
                          ("not-hex", "z" * 40))],
    # non-finite pixels are not an image, wherever images are read
    *[(f"predict-{name}", _predict("{model}", f"{{{name}}}"), 2,
       f"cops-hf predict: error: Image file '{{{name}}}' holds NaN or infinite pixel values; it is not a valid image.")
      for name in ("nan_tiff", "inf_tiff", "minus_inf_tiff")],
    ("calibrate-nan-tiff", ["calibrate", "--model", "{model}", "--normal", "{image}", "{nan_tiff}", *OUT], 2,
     "cops-hf calibrate: error: Image file '{nan_tiff}' holds NaN or infinite pixel values"),
    ("predict-skip-invalid-only-nan", _predict("{model}", "{nan_tiff}", extra=("--skip-invalid",)), 2,
     "cops-hf predict: error: no image could be scored (Image file '{nan_tiff}' holds NaN or infinite pixel values"),
]  # fmt: skip
CLI_CASES += RESOURCE_CASES


@pytest.mark.parametrize(
    ("argv", "code", "first_line"), [case[1:] for case in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_cli_matrix(files, tmp_path, capsys, argv, code, first_line):
    values = {**{name: str(value) for name, value in files.items()}, "tmp": str(tmp_path)}
    values["data"] = str(_dataset(tmp_path / "data"))
    values["anomalous_data"] = str(_anomalous_dataset(tmp_path / "anomalous_data"))
    for name, make in RAW_DATASETS.items():
        if f"{{data_{name}}}" in " ".join(argv):
            values[f"data_{name}"] = str(make(tmp_path / name))

    assert _run([part.format(**values) for part in argv]) == code

    line = _error_line(capsys)
    assert line.startswith(first_line.format(**values)), line
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_matrix_size():
    assert len(CLI_CASES) + len(DATA_CASES) + len(API_CASES) >= 80
    assert len(RESOURCE_CASES) >= 19  # issue 23's round two: ranges, SHA-1s, non-finite pixels


# ---------------------------------------------------------------- meta.json datasets gone wrong


def _record(path: str, **fields) -> dict:
    return {**make_record(path, cls_name="bottle", anomaly=0), **fields}


def _raw_dataset(root: Path, record: dict) -> None:
    """The valid dataset plus a record that write_meta_json would refuse, written as a hand-edited file would be."""
    _dataset(root)
    meta = json.loads((root / "meta.json").read_text())
    meta["test"]["bottle"].append(record)
    (root / "meta.json").write_text(json.dumps(meta))


DATA_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("missing-image", lambda root: _dataset(root, [_record("bottle/gone.png")]),
     "{root}/bottle/gone.png: image file not found [test/bottle[4]]"),
    ("missing-mask", lambda root: _dataset(root, [_record("bottle/0.png", anomaly=1, mask_path="bottle/gone.png")]),
     "{root}/bottle/gone.png: mask file not found [test/bottle[4]]"),
    ("duplicate", lambda root: _dataset(root, [_record("bottle/0.png")]),
     "{root}/bottle/0.png: duplicate record: the same image is listed at test/bottle[0] [test/bottle[4]]"),
    ("duplicate-spelled-differently", lambda root: _dataset(root, [_record("bottle/../bottle/2.png")]),
     "{root}/bottle/2.png: duplicate record: the same image is listed at test/bottle[2] [test/bottle[4]]"),
    ("bomb", lambda root: (_dataset(root, [_record("bottle/bomb.png")]),
                           write_png_header(root / "bottle" / "bomb.png", 30000, 30000)),
     f"{{root}}/bottle/bomb.png: image declares more than {2 * PIL_LIMIT} pixels, over the limit of {PIL_LIMIT}"),
    ("big", lambda root: (_dataset(root, [_record("bottle/big.png")]),
                          write_png_header(root / "bottle" / "big.png", 10000, 10000)),
     f"{{root}}/bottle/big.png: image is 10000x10000 pixels, over the limit of {PIL_LIMIT} pixels"),
    ("escaping-image", lambda root: _dataset(root, [_record("../outside.png")]),
     "../outside.png: image path leads outside the dataset root {root}; meta.json paths must stay inside it"),
    ("bad-specie", lambda root: _raw_dataset(root, _record("bottle/0.png", specie_name="../x")),
     "{root}/meta.json: field 'specie_name' '../x' is not a plain folder name"),
    ("bad-anomaly", lambda root: _raw_dataset(root, _record("bottle/0.png", anomaly=2)),
     "{root}/meta.json: field 'anomaly' must be 0 or 1, got 2 [test/bottle[4]]"),
    ("nul-image-path", lambda root: _raw_dataset(root, _record("bottle/a\0b.png")),
     "{root}/meta.json: field 'img_path' contains a NUL character, which no file name may hold [test/bottle[4]]"),
    ("nul-mask-path", lambda root: _raw_dataset(root, _record("bottle/1.png", anomaly=1, mask_path="m\0.png")),
     "{root}/meta.json: field 'mask_path' contains a NUL character, which no file name may hold [test/bottle[4]]"),
    ("long-name", lambda root: _raw_dataset(root, _record("bottle/" + "x" * 300 + ".png")),
     "{root}/meta.json: field 'img_path' is too long (311 bytes, longest name 304): file systems allow 255 bytes per "
     "name and 4096 in all [test/bottle[4]]"),
    ("long-path", lambda root: _raw_dataset(root, _record("a/" * 2100 + "x.png")),
     "{root}/meta.json: field 'img_path' is too long (4205 bytes, longest name 5): file systems allow 255 bytes per "
     "name and 4096 in all [test/bottle[4]]"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "problem"), [case[1:] for case in DATA_CASES], ids=[case[0] for case in DATA_CASES])
def test_invalid_records_are_listed_refused_and_skippable(files, tmp_path, capsys, make, problem):
    """validate lists the problem (exit 1), evaluate refuses it (exit 2) and evaluates the rest with --skip-invalid."""
    root = tmp_path / "data"
    make(root)
    problem = problem.format(root=root)

    assert _run(["data", "validate", str(root)]) == 1
    report = capsys.readouterr().out.splitlines()
    assert report[0].endswith("5 records in 1 categories, 4 valid (2 anomalous, pixel-level), 1 problems")
    assert report[1].startswith(f"  - {problem}")

    evaluate = ["evaluate", "--model", str(files["model"]), "--data", str(root), "--output", str(tmp_path / "out")]
    assert _run(evaluate) == 2
    assert _error_line(capsys).startswith(
        f"cops-hf evaluate: error: {root / 'meta.json'} [test]: 1 invalid of 5 records, first {problem}"
    )
    assert _run([*evaluate, "--skip-invalid"]) == 0
    predictions = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + 4  # header + the four valid records, each once


def test_evaluate_skip_invalid_skips_a_truncated_image(files, tmp_path, capsys, caplog):
    root = _dataset(tmp_path / "data")
    truncated = root / "bottle" / "2.png"
    write_image(truncated, size=(64, 64), value=90)
    truncated.write_bytes(truncated.read_bytes()[:-40])  # the header reads, the pixels do not
    evaluate = ["evaluate", "--model", str(files["model"]), "--data", str(root), "--output", str(tmp_path / "out")]

    assert _run([*evaluate, "--skip-invalid"]) == 0

    predictions = (tmp_path / "out" / "predictions.csv").read_text()
    assert len(predictions.splitlines()) == 1 + 3 and str(truncated) not in predictions
    assert "Skipped 1 invalid records" in caplog.text


def _benchmark_root(root: Path) -> Path:
    """A suite folder whose mvtec/ has one record pointing at a missing image."""
    _dataset(root / "mvtec", [_record("bottle/gone.png")])
    return root


def test_benchmark_skip_invalid_keeps_the_suite_going(files, tmp_path, capsys):
    root = _benchmark_root(tmp_path / "suite")
    benchmark = ["benchmark", "--model", str(files["model"]), "--data-root", str(root), "--suite", "industrial",
                 "--output", str(tmp_path / "out"), "--batch-size", "4"]  # fmt: skip

    assert _run(benchmark) == 2
    line = _error_line(capsys)
    assert line.startswith(f"cops-hf benchmark: error: {root / 'mvtec' / 'meta.json'} [test]: 1 invalid of 5 records")
    assert "(CLI: --skip-invalid)" in line  # the option the hint names exists
    assert _run([*benchmark, "--skip-invalid"]) == 0
    results = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert "mvtec" in json.dumps(results)
    assert len((tmp_path / "out" / "mvtec" / "predictions.csv").read_text().splitlines()) == 1 + 4


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_pixels_in_a_dataset_are_listed_and_refused(files, tmp_path, capsys, value):
    root = _dataset(tmp_path / "data", [_record("bottle/float.tif")])
    write_float_tiff(root / "bottle" / "float.tif", value)

    assert _run(["data", "validate", str(root)]) == 1  # validate decodes every image
    assert capsys.readouterr().out.splitlines()[1] == (
        f"  - {root}/bottle/float.tif: image holds NaN or infinite pixel values; it is not a valid image "
        "[test/bottle[4]]"
    )
    evaluate = ["evaluate", "--model", str(files["model"]), "--data", str(root), "--output", str(tmp_path / "out")]
    assert _run(evaluate) == 2  # refused while scoring, naming the file
    assert _error_line(capsys) == (
        f"cops-hf evaluate: error: Image file '{root}/bottle/float.tif' holds NaN or infinite pixel values; it is not "
        "a valid image."
    )


def test_category_names_are_refused_by_every_reader(files, tmp_path, capsys):
    root = tmp_path / "data"
    write_image(root / "x.png", size=(16, 16))
    (root / "meta.json").write_text(json.dumps({"test": {"a/b": [make_record("x.png", cls_name="a/b", anomaly=0)]}}))
    expected = f"{root / 'meta.json'}: split 'test': category 'a/b' is not a plain folder name"
    for argv in (
        ["data", "validate", str(root)],
        ["evaluate", "--model", str(files["model"]), "--data", str(root), "--output", str(tmp_path / "o")],
        ["calibrate", "--model", str(files["model"]), "--data", str(root), "--output", str(tmp_path / "o")],
    ):
        assert _run(argv) == 2
        assert _error_line(capsys) == f"cops-hf {argv[0]}: error: {expected} (no '/', '\\', '.', '..' or empty names)"
    assert not (tmp_path / "o").exists()  # fmt: skip


# ---------------------------------------------------------------- the pipeline and the processor


@pytest.fixture(scope="module")
def detector(files):
    return pipeline("anomaly-detection", model=str(files["model"]))


API_CASES: list[tuple[str, Callable[[dict], object], type[Exception], str]] = [
    ("empty-list", lambda f: f["detector"]([]), ValueError,
     "No images were given: pass a path, a PIL image, an array, or a non-empty list of them."),
    ("zero-by-zero", lambda f: f["detector"](np.zeros((0, 0, 3), np.uint8)), ImageLoadError,
     "input #0 (ndarray): the array has no pixels (shape [0, 0, 3])."),
    ("uint16-hwc", lambda f: f["detector"](np.zeros((8, 8, 3), np.uint16)), ImageLoadError,
     "input #0 (ndarray): uint16 arrays must be single-channel (HxW); give colour images as uint8, or as float in "
     "[0, 1]."),
    ("float-out-of-range", lambda f: f["detector"](np.full((8, 8, 3), 2.0)), ImageLoadError,
     "input #0 (ndarray): float arrays must hold finite values in [0, 1]."),
    ("threshold-text", lambda f: f["detector"](str(f["image"]), threshold="abc"), ValueError,
     "threshold must be a finite number in [0, 1], got 'abc'."),
    ("threshold-above-one", lambda f: f["detector"](str(f["image"]), threshold=2.0), ValueError,
     "threshold must be a finite number in [0, 1], got 2.0."),
    ("image-threshold-nan", lambda f: f["detector"](str(f["image"]), image_threshold=float("nan")), ValueError,
     "image_threshold must be a finite number in [0, 1], got nan."),
    ("threshold-bool", lambda f: f["detector"](str(f["image"]), threshold=True), ValueError,
     "threshold must be a finite number in [0, 1], got True."),
    ("directory", lambda f: f["detector"](str(f["root"])), ImageLoadError,
     "Image file '{root}' is a directory; give the image files in it."),
    ("bomb", lambda f: load_image(f["bomb"]), ImageLoadError,
     f"Image file '{{bomb}}' declares more than {2 * PIL_LIMIT} pixels"),
    ("references-empty", lambda f: f["detector"].set_references([]), ValueError,
     "No reference images were given: pass a non-empty list of normal images."),
    ("references-unreadable", lambda f: f["detector"].set_references([f["image"], f["text"]]), ImageLoadError,
     "Reference images: Image file '{text}' cannot be read (cannot identify image file"),
    ("wrong-shape", lambda f: load_image(np.zeros((2, 3, 5, 7))), ImageLoadError,
     "input #0 (ndarray): expected an HxW, HxWx3 or HxWx4 array, got shape [2, 3, 5, 7]."),
    ("pipeline-processor-size", lambda f: pipeline("anomaly-detection", model=f["detector"].model,
                                                   processor=CoPSProcessor.for_image_size(112)), ValueError,
     "The processor of {model} resizes images to 112 px but the model's config.json says image_size=98: scores "
     "would silently change."),
    ("predict-images-processor-size", lambda f: list(predict_images(
        f["detector"].model, CoPSProcessor.for_image_size(112), [str(f["image"])])), ValueError,
     "The processor of {model} resizes images to 112 px but the model's config.json says image_size=98"),
    ("config-nested-json", lambda f: CoPSConfig.from_pretrained(f["deep_config_model"]), ValueError,
     "The config.json of '{deep_config_model}' is nested too deeply to be read"),
    ("model-without-config", lambda f: CoPSForAnomalyDetection.from_pretrained(f["no_config_model"]), OSError,
     "'{no_config_model}' has no config.json, so it is not a saved model"),
    ("config-vae-samples", lambda f: CoPSConfig(vae_samples=5000), ValueError,
     "Invalid CoPSConfig: vae_samples must be at most 1000, got 5000."),
    ("read-json-nested", lambda f: read_json_file(f["deep_config_model"] / "config.json", "config"), ValueError,
     "config '{deep_config_model}/config.json' cannot be read as JSON: it is nested too deeply."),
    *[(f"pil-float-{value}", lambda f, value=value: f["detector"](Image.fromarray(np.full((8, 8), value, np.float32))),
       ImageLoadError, "Image input #0 (Image) holds NaN or infinite pixel values; it is not a valid image.")
      for value in (np.nan, np.inf)],
    ("nan-tiff-mask", lambda f: load_mask(f["nan_tiff"]), ImageLoadError,
     "Image file '{nan_tiff}' holds NaN or infinite pixel values"),
    ("nan-tensor", lambda f: f["detector"](torch.full((3, 8, 8), float("nan"))), ImageLoadError,
     "input #0 (Tensor): float arrays must hold finite values in [0, 1]."),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_matrix(files, detector, call, error, message):
    with pytest.raises(error) as raised:
        call({**files, "detector": detector})
    assert str(raised.value).splitlines()[0].startswith(message.format(**{name: str(v) for name, v in files.items()}))


def test_references_of_another_size_or_mode_are_processed_like_any_image(files):
    from transformers import pipeline

    grey = np.random.default_rng(0).integers(0, 256, (30, 50), dtype=np.uint8)
    rgba = np.random.default_rng(1).integers(0, 256, (120, 40, 4), dtype=np.uint8)
    referenced = pipeline("anomaly-detection", model=str(files["model"]), references=[files["image"], grey, rgba])
    assert referenced.model.num_references == 3
    assert 0.0 <= referenced(str(files["image"]))["score"] <= 1.0


def test_skip_invalid_keeps_the_rest_of_the_batch(files, detector):
    images = [str(files["image"]), str(files["bomb"]), str(files["text"]), str(files["big"]), str(files["image"])]

    results = detector(images, skip_invalid=True, batch_size=4)

    assert [("error" in result) for result in results] == [False, True, True, True, False]
    assert results[1]["error"].startswith(f"Image file '{files['bomb']}' declares more than")
    assert results[3]["error"].startswith(f"Image file '{files['big']}' is 10000x10000 pixels")
    assert results[0]["score"] == pytest.approx(results[4]["score"], abs=1e-6)


def test_predict_skip_invalid_writes_every_row(files, tmp_path, capsys):
    argv = _predict(str(files["model"]), str(files["image"]), str(files["bomb"]), extra=("--skip-invalid",))
    assert _run([part.format(tmp=tmp_path) for part in argv]) == 0
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert rows[1].startswith(f"{files['image']},0.")
    assert rows[2].startswith(f"{files['bomb']},,,,") and "declares more than" in rows[2]


def test_pixel_limit_can_be_raised(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    argv = _predict(str(files["model"]), str(files["image"]))
    argv = [part.format(tmp=tmp_path) for part in argv]
    monkeypatch.setenv("COPS_HF_MAX_IMAGE_PIXELS", "200")  # the 16x16 image is 256 pixels
    assert _run(argv) == 2
    assert _error_line(capsys) == (
        f"cops-hf predict: error: Image file '{files['image']}' is 16x16 pixels, over the limit of 200 pixels that "
        "guards against decompression bombs; if the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS "
        "(COPS_HF_MAX_IMAGE_PIXELS for the CLI)."
    )
    monkeypatch.setenv("COPS_HF_MAX_IMAGE_PIXELS", "256")
    assert _run(argv) == 0
    monkeypatch.setenv("COPS_HF_MAX_IMAGE_PIXELS", "lots")
    assert _run(argv) == 2
    assert _error_line(capsys) == (
        "cops-hf predict: error: COPS_HF_MAX_IMAGE_PIXELS must be a positive number of pixels, got 'lots'."
    )


_OUT_OF_MEMORY_SCRIPT = """
import resource, sys
from cops_hf.cli import main

def virtual_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

limit = virtual_bytes() + 3 * 2**30  # 3 GiB of address space beyond what the imports took: malloc fails past it
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(main(sys.argv[1:]))
"""


def test_running_out_of_memory_is_one_line_naming_the_batch_size(files, tmp_path):
    """A 7000 px input (a genuine config, saved with its processor) needs far more than the 3 GiB the process may
    take: the allocation failure is reported in one line that says what to lower, in a subprocess whose address
    space is capped (so the test is safe whatever the machine's memory and overcommit policy)."""
    model = _save_model(tmp_path / "huge_input", tiny_model(image_size=7000))
    argv = _predict(str(model), str(files["image"]), str(files["image"]), extra=("--batch-size", "2"))
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}

    result = subprocess.run(
        [sys.executable, "-c", _OUT_OF_MEMORY_SCRIPT, *[part.format(tmp=tmp_path) for part in argv]],
        capture_output=True, text=True, env=environment, timeout=600,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr[-2000:]
    line = next(line for line in result.stderr.splitlines() if line.startswith("cops-hf "))
    assert line.startswith("cops-hf predict: error: out of memory (")
    assert line.endswith("): lower --batch-size (now 2) or free memory")
    assert "Traceback" not in result.stderr


def test_refused_flags_write_nothing(tmp_path):
    assert _run(["demo", "--output", str(tmp_path / "demo"), "--epochs", "0"]) == 2
    assert _run(["train", "--random-clip", "tiny", "--data", str(_dataset(tmp_path / "data")), "--output",
                 str(tmp_path / "run"), "--lr", "nan"]) == 2  # fmt: skip
    assert not (tmp_path / "demo").exists() and not (tmp_path / "run").exists()


def test_saved_weights_are_as_readable_as_the_config(files):
    modes = {name: (files["model"] / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert modes["model.safetensors"] == modes["config.json"]


# ---------------------------------------------------------------- names and folders that strain the file system


def test_an_image_name_near_255_bytes_gets_a_short_overlay_name(files, tmp_path):
    long_names = [f"{'é' * 120}{tag}.png" for tag in ("a", "b")]  # 245 bytes each, sharing a 240-byte prefix
    for name in long_names:
        write_image(tmp_path / "images" / name, size=(16, 16))
    argv = _predict(str(files["model"]), str(tmp_path / "images"), extra=("--threshold", "0.5"))

    assert _run([part.format(tmp=tmp_path) for part in argv]) == 0

    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert [Path(row["image_path"]).name for row in rows] == sorted(long_names)
    written = [row[column] for row in rows for column in ("overlay", "pred_mask")]
    assert len(set(written)) == 4 and all(len(name.encode()) <= 255 for name in written)
    assert all((tmp_path / "out" / name).is_file() for name in written)
    for index, row in enumerate(rows):
        assert row["overlay"].startswith(f"{index:05d}_éé") and row["pred_mask"].startswith(f"{index:05d}_éé")


def test_scores_json_stays_valid_when_the_run_aborts(files, tmp_path, capsys):
    argv = _predict(str(files["model"]), str(files["image"]), str(files["truncated"]), extra=("--format", "json"))

    assert _run([part.format(tmp=tmp_path) for part in argv]) == 2  # the truncated image stops the run

    assert _error_line(capsys).startswith(f"cops-hf predict: error: Image file '{files['truncated']}' cannot be read")
    rows = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert [row["image_path"] for row in rows] == [str(files["image"])] and 0.0 <= rows[0]["pred_score"] <= 1.0


def test_symlink_loops_in_a_folder_visit_each_real_folder_once(files, tmp_path):
    root = tmp_path / "tree"
    write_image(root / "a" / "one.png", size=(16, 16))
    write_image(root / "a" / "b" / "two.png", size=(16, 16))
    write_image(tmp_path / "elsewhere" / "three.png", size=(16, 16))
    (root / "a" / "b" / "up").symlink_to(root / "a")  # a loop
    (root / "a" / "b" / "root").symlink_to(root)  # another
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # a folder linked in, followed once
    expected = [root / "a" / "b" / "two.png", root / "a" / "one.png", root / "linked" / "three.png"]

    assert expand_image_sources([root]) == [str(path) for path in expected]
    assert expand_image_sources([f"{root}/**/*.png"]) == [str(path) for path in expected]
    assert expand_image_sources([f"{root}/a/*.png"]) == [str(root / "a" / "one.png")]

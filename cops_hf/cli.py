"""`cops-hf` command line: each subcommand parses its arguments and calls the Python API, nothing else.

Building the parser imports neither torch nor transformers (each subcommand imports what it runs), so `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .data.registry import GENERAL_PRESET, REGISTRY, SUITES, aliases_text, resolve_test_preset
from .devices import DTYPE_NAMES
from .schema import ERROR, IMAGE_PATH, PRED_LABEL, PRED_SCORE

if TYPE_CHECKING:
    from .evaluation.fewshot import FewShotResult

Subcommand = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
"""name, one-line help, adds the arguments, runs the command."""


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", help="cpu, cuda, cuda:1, mps (default: the first CUDA GPU when there is one, else cpu)"
    )
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="precision of the model (default fp32)")


def _add_style_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--colormap", help="matplotlib colormap of the heatmaps (default jet; e.g. turbo, inferno)")
    parser.add_argument("--alpha", type=float, help="opacity of the heatmap over the image, 0..1 (default 0.5)")


def _style(args: argparse.Namespace) -> dict[str, object]:
    """The overlay options given on the command line (the API's defaults otherwise)."""
    given = {"colormap_name": args.colormap, "alpha": args.alpha}
    return {name: value for name, value in given.items() if value is not None}


def _add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tile", type=_positive_int, metavar="PIXELS",
        help="score large images by overlapping tiles of this many original pixels (e.g. 518), stitched back to full "
        "resolution (default: the whole image, resized)",
    )  # fmt: skip
    parser.add_argument(
        "--tile-overlap", type=_overlap, metavar="FRACTION",
        help="with --tile: fraction of a tile shared with its neighbour, in [0, 1) (default 0.25)",
    )  # fmt: skip


def _tiling(args: argparse.Namespace) -> dict[str, object]:
    """The tiling options given on the command line; `--tile-overlap` alone is refused."""
    if args.tile is None:
        if args.tile_overlap is not None:
            raise ValueError("--tile-overlap applies to tiles: give --tile too (e.g. --tile 518)")
        return {}
    return {"tile_size": args.tile, "tile_overlap": 0.25 if args.tile_overlap is None else args.tile_overlap}


def _overlap(text: str) -> float:
    """Argparse type: a fraction in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text!r}")
    return value


def _int_in_range(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """Argparse type: an integer in [`minimum`, `maximum`] (no upper bound when `maximum` is None)."""
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        stripped = text.strip()
        digits = stripped[1:] if stripped.startswith("-") else stripped
        value = int(stripped) if digits.isdigit() else None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_in_range(1)
_non_negative_int = _int_in_range(0)
MAX_NUM_WORKERS = 64
"""The most image-decoding worker processes `--num-workers` accepts (each is a process holding the dataset)."""
_num_workers = _int_in_range(0, MAX_NUM_WORKERS)
_port = _int_in_range(1, 65535)


def _sha1(text: str) -> str:
    """Argparse type: a SHA-1, 40 hex digits."""
    from .file_utils import is_sha1

    if not is_sha1(text):
        raise argparse.ArgumentTypeError(f"must be a SHA-1 of 40 hex digits, got {text!r}")
    return text.lower()


MAX_SEED = 2**32 - 1
"""The largest seed every generator takes (numpy's, which accelerate's `set_seed` seeds too)."""

MAX_BATCH_SIZE = 4096
"""The largest `--batch-size` accepted: far above what fits in memory for any CLIP tower CoPS uses."""


def _seed(text: str) -> int:
    """An integer seed in 0..MAX_SEED (an argparse type)."""
    if not text.strip().isdigit() or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{MAX_SEED}, got {text!r}")
    return int(text)


def _batch_size(text: str) -> int:
    """An integer in 1..MAX_BATCH_SIZE (an argparse type)."""
    if _positive_int(text) > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be an integer in 1..{MAX_BATCH_SIZE}, got {text!r}; a batch that large would not fit in memory"
        )
    return int(text)


def _threshold(text: str) -> float:
    """Argparse type: a finite number in [0, 1] (scores and anomaly maps are probabilities)."""
    from .processing_cops import check_threshold

    try:
        return check_threshold(float(text), "the threshold")
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be a finite number in [0, 1], got {text!r}") from error


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--official", choices=["mvtec", "visa"], help="Download, verify and convert an official detector (visa: "
        "trained on VisA, for other datasets; mvtec: trained on MVTec AD, for VisA)."
    )  # fmt: skip
    parser.add_argument(
        "--clip", help="CLIP: an OpenAI file (ViT-L-14-336px.pt), a transformers CLIP folder or a Hub id "
        "(with --official, default openai/clip-vit-large-patch14-336)."
    )  # fmt: skip
    parser.add_argument("--checkpoint", help="Reference CoPS checkpoint (e.g. epoch_10.pth); omit for fresh modules.")
    parser.add_argument("--output", required=True, help="Folder for the detector (model + processor).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a model folder already at --output.")
    parser.add_argument("--image-size", type=_positive_int, default=518, help="Input size in pixels (default 518).")
    parser.add_argument("--test-preset", help=f"Test-dataset preset: a dataset ({', '.join(REGISTRY)}) or general.")
    parser.add_argument("--train-preset", help="Training-dataset preset (visa or mvtec).")
    parser.add_argument("--revision", help="Hub revision of the CLIP (branch, tag or commit).")
    parser.add_argument("--cache-dir", help="Cache folder for downloads (default: the Hugging Face cache).")
    parser.add_argument(
        "--base-url", help="With --official: raw-file root of the reference repository or a mirror (default: "
        "$COPS_OFFICIAL_BASE_URL, else https://raw.githubusercontent.com/cqylunlun/CoPS/main)."
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-sha1", type=_sha1, help="With --official: the git blob SHA-1 the checkpoint must have, 40 hex "
        "digits (default: the published file's)."
    )  # fmt: skip
    parser.add_argument(
        "--no-round-deep-prompts",
        action="store_true",
        help="Keep the checkpoint's fp32 deep prompts (default: fp16-rounded, as the reference computes with them).",
    )


def _run_convert(args: argparse.Namespace) -> int:
    from .conversion import convert_original_checkpoint
    from .hub import save_detector
    from .official import load_official
    from .processing_cops import CoPSProcessor

    clip_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    rounding = {"round_deep_prompts": not args.no_round_deep_prompts}
    if args.official:
        if args.checkpoint:
            raise ValueError("--official downloads its own checkpoint: leave out --checkpoint")
        model, processor = load_official(
            args.official, clip=args.clip, base_url=args.base_url, blob_sha1=args.checkpoint_sha1,
            image_size=args.image_size, **clip_kwargs, **rounding,
        )  # fmt: skip
    elif args.clip:
        model = convert_original_checkpoint(
            args.clip, args.checkpoint, clip_kwargs=clip_kwargs, image_size=args.image_size, **rounding
        )
        processor = CoPSProcessor.for_image_size(model.config.image_size)
    else:
        raise ValueError("give --official visa|mvtec, or --clip (and --checkpoint) to convert local files")
    if args.test_preset or args.train_preset:
        test_preset = resolve_test_preset(args.test_preset) if args.test_preset else None
        model.config = model.config.with_preset(test_preset, args.train_preset)
    save_detector(model, processor, args.output, overwrite=args.overwrite)
    print(f"Saved CoPS model and processor to {args.output}")
    return 0


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("--output", required=True, help="folder for scores.csv/json, overlays and masks (PNG)")
    parser.add_argument("--format", choices=["csv", "json"], help="table of scores (default csv)")
    parser.add_argument("--threshold", type=_threshold, help="pixel threshold (default: the model's calibrated one)")
    parser.add_argument("--image-threshold", type=_threshold, help="score threshold (default: the calibrated one)")
    parser.add_argument("--batch-size", type=_batch_size, default=1, help="images per forward pass (default: 1)")
    parser.add_argument("--no-overlays", action="store_true", help="write the table only")
    parser.add_argument("--skip-invalid", action="store_true", help="report unreadable images instead of failing")
    _add_tiling_arguments(parser)
    _add_references_argument(parser)
    _add_style_arguments(parser)
    _add_device_arguments(parser)
    ray = parser.add_argument_group(
        "Ray Data (--engine ray)", 'score an archive on a Ray cluster into resumable Parquet shards (pip install '
        '"cops-hf[ray]"); unreadable images become rows with an error, no overlays are drawn'
    )  # fmt: skip
    ray.add_argument("--engine", choices=["local", "ray"], default="local", help="local (default) or ray")
    ray.add_argument("--address", help='Ray cluster to join, e.g. "auto" (default: a new local Ray instance)')
    ray.add_argument("--num-workers", type=_positive_int, help="scoring actors (default: one per GPU, else cores/4)")
    ray.add_argument("--shard-size", type=_positive_int, default=1024, help="images per Parquet shard (default 1024)")
    ray.add_argument("--maps", action="store_true", help="also write each anomaly map as maps/*.npy")


def _add_references_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--references", action="append", metavar="GOOD", help="normal reference images of the same part (few-shot): "
        "a file, folder or glob pattern; repeat the flag for more. Maps and scores then fuse the distance to them.",
    )  # fmt: skip


def _reference_paths(args: argparse.Namespace) -> list[str]:
    """The image files `--references` names (files, folders, globs), or a `ValueError` naming the flag."""
    from .predict import expand_image_sources

    try:
        return expand_image_sources(args.references)
    except ValueError as error:
        raise ValueError(f"--references {error}") from error


def _run_predict(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        return _run_predict_on_ray(args)
    ray_only = _given_flags(args, ["address", "num_workers", "maps"])
    if ray_only:
        raise ValueError(f"{ray_only[0]} applies to --engine ray only")
    from accelerate import PartialState

    from .predict import expand_image_sources, load_detector, write_predictions_sharded

    tiling = _tiling(args)
    if tiling and args.batch_size > 1:
        raise ValueError("--tile scores each image's tiles as one batch: leave out --batch-size")
    images = expand_image_sources(args.images)
    references = _reference_paths(args) if args.references else None
    state = PartialState(cpu=args.device == "cpu")
    # Under accelerate launch / torchrun, every process takes its own device unless one is named.
    device = args.device if args.device or state.num_processes == 1 else str(state.device)
    detector = load_detector(args.model, device=device, dtype=args.dtype)
    if references:
        detector.set_references(references)
    summary = write_predictions_sharded(
        detector, images, args.output, output_format=args.format or "csv", state=state, batch_size=args.batch_size,
        skip_invalid=args.skip_invalid, threshold=args.threshold, image_threshold=args.image_threshold,
        overlays=not args.no_overlays, progress=args.verbosity >= 0,
        on_row=_print_row if args.verbosity > 0 else None, **_style(args), **tiling,
    )  # fmt: skip
    if summary is None:  # not the main process: the main one merged the table and reports
        return 0
    if args.verbosity >= 0:
        print(f"Scored {summary.num_scored} image(s), {summary.num_failed} unreadable; wrote {summary.table_path}")
    if summary.num_scored == 0:
        print(f"cops-hf predict: error: no image could be scored ({summary.errors[0]})", file=sys.stderr)
        return 2
    return 0


def _given_flags(args: argparse.Namespace, names: list[str]) -> list[str]:
    """The flags among `names` (argument destinations) given on the command line (not `None` or `False`)."""
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) not in (None, False)]


def _run_predict_on_ray(args: argparse.Namespace) -> int:
    local_only = _given_flags(
        args, ["format", "threshold", "no_overlays", "skip_invalid", "colormap", "alpha", "references"]
    )
    if local_only:
        raise ValueError(
            f"{local_only[0]} applies to --engine local only; --engine ray writes Parquet shards (for few-shot, save "
            "a referenced model with `cops-hf references` and score that)"
        )
    from .distributed import score_images

    summary = score_images(
        args.model, args.images, args.output, shard_size=args.shard_size, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, dtype=args.dtype, image_threshold=args.image_threshold,
        anomaly_maps=args.maps, address=args.address,
    )  # fmt: skip
    if args.verbosity >= 0:
        print(f"Scored {summary.num_scored} image(s), {summary.num_failed} unreadable, skipped "
              f"{summary.skipped_shards} finished shard(s); wrote {len(summary.shard_paths)} shard(s) to "
              f"{summary.output_dir}")  # fmt: skip
    return 0


def _add_references_command_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument(
        "--images", required=True, nargs="+", metavar="GOOD",
        help="normal reference images: files, folders (searched recursively) or glob patterns",
    )  # fmt: skip
    parser.add_argument("--output", required=True, help="folder for the referenced model (model + processor)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already saved in --output")
    _add_device_arguments(parser)


def _run_references(args: argparse.Namespace) -> int:
    from .hub import save_detector
    from .predict import expand_image_sources, load_detector

    try:
        references = expand_image_sources(args.images)
    except ValueError as error:
        raise ValueError(f"--images {error}") from error
    output = Path(args.output)
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise ValueError(f"--output {output} already holds files; pass --overwrite to replace them")
    detector = load_detector(args.model, device=args.device, dtype=args.dtype)
    count = detector.set_references(references)
    save_detector(detector.model, detector.processor, output, overwrite=args.overwrite)
    if args.verbosity >= 0:
        limit = detector.model.config.reference_memory_size
        print(f"Saved the model with {count} normal reference(s) ({limit} memory patches per layer) to {output}")
    return 0


def _print_row(row: dict[str, str]) -> None:
    print(
        f"{row[IMAGE_PATH]}\t"
        + (f"error: {row[ERROR]}" if row[ERROR] else f"{PRED_SCORE}={row[PRED_SCORE]}\t{row[PRED_LABEL]}")
    )


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Model directory or Hub id.")
    parser.add_argument("--data", required=True, help="Dataset root holding meta.json.")
    parser.add_argument("--split", default="test", help="meta.json split to evaluate (default: test).")
    parser.add_argument("--categories", nargs="+", help="Only these categories (default: all).")
    parser.add_argument(
        "--preset",
        help=f"Test-time preset of the reference: a dataset ({', '.join(REGISTRY)}, or an alias) or "
        f"{GENERAL_PRESET}; default: the dataset meta.json records (written by `cops-hf data prepare`), else the "
        "preset the model's config records, else the config as saved.",
    )
    parser.add_argument("--output", required=True, help="Directory for metrics.csv/json, plots and overlays.")
    parser.add_argument("--batch-size", type=_batch_size, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--seed", type=_seed, default=0, help="Class-token noise seed (default 0).")
    parser.add_argument("--num-visualizations", type=_non_negative_int, default=8, help="Overlays per category.")
    parser.add_argument("--skip-invalid", action="store_true", help="Drop invalid records instead of failing.")
    _add_tiling_arguments(parser)
    _add_shots_arguments(parser)
    _add_style_arguments(parser)
    _add_device_arguments(parser)
    _add_cpu_alias(parser)


def _add_shots_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shots", type=_non_negative_int, default=0,
        help="K normal references per category, drawn from its train split (else from the test normals, then left "
        "out of scoring); 0 (default): zero-shot",
    )  # fmt: skip
    parser.add_argument(
        "--shot-seeds", type=_non_negative_int, nargs="+", metavar="S",
        help="seeds of the reference draws, one evaluation each, averaged with their std (default: 0)",
    )  # fmt: skip


def _shot_options(args: argparse.Namespace) -> dict[str, object]:
    """`shots` and `shot_seeds` for the API; refuses seeds without shots."""
    if args.shot_seeds and not args.shots:
        raise ValueError("--shot-seeds needs --shots K (K >= 1): seeds draw few-shot references")
    return {"shots": args.shots, "shot_seeds": args.shot_seeds or [0]} if args.shots else {}


def _add_cpu_alias(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu", dest="device", action="store_const", const="cpu", help="same as --device cpu")


def _accelerator_on(device: object):
    """An Accelerator on the model's device (on a GPU, each process of `accelerate launch` takes its own)."""
    from accelerate import Accelerator

    return Accelerator(cpu=getattr(device, "type", None) == "cpu")


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.evaluator import AUTO_PRESET, choose_test_preset, evaluate_dataset
    from .evaluation.fewshot import evaluate_few_shot
    from .predict import load_model_and_processor

    tiling = _tiling(args)
    shots = _shot_options(args)
    if tiling and shots:
        raise ValueError("--tile does not support few-shot references (--shots) yet: leave out one of them")
    model, processor = load_model_and_processor(args.model, device=args.device, dtype=args.dtype)
    preset = choose_test_preset(args.preset or AUTO_PRESET, model, args.data, source="--preset")
    print(preset.describe())
    evaluate = evaluate_few_shot if shots else evaluate_dataset
    result = evaluate(
        model, processor, args.data, split=args.split, categories=args.categories, test_preset=preset.name,
        batch_size=args.batch_size, seed=args.seed, output_dir=args.output,
        num_visualizations=args.num_visualizations, accelerator=_accelerator_on(model.device),
        skip_invalid=args.skip_invalid, **shots, **tiling, **_style(args),
    )  # fmt: skip
    if result is None:  # not the main process of a sharded run
        return 0
    if shots:
        _print_few_shot_notes(result)
    else:
        print(result.report.format_table())
        print(f"Protocol: {result.protocol}")
        print(f"Wrote {len(result.files)} files to {args.output}")
    return 0


def _print_few_shot_notes(result: FewShotResult) -> None:
    """Where the references came from: the test normals they took are not scored."""
    seeds = ", ".join(map(str, result.shot_seeds))
    print(f"{result.shots}-shot, mean over seeds {seeds} (std in metrics.json):")
    for category, split in result.reference_split.items():
        if split != "train":
            print(f"  {category}: references drawn from the {split} normals, left out of scoring")


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Model directory or Hub id.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--normal", nargs="+", help="Normal images (files or folders): quantile thresholds.")
    source.add_argument("--data", help="Labelled dataset root (meta.json): F1-optimal thresholds.")
    parser.add_argument("--split", default="test", help="Split of --data to calibrate on.")
    parser.add_argument(
        "--quantile", type=float, default=0.99,
        help="with --normal: the thresholds are this quantile of the normal images' scores and pixels "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=_batch_size, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--output", required=True, help="Folder to save the model (thresholds in its config).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a model folder already at --output.")
    _add_device_arguments(parser)


def _run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from .evaluation.calibration import calibrate_on, calibration_set
    from .hub import save_detector
    from .predict import load_model_and_processor

    model, processor = load_model_and_processor(args.model, device=args.device, dtype=args.dtype)
    source = calibration_set(normal=args.normal, data=args.data, split=args.split)
    thresholds = calibrate_on(model, processor, source, quantile=args.quantile, batch_size=args.batch_size)
    save_detector(model.to(device="cpu", dtype=torch.float32), processor, args.output, overwrite=args.overwrite)
    print(
        f"image_threshold={thresholds.image_threshold:.6f} pixel_threshold={thresholds.pixel_threshold:.6f} "
        f"({thresholds.method}, {len(source.images)} images); saved to {args.output}"
    )
    return 0


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=["prepare", "validate"], help="prepare: write meta.json; validate: check it."
    )
    parser.add_argument(
        "name_or_root",
        help=f"prepare: dataset name ({', '.join(REGISTRY)}; aliases {aliases_text()}) or 'folder' for your own "
        "images; validate: dataset root.",
    )
    parser.add_argument("root", nargs="?", help="prepare: the dataset's download folder.")
    parser.add_argument("--split", default="test", help="validate: split to check.")
    parser.add_argument("--normal", help="prepare folder: folder of normal images, relative to ROOT.")
    parser.add_argument("--anomalous", help="prepare folder: folder of anomalous images, relative to ROOT.")
    parser.add_argument("--masks", help="prepare folder: folder of masks of the anomalous images (by file stem).")


def _run_data(args: argparse.Namespace) -> int:
    from .data import prepare_dataset, prepare_folder_dataset, validate_meta_dataset

    if args.action == "prepare":
        if args.root is None:
            raise ValueError("usage: cops-hf data prepare NAME ROOT")
        if args.name_or_root != "folder":
            print(f"Wrote {prepare_dataset(args.name_or_root, args.root)}")
        elif args.normal is None and args.anomalous is None:
            raise ValueError("data prepare folder needs --normal DIR, --anomalous DIR or both")
        else:
            print(f"Wrote {prepare_folder_dataset(args.root, args.normal, args.anomalous, args.masks)}")
        return 0
    report = validate_meta_dataset(args.name_or_root, split=args.split)
    print(report.describe())
    return 0 if report.ok else 1


def _add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Model directory or Hub id.")
    parser.add_argument("--suite", choices=list(SUITES), default="all", help="Datasets to run (default all).")
    parser.add_argument(
        "--data-root", required=True, help="Folder with one sub-folder per dataset (mvtec/, visa/...)."
    )
    parser.add_argument("--output", required=True, help="Directory for benchmark.csv/.md/.json and per-dataset files.")
    parser.add_argument("--batch-size", type=_batch_size, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--seed", type=_seed, default=0, help="class-token noise seed (default: 0)")
    parser.add_argument("--skip-invalid", action="store_true", help="Drop invalid records instead of failing.")
    _add_shots_arguments(parser)
    _add_device_arguments(parser)
    _add_cpu_alias(parser)


def _run_benchmark(args: argparse.Namespace) -> int:
    from .evaluation.benchmark import run_benchmark
    from .predict import load_model_and_processor

    shots = _shot_options(args)
    model, processor = load_model_and_processor(args.model, device=args.device, dtype=args.dtype)
    result = run_benchmark(
        model, processor, args.data_root, suite=args.suite, output_dir=args.output, batch_size=args.batch_size,
        seed=args.seed, accelerator=_accelerator_on(model.device), skip_invalid=args.skip_invalid,
        **shots,
    )  # fmt: skip
    if result is None:
        return 0
    print(result.format_table())
    if not result.metrics:
        print(
            f"cops-hf benchmark: error: no dataset of suite {args.suite!r} was evaluated under {args.data_root}; "
            "put one folder per dataset there (mvtec/, visa/, ...)",
            file=sys.stderr,
        )
        return 2
    return 0


def _add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="Folder from save_pretrained or `cops-hf convert` (model + processor).")
    parser.add_argument("repo_id", help="Hub repository, namespace/name or name; created if needed.")
    parser.add_argument("--private", action="store_true", help="Create the repository private.")
    parser.add_argument("--revision", help="Branch to commit to, created from main if needed (default: main).")
    parser.add_argument(
        "--eval-json",
        help='Results for the card: benchmark.json, metrics.json, or {"dataset": {"metric": value in [0, 1]}}.',
    )
    parser.add_argument(
        "--training-dataset", help="Auxiliary training dataset, for the model card (default: the model's own record)."
    )
    parser.add_argument("--base-model", help="Hub id of the CLIP backbone, for the card (default: the model's own).")


def _run_push(args: argparse.Namespace) -> int:
    from .file_utils import read_json_file
    from .hub import evaluation_for_card, push_cops_to_hub

    evaluation = evaluation_for_card(read_json_file(args.eval_json, "--eval-json")) if args.eval_json else None
    commit = push_cops_to_hub(
        args.directory,
        args.repo_id,
        evaluation=evaluation,
        training_dataset=args.training_dataset,
        base_model=args.base_model,
        private=args.private,
        revision=args.revision,
    )
    print(f"Pushed {args.directory} to {commit.commit_url} (revision {commit.oid})")
    return 0


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    clip = parser.add_mutually_exclusive_group(required=True)
    clip.add_argument(
        "--clip", help="CLIP: a Hub id (openai/clip-vit-large-patch14-336), a transformers folder or an OpenAI file"
    )
    clip.add_argument(
        "--random-clip",
        "--clip-config",
        metavar="CONFIG",
        help="offline random CLIP: a preset name (tiny, small) or a CLIPConfig JSON file",
    )
    parser.add_argument("--data", required=True, help="dataset root holding meta.json")
    parser.add_argument(
        "--split", help="meta.json split to train on (default: the first with normal and anomalous images)"
    )
    parser.add_argument("--output", required=True, help="output folder (checkpoints, log, final model)")
    parser.add_argument("--preset", help="training dataset preset: visa, mvtec or general")
    parser.add_argument("--image-size", type=_positive_int, help="input size in pixels (default 518)")
    parser.add_argument("--epochs", type=_positive_int, default=10, help="passes over the data (default: 10)")
    parser.add_argument("--batch-size", type=_batch_size, default=8, help="images per process and step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    parser.add_argument("--grad-accum", type=_positive_int, default=1, help="batches per optimizer step")
    parser.add_argument("--mixed-precision", default="no", help="no, bf16 or fp16 (default no)")
    parser.add_argument(
        "--seed", type=_seed, default=0, help="seed of the initialisation, shuffling and noise (default: 0)"
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute the frozen vision features every epoch")
    parser.add_argument("--cache-dir", help="keep the feature cache on disk here instead of in memory")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("--overwrite", action="store_true", help="replace the final model already in --output")
    parser.add_argument(
        "--num-workers", type=_num_workers, default=0, help=f"image decoding worker processes (0..{MAX_NUM_WORKERS})"
    )
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument(
        "--report-to", choices=["none", "tensorboard", "wandb", "mlflow", "all"], default="none",
        help="experiment tracker for losses, learning rate, throughput and the final evaluation (default none: "
        "train_log.jsonl only; TensorBoard writes to OUTPUT/runs)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-data", metavar="ROOT", help="evaluate the trained model on this dataset's test split (metrics to "
        "OUTPUT/eval and to the tracker)",
    )  # fmt: skip
    parser.add_argument(
        "--synthesize", action="store_true",
        help="add a synthetic anomalous copy of every normal image each epoch (blob, scratch, cut-paste, foreign "
        "patch): trains on normal images only, or mixes into a labelled --split (default split: the first with "
        "normal images)",
    )  # fmt: skip


def _run_train(args: argparse.Namespace) -> int:
    from .training import (
        TrainingConfig,
        cops_model_for_training,
        load_training_dataset,
        processor_for,
        random_clip_model,
        train_cops,
    )

    try:
        clip = random_clip_model(args.random_clip, seed=args.seed) if args.random_clip else args.clip
    except ValueError as error:
        raise ValueError(f"--random-clip: {error}") from error
    model = cops_model_for_training(clip, preset=args.preset, image_size=args.image_size)
    config = TrainingConfig(
        output_dir=args.output,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        cache_vision_features=not args.no_cache,
        cache_dir=args.cache_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        dataloader_num_workers=args.num_workers,
        use_cpu=args.cpu,
        report_to=args.report_to,
        eval_data=args.eval_data,
        synthesize=args.synthesize,
    )
    dataset = load_training_dataset(args.data, split=args.split, synthesize=args.synthesize)
    num_anomalous = sum(dataset["gt_label"])
    num_normal = len(dataset) - num_anomalous
    synthetic = f", plus {num_normal} synthetic anomalous copies per epoch" if args.synthesize else ""
    print(
        f"Training on split '{dataset.split}' of {args.data}: {num_normal} normal and {num_anomalous} anomalous "
        f"images{synthetic}"
    )
    result = train_cops(model, processor_for(model), dataset, config)
    if result.history:
        first, last = result.history[0], result.history[-1]
        print(f"loss {first['loss']:.4f} (epoch {first['epoch']}) -> {last['loss']:.4f} (epoch {last['epoch']})")
    print(f"Saved the trained model and processor to {result.output_dir}")
    if result.evaluation is not None:
        print(result.evaluation.report.format_table())
    return 0


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="cops-demo", help="folder for the data and the run")
    parser.add_argument("--epochs", type=_positive_int, default=8, help="training epochs (default: 8)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the data, the CLIP and training (default: 0)")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import format_test_scores, run_demo

    result = run_demo(args.output, num_epochs=args.epochs, seed=args.seed)
    print("epoch  loss      cls     seg     gather  scatter")
    for record in result.training.history:
        print(
            f"{record['epoch']:>5}  {record['loss']:<8.4f}  {record['cls']:.4f}  {record['seg']:.4f}  "
            f"{record['gather']:.4f}  {record['scatter']:.4f}"
        )
    print("\nScores of unseen test images (random CLIP: mechanics, not accuracy):")
    print(format_test_scores(result.test_scores))
    print("\nZero-shot metrics on the unseen test categories (%):")
    print(result.evaluation.report.format_table())
    if result.few_shot is not None:
        print(f"\nZero-shot / {result.shots}-shot ({result.shots} normal references per category) (%):")
        print(result.comparison_table())
    print(f"\nModel, processor and train_log.jsonl in {result.training.output_dir}")
    print(f"Tables, ROC/PR plots and heatmap overlays in {Path(result.training.output_dir) / 'evaluation'}")
    return 0


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    parser.add_argument("--model", required=True, help="directory (or hub id) of a saved CoPS model")
    parser.add_argument("--output", required=True, help="path of the .onnx file to write")
    parser.add_argument("--vae-samples", type=_positive_int, help="VAE samples in the graph (default: config)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the fixed VAE noise (default: 0)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: 17)")
    parser.add_argument(
        "--int8", action="store_true", help="also write <output>.int8.onnx with int8 dynamically quantized weights"
    )


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_onnx, quantize_onnx_int8
    from .modeling_cops import CoPSForAnomalyDetection

    model = CoPSForAnomalyDetection.from_pretrained(args.model)
    path = export_onnx(model, args.output, vae_samples=args.vae_samples, seed=args.seed, opset=args.opset)
    written = [path, quantize_onnx_int8(path, path.with_suffix(".int8.onnx"))] if args.int8 else [path]
    if args.verbosity >= 0:
        print("\n".join(f"Wrote {item}" for item in written))
    return 0


def _add_app_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=[], help="model folder or Hub id (repeat for several)")
    parser.add_argument(
        "--official", action="append", default=[], choices=["visa", "mvtec"],
        help="an official CoPS detector, downloaded and converted (repeatable)",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=_port, help="port, 1..65535 (default: the first free one from 7860)")
    parser.add_argument(
        "--write-space", metavar="FOLDER",
        help="instead of serving, write the app as a Hugging Face Space folder: --model folders are copied into "
        "it, --model Hub ids are loaded by the Space",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="with --write-space: write into a folder that is not empty"
    )
    _add_device_arguments(parser)


def _run_app(args: argparse.Namespace) -> int:
    from .app import launch_app, load_app_models, write_space

    if args.write_space:
        space = write_space(args.write_space, args.model, overwrite=args.overwrite)
        print(f"Wrote the Space to {space}; upload it with "
              f"`hf upload --repo-type space NAMESPACE/NAME {args.write_space}`")  # fmt: skip
        return 0
    models = load_app_models(args.model, args.official, device=args.device, dtype=args.dtype)
    print(f"Serving {', '.join(model.name for model in models)} on http://{args.host}:{args.port or 7860} "
          "(Ctrl+C stops)")  # fmt: skip
    launch_app(models, host=args.host, port=args.port)
    return 0


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=_port, default=8000, help="port, 1-65535 (default 8000)")
    parser.add_argument("--max-batch-size", type=_positive_int, default=16, help="images per forward (default 16)")
    parser.add_argument("--batch-wait-ms", type=_non_negative_int, default=10,
                        help="longest wait for more images before a batch is scored (default 10 ms)")  # fmt: skip
    parser.add_argument("--max-body-mb", type=_positive_int, default=32, help="largest request body (default 32 MiB)")
    parser.add_argument("--allow-urls", action="store_true", help="let JSON requests name image URLs to fetch")
    parser.add_argument("--num-replicas", type=_positive_int, default=1, help="model replicas (default 1)")
    parser.add_argument("--address", help='Ray cluster to join, e.g. "auto" (default: a new local Ray instance)')
    _add_references_argument(parser)
    _add_device_arguments(parser)


def _run_serve(args: argparse.Namespace) -> int:
    from PIL import Image

    from .serve import ServeLimits, serve_detector

    body_bytes = args.max_body_mb * 2**20
    limits = ServeLimits(max_body_bytes=body_bytes, max_image_bytes=body_bytes,
                         max_image_pixels=Image.MAX_IMAGE_PIXELS, allow_urls=args.allow_urls)  # fmt: skip
    url = f"http://{args.host}:{args.port}"

    def announce() -> None:
        print(f"Serving {args.model} on {url} (POST /predict, GET /health, /ready, /docs; Ctrl+C stops)", flush=True)

    serve_detector(
        args.model, host=args.host, port=args.port, address=args.address, on_ready=[announce], device=args.device,
        dtype=args.dtype, limits=limits, max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000, num_replicas=args.num_replicas,
        references=[str(Path(path).resolve()) for path in _reference_paths(args)] if args.references else None,
    )  # fmt: skip
    return 0


SUBCOMMANDS: list[Subcommand] = [
    (
        "demo",
        "Offline demo: synthetic data, random tiny CLIP, about a minute on a CPU.",
        _add_demo_arguments,
        _run_demo,
    ),
    ("train", "Train CoPS on the labelled images of an auxiliary dataset.", _add_train_arguments, _run_train),
    ("convert", "Get an official CoPS detector, or convert CLIP + CoPS files.", _add_convert_arguments, _run_convert),
    ("predict", "Score images; write heatmap overlays and a CSV.", _add_predict_arguments, _run_predict),
    (
        "references",
        "Save a model with a memory of normal reference images (few-shot).",
        _add_references_command_arguments,
        _run_references,
    ),
    ("evaluate", "Evaluate on a meta.json dataset: metrics, plots.", _add_evaluate_arguments, _run_evaluate),
    ("calibrate", "Calibrate and store decision thresholds.", _add_calibrate_arguments, _run_calibrate),
    ("data", "Prepare (meta.json) or validate a dataset.", _add_data_arguments, _run_data),
    ("benchmark", "Run the paper's protocol on prepared datasets.", _add_benchmark_arguments, _run_benchmark),
    ("push", "Upload a model, its processor, code and card to the Hub.", _add_push_arguments, _run_push),
    ("export", "Export the whole inference to one ONNX graph.", _add_export_arguments, _run_export),
    ("app", "Serve the Gradio demo: upload images, see heatmaps and scores.", _add_app_arguments, _run_app),
    ("serve", "Serve a detector over HTTP with dynamic batching (Ray Serve).", _add_serve_arguments, _run_serve),
]


EXAMPLES = {
    "demo": "  cops-hf demo --output cops-demo",
    "train": "  cops-hf train --clip openai/clip-vit-large-patch14-336 --data /data/VisA --preset visa --output run\n"
    "  accelerate launch -m cops_hf.cli train --clip ... --data ... --output ...   (several GPUs)\n"
    "  cops-hf train --clip ... --data my_parts --synthesize --output run   (normal images only)",
    "convert": "  cops-hf convert --official visa --output cops\n"
    "  cops-hf convert --clip ViT-L-14-336px.pt --checkpoint epoch_10.pth --output cops",
    "predict": "  cops-hf predict --model cops part.png --output out\n"
    "  cops-hf predict --model cops photos/ 'more/**/*.jpg' --output out --format json --device cuda\n"
    "  accelerate launch -m cops_hf.cli predict --model cops photos/ --output out   (one box, several GPUs)\n"
    "  cops-hf predict --engine ray --address auto --model /shared/cops 's3://line/2025/**/*.png' --output shards\n"
    "  cops-hf predict --model cops --references good_parts/ new_parts/ --output out   (few-shot)",
    "references": "  cops-hf references --model cops --images good_parts/ --output cops-referenced\n"
    "  cops-hf predict --model cops-referenced new_parts/ --output out",
    "evaluate": "  cops-hf evaluate --model cops --data /data/mvtec --preset mvtec --output eval-mvtec\n"
    "  cops-hf evaluate --model cops --data /data/mvtec --shots 4 --shot-seeds 0 1 2 --output eval-4shot",
    "calibrate": "  cops-hf calibrate --model cops --normal good_parts/ --output cops-calibrated\n"
    "  cops-hf calibrate --model cops --data /data/mvtec --output cops-calibrated",
    "data": "  cops-hf data prepare mvtec /data/mvtec\n  cops-hf data validate /data/mvtec",
    "benchmark": "  cops-hf benchmark --model cops --suite industrial --data-root /data --output bench",
    "push": "  cops-hf push cops my-org/cops --eval-json bench/benchmark.json",
    "export": "  cops-hf export --model cops --output cops.onnx --int8",
    "app": "  cops-hf app --model cops --model cops-calibrated --port 7860\n  cops-hf app --official visa\n"
    "  cops-hf app --model my-org/cops-visa --write-space space/",
    "serve": "  cops-hf serve --model cops --port 8000 --references good_parts/\n"
    "  curl -F file=@part.png -F anomaly_map=png http://127.0.0.1:8000/predict",
}
"""A few command lines per subcommand, shown at the end of its --help."""


def _add_verbosity_arguments(parser: argparse.ArgumentParser, default: object) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
        help="only errors: no progress bars or summaries",
    )  # fmt: skip
    group.add_argument(
        "-v", "--verbose", dest="verbosity", action="count", default=default,
        help="more detail (-v: a line per image and INFO logs, -vv: DEBUG logs)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The `cops-hf` argument parser with every subcommand (imports neither torch nor transformers)."""
    parser = argparse.ArgumentParser(
        prog="cops-hf",
        description="CoPS zero-shot anomaly detection.",
        epilog="Run `cops-hf COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_verbosity_arguments(parser, default=0)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in SUBCOMMANDS:
        subparser = subparsers.add_parser(
            name, help=help_text, description=help_text, epilog=f"examples:\n{EXAMPLES[name]}" if name in EXAMPLES
            else None, formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        _add_verbosity_arguments(subparser, default=argparse.SUPPRESS)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def _is_input_error(error: Exception) -> bool:
    """Whether `error` reports bad input (a one-line message) rather than a bug (a traceback)."""
    hub_errors = sys.modules.get(f"{__package__}.hub_errors")
    hub_error = hub_errors is not None and isinstance(error, hub_errors.CoPSHubError)
    return isinstance(error, (ValueError, OSError)) or hub_error


def _route_library_logs(level: int, progress_bars: bool) -> None:
    """Send transformers' and huggingface_hub's logs through the root handler only, at `level`.

    Both libraries attach a handler of their own and also propagate to the root logger, so with `basicConfig` each
    of their warnings (e.g. a download's retries) would print twice. Without `progress_bars` (`-q`) their bars
    ("Loading weights", downloads) are off too.
    """
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    for name in ("huggingface_hub", "transformers"):
        library_logger = logging.getLogger(name)
        for handler in list(library_logger.handlers):
            library_logger.removeHandler(handler)
        library_logger.propagate = True
        library_logger.setLevel(level)
    if not progress_bars:
        huggingface_hub.utils.disable_progress_bars()
        transformers_logging.disable_progress_bar()


def _out_of_memory_message(error: BaseException, args: argparse.Namespace) -> str | None:
    """One line for an allocation failure, naming `--batch-size` where the command has one; None for other errors.

    Allocation failures are `MemoryError`, torch's "can't allocate memory" and CUDA's "out of memory".
    """
    text = str(error).strip()
    failed = isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and any(sign in text for sign in ("can't allocate memory", "out of memory"))
    )
    if not failed:
        return None
    reason = text.splitlines()[0] if text else type(error).__name__
    batch_size = getattr(args, "batch_size", None)
    remedy = (
        f"lower --batch-size (now {batch_size}) or free memory"
        if batch_size and batch_size > 1
        else "free memory, or use a smaller --image-size / model"
    )
    return f"out of memory ({reason[:200]}): {remedy}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cops-hf` console script."""
    args = build_parser().parse_args(argv)
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(args.verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _route_library_logs(level, progress_bars=args.verbosity >= 0)
    try:
        from .image_utils import apply_pixel_limit_from_environment

        apply_pixel_limit_from_environment()
        return args.run(args)
    except Exception as error:
        message = _out_of_memory_message(error, args)
        if message is None and not _is_input_error(error):
            raise
        print(f"cops-hf {args.command}: error: {message or error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

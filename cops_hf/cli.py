"""`cops-hf` command line: each subcommand parses its arguments and calls the Python API, nothing else."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .hub import CoPSHubError, friendly_hub_errors

Subcommand = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _threshold(text: str) -> float:
    """argparse type: a finite number in [0, 1] (scores and anomaly maps are probabilities)."""
    from .processing_cops import check_threshold

    try:
        return check_threshold(float(text), "the threshold")
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be a finite number in [0, 1], got {text}") from error


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
    parser.add_argument("--output", required=True, help="Directory for save_pretrained (model + processor).")
    parser.add_argument("--image-size", type=_positive_int, default=518, help="Input size in pixels (default 518).")
    parser.add_argument("--test-preset", help="Test-dataset preset (e.g. visa, mvtec), see TEST_DATASET_PRESETS.")
    parser.add_argument("--train-preset", help="Training-dataset preset (visa or mvtec).")
    parser.add_argument("--revision", help="Hub revision of the CLIP (branch, tag or commit).")
    parser.add_argument("--cache-dir", help="Cache folder for downloads (default: the Hugging Face cache).")
    parser.add_argument(
        "--base-url", help="With --official: raw-file root of the reference repository or a mirror (default: "
        "$COPS_OFFICIAL_BASE_URL, else https://raw.githubusercontent.com/cqylunlun/CoPS/main)."
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-sha1", help="With --official: the git blob SHA-1 the checkpoint must have (default: the "
        "published file's)."
    )  # fmt: skip
    parser.add_argument(
        "--no-round-deep-prompts",
        action="store_true",
        help="Keep the checkpoint's fp32 deep prompts (default: fp16-rounded, as the reference computes with them).",
    )


def _run_convert(args: argparse.Namespace) -> int:
    from .conversion import convert_original_checkpoint
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
        model.config = model.config.with_preset(args.test_preset, args.train_preset)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"Saved CoPS model and processor to {args.output}")
    return 0


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Model directory or Hub id.")
    parser.add_argument("images", nargs="+", help="Image files.")
    parser.add_argument("--output", required=True, help="Directory for overlays (PNG) and scores.csv.")
    parser.add_argument("--threshold", type=_threshold, help="Pixel threshold (default: the model's calibrated one).")
    parser.add_argument("--image-threshold", type=_threshold, help="Score threshold (default: the calibrated one).")
    parser.add_argument("--batch-size", type=_positive_int, default=1)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--skip-invalid", action="store_true", help="Report unreadable images instead of failing.")


def _run_predict(args: argparse.Namespace) -> int:
    from transformers import pipeline

    from .evaluation.plots import overlay
    from .processing_cops import load_image

    with friendly_hub_errors(args.model):
        detector = pipeline("anomaly-detection", model=args.model, device=args.device)
    results = detector(
        args.images,
        batch_size=args.batch_size,
        skip_invalid=args.skip_invalid,
        threshold=args.threshold,
        image_threshold=args.image_threshold,
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "score", "label", "overlay", "error"])
        for index, (image_path, result) in enumerate(zip(args.images, results, strict=True)):
            if "error" in result:
                writer.writerow([image_path, "", "", "", result["error"]])
                continue
            overlay_path = output / f"{index:04d}_{Path(image_path).stem}_overlay.png"
            overlay(load_image(image_path), result["anomaly_map"], value_range=(0.0, 1.0)).save(overlay_path)
            writer.writerow([image_path, f"{result['score']:.6f}", result.get("label", ""), overlay_path.name, ""])
            print(f"{image_path}\tscore={result['score']:.4f}\t{result.get('label', '')}")
    errors = [result["error"] for result in results if "error" in result]
    if len(errors) == len(results):
        raise ValueError(f"none of the {len(results)} images could be read (see {handle.name}); first: {errors[0]}")
    print(f"Wrote {output / 'scores.csv'} and overlays")
    return 0


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Model directory or Hub id.")
    parser.add_argument("--data", required=True, help="Dataset root holding meta.json.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--categories", nargs="+", help="Only these categories (default: all).")
    parser.add_argument(
        "--preset",
        help="Test-time preset of the reference (e.g. visa, mvtec); default: the dataset meta.json records "
        "(written by `cops-hf data prepare`), else the model's config as saved.",
    )
    parser.add_argument("--output", required=True, help="Directory for metrics.csv/json, plots and overlays.")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="Class-token noise seed (default 0).")
    parser.add_argument("--num-visualizations", type=_non_negative_int, default=8, help="Overlays per category.")
    parser.add_argument("--cpu", action="store_true", help="Run on CPU even when a GPU is available.")
    parser.add_argument("--skip-invalid", action="store_true", help="Drop invalid records instead of failing.")


def _run_evaluate(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from .data import meta_dataset_name
    from .evaluation.evaluator import evaluate_dataset
    from .modeling_cops import CoPSForAnomalyDetection

    accelerator = Accelerator(cpu=args.cpu)
    model = CoPSForAnomalyDetection.from_pretrained(args.model)
    processor = _load_processor(args.model, model.config.image_size)
    if args.preset:
        preset, source = args.preset, "--preset"
    elif model.config.test_preset:  # e.g. an official detector: the preset it is meant for
        preset, source = model.config.test_preset, "the preset the model's config records"
    else:
        preset, source = meta_dataset_name(args.data), f"the dataset {args.data}/meta.json records"
    print(f"Test preset: {preset} ({source})" if preset else "Test preset: none recorded, the model's config as is")
    result = evaluate_dataset(
        model, processor, args.data, split=args.split, categories=args.categories, test_preset=preset,
        batch_size=args.batch_size, seed=args.seed, output_dir=args.output,
        num_visualizations=args.num_visualizations, accelerator=accelerator, skip_invalid=args.skip_invalid,
    )  # fmt: skip
    if result is not None:
        print(result.report.format_table())
        print(f"Protocol: {result.protocol}")
        print(f"Wrote {len(result.files)} files to {args.output}")
    return 0


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Model directory or Hub id.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--normal", nargs="+", help="Normal images (files or folders): quantile thresholds.")
    source.add_argument("--data", help="Labelled dataset root (meta.json): F1-optimal thresholds.")
    parser.add_argument("--split", default="test", help="Split of --data to calibrate on.")
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--output", required=True, help="Directory to save the model (thresholds in its config).")


def _run_calibrate(args: argparse.Namespace) -> int:
    from .data import load_meta_dataset
    from .data.builders import list_image_files
    from .evaluation.calibration import calibrate_thresholds
    from .modeling_cops import CoPSForAnomalyDetection

    model = CoPSForAnomalyDetection.from_pretrained(args.model)
    processor = _load_processor(args.model, model.config.image_size)
    labels = masks = None
    if args.data:
        dataset = load_meta_dataset(args.data, split=args.split)
        images, labels = dataset["image_path"], dataset["gt_label"]
        masks = [path or None for path in dataset["mask_path"]]
    else:
        images = [str(f) for item in args.normal for f in (list_image_files(item) if Path(item).is_dir() else [item])]
    thresholds = calibrate_thresholds(
        model, processor, images, labels, masks, quantile=args.quantile, batch_size=args.batch_size
    )
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(
        f"image_threshold={thresholds.image_threshold:.6f} pixel_threshold={thresholds.pixel_threshold:.6f} "
        f"({thresholds.method}, {len(images)} images); saved to {args.output}"
    )
    return 0


# The registry names of cops_hf.data.BENCHMARKS (tests check they agree), here so that --help imports nothing.
_DATASET_NAMES = (
    "mvtec, visa, btad, mpdd, dtd_synthetic, headct, brainmri, br35h, isic, cvc_colondb, cvc_clinicdb, kvasir, endo"
)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=["prepare", "validate"], help="prepare: write meta.json; validate: check it."
    )
    parser.add_argument(
        "name_or_root",
        help=f"prepare: dataset name ({_DATASET_NAMES}) or 'folder' for your own images; validate: dataset root.",
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
    parser.add_argument("--suite", choices=["industrial", "medical", "all"], default="all")
    parser.add_argument(
        "--data-root", required=True, help="Folder with one sub-folder per dataset (mvtec/, visa/...)."
    )
    parser.add_argument("--output", required=True, help="Directory for benchmark.csv/.md/.json and per-dataset files.")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="Run on CPU even when a GPU is available.")


def _run_benchmark(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from .evaluation.benchmark import run_benchmark
    from .modeling_cops import CoPSForAnomalyDetection

    model = CoPSForAnomalyDetection.from_pretrained(args.model)
    processor = _load_processor(args.model, model.config.image_size)
    result = run_benchmark(
        model, processor, args.data_root, suite=args.suite, output_dir=args.output, batch_size=args.batch_size,
        seed=args.seed, accelerator=Accelerator(cpu=args.cpu),
    )  # fmt: skip
    if result is not None:
        print(result.format_table())
    return 0


def _load_processor(model_name: str, image_size: int):
    """The processor saved with the model, or the default one at the model's input size."""
    from .processing_cops import CoPSProcessor

    try:
        return CoPSProcessor.from_pretrained(model_name)
    except (OSError, ValueError):
        return CoPSProcessor.for_image_size(image_size)


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
    from .hub import evaluation_for_card, push_cops_to_hub

    evaluation = evaluation_for_card(json.loads(Path(args.eval_json).read_text())) if args.eval_json else None
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
    from .configuration_cops import TRAIN_DATASET_PRESETS
    from .training import MIXED_PRECISION_MODES, RANDOM_CLIP_CONFIGS

    clip = parser.add_mutually_exclusive_group(required=True)
    clip.add_argument(
        "--clip", help="CLIP: a Hub id (openai/clip-vit-large-patch14-336), a transformers folder or an OpenAI file"
    )
    clip.add_argument(
        "--random-clip",
        "--clip-config",
        metavar="CONFIG",
        help=f"offline random CLIP: a preset ({', '.join(RANDOM_CLIP_CONFIGS)}) or a CLIPConfig JSON file",
    )
    parser.add_argument("--data", required=True, help="dataset root holding meta.json")
    parser.add_argument(
        "--split", help="meta.json split to train on (default: the first with normal and anomalous images)"
    )
    parser.add_argument("--output", required=True, help="output folder (checkpoints, log, final model)")
    parser.add_argument("--preset", choices=sorted(TRAIN_DATASET_PRESETS), help="training dataset preset")
    parser.add_argument("--image-size", type=_positive_int, help="input size in pixels (default 518)")
    parser.add_argument("--epochs", type=_positive_int, default=10)
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="images per process and step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--grad-accum", type=_positive_int, default=1, help="batches per optimizer step")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION_MODES, default="no")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the frozen vision features every epoch")
    parser.add_argument("--cache-dir", help="keep the feature cache on disk here instead of in memory")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("--num-workers", type=_non_negative_int, default=0, help="image decoding worker processes")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")


def _run_train(args: argparse.Namespace) -> int:
    from .training import (
        TrainingConfig,
        cops_model_for_training,
        load_training_dataset,
        processor_for,
        random_clip_model,
        train_cops,
    )

    clip = random_clip_model(args.random_clip, seed=args.seed) if args.random_clip else args.clip
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
        dataloader_num_workers=args.num_workers,
        use_cpu=args.cpu,
    )
    dataset = load_training_dataset(args.data, split=args.split)
    num_anomalous = sum(dataset["gt_label"])
    print(
        f"Training on split '{dataset.split}' of {args.data}: {len(dataset) - num_anomalous} normal and "
        f"{num_anomalous} anomalous images"
    )
    result = train_cops(model, processor_for(model), dataset, config)
    if result.history:
        first, last = result.history[0], result.history[-1]
        print(f"loss {first['loss']:.4f} (epoch {first['epoch']}) -> {last['loss']:.4f} (epoch {last['epoch']})")
    print(f"Saved the trained model and processor to {result.output_dir}")
    return 0


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="cops-demo", help="folder for the data and the run")
    parser.add_argument("--epochs", type=_positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.output, num_epochs=args.epochs, seed=args.seed)
    print("epoch  loss      cls     seg     gather  scatter")
    for record in result.training.history:
        print(
            f"{record['epoch']:>5}  {record['loss']:<8.4f}  {record['cls']:.4f}  {record['seg']:.4f}  "
            f"{record['gather']:.4f}  {record['scatter']:.4f}"
        )
    print("\nScores of unseen test images (random CLIP: mechanics, not accuracy):")
    for row in result.test_scores:
        label = "anomalous" if row["gt_label"] else "normal"
        print(f"  {row['score']:.4f}  {label:<9}  {row['cls_name']:<8}  {row['image_path']}")
    print("\nZero-shot metrics on the unseen test categories (%):")
    print(result.evaluation.report.format_table())
    print(f"\nModel, processor and train_log.jsonl in {result.training.output_dir}")
    print(f"Tables, ROC/PR plots and heatmap overlays in {Path(result.training.output_dir) / 'evaluation'}")
    return 0


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    parser.add_argument("--model", required=True, help="directory (or hub id) of a saved CoPS model")
    parser.add_argument("--output", required=True, help="path of the .onnx file to write")
    parser.add_argument("--vae-samples", type=_positive_int, help="VAE samples in the graph (default: config)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed VAE noise (default: 0)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: 17)")
    parser.add_argument(
        "--int8", action="store_true", help="also write <output>.int8.onnx with int8 dynamically quantized weights"
    )


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_onnx, quantize_onnx_int8
    from .modeling_cops import CoPSForAnomalyDetection

    model = CoPSForAnomalyDetection.from_pretrained(args.model)
    path = export_onnx(model, args.output, vae_samples=args.vae_samples, seed=args.seed, opset=args.opset)
    print(f"Wrote {path}")
    if args.int8:
        print(f"Wrote {quantize_onnx_int8(path, path.with_suffix('.int8.onnx'))}")
    return 0


SUBCOMMANDS: list[Subcommand] = [
    (
        "demo",
        "Offline demo: synthetic data, random tiny CLIP, about a minute on a CPU.",
        _add_demo_arguments,
        _run_demo,
    ),
    ("train", "Train CoPS on the labelled images of an auxiliary dataset.", _add_train_arguments, _run_train),
    ("convert", "Convert the official CLIP + CoPS release files.", _add_convert_arguments, _run_convert),
    ("predict", "Score images; write heatmap overlays and a CSV.", _add_predict_arguments, _run_predict),
    ("evaluate", "Evaluate on a meta.json dataset: metrics, plots.", _add_evaluate_arguments, _run_evaluate),
    ("calibrate", "Calibrate and store decision thresholds.", _add_calibrate_arguments, _run_calibrate),
    ("data", "Prepare (meta.json) or validate a dataset.", _add_data_arguments, _run_data),
    ("benchmark", "Run the paper's protocol on prepared datasets.", _add_benchmark_arguments, _run_benchmark),
    ("push", "Upload a model, its processor, code and card to the Hub.", _add_push_arguments, _run_push),
    ("export", "Export the whole inference to one ONNX graph.", _add_export_arguments, _run_export),
]


def build_parser() -> argparse.ArgumentParser:
    """The `cops-hf` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="cops-hf", description="CoPS zero-shot anomaly detection.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in SUBCOMMANDS:
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cops-hf` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from .processing_cops import apply_pixel_limit_from_environment

        apply_pixel_limit_from_environment()
        return args.run(args)
    except (ValueError, OSError, CoPSHubError) as error:
        print(f"cops-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

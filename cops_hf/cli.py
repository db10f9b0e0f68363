"""The `cops-hf` command line.

Each subcommand is one `add_<name>_command(subcommands)` function that registers its parser and sets a handler;
`SUBCOMMANDS` lists them, so a new subcommand is one function appended there. Handlers only turn arguments into
calls of the package API and print the outcome.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .configuration_cops import TRAIN_DATASET_PRESETS
from .demo import run_demo
from .training import (
    MIXED_PRECISION_MODES,
    RANDOM_CLIP_CONFIGS,
    TrainingConfig,
    cops_model_for_training,
    load_training_dataset,
    processor_for,
    random_clip_model,
    train_cops,
)

Subcommands = argparse._SubParsersAction
SubcommandRegistrar = Callable[[Subcommands], None]
"""A function that adds one subcommand's parser (with a `handler` default) to the `cops-hf` subparsers."""


def _train(args: argparse.Namespace) -> int:
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
    result = train_cops(model, processor_for(model), load_training_dataset(args.data), config)
    if result.history:
        first, last = result.history[0], result.history[-1]
        print(f"loss {first['loss']:.4f} (epoch {first['epoch']}) -> {last['loss']:.4f} (epoch {last['epoch']})")
    print(f"Saved the trained model and processor to {result.output_dir}")
    return 0


def add_train_command(subcommands: Subcommands) -> None:
    """`cops-hf train`: train CoPS on the train split of a meta.json dataset."""
    parser = subcommands.add_parser(
        "train",
        help="train CoPS on an auxiliary dataset (meta.json train split)",
        description="Train the CoPS modules on a frozen CLIP. Runs as is under torchrun or accelerate launch.",
    )
    clip = parser.add_mutually_exclusive_group(required=True)
    clip.add_argument("--clip", help="CLIP name or path, e.g. openai/clip-vit-large-patch14-336")
    clip.add_argument(
        "--random-clip",
        "--clip-config",
        metavar="CONFIG",
        help=f"offline random CLIP: a preset ({', '.join(RANDOM_CLIP_CONFIGS)}) or a CLIPConfig JSON file",
    )
    parser.add_argument("--data", required=True, help="dataset root holding meta.json")
    parser.add_argument("--output", required=True, help="output folder (checkpoints, log, final model)")
    parser.add_argument("--preset", choices=sorted(TRAIN_DATASET_PRESETS), help="training dataset preset")
    parser.add_argument("--image-size", type=int, help="input size in pixels (default 518)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="images per process and step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION_MODES, default="no")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the frozen vision features every epoch")
    parser.add_argument("--cache-dir", help="keep the feature cache on disk here instead of in memory")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.set_defaults(handler=_train)


def _demo(args: argparse.Namespace) -> int:
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
    print(f"\nModel, processor and train_log.jsonl in {result.training.output_dir}")
    return 0


def add_demo_command(subcommands: Subcommands) -> None:
    """`cops-hf demo`: train a small CoPS offline on synthetic data and score unseen images."""
    parser = subcommands.add_parser(
        "demo",
        help="offline demo: synthetic data, random tiny CLIP, about a minute on a CPU",
        description="Generate a synthetic anomaly dataset, train CoPS on a random tiny CLIP, score test images.",
    )
    parser.add_argument("--output", default="cops-demo", help="folder for the data and the run")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_demo)


SUBCOMMANDS: list[SubcommandRegistrar] = [add_train_command, add_demo_command]


def build_parser() -> argparse.ArgumentParser:
    """The `cops-hf` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="cops-hf", description="CoPS zero-shot anomaly detection on CLIP.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cops-hf`; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

"""Seconds per training epoch with and without the vision feature cache, measured side by side in one run.

The frozen vision tower dominates a CoPS step (ViT-L/14 at 518 px); the default geometry here, the "small" random
CLIP (12 layers of width 384) at 224 px, has the same balance at a CPU-friendly size. Three runs train the same model
on the same synthetic data: in-memory cache, disk cache and no cache. The first epoch of a cached run computes and
stores the features, later epochs read them. Each figure is the best (fastest) of the run's later epochs, the
estimate least disturbed by other load on the machine; the mean is printed beside it.

    PYTHONPATH=. python benchmarks/training_cache.py [--epochs 4] [--images-per-category 16] [--image-size 224]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

from cops_hf.data import load_meta_dataset, make_synthetic_dataset
from cops_hf.testing_utils import RANDOM_CLIP_CONFIGS, random_clip_model
from cops_hf.training import TrainingConfig, cops_model_for_training, processor_for, train_cops


def timed_run(dataset: Any, args: argparse.Namespace, output_dir: Path, **settings: Any) -> list[dict[str, Any]]:
    """Train a fresh model for `args.epochs` epochs; return the per-epoch log records."""
    model = cops_model_for_training(random_clip_model(args.clip, seed=0), image_size=args.image_size)
    config = TrainingConfig(
        output_dir=output_dir, num_epochs=args.epochs, batch_size=args.batch_size, progress_bar=False, **settings
    )
    return train_cops(model, processor_for(model), dataset, config).history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="small", choices=sorted(RANDOM_CLIP_CONFIGS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images-per-category", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4, help="per run; cached runs reuse features from epoch 2")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch fills the cache)")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as workspace:
        root = make_synthetic_dataset(Path(workspace) / "data", images_per_category=args.images_per_category)
        dataset = load_meta_dataset(root, split="train")
        runs = {
            "no cache": timed_run(dataset, args, Path(workspace) / "none", cache_vision_features=False),
            "memory cache": timed_run(dataset, args, Path(workspace) / "memory"),
            "disk cache": timed_run(dataset, args, Path(workspace) / "disk", cache_dir=Path(workspace) / "cache"),
        }

    uncached_seconds = min(record["seconds"] for record in runs["no cache"][1:])
    print(
        f"{len(dataset)} images, batch {args.batch_size}, {args.clip} random CLIP at {args.image_size} px, "
        f"{args.epochs} epochs per run"
    )
    print(f"{'run':<14}{'epoch 1 s':>11}{'later epochs s (mean)':>23}{'images/s':>10}{'speed-up':>10}")
    for name, history in runs.items():
        later = [record["seconds"] for record in history[1:]]
        images_per_second = len(dataset) / min(later)
        print(
            f"{name:<14}{history[0]['seconds']:>11.2f}{min(later):>15.2f} ({statistics.mean(later):5.2f})"
            f"{images_per_second:>10.1f}{uncached_seconds / min(later):>9.1f}x"
        )
    print("speed-up: best uncached epoch time / best later epoch time of the run")


if __name__ == "__main__":
    main()

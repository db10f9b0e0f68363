"""A self-contained demonstration: train a small CoPS offline and score unseen categories.

Everything is generated locally: a synthetic anomaly dataset (`cops_hf.data.make_synthetic_dataset`) and a random
tiny CLIP, so the demo needs no download and runs in about a minute on a laptop CPU. A random CLIP carries no
visual knowledge, so the scores on the unseen test categories show the mechanics, not CoPS's accuracy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import load_meta_dataset, make_synthetic_dataset
from .training import (
    TrainingConfig,
    TrainingResult,
    cops_model_for_training,
    processor_for,
    random_clip_model,
    train_cops,
)


@dataclass
class DemoResult:
    """Outcome of `run_demo`.

    Args:
        training: the training run (its `history` holds the per-epoch loss terms).
        data_dir: the generated synthetic dataset.
        test_scores: per scored test image: `image_path`, `cls_name`, `gt_label` and `score`.
    """

    training: TrainingResult
    data_dir: Path
    test_scores: list[dict[str, Any]]


def run_demo(
    output_dir: str | os.PathLike[str],
    num_epochs: int = 8,
    images_per_category: int = 16,
    image_size: int = 112,
    num_test_images: int = 6,
    seed: int = 0,
    progress_bar: bool = True,
) -> DemoResult:
    """Generate synthetic data, train a CoPS on a random tiny CLIP, and score a few unseen test images.

    Args:
        output_dir: receives `data/` (the synthetic dataset) and the run (checkpoints, log, final model).
        num_epochs: training epochs (the first computes the vision features, later ones reuse them).
        images_per_category: synthetic images per category (half of them anomalous).
        image_size: model input size in pixels (a multiple of 14).
        num_test_images: test images scored, alternating normal and anomalous ones.
        seed: seed of the data, the CLIP initialization, the training run and the scoring noise.
        progress_bar: show the training progress bar.
    """
    output_dir = Path(output_dir)
    data_dir = make_synthetic_dataset(output_dir / "data", images_per_category=images_per_category, seed=seed)
    model = cops_model_for_training(random_clip_model("tiny", seed=seed), image_size=image_size)
    processor = processor_for(model)
    config = TrainingConfig(output_dir=output_dir, num_epochs=num_epochs, seed=seed, progress_bar=progress_bar)
    training = train_cops(model, processor, load_meta_dataset(data_dir, split="train"), config)

    test_set = load_meta_dataset(data_dir, split="test")
    normal = [index for index, label in enumerate(test_set["gt_label"]) if label == 0]
    anomalous = [index for index, label in enumerate(test_set["gt_label"]) if label == 1]
    chosen = [index for pair in zip(normal, anomalous, strict=False) for index in pair][:num_test_images]
    rows = test_set.select(chosen)
    inputs = processor(images=list(rows["image"]))
    noise_shape = (len(chosen), model.config.vae_samples, model.config.projection_dim)
    noise = torch.randn(noise_shape, generator=torch.Generator().manual_seed(seed))
    device = model.device
    with torch.no_grad():
        scores = model(pixel_values=inputs["pixel_values"].to(device), vae_noise=noise.to(device)).image_scores
    test_scores = [
        {"image_path": path, "cls_name": name, "gt_label": int(label), "score": float(score)}
        for path, name, label, score in zip(
            rows["image_path"], rows["cls_name"], rows["gt_label"], scores, strict=True
        )
    ]
    return DemoResult(training=training, data_dir=data_dir, test_scores=test_scores)


__all__ = ["DemoResult", "run_demo"]

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

from .data import load_meta_dataset, make_synthetic_dataset, render_synthetic_sample
from .evaluation.evaluator import EvaluationResult, evaluate_dataset
from .evaluation.report import METRIC_DISPLAY_NAMES, ZSADReport, format_percent, render_table
from .random_towers import random_clip_model
from .schema import GT_LABEL, IMAGE_PATH, LABEL_NAMES, PRED_SCORE, Prediction
from .training import TrainingConfig, TrainingResult, cops_model_for_training, processor_for, train_cops

DATA_IMAGE_SIZE = 64
"""Side of the demo's synthetic images in pixels (`make_synthetic_dataset`'s default)."""


@dataclass
class DemoResult:
    """Outcome of `run_demo`.

    Args:
        training: the training run (its `history` holds the per-epoch loss terms).
        data_dir: the generated synthetic dataset.
        test_scores: per scored test image: `image_path`, `cls_name`, `gt_label` and `score`.
        evaluation: zero-shot metrics on the unseen test categories; its files (table, plots, overlays) are in
            `output_dir/evaluation`.
        few_shot: the same metrics with `shots` normal references of each test category in the model's memory
            (rendered apart from the test images, as a category's `train/good` would be); `None` with `shots=0`.
        shots: references per category of `few_shot`.
    """

    training: TrainingResult
    data_dir: Path
    test_scores: list[dict[str, Any]]
    evaluation: EvaluationResult
    few_shot: ZSADReport | None = None
    shots: int = 0

    def comparison_table(self) -> str:
        """Zero-shot next to k-shot, per test category and mean: "zero-shot / k-shot" percentages per metric."""
        zero_shot = self.evaluation.report
        metrics = zero_shot.available_metrics
        header = ["category", *(METRIC_DISPLAY_NAMES[name] for name in metrics)]
        rows = [
            [
                str(zero_row["category"]),
                *(f"{format_percent(zero_row[name])} / {format_percent(few_row[name])}" for name in metrics),
            ]
            for zero_row, few_row in zip(zero_shot.to_rows(), self.few_shot.to_rows(), strict=True)
        ]
        return render_table(header, rows)


def run_demo(
    output_dir: str | os.PathLike[str],
    num_epochs: int = 8,
    images_per_category: int = 16,
    image_size: int = 112,
    num_test_images: int = 6,
    seed: int = 0,
    progress_bar: bool = True,
    shots: int = 2,
) -> DemoResult:
    """Generate synthetic data, train a CoPS on a random tiny CLIP, and evaluate it on the unseen categories.

    Args:
        output_dir: receives `data/` (the synthetic dataset) and the run (checkpoints, log, final model).
        num_epochs: training epochs (the first computes the vision features, later ones reuse them).
        images_per_category: synthetic images per category (half of them anomalous).
        image_size: model input size in pixels (a multiple of 14).
        num_test_images: test images listed in `test_scores`, alternating normal and anomalous ones.
        seed: seed of the data, the CLIP initialization, the training run and the class-token noise.
        progress_bar: show the training progress bar.
        shots: normal references per test category for the few-shot evaluation (0: zero-shot only).
    """
    output_dir = Path(output_dir)
    config = TrainingConfig(output_dir=output_dir, num_epochs=num_epochs, seed=seed, progress_bar=progress_bar)
    data_dir = make_synthetic_dataset(
        output_dir / "data", images_per_category=images_per_category, image_size=DATA_IMAGE_SIZE, seed=seed
    )
    model = cops_model_for_training(random_clip_model("tiny", seed=seed), image_size=image_size)
    processor = processor_for(model)
    training = train_cops(model, processor, load_meta_dataset(data_dir, split="train"), config)

    evaluation = evaluate_dataset(
        training.model, processor, data_dir, seed=seed, output_dir=output_dir / "evaluation", num_visualizations=4
    )
    labels = evaluation.image_labels.tolist()
    normal = [index for index, label in enumerate(labels) if label == 0]
    anomalous = [index for index, label in enumerate(labels) if label == 1]
    chosen = [index for pair in zip(normal, anomalous, strict=False) for index in pair][:num_test_images]
    test_scores = [
        Prediction({
            IMAGE_PATH: evaluation.image_paths[index],
            "cls_name": evaluation.categories[index],
            GT_LABEL: labels[index],
            PRED_SCORE: float(evaluation.image_scores[index]),
        })
        for index in chosen
    ]
    few_shot = None
    if shots:
        per_category = {}
        for category in dict.fromkeys(evaluation.categories):
            references = [
                render_synthetic_sample(
                    category, images_per_category + index, image_size=DATA_IMAGE_SIZE, seed=seed
                ).image
                for index in range(shots)
            ]
            training.model.set_references(processor(images=references)["pixel_values"])
            referenced = evaluate_dataset(
                training.model, processor, data_dir, categories=[category], seed=seed, num_visualizations=0
            )
            per_category[category] = referenced.report.per_category[category]
        training.model.clear_references()
        few_shot = ZSADReport(per_category)
    return DemoResult(
        training=training,
        data_dir=data_dir,
        test_scores=test_scores,
        evaluation=evaluation,
        few_shot=few_shot,
        shots=shots,
    )


def format_test_scores(test_scores: list[dict[str, Any]]) -> str:
    """The demo's table of test scores under a heading row.

    The "truth" column is the image's ground truth (the demo's random model is not calibrated, so it makes no
    decision).

    Args:
        test_scores: rows of `DemoResult.test_scores`.

    Returns:
        The table, one line per row after the heading.
    """
    lines = [f"  {'score':<6}  {'truth':<9}  {'category':<8}  image"]
    for row in test_scores:
        truth = LABEL_NAMES[int(row[GT_LABEL])]
        lines.append(f"  {row[PRED_SCORE]:.4f}  {truth:<9}  {row['cls_name']:<8}  {row[IMAGE_PATH]}")
    return "\n".join(lines)


__all__ = ["DemoResult", "format_test_scores", "run_demo"]

"""Ablation of `config.reference_weight`, the fusion weight of the few-shot reference map, on synthetic data.

Run from the repository root::

    python -m benchmarks.reference_weight            # ~3 min on 2 cores

Two models, both offline: the demo's (a tiny random CLIP whose CoPS modules are trained for 8 epochs on the demo's
training categories, as `cops-hf demo` does) and the "small" random tower untrained. They are scored on synthetic
categories that neither the demo nor the tests use (`ABLATION_CATEGORIES`), with k normal references drawn at random
from other indices of the same category, for several k and draws. For each weight w the fused map and score are
`(1 - w) * zero-shot + w * reference` (w = 0 is zero-shot); the table prints pixel and image AUROC averaged over
categories, k and draws. The default weight in `CoPSConfig` is the one with the best mean of the two.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from cops_hf import CoPSForAnomalyDetection, CoPSProcessor
from cops_hf.data import DEFECT_TYPES, load_meta_dataset, make_synthetic_dataset, render_synthetic_sample
from cops_hf.evaluation.metrics import image_auroc, pixel_auroc
from cops_hf.testing_utils import random_clip_model, random_cops_config, random_cops_model
from cops_hf.training import TrainingConfig, cops_model_for_training, processor_for, train_cops

ABLATION_CATEGORIES = ("wood", "noise_texture", "bolt")
"""Held-out categories of the ablation: not the demo's test categories (checker, ring) the tests assert on."""

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)


def demo_model(seed: int = 0, image_size: int = 112, num_epochs: int = 8) -> CoPSForAnomalyDetection:
    """The demo's model: a tiny random CLIP with CoPS trained on the demo's synthetic training categories."""
    with tempfile.TemporaryDirectory() as folder:
        data_dir = make_synthetic_dataset(Path(folder) / "data", images_per_category=16, seed=seed)
        model = cops_model_for_training(random_clip_model("tiny", seed=seed), image_size=image_size)
        config = TrainingConfig(output_dir=Path(folder) / "run", num_epochs=num_epochs, seed=seed, progress_bar=False)
        return train_cops(model, processor_for(model), load_meta_dataset(data_dir, split="train"), config).model


def category_images(
    category: str, count: int, size: int, seed: int
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """`count` test images of `category` (half with a defect), their `[count, size, size]` masks and labels."""
    samples = [
        render_synthetic_sample(
            category, index, image_size=size, seed=seed, defect_type=DEFECT_TYPES[index % 4] if index % 2 else None
        )
        for index in range(count)
    ]
    labels = np.array([index % 2 for index in range(count)])
    return [sample.image for sample in samples], np.stack([sample.mask for sample in samples]), labels


def ablate(model: CoPSForAnomalyDetection, shots: tuple[int, ...], draws: int, num_images: int) -> dict:
    """Pixel and image AUROC per weight, each a list over (category, k, draw)."""
    size = model.config.image_size
    processor = CoPSProcessor.for_image_size(size)
    results = {weight: {"pixel": [], "image": []} for weight in WEIGHTS}
    for category in ABLATION_CATEGORIES:
        images, masks, labels = category_images(category, num_images, size, seed=0)
        pixel_values = processor(images=images)["pixel_values"]
        noise = model.seeded_prior_noise(len(images), 0)
        for k in shots:
            for draw in range(draws):
                indices = np.random.default_rng([draw, k]).choice(np.arange(1000, 1100), size=k, replace=False)
                references = [render_synthetic_sample(category, int(i), image_size=size).image for i in indices]
                model.set_references(processor(images=references)["pixel_values"])
                for weight in WEIGHTS:
                    model.config.reference_weight = weight
                    with torch.no_grad():
                        outputs = model(pixel_values, vae_noise=noise)
                    results[weight]["pixel"].append(pixel_auroc(outputs.anomaly_maps.numpy(), masks))
                    results[weight]["image"].append(image_auroc(outputs.image_scores.numpy(), labels))
    model.clear_references()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--draws", type=int, default=3, help="reference draws per k")
    parser.add_argument("--num-images", type=int, default=12, help="test images per category")
    parser.add_argument("--demo-only", action="store_true", help="skip the small tower (about 4x faster)")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"demo (tiny, trained 8 epochs, 112 px)": demo_model()}
    if not args.demo_only:
        models["small random tower (untrained, 224 px)"] = random_cops_model(
            random_cops_config("small", image_size=224)
        )
    print(f"categories {', '.join(ABLATION_CATEGORIES)}; k in {args.shots}; {args.draws} draws each")
    means = {weight: [] for weight in WEIGHTS}
    for name, model in models.items():
        results = ablate(model.eval(), tuple(args.shots), args.draws, args.num_images)
        print(f"\n{name}\n  weight  pixel AUROC  image AUROC")
        for weight, values in results.items():
            pixel, image = statistics.mean(values["pixel"]), statistics.mean(values["image"])
            means[weight] += [pixel, image]
            print(f"  {weight:6.2f}  {pixel:11.3f}  {image:11.3f}")
    best = max(WEIGHTS, key=lambda weight: statistics.mean(means[weight]))
    print(f"\nbest mean of pixel and image AUROC over the models: weight {best}")


if __name__ == "__main__":
    main()

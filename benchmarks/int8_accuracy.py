"""Accuracy cost of the int8 CPU paths against float32, on a synthetic set of textures with pasted defects.

Run from the repository root, e.g.::

    python -m benchmarks.int8_accuracy                 # official geometry, 32 images, torch int8
    python -m benchmarks.int8_accuracy --small --onnx  # small geometry; also onnxruntime int8

Reports, for each int8 path against the float32 model with the same fixed VAE noise: max and mean absolute
anomaly-map difference, max image-score difference, Spearman correlation of the image scores, and the change of
I-AUROC and P-AUROC. With random CLIP weights the detector is near chance, so the AUROCs say little about the
method; the differences and the Spearman correlation are what measure the quantization.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from cops_hf import CoPSImageProcessor
from cops_hf.export import CoPSOnnxDetector, export_onnx, fixed_vae_noise, quantize_onnx_int8
from cops_hf.quantization import quantize_int8

from .common import make_synthetic_images, random_model

ScoreFunction = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def score_dataset(score_batch: ScoreFunction, pixel_values: torch.Tensor, batch_size: int) -> tuple[np.ndarray, ...]:
    """Image scores `[B]` and anomaly maps `[B, H, W]` of a whole set, batch by batch."""
    scores, maps = [], []
    for start in range(0, len(pixel_values), batch_size):
        batch_scores, batch_maps = score_batch(pixel_values[start : start + batch_size])
        scores.append(batch_scores.float().cpu().numpy())
        maps.append(batch_maps.float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(maps)


def accuracy_cost(
    reference: tuple[np.ndarray, ...], candidate: tuple[np.ndarray, ...], labels: np.ndarray, masks: np.ndarray
) -> dict[str, float]:
    """How far `candidate` (scores, maps) lies from `reference`: map and score differences, the Spearman
    correlation of the image scores, and the I-AUROC / P-AUROC of each."""
    map_difference = np.abs(candidate[1] - reference[1])
    image_aurocs = [roc_auc_score(labels, outputs[0]) for outputs in (reference, candidate)]
    pixel_aurocs = [roc_auc_score(masks.ravel(), outputs[1].ravel()) for outputs in (reference, candidate)]
    return {
        "max_map_difference": float(map_difference.max()),
        "mean_map_difference": float(map_difference.mean()),
        "max_score_difference": float(np.abs(candidate[0] - reference[0]).max()),
        "spearman_scores": float(spearmanr(reference[0], candidate[0]).statistic),
        "image_auroc_reference": float(image_aurocs[0]),
        "image_auroc": float(image_aurocs[1]),
        "pixel_auroc_reference": float(pixel_aurocs[0]),
        "pixel_auroc": float(pixel_aurocs[1]),
    }


def report(name: str, reference: tuple[np.ndarray, ...], candidate: tuple[np.ndarray, ...], labels, masks) -> None:
    """Print the accuracy cost of `candidate` (scores, maps) against `reference`."""
    cost = accuracy_cost(reference, candidate, labels, masks)
    image_change = cost["image_auroc"] - cost["image_auroc_reference"]
    pixel_change = cost["pixel_auroc"] - cost["pixel_auroc_reference"]
    print(
        f"{name}: max |map diff| {cost['max_map_difference']:.3e}, mean |map diff| {cost['mean_map_difference']:.3e}, "
        f"max |score diff| {cost['max_score_difference']:.3e}, Spearman(scores) {cost['spearman_scores']:.4f}, "
        f"I-AUROC {cost['image_auroc_reference']:.4f} -> {cost['image_auroc']:.4f} ({image_change:+.4f}), "
        f"P-AUROC {cost['pixel_auroc_reference']:.4f} -> {cost['pixel_auroc']:.4f} ({pixel_change:+.4f})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small geometry for quick checks (default: official)")
    parser.add_argument("--num-images", type=int, default=32, help="synthetic images (half with defects)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the images (the weights use seed 0)")
    parser.add_argument("--onnx", action="store_true", help="also measure onnxruntime int8 (against torch fp32)")
    args = parser.parse_args(argv)

    model = random_model("small" if args.small else "official")
    size = model.config.image_size
    images, masks, labels = make_synthetic_images(args.num_images, size, seed=args.seed)
    pixel_values = CoPSImageProcessor(size=size)(list(images))["pixel_values"]
    noise = fixed_vae_noise(model)
    print(f"{args.num_images} synthetic {size} px images ({labels.sum()} with defects), "
          f"{noise.shape[0]} fixed VAE samples, {torch.get_num_threads()} threads")  # fmt: skip

    def torch_scorer(scorer: torch.nn.Module) -> ScoreFunction:
        def score_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.inference_mode():
                outputs = scorer(batch, vae_noise=noise.expand(len(batch), -1, -1))
            return outputs.image_scores, outputs.anomaly_maps

        return score_batch

    start = time.perf_counter()
    reference = score_dataset(torch_scorer(model), pixel_values, args.batch_size)
    print(f"float32: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    quantized = score_dataset(torch_scorer(quantize_int8(model)), pixel_values, args.batch_size)
    print(f"torch int8 (quantization included): {time.perf_counter() - start:.1f} s")
    report("torch int8 vs float32", reference, quantized, labels, masks)
    if args.onnx:
        with tempfile.TemporaryDirectory() as directory:
            path = quantize_onnx_int8(export_onnx(model, Path(directory) / "cops.onnx"), Path(directory) / "q.onnx")
            detector = CoPSOnnxDetector(path)
            start = time.perf_counter()
            onnx_outputs = score_dataset(
                lambda batch: tuple(detector(pixel_values=batch).to_tuple()), pixel_values, args.batch_size
            )
            print(f"onnxruntime int8: {time.perf_counter() - start:.1f} s")
        report("onnxruntime int8 vs float32", reference, onnx_outputs, labels, masks)


if __name__ == "__main__":
    main()

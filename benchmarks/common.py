"""What the benchmark scripts share: model geometries with random weights, memory readings, a synthetic set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cops_hf import CoPSConfig, CoPSForAnomalyDetection
from cops_hf.data import DEFAULT_TEST_CATEGORIES, DEFECT_TYPES, render_synthetic_sample
from cops_hf.testing_utils import random_cops_config, random_cops_model

GEOMETRIES = ("official", "small")


def benchmark_config(geometry: str) -> CoPSConfig:
    """`official`: CoPSConfig() defaults (ViT-L/14@336 towers, 518 px input, 37x37 patches, dual path in all 24
    layers). `small`: the "small" random CLIP of `cops_hf.testing_utils` (12-layer, 384-wide ViT) at 224 px."""
    if geometry == "official":
        return CoPSConfig()
    if geometry == "small":
        return random_cops_config("small", image_size=224)
    raise ValueError(f"Unknown geometry {geometry!r}; choose one of {GEOMETRIES}.")


def random_model(geometry: str, seed: int = 0, device: str | torch.device = "cpu") -> CoPSForAnomalyDetection:
    """A model with random weights at a geometry, float32, eval mode (`cops_hf.testing_utils.random_cops_model`),
    created and initialized on `device` (a GPU initializes ViT-L in a fraction of a second)."""
    with torch.device(device):
        return random_cops_model(benchmark_config(geometry), seed=seed)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; peak RSS needs Linux.")


def current_rss_mib() -> float:
    """Resident set size of this process now, MiB (Linux /proc)."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """Peak resident set size of this process since start or the last `reset_peak_rss`, MiB."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark to the current RSS (writes 5 to /proc/self/clear_refs)."""
    with open(f"/proc/{os.getpid()}/clear_refs", "w") as handle:
        handle.write("5")


def make_synthetic_images(
    num_images: int, size: int, seed: int = 0, anomalous_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images of the package's synthetic anomaly source (test categories), a share of them with defects.

    Returns:
        `(images, masks, labels)`: uint8 `[B, size, size, 3]`, bool `[B, size, size]`, int `[B]`.
    """
    rng = np.random.default_rng(seed)
    labels = (np.arange(num_images) < round(num_images * anomalous_fraction)).astype(int)
    rng.shuffle(labels)
    samples = [
        render_synthetic_sample(
            DEFAULT_TEST_CATEGORIES[index % len(DEFAULT_TEST_CATEGORIES)],
            index,
            image_size=size,
            seed=seed,
            defect_type=DEFECT_TYPES[index % len(DEFECT_TYPES)] if label else None,
        )
        for index, label in enumerate(labels)
    ]
    images = np.stack([sample.image for sample in samples])
    masks = np.stack([sample.mask for sample in samples])
    return images, masks, labels

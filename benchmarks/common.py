"""What the benchmark scripts share: model geometries with random weights, memory readings, a synthetic set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cops_hf import CoPSConfig, CoPSForAnomalyDetection

GEOMETRIES = ("official", "small")


def benchmark_config(geometry: str) -> CoPSConfig:
    """`official`: CoPSConfig() defaults (ViT-L/14@336 towers, 518 px input, 37x37 patches, dual path in all 24
    layers). `small`: a 6-layer, 384-wide ViT and text tower at 224 px for quick checks."""
    if geometry == "official":
        return CoPSConfig()
    if geometry == "small":
        width = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6}
        return CoPSConfig(
            text_config={**width, "projection_dim": 384},
            vision_config={**width, "image_size": 224, "patch_size": 14, "projection_dim": 384},
            projection_dim=384,
            dpam_layers=6,
            feature_layers=[6],
            image_size=224,
            deep_prompt_depth=4,
        )
    raise ValueError(f"Unknown geometry {geometry!r}; choose one of {GEOMETRIES}.")


def random_model(geometry: str, seed: int = 0) -> CoPSForAnomalyDetection:
    """A model with random (transformers-initialized) weights at a geometry, float32, eval mode.

    The CoPS modules' weights are scaled up (x10, as the test models are) so that prototypes, class tokens and
    deep prompts move the outputs as trained weights would, instead of vanishing at the 0.02 init scale.
    """
    torch.manual_seed(seed)
    model = CoPSForAnomalyDetection(benchmark_config(geometry))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("clip.") and parameter.ndim >= 2:
                parameter.mul_(10.0)
    return model.eval()


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
    """Smooth random textures; a share of them get pasted defects (bright/dark elliptic blobs).

    Returns:
        `(images, masks, labels)`: uint8 `[B, size, size, 3]`, bool `[B, size, size]`, int `[B]`.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / size
    images = np.empty((num_images, size, size, 3), dtype=np.uint8)
    masks = np.zeros((num_images, size, size), dtype=bool)
    labels = (np.arange(num_images) < round(num_images * anomalous_fraction)).astype(int)
    rng.shuffle(labels)
    for index in range(num_images):
        frequency = rng.uniform(2, 8, size=2)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        base = 0.5 + 0.2 * np.sin(2 * np.pi * (frequency[0] * rows + frequency[1] * cols)[..., None] + phase)
        texture = base + rng.normal(0, 0.03, size=(size, size, 3))
        if labels[index]:
            for _ in range(rng.integers(1, 4)):
                center = rng.uniform(0.15, 0.85, size=2)
                radii = rng.uniform(0.04, 0.12, size=2)
                blob = ((rows - center[0]) / radii[0]) ** 2 + ((cols - center[1]) / radii[1]) ** 2 <= 1.0
                texture[blob] = rng.uniform(0, 1, size=3)
                masks[index] |= blob
        images[index] = np.clip(texture * 255, 0, 255).astype(np.uint8)
    return images, masks, labels

"""What the benchmark scripts share: model geometries with random weights, memory readings, a synthetic set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cops_hf import CoPSConfig, CoPSForAnomalyDetection
from cops_hf.data import DEFAULT_TEST_CATEGORIES, DEFECT_TYPES, render_synthetic_sample

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


def random_model(geometry: str, seed: int = 0, device: str | torch.device = "cpu") -> CoPSForAnomalyDetection:
    """A model with random (transformers-initialized) weights at a geometry, float32, eval mode.

    The CoPS modules' weights are scaled up (x10, as the test models are) so that prototypes, class tokens and
    deep prompts move the outputs as trained weights would, instead of vanishing at the 0.02 init scale.
    `device`: where the weights are created and initialized (a GPU initializes ViT-L in a fraction of a second).
    """
    torch.manual_seed(seed)
    with torch.device(device):
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

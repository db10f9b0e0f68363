"""Tiny random CoPS configurations shared by the tests (seconds on 2 CPU cores)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from cops_hf import CoPSConfig, CoPSForAnomalyDetection
from cops_hf.training import RANDOM_CLIP_CONFIGS

TEXT_WIDTH = RANDOM_CLIP_CONFIGS["tiny"]["projection_dim"]


def tiny_config(**fields: Any) -> CoPSConfig:
    """The packaged "tiny" random CLIP (3-layer ViT, patch 14, 4x4 positional grid; 4-layer text tower) with a
    98 px input (7x7 patches) and all vision layers dual-path."""
    defaults: dict[str, Any] = {
        **copy.deepcopy(RANDOM_CLIP_CONFIGS["tiny"]),
        "dpam_layers": 3,
        "feature_layers": [3],
        "image_size": 98,
        "deep_prompt_depth": 3,
    }
    defaults.update(fields)
    return CoPSConfig(**defaults)


def tiny_model(seed: int = 0, **fields: Any) -> CoPSForAnomalyDetection:
    """A tiny CoPS with random weights, in eval mode; the CoPS parameters are scaled up so each term matters."""
    torch.manual_seed(seed)
    model = CoPSForAnomalyDetection(tiny_config(**fields))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("clip.") and parameter.ndim >= 2:
                parameter.mul_(10.0)
    return model.eval()

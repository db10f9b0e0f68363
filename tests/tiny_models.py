"""Tiny random CoPS configurations shared by the tests (seconds on 2 CPU cores)."""

from __future__ import annotations

from typing import Any

import torch

from cops_hf import CoPSConfig, CoPSForAnomalyDetection

TEXT_WIDTH = 48


def tiny_config(**fields: Any) -> CoPSConfig:
    """A 3-layer ViT (patch 14, 4x4 positional grid) and a 4-layer text tower; 98 px input (7x7 patches)."""
    defaults: dict[str, Any] = {
        "text_config": {
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "projection_dim": TEXT_WIDTH,
        },
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "projection_dim": TEXT_WIDTH,
        },
        "projection_dim": TEXT_WIDTH,
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

"""Tiny random CoPS configurations shared by the tests (seconds on 2 CPU cores)."""

from __future__ import annotations

from typing import Any

from cops_hf import CoPSConfig, CoPSForAnomalyDetection
from cops_hf.testing_utils import RANDOM_CLIP_CONFIGS, random_cops_config, random_cops_model

TEXT_WIDTH = RANDOM_CLIP_CONFIGS["tiny"]["projection_dim"]


def tiny_config(**fields: Any) -> CoPSConfig:
    """The packaged "tiny" random CLIP (3-layer ViT, patch 14, 4x4 positional grid; 4-layer text tower) with a
    98 px input (7x7 patches) and the depth-derived defaults: all vision layers dual-path, deep prompts in 3 text
    layers."""
    return random_cops_config("tiny", **{"image_size": 98, **fields})


def tiny_model(seed: int = 0, **fields: Any) -> CoPSForAnomalyDetection:
    """A tiny CoPS with random weights, in eval mode; the CoPS parameters are scaled up so each term matters."""
    return random_cops_model(tiny_config(**fields), seed=seed)

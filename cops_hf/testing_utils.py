"""Random CoPS models for tests and benchmarks (no download); the CLIP towers come from `cops_hf.random_towers`."""

from __future__ import annotations

import os
from typing import Any

import torch

from .configuration_cops import CoPSConfig
from .modeling_cops import CoPSForAnomalyDetection
from .random_towers import RANDOM_CLIP_CONFIGS, random_clip_config, random_clip_model


def random_cops_config(spec: str | os.PathLike[str] | dict[str, Any], **fields: Any) -> CoPSConfig:
    """`CoPSConfig.from_clip_config` around a random tower (`spec` as in `random_clip_config`)."""
    return CoPSConfig.from_clip_config(random_clip_config(spec), **fields)


def random_cops_model(config: CoPSConfig, seed: int = 0) -> CoPSForAnomalyDetection:
    """A CoPS model with random weights, float32, in eval mode.

    The CoPS modules' weights (matrices) are scaled up x10 so that prototypes, class tokens and deep prompts move
    the outputs as trained weights would, instead of vanishing at the 0.02 initialization scale.
    """
    torch.manual_seed(seed)
    model = CoPSForAnomalyDetection(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("clip.") and parameter.ndim >= 2:
                parameter.mul_(10.0)
    return model.eval()


__all__ = [
    "RANDOM_CLIP_CONFIGS",
    "random_clip_config",
    "random_clip_model",
    "random_cops_config",
    "random_cops_model",
]

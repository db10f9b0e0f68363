"""Random CLIP towers for offline runs: the demo, training from scratch, benchmarks and tests (no download).

Two geometries, both with the same small text tower (4 layers of width 48):

* ``"tiny"``: a 3-layer ViT of width 64 (patch 14, 56 px, a 4x4 positional grid); a training step takes
  milliseconds, which is what the tests need.
* ``"small"``: a 12-layer ViT of width 384 at 224 px. As with ViT-L/14 at 518 px, the vision tower dominates the
  cost of a step; used by the benchmarks' quick checks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import CLIPConfig, CLIPModel

from .file_utils import read_json_file

_TEXT_TOWER = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "projection_dim": 48,
}
# CLIPConfig keyword arguments of the random towers.
RANDOM_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "text_config": _TEXT_TOWER,
        "vision_config": {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
            "image_size": 56, "patch_size": 14, "projection_dim": 48,
        },
        "projection_dim": 48,
    },
    "small": {
        "text_config": _TEXT_TOWER,
        "vision_config": {
            "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
            "image_size": 224, "patch_size": 14, "projection_dim": 48,
        },
        "projection_dim": 48,
    },
}  # fmt: skip


def random_clip_config(spec: str | os.PathLike[str] | dict[str, Any]) -> CLIPConfig:
    """The `CLIPConfig` of a random tower.

    Args:
        spec: a name from `RANDOM_CLIP_CONFIGS` ("tiny", "small"), a JSON file or a dict of `CLIPConfig` keyword
            arguments (`text_config`, `vision_config`, `projection_dim`; a CLIP `config.json` works too).
    """
    if isinstance(spec, dict):
        fields = spec
    elif str(spec) in RANDOM_CLIP_CONFIGS:
        fields = RANDOM_CLIP_CONFIGS[str(spec)]
    elif Path(spec).is_file():
        fields = read_json_file(spec, "Random CLIP config")
    else:
        raise ValueError(
            f"Random CLIP {str(spec)!r} is neither a preset ({sorted(RANDOM_CLIP_CONFIGS)}) nor a JSON file."
        )
    if not isinstance(fields, dict):
        raise ValueError(f"Random CLIP config {str(spec)!r} must be a JSON object of CLIPConfig fields.")
    try:
        return CLIPConfig(**fields)
    except (TypeError, ValueError, StrictDataclassError) as error:
        reason = str(error.__cause__ or error).strip().splitlines()[0]
        raise ValueError(f"Random CLIP config {str(spec)!r} is not a valid CLIPConfig: {reason}") from error


def random_clip_model(spec: str | os.PathLike[str] | dict[str, Any], seed: int = 0) -> CLIPModel:
    """A randomly initialized `CLIPModel` in eval mode; `spec` as in `random_clip_config`, `seed` seeds torch."""
    config = random_clip_config(spec)
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


__all__ = ["RANDOM_CLIP_CONFIGS", "random_clip_config", "random_clip_model"]

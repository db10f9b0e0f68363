"""The cache of frozen vision outputs: computed during the first epoch, reused by the later ones."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..file_utils import atomic_write
from ..modeling_cops import CoPSForAnomalyDetection, CoPSVisionOutput

logger = logging.getLogger(__name__)


class VisionFeatureCache:
    """Frozen vision outputs (and processed masks) of one process's images, by dataset index.

    In memory by default (CPU tensors); with `directory`, each stored batch becomes one safetensors file and a
    manifest (written by `finalize`) lets a later run over the same data and vision tower reuse them.
    """

    def __init__(self, directory: str | os.PathLike[str] | None, fingerprint: str, process_index: int) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
        self.process_index = process_index
        self._entries: dict[int, dict[str, torch.Tensor]] = {}
        self._files: dict[int, str] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            manifest = self._manifest_path()
            if manifest.is_file():
                try:
                    content = json.loads(manifest.read_text())
                    recorded, files = content.get("fingerprint"), content["files"]
                except (ValueError, TypeError, KeyError, AttributeError):
                    logger.warning("Feature cache manifest %s cannot be read; rebuilding the cache.", manifest)
                    return
                if recorded == fingerprint:
                    self._files = {int(index): name for index, name in files.items()}
                else:
                    logger.warning(
                        "Feature cache %s was made for other image or mask files (paths, sizes or modification "
                        "times), vision weights or precision; rebuilding the cache.",
                        manifest,
                    )

    def _manifest_path(self) -> Path:
        return self.directory / f"manifest-process{self.process_index}.json"

    def __len__(self) -> int:
        return len(self._files) if self.directory is not None else len(self._entries)

    def has_all(self, indices: Sequence[int]) -> bool:
        """Whether every index of a batch is cached."""
        stored = self._files if self.directory is not None else self._entries
        return all(index in stored for index in indices)

    def store(self, indices: Sequence[int], vision_outputs: CoPSVisionOutput, masks: torch.Tensor | None) -> None:
        """Keep the outputs (and binary masks, as uint8) of a batch."""
        per_image = {
            "image_embeds": vision_outputs.image_embeds.detach().cpu(),
            "patch_embeds": vision_outputs.patch_embeds.detach().cpu(),
        }
        if masks is not None:
            per_image["mask"] = masks.detach().cpu().to(torch.uint8)
        if self.directory is None:
            for row, index in enumerate(indices):
                self._entries[index] = {name: tensor[row].clone() for name, tensor in per_image.items()}
            return
        name = f"process{self.process_index}-{min(indices):08d}-{len(self._files):08d}.safetensors"
        tensors = {
            f"{index}/{key}": tensor[row].contiguous()
            for row, index in enumerate(indices)
            for key, tensor in per_image.items()
        }
        with atomic_write(self.directory / name) as temporary:
            save_file(tensors, str(temporary))
        self._files.update(dict.fromkeys(indices, name))

    def load(self, indices: Sequence[int]) -> tuple[CoPSVisionOutput, torch.Tensor | None]:
        """The cached outputs `[B, D]`, `[B, F, N, D]` and masks `[B, H, W]` (float, or None) of a batch."""
        if self.directory is None:
            rows = [self._entries[index] for index in indices]
        else:
            rows = []
            for index in indices:
                with safe_open(str(self.directory / self._files[index]), framework="pt") as stored:
                    prefix = f"{index}/"
                    rows.append(
                        {key[len(prefix) :]: stored.get_tensor(key) for key in stored.keys() if key.startswith(prefix)}
                    )
        vision_outputs = CoPSVisionOutput(
            image_embeds=torch.stack([row["image_embeds"] for row in rows]),
            patch_embeds=torch.stack([row["patch_embeds"] for row in rows]),
        )
        masks = torch.stack([row["mask"] for row in rows]).float() if "mask" in rows[0] else None
        return vision_outputs, masks

    def finalize(self) -> None:
        """Record the disk cache's content (after the first full epoch), so that later runs can reuse it."""
        if self.directory is None:
            return
        manifest = {
            "fingerprint": self.fingerprint,
            "files": {str(index): name for index, name in self._files.items()},
        }
        with atomic_write(self._manifest_path()) as temporary:
            temporary.write_text(json.dumps(manifest))


def vision_fingerprint(
    model: CoPSForAnomalyDetection, dataset: datasets.Dataset, mixed_precision: str, num_processes: int
) -> str:
    """Hash of what the cached features depend on: data files, vision tower (config and weights), precision.

    Each data file counts with its path, size and modification time, so that images replaced in place are seen.
    """
    config = model.config
    digest = hashlib.sha256()
    vision_fields = {
        "vision_config": config.vision_config.to_dict(),
        "dpam_layers": config.dpam_layers,
        "feature_layers": config.feature_layers,
        "image_size": config.image_size,
        "mixed_precision": mixed_precision,
        "num_processes": num_processes,
    }
    digest.update(json.dumps(vision_fields, sort_keys=True, default=str).encode())
    for column in ("image_path", "mask_path"):
        if column in dataset.column_names:
            digest.update("\n".join(_file_signature(path) for path in dataset[column]).encode())
    digest.update(weights_digest(model.clip.vision_model).encode())
    with torch.no_grad():
        digest.update(f"{model.clip.visual_projection.weight.double().sum().item():.12e}".encode())
    return digest.hexdigest()


def _file_signature(path: str | None) -> str:
    """`path`, its size and modification time (ns); only the path when it names no file (e.g. no mask)."""
    if not path or not os.path.isfile(path):
        return f"{path}"
    status = os.stat(path)
    return f"{path}\t{status.st_size}\t{status.st_mtime_ns}"


def weights_digest(module: torch.nn.Module) -> str:
    """Hash of a module's parameters (name, sum and absolute sum of each): tells different weights apart cheaply."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            values = parameter.detach().double()
            digest.update(f"{name}:{values.sum().item():.12e}:{values.abs().sum().item():.12e}".encode())
    return digest.hexdigest()


__all__ = ["VisionFeatureCache", "vision_fingerprint", "weights_digest"]

"""Epoch checkpoints of a training run, written with `Accelerator.save_state` and read with `load_state`.

A checkpoint `OUTPUT_DIR/checkpoints/epoch-NNNN` holds what Accelerate saves (optimizer, gradient scaler, every
process's random generator states) and, instead of the whole model, only the CoPS weights in `model.safetensors`:
the frozen CLIP is left out by the hooks `register_cops_weights_hooks` installs (a ViT-L/14 CLIP would add 1.7 GB to
every checkpoint without ever changing). `trainer_state.json` records the epoch, the step and the settings a resumed
run must share (`RESUME_INVARIANTS`, process and sample counts).

Every process saves into a hidden temporary folder; one rename by the main process publishes it, so a run killed
while saving leaves the previous checkpoint as the last complete one, and `list_checkpoints` ignores the
temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME, SAFE_MODEL_NAME
from safetensors.torch import load_file

from ..configuration_cops import CoPSConfig
from ..file_utils import fsync_tree, named_write_failures, replace_folder
from ..modeling_cops import CoPSForAnomalyDetection
from .config import TrainingConfig
from .feature_cache import weights_digest

CHECKPOINTS_DIRNAME = "checkpoints"
CLIP_PREFIX = "clip."
_CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)$")
_STATE_FILENAME = "trainer_state.json"
# Settings a resumed run must share with the run that wrote the checkpoint, or it would not continue it.
RESUME_INVARIANTS = ("batch_size", "learning_rate", "adam_betas", "gradient_accumulation_steps", "seed", "synthesize")


def cops_state_dict(model: CoPSForAnomalyDetection) -> dict[str, torch.Tensor]:
    """The trainable (non-CLIP) weights of a CoPS model."""
    return {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(CLIP_PREFIX)}


def checkpoints_folder(output_dir: str | os.PathLike[str]) -> Path:
    """The folder of a run's epoch checkpoints."""
    return Path(output_dir) / CHECKPOINTS_DIRNAME


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete epoch checkpoints of a run, oldest first (temporary folders of interrupted saves are ignored)."""
    folder = checkpoints_folder(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _CHECKPOINT_NAME.match(path.name))]
    return [path for _, path in sorted(found)]


class CorruptCheckpointError(ValueError):
    """A checkpoint's files cannot be read (truncated, malformed): an earlier intact checkpoint may be used."""


# CoPS config fields that may change between a run and its resumption (decisions and records, not the model).
_CONFIG_FIELDS_OUTSIDE_FINGERPRINT = (
    "image_threshold",
    "pixel_threshold",
    "train_dataset",
    "train_split",
    "train_real_images",
    "train_synthetic_images",
)


def run_fingerprint(model: CoPSForAnomalyDetection, dataset: datasets.Dataset) -> dict[str, Any]:
    """What a resumed run must train on to continue a checkpoint: the data files, the CLIP and the CoPS config.

    `data` hashes each record's image and mask paths, their file sizes and its label; `clip` hashes the CLIP
    weights; `config` is the model configuration (presets, sizes, widths) as a dict, so a refusal can name fields.
    """
    data = hashlib.sha256()
    for image, mask, label in zip(dataset["image_path"], dataset["mask_path"], dataset["gt_label"], strict=True):
        sizes = [os.path.getsize(path) if path and os.path.isfile(path) else -1 for path in (image, mask)]
        data.update(f"{image}\t{sizes[0]}\t{mask}\t{sizes[1]}\t{label}\n".encode())
    config = model.config.to_dict()
    fields = {name: config[name] for name in CoPSConfig.__annotations__ if name in config}
    for name in ("text_config", "vision_config"):
        fields[name] = {key: value for key, value in config[name].items() if not key.startswith("_")}
    for name in _CONFIG_FIELDS_OUTSIDE_FINGERPRINT:
        fields.pop(name, None)
    # Through JSON as trainer_state.json stores it, so that a fingerprint equals its reloaded copy.
    return {"data": data.hexdigest(), "clip": weights_digest(model.clip), "config": json.loads(json.dumps(fields))}


def _fingerprint_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    differences = []
    if recorded["data"] != current["data"]:
        differences.append("the training data (image and mask paths, file sizes or labels)")
    if recorded["clip"] != current["clip"]:
        differences.append("the CLIP weights")
    old, new = recorded["config"], current["config"]
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            if isinstance(old.get(name), dict) and isinstance(new.get(name), dict):
                before, after = old[name], new[name]
                keys = sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))
                differences += [f"{name}.{key}: was {before.get(key)!r}, now {after.get(key)!r}" for key in keys]
            else:
                differences.append(f"{name}: was {old.get(name)!r}, now {new.get(name)!r}")
    return differences


def trainer_state(
    config: TrainingConfig,
    epoch: int,
    global_step: int,
    num_processes: int,
    num_samples: int,
    fingerprint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What `trainer_state.json` records.

    That is the position in the run, the settings it must resume with and the `run_fingerprint` of what it trains.
    """
    settings = {name: getattr(config, name) for name in RESUME_INVARIANTS}
    settings["adam_betas"] = list(settings["adam_betas"])
    return {
        "epoch": epoch,
        "global_step": global_step,
        "num_processes": num_processes,
        "num_samples": num_samples,
        **settings,
        "fingerprint": fingerprint,
    }


def register_cops_weights_hooks(accelerator: Accelerator) -> None:
    """Make `save_state`/`load_state` of `accelerator` store and restore only the CoPS weights of its models.

    The save hook swaps each model's full state dict for `cops_state_dict` (no CLIP, no DDP `module.` prefix); the
    load hook restores those weights itself, checking that they fit, and takes the models off Accelerate's list so
    that it does not try to load a full state dict.
    """

    def keep_cops_weights(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        for index, model in enumerate(models):
            weights[index] = cops_state_dict(accelerator.unwrap_model(model))

    def load_cops_weights(models: list[torch.nn.Module], input_dir: str) -> None:
        for index, model in enumerate(models):
            suffix = f"_{index}" if index else ""
            path = Path(input_dir) / f"{SAFE_MODEL_NAME}{suffix}.safetensors"
            missing, unexpected = accelerator.unwrap_model(model).load_state_dict(load_file(str(path)), strict=False)
            not_clip = [name for name in missing if not name.startswith(CLIP_PREFIX)]
            if not_clip or unexpected:
                raise ValueError(f"{path} does not match the model (missing {not_clip}, unexpected {unexpected}).")
        models.clear()

    accelerator.register_save_state_pre_hook(keep_cops_weights)
    accelerator.register_load_state_pre_hook(load_cops_weights)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Write `checkpoints/epoch-NNNN` (epoch from `state`) atomically and drop all but the `keep` newest.

    Called by every process, after `register_cops_weights_hooks`. Returns the checkpoint folder.
    """
    folder = checkpoints_folder(output_dir)
    final = folder / f"epoch-{state['epoch']:04d}"
    temporary = folder / f".epoch-{state['epoch']:04d}.tmp"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    earlier = list_checkpoints(output_dir)
    kept = f"the last complete checkpoint {earlier[-1]} is kept" if earlier else "no earlier checkpoint exists"
    try:
        with named_write_failures(final, f"{kept}: free disk space, then rerun with --resume"):
            accelerator.save_state(str(temporary))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (temporary / _STATE_FILENAME).write_text(json.dumps(state, indent=2))
                fsync_tree(temporary)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        replace_folder(temporary, final)
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, expected_state: dict[str, Any]) -> dict[str, Any]:
    """Check that `checkpoint` continues this run, then restore it with `accelerator.load_state`.

    Args:
        expected_state: `trainer_state(...)` of the resuming run; its `RESUME_INVARIANTS`, process count and sample
            count must equal the checkpoint's.

    Returns:
        The checkpoint's trainer state (`epoch`, `global_step`, ...).

    Raises:
        ValueError: the settings, the data, the CLIP or the config changed (the message names what differs), or a
            process's random states are missing.
        CorruptCheckpointError: `trainer_state.json` or a file `load_state` reads is unreadable or malformed.
    """
    state_file = checkpoint / _STATE_FILENAME
    required = ("epoch", "global_step", *RESUME_INVARIANTS, "num_processes", "num_samples")
    try:
        state = json.loads(state_file.read_text())
        missing = [name for name in required if name not in state] if isinstance(state, dict) else list(required)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(f"{state_file} cannot be read ({error}).") from error
    if missing:
        raise CorruptCheckpointError(f"{state_file} is malformed: it lacks {missing}.")
    mismatched = [
        f"{name}: checkpoint {state[name]!r}, now {expected_state[name]!r}"
        for name in (*RESUME_INVARIANTS, "num_processes", "num_samples")
        if state[name] != expected_state[name]
    ]
    if state.get("fingerprint") and expected_state.get("fingerprint"):
        mismatched += _fingerprint_differences(state["fingerprint"], expected_state["fingerprint"])
    if mismatched:
        raise ValueError(
            f"Cannot resume from {checkpoint}: the run's settings changed ({'; '.join(mismatched)}). Resume "
            "with the original settings, or start a new run in another output_dir."
        )
    rng_file = checkpoint / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        # Accelerate would go on without it, and the resumed run would silently differ from an uninterrupted one.
        raise ValueError(f"Cannot resume from {checkpoint}: {rng_file.name} is missing; start a new run.")
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # torch, safetensors and pickle raise many kinds for a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptCheckpointError(f"{checkpoint} cannot be loaded ({reason}).") from error
    return state


__all__ = [
    "CHECKPOINTS_DIRNAME",
    "CLIP_PREFIX",
    "CorruptCheckpointError",
    "RESUME_INVARIANTS",
    "checkpoints_folder",
    "cops_state_dict",
    "list_checkpoints",
    "load_checkpoint",
    "register_cops_weights_hooks",
    "run_fingerprint",
    "save_checkpoint",
    "trainer_state",
]

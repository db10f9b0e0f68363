"""Epoch checkpoints of a training run: written atomically, resumed only by a run with the same settings.

A checkpoint `OUTPUT_DIR/checkpoints/epoch-NNNN` holds the CoPS weights (never the frozen CLIP), the optimizer and
gradient-scaler states, each process's random generator states and `trainer_state.json` (epoch, step and the
settings a resumed run must share). Every process fills a hidden temporary folder; one rename publishes it, so an
interrupted save leaves the previous checkpoint as the last complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ..modeling_cops import CoPSForAnomalyDetection
from .config import TrainingConfig

CHECKPOINTS_DIRNAME = "checkpoints"
CLIP_PREFIX = "clip."
_CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)$")
_WEIGHTS_FILENAME = "cops_weights.safetensors"
_OPTIMIZER_FILENAME = "optimizer.pt"
_SCALER_FILENAME = "grad_scaler.pt"
_STATE_FILENAME = "trainer_state.json"
# Settings a resumed run must share with the run that wrote the checkpoint, or it would not continue it.
RESUME_INVARIANTS = ("batch_size", "learning_rate", "adam_betas", "gradient_accumulation_steps", "seed")


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


def trainer_state(
    config: TrainingConfig, epoch: int, global_step: int, num_processes: int, num_samples: int
) -> dict[str, Any]:
    """What `trainer_state.json` records: the position in the run and the settings it must resume with."""
    settings = {name: getattr(config, name) for name in RESUME_INVARIANTS}
    settings["adam_betas"] = list(settings["adam_betas"])
    return {
        "epoch": epoch,
        "global_step": global_step,
        "num_processes": num_processes,
        "num_samples": num_samples,
        **settings,
    }


def save_checkpoint(
    accelerator: Accelerator,
    model: CoPSForAnomalyDetection,
    optimizer: torch.optim.Optimizer,
    output_dir: Path,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write `checkpoints/epoch-NNNN` (epoch from `state`) atomically and drop all but the `keep` newest.

    Called by every process: each saves its random generator states, the main process the rest. Returns the
    checkpoint folder.
    """
    folder = checkpoints_folder(output_dir)
    final = folder / f"epoch-{state['epoch']:04d}"
    temporary = folder / f".epoch-{state['epoch']:04d}.tmp"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
    accelerator.wait_for_everyone()
    torch.save(_capture_rng_state(), temporary / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(cops_state_dict(model), str(temporary / _WEIGHTS_FILENAME))
        torch.save(optimizer.state_dict(), temporary / _OPTIMIZER_FILENAME)
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), temporary / _SCALER_FILENAME)
        (temporary / _STATE_FILENAME).write_text(json.dumps(state, indent=2))
        for path in temporary.iterdir():
            with open(path, "rb") as written:
                os.fsync(written.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator,
    model: CoPSForAnomalyDetection,
    optimizer: torch.optim.Optimizer,
    checkpoint: Path,
    expected_state: dict[str, Any],
) -> dict[str, Any]:
    """Restore weights, optimizer, scaler and this process's random generators from `checkpoint`.

    Args:
        expected_state: `trainer_state(...)` of the resuming run; its `RESUME_INVARIANTS`, process count and sample
            count must equal the checkpoint's.

    Returns:
        The checkpoint's trainer state (`epoch`, `global_step`, ...).

    Raises:
        ValueError: the settings changed, or the weights do not fit the model.
    """
    state = json.loads((checkpoint / _STATE_FILENAME).read_text())
    mismatched = [
        f"{name}: checkpoint {state[name]!r}, now {expected_state[name]!r}"
        for name in (*RESUME_INVARIANTS, "num_processes", "num_samples")
        if state[name] != expected_state[name]
    ]
    if mismatched:
        raise ValueError(
            f"Cannot resume from {checkpoint}: the run's settings changed ({'; '.join(mismatched)}). Resume "
            "with the original settings, or start a new run in another output_dir."
        )
    weights = load_file(str(checkpoint / _WEIGHTS_FILENAME))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    not_clip = [name for name in missing if not name.startswith(CLIP_PREFIX)]
    if not_clip or unexpected:
        raise ValueError(f"{checkpoint} does not match the model (missing {not_clip}, unexpected {unexpected}).")
    optimizer.load_state_dict(torch.load(checkpoint / _OPTIMIZER_FILENAME, weights_only=True))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(torch.load(checkpoint / _SCALER_FILENAME, weights_only=True))
    rng_file = checkpoint / f"rng_state_{accelerator.process_index}.pt"
    _restore_rng_state(torch.load(rng_file, weights_only=True))
    return state


def _capture_rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = [
    "CHECKPOINTS_DIRNAME",
    "CLIP_PREFIX",
    "RESUME_INVARIANTS",
    "checkpoints_folder",
    "cops_state_dict",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "trainer_state",
]

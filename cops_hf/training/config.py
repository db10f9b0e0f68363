"""Settings of a training run."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

MIXED_PRECISION_MODES = ("no", "bf16", "fp16")


@dataclass
class TrainingConfig:
    """Settings of a CoPS training run (the reference's defaults).

    Args:
        output_dir: where checkpoints, `train_log.jsonl` and the final model and processor go.
        num_epochs: epochs over the training split (10 for VisA, 5 for MVTec AD in the reference).
        batch_size: images per process and step.
        learning_rate: Adam learning rate.
        adam_betas: Adam betas.
        gradient_accumulation_steps: batches whose gradients are averaged per optimizer step; an epoch's last
            group may be shorter (it is averaged over its own batches).
        mixed_precision: "no", "bf16" or "fp16" (passed to `Accelerator`; meant for GPUs).
        seed: seeds Python, numpy and torch (`accelerate.utils.set_seed`, offset by the process index); the
            shuffling of each epoch and the VAE noise follow from it.
        cache_vision_features: compute the frozen vision outputs once (first epoch) and reuse them; see the module
            docstring for the memory cost (~4.2 MB per image for ViT-L/14 at 518 px in fp32).
        cache_dir: keep the feature cache on disk (safetensors files, one per batch and process) in this folder
            instead of in memory; a later run over the same data and vision tower reuses it.
        resume: continue from the last complete checkpoint in `output_dir` (a fresh start when there is none).
        keep_checkpoints: number of most recent epoch checkpoints kept.
        overwrite: train into an `output_dir` that holds the final model of an earlier run, replacing it (without
            it, such a folder is refused).
        dataloader_num_workers: worker processes decoding images (uncached epochs).
        progress_bar: show a tqdm bar with the running loss terms (main process only).
        use_cpu: train on the CPU even when an accelerator (GPU) is present. Without one, the CPU is used anyway,
            and several processes (`torchrun --nproc_per_node N`) train together over gloo.
        synthesize: normal-only adaptation: every epoch, each normal image of the split also appears as a
            synthetic anomalous copy (blob, scratch, cut-paste or foreign-patch defect with its exact mask, seeded
            by `(seed, epoch, index)`, so runs reproduce and resume exactly). A split of normal images only is then
            enough; the real anomalous images of a labelled split are kept (mixing). Synthetic images are never
            served from the feature cache.
    """

    output_dir: str | os.PathLike[str]
    num_epochs: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-3
    adam_betas: tuple[float, float] = (0.5, 0.999)
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    cache_vision_features: bool = True
    cache_dir: str | os.PathLike[str] | None = None
    resume: bool = False
    keep_checkpoints: int = 2
    overwrite: bool = False
    dataloader_num_workers: int = 0
    progress_bar: bool = True
    use_cpu: bool = False
    synthesize: bool = False

    def __post_init__(self) -> None:
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        problems = []
        if self.num_epochs < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            problems.append("num_epochs, batch_size and gradient_accumulation_steps must be >= 1")
        if not 0 < self.learning_rate < math.inf or not all(0.0 <= beta < 1.0 for beta in self.adam_betas):
            problems.append("learning_rate must be finite and > 0, and adam_betas in [0, 1)")
        if self.mixed_precision not in MIXED_PRECISION_MODES:
            problems.append(f"mixed_precision={self.mixed_precision!r} must be one of {MIXED_PRECISION_MODES}")
        if self.keep_checkpoints < 1 or self.dataloader_num_workers < 0 or self.seed < 0:
            problems.append("keep_checkpoints must be >= 1, dataloader_num_workers and seed >= 0")
        if self.cache_dir is not None and not self.cache_vision_features:
            problems.append("cache_dir is set but cache_vision_features is False")
        if problems:
            raise ValueError("Invalid TrainingConfig: " + "; ".join(problems) + ".")


__all__ = ["MIXED_PRECISION_MODES", "TrainingConfig"]

"""Training CoPS on an auxiliary dataset with Accelerate.

The frozen CLIP runs in eval mode without gradients; only the CoPS modules (prompt context, deep prompts, state
prototypes, class-token VAE) learn, with the reference optimizer (Adam, lr 1e-3, betas (0.5, 0.999)). The same
code runs in one process, under `torchrun --nproc_per_node N` (CPU, gloo) and under `accelerate launch` (GPUs).

Typical use::

    from cops_hf.data import load_meta_dataset
    from cops_hf.training import TrainingConfig, cops_model_for_training, processor_for, train_cops

    model = cops_model_for_training("openai/clip-vit-large-patch14-336", preset="visa")
    dataset = load_meta_dataset("/data/VisA", split="train")
    train_cops(model, processor_for(model), dataset, TrainingConfig(output_dir="runs/visa"))

Feature cache: the vision tower is frozen and the data is not augmented, so its outputs (`CoPSVisionOutput`) are
exact per image. They are computed during the first epoch and reused afterwards. Each image costs
`(1 + F * N) * D` floats (F feature layers, N patches, D joint width) plus its binary mask: for ViT-L/14 at 518 px,
`(1 + 1369) * 768 * 4` bytes ~= 4.2 MB in fp32 (half in bf16/fp16), so VisA's ~10k training images need ~42 GB.
Keep that in memory only when it fits; otherwise set `cache_dir` (safetensors files on disk, memory-mapped when
read) or turn the cache off (`cache_vision_features=False`, `--no-cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel

from .configuration_cops import TRAIN_DATASET_PRESETS
from .data import load_meta_dataset
from .modeling_cops import CoPSForAnomalyDetection, CoPSVisionOutput
from .processing_cops import CoPSImageProcessor, CoPSProcessor

logger = logging.getLogger(__name__)

LOSS_TERMS = ("cls", "seg", "gather", "scatter", "kl", "recon")
TRAIN_LOG_FILENAME = "train_log.jsonl"
CHECKPOINTS_DIRNAME = "checkpoints"
CLIP_PREFIX = "clip."
MIXED_PRECISION_MODES = ("no", "bf16", "fp16")
_CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)$")
_WEIGHTS_FILENAME = "cops_weights.safetensors"
_OPTIMIZER_FILENAME = "optimizer.pt"
_SCALER_FILENAME = "grad_scaler.pt"
_STATE_FILENAME = "trainer_state.json"
# Settings a resumed run must share with the run that wrote the checkpoint, or it would not continue it.
_RESUME_INVARIANTS = ("batch_size", "learning_rate", "adam_betas", "gradient_accumulation_steps", "seed")

# Random CLIP towers for offline runs, tests and benchmarks (CLIPConfig keyword arguments).
_TINY_TEXT_TOWER = {
    "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "projection_dim": 48,
}
RANDOM_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "text_config": _TINY_TEXT_TOWER,
        "vision_config": {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
            "image_size": 56, "patch_size": 14, "projection_dim": 48,
        },
        "projection_dim": 48,
    },
    # The vision tower dominates the step time, as with ViT-L/14 at 518 px.
    "small": {
        "text_config": _TINY_TEXT_TOWER,
        "vision_config": {
            "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
            "image_size": 224, "patch_size": 14, "projection_dim": 48,
        },
        "projection_dim": 48,
    },
}  # fmt: skip


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
        dataloader_num_workers: worker processes decoding images (uncached epochs).
        progress_bar: show a tqdm bar with the running loss terms (main process only).
        use_cpu: train on the CPU even when an accelerator (GPU) is present. Without one, the CPU is used anyway,
            and several processes (`torchrun --nproc_per_node N`) train together over gloo.
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
    dataloader_num_workers: int = 0
    progress_bar: bool = True
    use_cpu: bool = False

    def __post_init__(self) -> None:
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        problems = []
        if self.num_epochs < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            problems.append("num_epochs, batch_size and gradient_accumulation_steps must be >= 1")
        if self.learning_rate <= 0 or not all(0.0 <= beta < 1.0 for beta in self.adam_betas):
            problems.append("learning_rate must be > 0 and adam_betas in [0, 1)")
        if self.mixed_precision not in MIXED_PRECISION_MODES:
            problems.append(f"mixed_precision={self.mixed_precision!r} must be one of {MIXED_PRECISION_MODES}")
        if self.keep_checkpoints < 1 or self.dataloader_num_workers < 0 or self.seed < 0:
            problems.append("keep_checkpoints must be >= 1, dataloader_num_workers and seed >= 0")
        if self.cache_dir is not None and not self.cache_vision_features:
            problems.append("cache_dir is set but cache_vision_features is False")
        if problems:
            raise ValueError("Invalid TrainingConfig: " + "; ".join(problems) + ".")


@dataclass
class TrainingResult:
    """What a training run produced.

    Args:
        model: the trained model (the object passed in, unwrapped), in eval mode.
        output_dir: folder holding the final model, processor, checkpoints and `train_log.jsonl`.
        history: one record per epoch run in this call (the lines appended to `train_log.jsonl`).
        resumed_from_epoch: the checkpoint epoch this run continued from (0 for a fresh run).
    """

    model: CoPSForAnomalyDetection
    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0


# ---------------------------------------------------------------------------------------------- model building


def random_clip_model(spec: str | os.PathLike[str] | dict[str, Any], seed: int = 0) -> CLIPModel:
    """A randomly initialized `CLIPModel` for offline runs, tests and benchmarks.

    Args:
        spec: a name from `RANDOM_CLIP_CONFIGS` ("tiny", "small"), a JSON file or a dict of `CLIPConfig` keyword
            arguments (`text_config`, `vision_config`, `projection_dim`; a CLIP `config.json` works too).
        seed: torch seed of the initialization.
    """
    if isinstance(spec, dict):
        fields = spec
    elif str(spec) in RANDOM_CLIP_CONFIGS:
        fields = RANDOM_CLIP_CONFIGS[str(spec)]
    elif Path(spec).is_file():
        fields = json.loads(Path(spec).read_text())
    else:
        raise ValueError(
            f"Random CLIP {str(spec)!r} is neither a preset ({sorted(RANDOM_CLIP_CONFIGS)}) nor a JSON file."
        )
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(**fields)).eval()


def cops_model_for_training(
    clip: str | CLIPModel,
    preset: str | None = None,
    image_size: int | None = None,
    clip_kwargs: dict[str, Any] | None = None,
    **cops_fields: Any,
) -> CoPSForAnomalyDetection:
    """A fresh CoPS around a (pretrained or random) CLIP, ready to train.

    Args:
        clip: a `CLIPModel` or a name/path for `CLIPModel.from_pretrained`.
        preset: training dataset preset from `TRAIN_DATASET_PRESETS` ("visa", "mvtec", "general"): the training
            neighbour kernel and whether the reconstruction loss is on.
        image_size: input size (518 by default, the reference's); a multiple of the patch size.
        clip_kwargs: extra arguments of `CLIPModel.from_pretrained`.
        **cops_fields: other `CoPSConfig` fields. Shallow text towers get `deep_prompt_depth` capped to fit.
    """
    if isinstance(clip, str):
        clip = CLIPModel.from_pretrained(clip, **(clip_kwargs or {}))
    if preset is not None:
        key = preset.lower()
        if key not in TRAIN_DATASET_PRESETS:
            raise ValueError(f"Unknown training preset {preset!r}; choose one of {sorted(TRAIN_DATASET_PRESETS)}.")
        cops_fields = {**TRAIN_DATASET_PRESETS[key], **cops_fields}
    if image_size is not None:
        cops_fields["image_size"] = image_size
    cops_fields.setdefault("deep_prompt_depth", min(8, clip.config.text_config.num_hidden_layers - 1))
    return CoPSForAnomalyDetection.from_clip(clip, **cops_fields)


def processor_for(model: CoPSForAnomalyDetection) -> CoPSProcessor:
    """A `CoPSProcessor` whose image size is the model's input size."""
    return CoPSProcessor.for_image_size(model.config.image_size)


def load_training_dataset(root: str | os.PathLike[str], categories: Sequence[str] | None = None) -> datasets.Dataset:
    """The `train` split of `ROOT/meta.json` (see `cops_hf.data`); the error names the builders when it is missing."""
    return load_meta_dataset(root, split="train", categories=categories)


# ---------------------------------------------------------------------------------------------- data


class TrainingSamples(Dataset):
    """Torch view of a meta.json `datasets.Dataset`: preprocessed images, binary masks and labels.

    Supervision follows the data. With masks (the usual auxiliary sets) every sample gets a mask: all-zero for
    normal images and, as in the reference, for anomalous images without one (a warning counts them). A dataset
    with no mask at all is image-level: the model is trained with `masks=None` (cls + kl (+ recon) only).

    Raises:
        ValueError: missing columns, labels other than 0/1, or a split without normal or without anomalous samples.
    """

    REQUIRED_COLUMNS = ("image", "mask", "gt_label")

    def __init__(self, dataset: datasets.Dataset, image_processor: CoPSImageProcessor) -> None:
        missing = [name for name in self.REQUIRED_COLUMNS if name not in dataset.column_names]
        if missing:
            raise ValueError(
                f"The training dataset lacks the columns {missing}; load it with cops_hf.data.load_meta_dataset."
            )
        if len(dataset) == 0:
            raise ValueError("The training dataset is empty.")
        self.dataset = dataset
        self.image_processor = image_processor
        self.labels = [int(label) for label in dataset["gt_label"]]
        unknown = sorted(set(self.labels) - {0, 1})
        if unknown:
            raise ValueError(f"gt_label must be 0 (normal) or 1 (anomalous); found {unknown}.")
        num_anomalous = sum(self.labels)
        if num_anomalous == 0 or num_anomalous == len(self.labels):
            missing_kind = "anomalous" if num_anomalous == 0 else "normal"
            raise ValueError(
                f"The training split has no {missing_kind} sample ({len(self.labels)} images, {num_anomalous} "
                "anomalous). CoPS learns to tell normal from anomalous: train on an auxiliary set with both, "
                "e.g. VisA or MVTec AD with their test images and masks as the reference does."
            )
        mask_paths = dataset["mask_path"] if "mask_path" in dataset.column_names else None
        has_mask = (
            [bool(path) for path in mask_paths]
            if mask_paths is not None
            else [mask is not None for mask in dataset["mask"]]
        )
        self.uses_masks = any(has_mask)
        unmasked = sum(1 for label, masked in zip(self.labels, has_mask, strict=True) if label == 1 and not masked)
        if self.uses_masks and unmasked:
            logger.warning(
                "%d of %d anomalous training images have no mask: they get an all-zero mask (as in the reference), "
                "so their anomalous pixels count as normal in the segmentation terms.",
                unmasked,
                num_anomalous,
            )
        elif not self.uses_masks:
            logger.warning("The training data has no masks: training the image-level loss only (cls, kl, recon).")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index)]
        masks = [row["mask"]] if self.uses_masks else None
        processed = self.image_processor.preprocess([row["image"]], masks=masks)
        item = {"index": int(index), "pixel_values": processed["pixel_values"][0], "label": self.labels[index]}
        if self.uses_masks:
            item["mask"] = processed["masks"][0]
        return item


def collate_samples(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack `TrainingSamples` items into `indices`, `pixel_values`, `labels` and (when present) `masks`."""
    batch = {
        "indices": torch.tensor([item["index"] for item in items]),
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "labels": torch.tensor([item["label"] for item in items]),
    }
    if "mask" in items[0]:
        batch["masks"] = torch.stack([item["mask"] for item in items])
    return batch


def epoch_batches(
    num_samples: int, batch_size: int, seed: int, epoch: int, process_index: int = 0, num_processes: int = 1
) -> list[list[int]]:
    """The index batches one process trains on in one epoch; deterministic in (seed, epoch, process).

    The samples are dealt once into `num_processes` fixed shards (padded by wrapping around so that every process
    takes the same number of steps); each process shuffles its own shard every epoch with a generator seeded by
    `(seed, epoch, process_index)`. Fixed shards let each process cache the features of its own images. The last
    batch may be smaller.
    """
    padded_size = math.ceil(num_samples / num_processes) * num_processes
    shard = np.arange(padded_size)[process_index::num_processes] % num_samples
    order = shard[np.random.default_rng([seed, epoch, process_index]).permutation(len(shard))]
    return [order[start : start + batch_size].tolist() for start in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------- feature cache


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
                content = json.loads(manifest.read_text())
                if content.get("fingerprint") == fingerprint:
                    self._files = {int(index): name for index, name in content["files"].items()}
                else:
                    logger.warning("Feature cache %s was made for other data or weights; recomputing.", manifest)

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
        _atomic_write(self.directory / name, lambda path: save_file(tensors, str(path)))
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
        _atomic_write(self._manifest_path(), lambda path: path.write_text(json.dumps(manifest)))


def _vision_fingerprint(
    model: CoPSForAnomalyDetection, dataset: datasets.Dataset, mixed_precision: str, num_processes: int
) -> str:
    """Hash of what the cached features depend on: data files, vision tower (config and weights), precision."""
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
            digest.update("\n".join(dataset[column]).encode())
    with torch.no_grad():
        for name, parameter in model.clip.vision_model.named_parameters():
            values = parameter.detach().double()
            digest.update(f"{name}:{values.sum().item():.12e}:{values.abs().sum().item():.12e}".encode())
        digest.update(f"{model.clip.visual_projection.weight.double().sum().item():.12e}".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- checkpoints


def _atomic_write(path: Path, write: Any) -> None:
    """Run `write(temporary_path)` next to `path`, then move the result into place in one rename."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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


def cops_state_dict(model: CoPSForAnomalyDetection) -> dict[str, torch.Tensor]:
    """The trainable (non-CLIP) weights of a CoPS model."""
    return {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(CLIP_PREFIX)}


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete epoch checkpoints of a run, oldest first (temporary folders of interrupted saves are ignored)."""
    folder = Path(output_dir) / CHECKPOINTS_DIRNAME
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _CHECKPOINT_NAME.match(path.name))]
    return [path for _, path in sorted(found)]


# ---------------------------------------------------------------------------------------------- trainer


class CoPSTrainer:
    """Accelerate-driven training of the CoPS modules on a meta.json training split.

    Args:
        model: a `CoPSForAnomalyDetection` (e.g. from `cops_model_for_training`); trained in place.
        processor: its `CoPSProcessor`; the image size must equal `model.config.image_size`.
        train_dataset: rows as `cops_hf.data.load_meta_dataset` gives them (`image`, `mask`, `gt_label`, ...).
        config: the run's `TrainingConfig`.
    """

    def __init__(
        self,
        model: CoPSForAnomalyDetection,
        processor: CoPSProcessor,
        train_dataset: datasets.Dataset,
        config: TrainingConfig,
    ) -> None:
        if processor.image_processor.size != model.config.image_size:
            raise ValueError(
                f"The processor resizes to {processor.image_processor.size} px but the model expects "
                f"{model.config.image_size} px; use cops_hf.training.processor_for(model)."
            )
        self.model = model
        self.processor = processor
        self.train_dataset = train_dataset
        self.config = config
        self.samples = TrainingSamples(train_dataset, processor.image_processor)
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            # Accelerate forms a multi-process CPU group (gloo) only when told to use the CPU.
            cpu=config.use_cpu or not torch.accelerator.is_available(),
            mixed_precision=config.mixed_precision,
            # Image-level data (no masks) leaves the prototype extractor without gradients.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not self.samples.uses_masks)],
        )
        self.global_step = 0

    # -- public ---------------------------------------------------------------------------------------------

    def train(self) -> TrainingResult:
        """Run (or resume) the training, save the final model and processor, and return the result."""
        config, accelerator = self.config, self.accelerator
        if list_checkpoints(self.output_dir) and not config.resume:
            raise ValueError(
                f"{self.output_dir} holds checkpoints of an earlier run: pass resume=True (--resume) to continue it, "
                "or choose another output_dir."
            )
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        set_seed(config.seed, device_specific=True)
        self.model.clip.requires_grad_(False)
        self.model.train()
        trainable = [
            parameter for name, parameter in self.model.named_parameters() if not name.startswith(CLIP_PREFIX)
        ]
        optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, betas=config.adam_betas)
        self.wrapped_model, self.optimizer = accelerator.prepare(self.model, optimizer)
        start_epoch = self._resume() if config.resume else 0
        if start_epoch == 0 and accelerator.is_main_process:
            self._truncate_log(0)  # lines of an earlier attempt that died before its first checkpoint
        cache = None
        if config.cache_vision_features:
            fingerprint = _vision_fingerprint(
                self.model, self.train_dataset, config.mixed_precision, accelerator.num_processes
            )
            cache = VisionFeatureCache(config.cache_dir, fingerprint, accelerator.process_index)

        history = []
        for epoch in range(start_epoch + 1, config.num_epochs + 1):
            record = self._train_epoch(epoch, cache)
            history.append(record)
            if accelerator.is_main_process:
                with open(self.output_dir / TRAIN_LOG_FILENAME, "a") as log:
                    log.write(json.dumps(record) + "\n")
            self._save_checkpoint(epoch)

        self.model.eval()
        self._save_final()
        return TrainingResult(self.model, self.output_dir, history, start_epoch)

    # -- epochs ---------------------------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        accelerator = self.accelerator
        return epoch_batches(
            len(self.samples),
            self.config.batch_size,
            self.config.seed,
            epoch,
            accelerator.process_index,
            accelerator.num_processes,
        )

    def _cached_batches(self, batches: list[list[int]], cache: VisionFeatureCache) -> Iterator[dict]:
        """Batches of cached vision outputs and masks; no image is decoded."""
        for indices in batches:
            vision_outputs, masks = cache.load(indices)
            batch = {
                "indices": torch.tensor(indices),
                "vision_outputs": vision_outputs,
                "labels": torch.tensor([self.samples.labels[index] for index in indices]),
            }
            if masks is not None:
                batch["masks"] = masks
            yield batch

    def _decoded_batches(self, batches: list[list[int]], epoch: int) -> DataLoader:
        """Batches of preprocessed images (and masks), decoded by the DataLoader's workers."""
        return DataLoader(
            self.samples,
            batch_sampler=batches,
            collate_fn=collate_samples,
            num_workers=self.config.dataloader_num_workers,
            # Its own generator, so that loading draws nothing from the global RNG (which the VAE noise uses).
            generator=torch.Generator().manual_seed(self.config.seed + epoch),
        )

    def _train_epoch(self, epoch: int, cache: VisionFeatureCache | None) -> dict[str, Any]:
        config, accelerator = self.config, self.accelerator
        device = accelerator.device
        batches = self._epoch_batches(epoch)
        accumulation = config.gradient_accumulation_steps
        vision_model = accelerator.unwrap_model(self.wrapped_model)
        # Per-process sums of (loss, terms...) weighted by batch size, and the image count.
        totals = torch.zeros(len(LOSS_TERMS) + 2, dtype=torch.float64, device=device)
        cached_epoch = cache is not None and all(cache.has_all(indices) for indices in batches)
        progress = tqdm(
            total=len(batches),
            desc=f"epoch {epoch}/{config.num_epochs}",
            disable=not (config.progress_bar and accelerator.is_local_main_process),
        )
        started = time.perf_counter()
        source = self._cached_batches(batches, cache) if cached_epoch else self._decoded_batches(batches, epoch)
        for position, batch in enumerate(source):
            group_start = position - position % accumulation
            group_size = min(accumulation, len(batches) - group_start)
            sync_now = position == group_start + group_size - 1
            labels = batch["labels"].to(device)
            masks = batch["masks"].to(device) if "masks" in batch else None
            if "vision_outputs" in batch:
                vision_outputs = CoPSVisionOutput(
                    image_embeds=batch["vision_outputs"].image_embeds.to(device),
                    patch_embeds=batch["vision_outputs"].patch_embeds.to(device),
                )
            else:
                with accelerator.autocast():
                    vision_outputs = vision_model.dual_path_vision_forward(batch["pixel_values"].to(device))
                if cache is not None:
                    cache.store(batch["indices"].tolist(), vision_outputs, masks)
            with accelerator.no_sync(self.wrapped_model) if not sync_now else nullcontext():
                with accelerator.autocast():
                    outputs = self.wrapped_model(vision_outputs=vision_outputs, labels=labels, masks=masks)
                accelerator.backward(outputs.loss / group_size)
            if sync_now:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
            batch_size = len(labels)
            values = [outputs.loss.detach()] + [outputs.loss_terms[name] for name in LOSS_TERMS]
            totals[:-1] += torch.stack([value.double() for value in values]) * batch_size
            totals[-1] += batch_size
            progress.update(1)
            running_means = (totals[:-1] / totals[-1]).tolist()
            progress.set_postfix(
                {name: f"{value:.3f}" for name, value in zip(("loss", *LOSS_TERMS), running_means, strict=True)},
                refresh=False,
            )
        progress.close()
        if cache is not None and not cached_epoch:
            cache.finalize()
        seconds = time.perf_counter() - started
        totals = accelerator.reduce(totals, reduction="sum")
        means = (totals[:-1] / totals[-1]).tolist()
        num_images = int(totals[-1].item())
        record = {"epoch": epoch, "step": self.global_step, "loss": means[0]}
        record.update(dict(zip(LOSS_TERMS, means[1:], strict=True)))
        record.update(
            seconds=seconds,
            images_per_second=num_images / seconds,
            images=num_images,
            cached_features=cached_epoch,
        )
        if accelerator.is_main_process:
            logger.info("epoch %d: %s", epoch, json.dumps(record))
        return record

    # -- checkpoints ----------------------------------------------------------------------------------------

    def _trainer_state(self, epoch: int) -> dict[str, Any]:
        settings = {name: getattr(self.config, name) for name in _RESUME_INVARIANTS}
        settings["adam_betas"] = list(settings["adam_betas"])
        return {
            "epoch": epoch,
            "global_step": self.global_step,
            "num_processes": self.accelerator.num_processes,
            "num_samples": len(self.samples),
            **settings,
        }

    def _save_checkpoint(self, epoch: int) -> None:
        """Write `checkpoints/epoch-NNNN` atomically: every process fills a temporary folder, then one rename."""
        accelerator = self.accelerator
        folder = self.output_dir / CHECKPOINTS_DIRNAME
        final = folder / f"epoch-{epoch:04d}"
        temporary = folder / f".epoch-{epoch:04d}.tmp"
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
        accelerator.wait_for_everyone()
        torch.save(_capture_rng_state(), temporary / f"rng_state_{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_file(cops_state_dict(self.model), str(temporary / _WEIGHTS_FILENAME))
            torch.save(self.optimizer.state_dict(), temporary / _OPTIMIZER_FILENAME)
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), temporary / _SCALER_FILENAME)
            (temporary / _STATE_FILENAME).write_text(json.dumps(self._trainer_state(epoch), indent=2))
            for path in temporary.iterdir():
                with open(path, "rb") as written:
                    os.fsync(written.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            for stale in list_checkpoints(self.output_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(stale)
        accelerator.wait_for_everyone()

    def _resume(self) -> int:
        """Load the last complete checkpoint; return its epoch (0 when there is none)."""
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            logger.warning("No checkpoint in %s: starting a fresh run.", self.output_dir / CHECKPOINTS_DIRNAME)
            return 0
        checkpoint = checkpoints[-1]
        state = json.loads((checkpoint / _STATE_FILENAME).read_text())
        expected = self._trainer_state(state["epoch"])
        mismatched = [
            f"{name}: checkpoint {state[name]!r}, now {expected[name]!r}"
            for name in (*_RESUME_INVARIANTS, "num_processes", "num_samples")
            if state[name] != expected[name]
        ]
        if mismatched:
            raise ValueError(
                f"Cannot resume from {checkpoint}: the run's settings changed ({'; '.join(mismatched)}). Resume "
                "with the original settings, or start a new run in another output_dir."
            )
        weights = load_file(str(checkpoint / _WEIGHTS_FILENAME))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        not_clip = [name for name in missing if not name.startswith(CLIP_PREFIX)]
        if not_clip or unexpected:
            raise ValueError(f"{checkpoint} does not match the model (missing {not_clip}, unexpected {unexpected}).")
        self.optimizer.load_state_dict(torch.load(checkpoint / _OPTIMIZER_FILENAME, weights_only=True))
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(torch.load(checkpoint / _SCALER_FILENAME, weights_only=True))
        rng_file = checkpoint / f"rng_state_{self.accelerator.process_index}.pt"
        _restore_rng_state(torch.load(rng_file, weights_only=True))
        self.global_step = state["global_step"]
        if self.accelerator.is_main_process:
            self._truncate_log(state["epoch"])
            logger.info("Resumed from %s (epoch %d, step %d).", checkpoint, state["epoch"], self.global_step)
        self.accelerator.wait_for_everyone()
        return state["epoch"]

    def _truncate_log(self, last_epoch: int) -> None:
        """Drop log lines of epochs after the checkpoint (written by the interrupted run)."""
        log = self.output_dir / TRAIN_LOG_FILENAME
        if not log.is_file():
            return
        kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["epoch"] <= last_epoch]
        _atomic_write(log, lambda path: path.write_text("".join(line + "\n" for line in kept)))

    def _save_final(self) -> None:
        """`save_pretrained` of model and processor into `output_dir`, each file moved into place atomically."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            with tempfile.TemporaryDirectory(dir=self.output_dir, prefix=".final-") as staging:
                self.model.save_pretrained(staging)
                self.processor.save_pretrained(staging)
                for path in Path(staging).iterdir():
                    os.replace(path, self.output_dir / path.name)
        accelerator.wait_for_everyone()


def train_cops(
    model: CoPSForAnomalyDetection,
    processor: CoPSProcessor,
    train_dataset: datasets.Dataset,
    config: TrainingConfig,
) -> TrainingResult:
    """Train the CoPS modules of `model` on `train_dataset`; see `CoPSTrainer` and `TrainingConfig`."""
    return CoPSTrainer(model, processor, train_dataset, config).train()


__all__ = [
    "LOSS_TERMS",
    "RANDOM_CLIP_CONFIGS",
    "TRAIN_LOG_FILENAME",
    "CoPSTrainer",
    "TrainingConfig",
    "TrainingResult",
    "TrainingSamples",
    "VisionFeatureCache",
    "collate_samples",
    "cops_model_for_training",
    "cops_state_dict",
    "epoch_batches",
    "list_checkpoints",
    "load_training_dataset",
    "processor_for",
    "random_clip_model",
    "train_cops",
]

"""The training loop: `CoPSTrainer` and `train_cops`, and the model and processor a run starts from."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import CLIPModel
from transformers.utils import CONFIG_NAME

from ..clip_loading import load_clip_model
from ..file_utils import (
    STAGING_PREFIX,
    FolderLockedError,
    acquire_folder_lock,
    atomic_write,
    release_folder_lock,
)
from ..hub import save_detector
from ..losses import LOSS_TERMS
from ..modeling_cops import CoPSForAnomalyDetection, CoPSVisionOutput
from ..processing_cops import CoPSProcessor
from .checkpointing import (
    CLIP_PREFIX,
    CorruptCheckpointError,
    checkpoints_folder,
    list_checkpoints,
    load_checkpoint,
    register_cops_weights_hooks,
    run_fingerprint,
    save_checkpoint,
    trainer_state,
)
from .config import TrainingConfig
from .data import TrainingSamples, collate_samples, epoch_batches
from .feature_cache import VisionFeatureCache, vision_fingerprint

logger = logging.getLogger(__name__)

TRAIN_LOG_FILENAME = "train_log.jsonl"
TRACKER_PROJECT = "cops-hf"
"""Project (run) name given to the trackers; TensorBoard writes to `output_dir/runs/cops-hf/`."""
TRACKER_LOGGING_DIR = "runs"


def check_tracker_installed(report_to: str) -> None:
    """Raise `ValueError` naming the package to install when the tracker `report_to` cannot be imported."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    if report_to in available and not available[report_to]():
        raise ValueError(
            f"report_to={report_to!r} needs the {report_to} package: pip install {report_to}, or choose another "
            "tracker (or none)."
        )


@dataclass
class TrainingResult:
    """What a training run produced.

    Args:
        model: the trained model (the object passed in, unwrapped), in eval mode.
        output_dir: folder holding the final model, processor, checkpoints and `train_log.jsonl`.
        history: one record per epoch run in this call (the lines appended to `train_log.jsonl`).
        resumed_from_epoch: the checkpoint epoch this run continued from (0 for a fresh run).
        evaluation: the `EvaluationResult` of `TrainingConfig.eval_data` (main process), else None.
    """

    model: CoPSForAnomalyDetection
    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    evaluation: Any = None


def cops_model_for_training(
    clip: str | CLIPModel,
    preset: str | None = None,
    image_size: int | None = None,
    clip_kwargs: dict[str, Any] | None = None,
    **cops_fields: Any,
) -> CoPSForAnomalyDetection:
    """A fresh CoPS around a (pretrained or random) CLIP, ready to train.

    Args:
        clip: a `CLIPModel`, a Hub id, a transformers CLIP folder or an OpenAI CLIP file (see
            `cops_hf.conversion.load_clip_model`).
        preset: training dataset preset from `TRAIN_DATASET_PRESETS` ("visa", "mvtec", "general"): the training
            neighbour kernel and whether the reconstruction loss is on.
        image_size: input size (518 by default, the reference's); a multiple of the patch size.
        clip_kwargs: extra arguments of `CLIPModel.from_pretrained` for a Hub id or folder (`revision`, ...).
        **cops_fields: other `CoPSConfig` fields; the ones derived from the CLIP's depth are described in
            `CoPSConfig.from_clip_config`.
    """
    if image_size is not None:
        cops_fields["image_size"] = image_size
    clip = load_clip_model(clip, **(clip_kwargs or {}))
    return CoPSForAnomalyDetection.from_clip(clip, train_preset=preset, **cops_fields)


def processor_for(model: CoPSForAnomalyDetection) -> CoPSProcessor:
    """A `CoPSProcessor` whose image size is the model's input size."""
    return CoPSProcessor.for_image_size(model.config.image_size)


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
        self.samples = TrainingSamples(
            train_dataset, processor.image_processor, synthesize=config.synthesize, seed=config.seed
        )
        self.output_dir = Path(config.output_dir)
        # What the model is trained on, saved with its config and written on every train_log.jsonl line.
        model.config.train_dataset = train_dataset.info.dataset_name
        model.config.train_split = None if train_dataset.split is None else str(train_dataset.split)
        self.log_with = None if config.report_to == "none" else config.report_to
        check_tracker_installed(config.report_to)
        model.config.train_real_images = self.samples.num_real
        model.config.train_synthetic_images = self.samples.num_synthetic
        self.accelerator = Accelerator(
            # Accelerate forms a multi-process CPU group (gloo) only when told to use the CPU.
            cpu=config.use_cpu or not torch.accelerator.is_available(),
            mixed_precision=config.mixed_precision,
            # Image-level data (no masks) leaves the prototype extractor without gradients.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not self.samples.uses_masks)],
            log_with=self.log_with,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / TRACKER_LOGGING_DIR)
            ),
        )
        register_cops_weights_hooks(self.accelerator)
        self.global_step = 0

    # -- public ---------------------------------------------------------------------------------------------

    def train(self) -> TrainingResult:
        """Run (or resume) the training, save the final model and processor, and return the result.

        While it runs, `output_dir` is locked (`cops_hf.file_utils.LOCK_FILENAME`, by the main process): a second run
        into the same folder is refused, naming this one's PID.
        """
        config = self.config
        checkpoints = list_checkpoints(self.output_dir)
        if checkpoints and not config.resume:
            raise ValueError(
                f"{self.output_dir} holds checkpoints of an earlier run: pass resume=True (--resume) to continue it, "
                "or choose another output_dir."
            )
        if not config.overwrite and (self.output_dir / CONFIG_NAME).is_file() and not checkpoints:
            resuming = " and no checkpoint to resume from" if config.resume else ""
            raise ValueError(
                f"{self.output_dir} holds the final model of an earlier run{resuming}: pass overwrite=True "
                "(--overwrite) to replace it, or choose another output_dir."
            )
        with self._output_folder_lock():
            return self._train_in_locked_folder()

    @contextmanager
    def _output_folder_lock(self) -> Iterator[None]:
        """Hold `output_dir`'s lock for the block: taken by the main process, its refusal raised by every process."""
        accelerator, lock, refusal = self.accelerator, None, None
        if accelerator.is_main_process:
            try:
                lock = acquire_folder_lock(self.output_dir, "cops-hf train")
            except FolderLockedError as error:
                refusal = str(error)
        refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise FolderLockedError(refusal)
        try:
            yield
        finally:
            if lock is not None:
                release_folder_lock(lock)

    def _train_in_locked_folder(self) -> TrainingResult:
        config, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            self._remove_interrupted_saves()
        accelerator.wait_for_everyone()
        self.fingerprint = run_fingerprint(self.model, self.train_dataset)
        set_seed(config.seed, device_specific=True)
        self.model.clip.requires_grad_(False)
        self.model.train()
        trainable = [
            parameter for name, parameter in self.model.named_parameters() if not name.startswith(CLIP_PREFIX)
        ]
        optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, betas=config.adam_betas)
        self.wrapped_model, self.optimizer = accelerator.prepare(self.model, optimizer)
        start_epoch = self._resume() if config.resume else 0
        if self.log_with is not None:
            accelerator.init_trackers(TRACKER_PROJECT, config=self._tracked_hyperparameters())
        if start_epoch == 0 and accelerator.is_main_process:
            self._truncate_log(0)  # lines of an earlier attempt that died before its first checkpoint
        cache = None
        if config.cache_vision_features:
            fingerprint = vision_fingerprint(
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
            if self.log_with is not None:
                accelerator.log(self._tracked_epoch(record), step=self.global_step)

        self.model.eval()
        self._save_final()
        evaluation = self._evaluate() if config.eval_data is not None else None
        if self.log_with is not None:
            accelerator.end_training()
        return TrainingResult(self.model, self.output_dir, history, start_epoch, evaluation)

    # -- trackers and evaluation ----------------------------------------------------------------------------

    def _tracked_hyperparameters(self) -> dict[str, Any]:
        """The run's settings as trackers take them (numbers and strings only)."""
        config = self.config
        values = {
            "num_epochs": config.num_epochs, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
            "adam_beta1": config.adam_betas[0], "adam_beta2": config.adam_betas[1],
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "mixed_precision": config.mixed_precision, "seed": config.seed,
            "num_processes": self.accelerator.num_processes, "image_size": self.model.config.image_size,
            "train_dataset": self.model.config.train_dataset, "train_preset": self.model.config.train_preset,
        }  # fmt: skip
        return {name: "none" if value is None else value for name, value in values.items()}

    def _tracked_epoch(self, record: dict[str, Any]) -> dict[str, float]:
        """An epoch's `train_log.jsonl` record as tracker scalars (`train/...`)."""
        scalars = {f"train/{name}": record[name] for name in ("loss", *LOSS_TERMS, "images_per_second", "epoch")}
        scalars["train/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        return scalars

    def _evaluate(self) -> Any:
        """Evaluate the final model on `config.eval_data` (its test split); log the metrics to the trackers."""
        from ..evaluation.evaluator import evaluate_dataset

        result = evaluate_dataset(
            self.model, self.processor, self.config.eval_data, output_dir=self.output_dir / "eval",
            accelerator=self.accelerator,
        )  # fmt: skip
        if result is not None and self.log_with is not None:
            scalars = {f"eval/{name}": value for name, value in result.report.mean.items() if value is not None}
            for category, values in result.report.per_category.items():
                known = {name: value for name, value in values.items() if value is not None}
                scalars.update({f"eval/{category}/{name}": value for name, value in known.items()})
            self.accelerator.log(scalars, step=self.global_step)
        return result

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

    def _vision_outputs(self, vision_model: CoPSForAnomalyDetection, pixel_values: torch.Tensor) -> CoPSVisionOutput:
        with self.accelerator.autocast():
            return vision_model.dual_path_vision_forward(pixel_values.to(self.accelerator.device))

    def _real_indices(self, indices: list[int]) -> list[int]:
        """The indices of real images, the only ones whose features may be cached."""
        return [index for index in indices if not self.samples.is_synthetic(index)]

    def _cached_batches(
        self, batches: list[list[int]], cache: VisionFeatureCache, vision_model: CoPSForAnomalyDetection
    ) -> Iterator[dict]:
        """Batches of cached vision outputs and masks; only synthetic images (new every epoch) are decoded."""
        for indices in batches:
            real = self._real_indices(indices)
            synthetic = [index for index in indices if index not in real]
            parts = [cache.load(real)] if real else []
            if synthetic:
                decoded = collate_samples([self.samples[index] for index in synthetic])
                outputs = self._vision_outputs(vision_model, decoded["pixel_values"])
                parts.append(
                    (CoPSVisionOutput(outputs.image_embeds.cpu(), outputs.patch_embeds.cpu()), decoded["masks"])
                )
            # Back to the batch's order (the VAE noise is drawn per row, so the order matters).
            order = torch.tensor([(real + synthetic).index(index) for index in indices])
            vision_outputs = CoPSVisionOutput(
                image_embeds=torch.cat([part[0].image_embeds for part in parts])[order],
                patch_embeds=torch.cat([part[0].patch_embeds for part in parts])[order],
            )
            batch = {
                "indices": torch.tensor(indices),
                "vision_outputs": vision_outputs,
                "labels": torch.tensor([self.samples.labels[index] for index in indices]),
            }
            if parts[0][1] is not None:
                batch["masks"] = torch.cat([part[1] for part in parts])[order]
            yield batch

    def _store_real(
        self,
        cache: VisionFeatureCache,
        indices: list[int],
        vision_outputs: CoPSVisionOutput,
        masks: torch.Tensor | None,
    ) -> None:
        """Cache the outputs of a decoded batch's real images (synthetic ones change every epoch)."""
        rows = [row for row, index in enumerate(indices) if not self.samples.is_synthetic(index)]
        if rows:
            real_outputs = CoPSVisionOutput(vision_outputs.image_embeds[rows], vision_outputs.patch_embeds[rows])
            cache.store([indices[row] for row in rows], real_outputs, None if masks is None else masks[rows])

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
        self.samples.set_epoch(epoch)
        accumulation = config.gradient_accumulation_steps
        vision_model = accelerator.unwrap_model(self.wrapped_model)
        # Per-process sums of (loss, terms...) weighted by batch size, and the image count.
        totals = torch.zeros(len(LOSS_TERMS) + 2, dtype=torch.float64, device=device)
        cached_epoch = cache is not None and all(cache.has_all(self._real_indices(indices)) for indices in batches)
        progress = tqdm(
            total=len(batches),
            desc=f"epoch {epoch}/{config.num_epochs}",
            disable=not (config.progress_bar and accelerator.is_local_main_process),
        )
        started = time.perf_counter()
        if cached_epoch:
            source = self._cached_batches(batches, cache, vision_model)
        else:
            source = self._decoded_batches(batches, epoch)
        for position, batch in enumerate(source):
            group_start = position - position % accumulation
            group_size = min(accumulation, len(batches) - group_start)
            sync_now = position == group_start + group_size - 1
            outputs = self._train_step(batch, vision_model, cache, group_size=group_size, sync_now=sync_now)
            batch_size = len(batch["labels"])
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
        return self._epoch_record(epoch, totals, time.perf_counter() - started, cached_epoch)

    def _train_step(
        self,
        batch: dict[str, Any],
        vision_model: Any,
        cache: VisionFeatureCache | None,
        *,
        group_size: int,
        sync_now: bool,
    ) -> Any:
        """One batch through the model's training path: loss, backward, and an optimizer step ending each group.

        The vision features come from the cache when the batch carries them, else from the frozen tower (and are
        stored for the next epochs when a cache is kept). Returns the model outputs (loss and its terms).
        """
        accelerator, device = self.accelerator, self.accelerator.device
        labels = batch["labels"].to(device)
        masks = batch["masks"].to(device) if "masks" in batch else None
        if "vision_outputs" in batch:
            vision_outputs = CoPSVisionOutput(
                image_embeds=batch["vision_outputs"].image_embeds.to(device),
                patch_embeds=batch["vision_outputs"].patch_embeds.to(device),
            )
        else:
            vision_outputs = self._vision_outputs(vision_model, batch["pixel_values"])
            if cache is not None:
                self._store_real(cache, batch["indices"].tolist(), vision_outputs, masks)
        with accelerator.no_sync(self.wrapped_model) if not sync_now else nullcontext():
            with accelerator.autocast():
                outputs = self.wrapped_model(vision_outputs=vision_outputs, labels=labels, masks=masks)
            accelerator.backward(outputs.loss / group_size)
        if sync_now:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
        return outputs

    def _epoch_record(
        self, epoch: int, totals: torch.Tensor, seconds: float, cached_epoch: bool
    ) -> dict[str, Any]:
        """The epoch's log line: the mean loss and terms over every process's images, speed, and the data used.

        Args:
            totals: this process's `[1 + len(LOSS_TERMS) + 1]` sums (loss, terms) weighted by batch size, then the
                image count; summed over processes here.
        """
        totals = self.accelerator.reduce(totals, reduction="sum")
        means = (totals[:-1] / totals[-1]).tolist()
        num_images = int(totals[-1].item())
        record = {"epoch": epoch, "step": self.global_step, "loss": means[0]}
        record.update(dict(zip(LOSS_TERMS, means[1:], strict=True)))
        record.update(
            seconds=seconds,
            images_per_second=num_images / seconds,
            images=num_images,
            cached_features=cached_epoch,
            real_images=self.samples.num_real,
            synthetic_images=self.samples.num_synthetic,
            dataset=self.model.config.train_dataset,
            split=self.model.config.train_split,
            preset=self.model.config.train_preset,
        )
        if self.accelerator.is_main_process:
            logger.info("epoch %d: %s", epoch, json.dumps(record))
        return record

    # -- checkpoints ----------------------------------------------------------------------------------------

    def _trainer_state(self, epoch: int) -> dict[str, Any]:
        num_processes, num_samples = self.accelerator.num_processes, len(self.samples)
        return trainer_state(self.config, epoch, self.global_step, num_processes, num_samples, self.fingerprint)

    def _save_checkpoint(self, epoch: int) -> None:
        save_checkpoint(self.accelerator, self.output_dir, self._trainer_state(epoch), self.config.keep_checkpoints)

    def _resume(self) -> int:
        """Load the last complete checkpoint; return its epoch (0 when there is none)."""
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            logger.warning("No checkpoint in %s: starting a fresh run.", checkpoints_folder(self.output_dir))
            return 0
        for checkpoint in reversed(checkpoints):
            try:
                state = load_checkpoint(self.accelerator, checkpoint, self._trainer_state(0))
                break
            except CorruptCheckpointError as error:
                logger.warning("Checkpoint %s is damaged (%s): trying the one before it.", checkpoint.name, error)
        else:
            raise ValueError(
                f"No intact checkpoint in {checkpoints_folder(self.output_dir)}: start a new run (another output_dir)."
            )
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
        kept = []
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), start=1):
            try:
                epoch = json.loads(line)["epoch"] if line.strip() else None
            except (json.JSONDecodeError, TypeError, KeyError):
                logger.warning("Dropping line %d of %s: it is not a complete log record (a torn write).", number, log)
                continue
            if epoch is not None and epoch <= last_epoch:
                kept.append(line)
        with atomic_write(log) as temporary:
            temporary.write_text("".join(line + "\n" for line in kept))

    def _remove_interrupted_saves(self) -> None:
        """Delete what a run killed while saving left behind: staging folders of the final model and checkpoints."""
        staging = self.output_dir.glob(f"{STAGING_PREFIX}*")
        for folder in [*staging, *checkpoints_folder(self.output_dir).glob(".epoch-*")]:
            logger.warning("Removing %s, left by an interrupted save.", folder)
            shutil.rmtree(folder, ignore_errors=True)

    def _save_final(self) -> None:
        """The detector (model and processor) into `output_dir`, by `save_detector`: beside the run's other files."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            try:
                save_detector(self.model, self.processor, self.output_dir, into_existing=True)
            except OSError as error:
                checkpoints = checkpoints_folder(self.output_dir)
                raise OSError(
                    f"{error}; the checkpoints in {checkpoints} are kept: free disk space, then rerun with --resume"
                ) from error
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
    "TRAIN_LOG_FILENAME",
    "CoPSTrainer",
    "TrainingResult",
    "cops_model_for_training",
    "processor_for",
    "train_cops",
]

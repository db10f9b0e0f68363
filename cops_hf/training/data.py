"""Training samples: the meta.json training split as preprocessed tensors, and each epoch's index batches."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data import DEFECT_TYPES, apply_defect, labelled_split, load_meta_dataset, normal_split, split_label_counts
from ..processing_cops import CoPSImageProcessor
from ..schema import ANOMALOUS, NORMAL

logger = logging.getLogger(__name__)


def load_training_dataset(
    root: str | os.PathLike[str],
    categories: Sequence[str] | None = None,
    split: str | None = None,
    synthesize: bool = False,
) -> datasets.Dataset:
    """The labelled training images of `ROOT/meta.json` (see `cops_hf.data`).

    Args:
        root: dataset root holding meta.json; the error names the builders when it is missing.
        categories: only these categories (default: all of the split).
        split: the meta.json split to train on. By default the first split holding both normal and anomalous
            images (`cops_hf.data.labelled_split`): `test` for MVTec AD and VisA, the images the reference's
            `train.py` reads; `train` for a synthetic dataset. The split used and its counts are logged.
        synthesize: the run adds synthetic defects to the split's normal images (`TrainingConfig.synthesize`):
            the default split is then the first one holding normal images (`cops_hf.data.normal_split`).
    """
    if split is None:
        split = normal_split(root, categories) if synthesize else labelled_split(root, categories)
    normal, anomalous = split_label_counts(root, categories).get(split, (0, 0))
    logger.info("Training on split %r of %s: %d normal and %d anomalous images.", split, root, normal, anomalous)
    return load_meta_dataset(root, split=split, categories=categories)


def synthetic_defect(image: Image.Image, seed: int, epoch: int, index: int) -> tuple[Image.Image, np.ndarray]:
    """A synthetic anomalous copy of a normal image and its exact mask, derived from `(seed, epoch, index)`.

    The defect type is drawn first (one of `cops_hf.data.DEFECT_TYPES`); when it cannot change enough pixels of
    this image (e.g. `cutpaste` on a flat black image), the next types are tried in turn.

    Returns:
        The RGB image with the defect and its `(H, W)` bool mask.

    Raises:
        ValueError: the image is under 16 pixels per side, or no defect type changes it visibly.
    """
    pixels = np.asarray(image.convert("RGB"))
    rng = np.random.default_rng([seed, epoch, index])
    first = int(rng.integers(len(DEFECT_TYPES)))
    for offset in range(len(DEFECT_TYPES)):
        sample = apply_defect(pixels, DEFECT_TYPES[(first + offset) % len(DEFECT_TYPES)], rng)
        if sample is not None:
            return Image.fromarray(sample.image), sample.mask
    raise ValueError(f"No synthetic defect changes training image #{index} visibly (is it blank?); remove it.")


class TrainingSamples(Dataset):
    """Torch view of a meta.json `datasets.Dataset`: preprocessed images, binary masks and labels.

    Supervision follows the data. With masks (the usual auxiliary sets) every sample gets a mask: all-zero for
    normal images and, as in the reference, for anomalous images without one (a warning counts them). A dataset
    with no mask at all is image-level: the model is trained with `masks=None` (cls + kl (+ recon) only).

    With `synthesize`, the samples are the dataset's rows (indices `0..len(dataset)-1`, the real images) followed
    by one synthetic anomalous copy of each normal row (`synthetic_defect`, with its exact mask). A synthetic
    sample changes every epoch (`set_epoch`), so it must never be served from a feature cache: `is_synthetic`
    tells them apart. The split then needs normal images only; its anomalous images, if any, are kept (mixing).

    Args:
        dataset: rows as `cops_hf.data.load_meta_dataset` gives them.
        image_processor: turns images and masks into model inputs.
        synthesize: add the synthetic anomalous copies.
        seed: seed of the synthetic defects (with the epoch and the sample index).

    Raises:
        ValueError: missing columns, labels other than 0/1, a split without normal samples, or (without
            `synthesize`) without anomalous samples.
    """

    REQUIRED_COLUMNS = ("image", "mask", "gt_label")

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_processor: CoPSImageProcessor,
        synthesize: bool = False,
        seed: int = 0,
    ) -> None:
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
        self.num_real = len(self.labels)
        self.seed, self.epoch = seed, 0
        if synthesize and num_anomalous == len(self.labels):
            raise ValueError(
                f"The training split has no normal image ({len(self.labels)} images, all anomalous): --synthesize "
                "puts defects on normal images; add good images (`cops-hf data prepare folder ROOT --normal good`)."
            )
        if not synthesize and (num_anomalous == 0 or num_anomalous == len(self.labels)):
            missing_kind = ANOMALOUS if num_anomalous == 0 else NORMAL
            raise ValueError(
                f"The training split has no {missing_kind} sample ({len(self.labels)} images, {num_anomalous} "
                "anomalous). CoPS learns to tell normal from anomalous: train on an auxiliary set with both, "
                "e.g. VisA or MVTec AD with their test images and masks as the reference does; or add synthetic "
                "defects to the normal images (--synthesize)."
            )
        mask_paths = dataset["mask_path"] if "mask_path" in dataset.column_names else None
        has_mask = (
            [bool(path) for path in mask_paths]
            if mask_paths is not None
            else [mask is not None for mask in dataset["mask"]]
        )
        self.uses_masks = any(has_mask) or synthesize
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
        # The source row of each synthetic sample (index num_real + position).
        self.synthetic_sources = [index for index, label in enumerate(self.labels) if label == 0] if synthesize else []
        self.labels += [1] * len(self.synthetic_sources)

    @property
    def num_synthetic(self) -> int:
        """Synthetic anomalous samples per epoch (0 without `synthesize`)."""
        return len(self.synthetic_sources)

    def is_synthetic(self, index: int) -> bool:
        """Whether sample `index` is a synthetic copy, different every epoch (never to be cached)."""
        return index >= self.num_real

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose synthetic defects `__getitem__` renders (call before each epoch's loader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.is_synthetic(index):
            return self._synthetic_item(index)
        row = self.dataset[int(index)]
        # The mask file itself when known, so that cops_hf.processing_cops.load_mask reads it (mask rules).
        masks = [row.get("mask_path") or row["mask"]] if self.uses_masks else None
        processed = self.image_processor.preprocess([row["image"]], masks=masks)
        item = {"index": int(index), "pixel_values": processed["pixel_values"][0], "label": self.labels[index]}
        if self.uses_masks:
            item["mask"] = processed["masks"][0]
        return item

    def _synthetic_item(self, index: int) -> dict[str, Any]:
        image = self.dataset[self.synthetic_sources[index - self.num_real]]["image"]
        defective, mask = synthetic_defect(image, self.seed, self.epoch, index)
        processed = self.image_processor.preprocess([defective], masks=[mask])
        return {
            "index": index,
            "pixel_values": processed["pixel_values"][0],
            "label": 1,
            "mask": processed["masks"][0],
        }


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


__all__ = [
    "TrainingSamples",
    "collate_samples",
    "epoch_batches",
    "load_training_dataset",
    "synthetic_defect",
]

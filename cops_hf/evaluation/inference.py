"""The batched scoring loop that the evaluator and threshold calibration share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..image_utils import ImageLike
from ..modeling_cops import CoPSAnomalyDetectionOutput, CoPSForAnomalyDetection
from ..processing_cops import (
    CoPSProcessor,
    check_finite_scores,
    check_processor_matches_model,
    check_tiles_without_references,
)
from ..schema import ANOMALY_MAP, PRED_SCORE


@dataclass
class ImagePrediction:
    """The model's outputs for one image, at the model's input size (anomalib's field names).

    Attributes:
        index: position of the image in the scored sequence.
        pred_score: image anomaly score.
        anomaly_map: float32 `[H, W]` pixel anomaly scores.
        gt_mask: uint8 `[H, W]` ground-truth mask as the processor prepared it (1 = anomalous); `None` when no masks
            were given.
    """

    index: int
    pred_score: float
    anomaly_map: np.ndarray
    gt_mask: np.ndarray | None = None


def predict_images(
    model: CoPSForAnomalyDetection,
    processor: CoPSProcessor,
    images: Sequence[ImageLike],
    masks: Sequence[ImageLike | None] | None = None,
    *,
    batch_size: int = 8,
    seed: int = 0,
    show_progress: bool = False,
    tile_size: int | None = None,
    tile_overlap: float = 0.25,
) -> Iterator[ImagePrediction]:
    """Score `images` in batches of `batch_size` on the model's device and dtype, in order.

    Args:
        masks: ground-truth masks aligned with `images` (`None` entries are all-zero masks), read by `load_mask`.
        seed: seed of the class-token noise; every image gets the same samples (`seeded_prior_noise`), so an
            image's outputs do not depend on the batch it is in (up to float rounding).
        show_progress: show a tqdm bar over the batches.
        tile_size, tile_overlap: score each image by tiles (see `CoPSImageProcessor`), `batch_size` tiles per
            forward; the stitched map is resized to the model's input size, where the ground-truth masks are.

    Raises:
        NonFiniteScoreError: the model gave a NaN or infinite score (naming the image when it is a path).
        ValueError: the processor's image size is not the model's `config.image_size`.
    """
    check_processor_matches_model(processor, model.config.image_size, model.name_or_path or "the model")
    device = next(model.parameters()).device
    dtype = model.prompt_synthesizer.normal_context.dtype
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="scoring", disable=not show_progress):
        batch_images = list(images[start : start + batch_size])
        batch_masks = list(masks[start : start + batch_size]) if masks is not None else None
        features = processor(images=batch_images, masks=batch_masks, tile_size=tile_size, tile_overlap=tile_overlap)
        pixel_values = features["pixel_values"].to(device, dtype)
        noise = model.seeded_prior_noise(len(pixel_values), seed).to(device, dtype)
        with torch.no_grad():
            chunks = [
                model(pixel_values=pixel_values[rows], vae_noise=noise[rows])
                for rows in (slice(first, first + batch_size) for first in range(0, len(pixel_values), batch_size))
            ]
        outputs = CoPSAnomalyDetectionOutput(**{
            name: torch.cat([getattr(chunk, name) for chunk in chunks]).float().cpu()
            for name in ("image_scores", "anomaly_maps", "patch_scores", "global_scores")
        })  # fmt: skip
        tiles = features.get("tiles")
        if tiles is not None and any(len(boxes) > 1 for boxes in tiles):  # one tile is the untiled path
            check_tiles_without_references(model)
        owners = batch_images if tiles is None else [
            image for image, boxes in zip(batch_images, tiles, strict=True) for _ in boxes
        ]  # the image each row belongs to, to name it
        check_finite_scores(outputs.image_scores, owners)
        if tiles is None:
            scores, maps = outputs.image_scores.tolist(), outputs.anomaly_maps.numpy()
        else:
            size = tuple(pixel_values.shape[-2:])
            results = processor.post_process_anomaly_detection(
                outputs, target_sizes=[size] * len(batch_images), tiles=tiles,
                image_score_beta=model.config.image_score_beta,
            )  # fmt: skip
            scores = [result[PRED_SCORE] for result in results]
            maps = np.stack([result[ANOMALY_MAP].numpy() for result in results])
        for offset, (score, anomaly_map) in enumerate(zip(scores, maps, strict=True)):
            gt_mask = features["masks"][offset].numpy().astype(np.uint8) if batch_masks is not None else None
            yield ImagePrediction(start + offset, score, anomaly_map, gt_mask)


__all__ = ["ImagePrediction", "predict_images"]

"""Image/mask preprocessing, tokenizer and post-processing for CoPS.

Images follow the reference exactly (method spec, section 1): PIL bicubic resize to a square (aspect not kept)
in the image's own mode, conversion to RGB, scaling to [0, 1] and CLIP normalization. Masks: read by `load_mask`
(every non-zero pixel is a defect, at any bit depth), PIL bilinear resize of the 0/255 mask to the input size,
scaled to [0, 1], thresholded at 0.5. The mask rules are listed in docs/protocol.md.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature, CLIPTokenizer
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import ProcessorMixin

from .image_utils import ImageLike, ImageLoadError, describe_input, load_image, load_mask
from .schema import ANOMALY_MAP, PRED_LABEL, PRED_MASK, PRED_SCORE, Prediction, decision_label

logger = logging.getLogger(__name__)


class NonFiniteScoreError(ValueError):
    """The model produced a NaN or infinite score: its weights are broken, and no decision can be made."""


def check_finite_scores(image_scores: torch.Tensor, images: list | None = None) -> None:
    """Raise `NonFiniteScoreError` naming the first image whose score is NaN or infinite (`images` names them)."""
    finite = torch.isfinite(image_scores.detach())
    if bool(finite.all()):
        return
    index = int((~finite).nonzero()[0])
    named = images is not None and isinstance(images[index], (str, os.PathLike))
    what = f"'{images[index]}'" if named else f"image #{index} of the batch"
    raise NonFiniteScoreError(
        f"The model gave a non-finite anomaly score ({float(image_scores[index])}) for {what}: its weights hold "
        "NaN or infinite values. Reload, reconvert or retrain the model; no label is given for such a score."
    )


def check_threshold(value: Any, name: str = "threshold") -> float:
    """`value` as a float when it is a finite number in [0, 1] (scores and maps are probabilities); else ValueError."""
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}.")
    return float(value)


def check_tiling(tile_size: Any, tile_overlap: Any) -> tuple[int | None, float]:
    """`(tile_size, tile_overlap)` checked: `tile_size` None (no tiling) or a positive int; overlap in [0, 1)."""
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer))
                                  or tile_size < 1):  # fmt: skip
        raise ValueError(f"tile_size must be a positive number of pixels (or None for no tiling), got {tile_size!r}.")
    is_number = isinstance(tile_overlap, (int, float, np.integer, np.floating)) and not isinstance(tile_overlap, bool)
    if not is_number or not 0.0 <= tile_overlap < 1.0:
        raise ValueError(f"tile_overlap must be a fraction of the tile in [0, 1), got {tile_overlap!r}.")
    return (None if tile_size is None else int(tile_size)), float(tile_overlap)


def check_tiles_without_references(model: Any) -> None:
    """Refuse tiled scoring for a model holding few-shot references (`model.num_references > 0`).

    Stitching re-fuses each image's score from its tiles' zero-shot parts; the reference-map part is not stitched
    yet, so such a score would silently drop it.
    """
    if getattr(model, "num_references", 0):
        raise ValueError(
            f"Tiled scoring does not support a model holding references yet ({model.num_references} set): score "
            "without tile_size (--tile), or clear the references (model.clear_references())."
        )


def _tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `length` pixels.

    Consecutive tiles overlap by at least `overlap` of a tile; the last tile ends at the edge.
    """
    if tile >= length:
        return [0]
    stride = max(1, math.floor(tile * (1.0 - overlap)))  # floor: the overlap is at least the fraction
    count = math.ceil((length - tile) / stride) + 1
    return [min(index * stride, length - tile) for index in range(count)]


def tile_boxes(height: int, width: int, tile_size: int, tile_overlap: float) -> list[tuple[int, int, int, int]]:
    """The `(top, left, height, width)` boxes of the tiles of a `height x width` image, row by row.

    A tile is `tile_size` pixels square, clipped to the image: an image no larger than a tile is one box, the whole
    image (then tiling changes nothing).
    """
    tile_height, tile_width = min(tile_size, height), min(tile_size, width)
    return [
        (top, left, tile_height, tile_width)
        for top in _tile_starts(height, tile_height, tile_overlap)
        for left in _tile_starts(width, tile_width, tile_overlap)
    ]


def _blend_ramp(start: int, length: int, total: int, ramp: int) -> torch.Tensor:
    """Weights `[length]` of one tile along one axis, always positive.

    They rise over `ramp` pixels from an edge shared with another tile and stay flat (1) towards the image's edges.
    """
    positions = torch.arange(length, dtype=torch.float32) + 0.5
    weights = torch.ones(length)
    if start > 0:
        weights = torch.minimum(weights, positions / ramp)
    if start + length < total:
        weights = torch.minimum(weights, (length - positions + 1.0) / ramp)
    return weights


def stitch_tiles(
    tile_maps: torch.Tensor, boxes: Sequence[Sequence[int]], mode: str = "bilinear", ramp: int | None = None
) -> torch.Tensor:
    """Blend per-tile maps back into one map of the whole image.

    Args:
        tile_maps: `[T, h, w]` maps, one per box, at any resolution (each is resized to its box).
        boxes: `(top, left, height, width)` of each tile in the image (from `tile_boxes`).
        mode: interpolation of a tile map to its box ("bilinear" for anomaly maps, "nearest" for patch scores).
        ramp: width in pixels of the linear cross-fade where tiles overlap (default: the overlap of the first two
            tiles along each axis, at least 1).

    Returns:
        `[H, W]` float32: at each pixel the weighted mean of the tiles covering it.
    """
    height = max(top + size for top, _, size, _ in boxes)
    width = max(left + size for _, left, _, size in boxes)
    ramps = ramp or _overlap_ramp(boxes)
    total = torch.zeros(height, width)
    weight_sum = torch.zeros(height, width)
    for tile_map, (top, left, box_height, box_width) in zip(tile_maps.float(), boxes, strict=True):
        options = {"align_corners": False} if mode == "bilinear" else {}
        resized = F.interpolate(tile_map[None, None], size=(box_height, box_width), mode=mode, **options)[0, 0]
        weights = torch.outer(
            _blend_ramp(top, box_height, height, ramps[0]), _blend_ramp(left, box_width, width, ramps[1])
        )  # [h, w]
        total[top : top + box_height, left : left + box_width] += resized * weights
        weight_sum[top : top + box_height, left : left + box_width] += weights
    return total / weight_sum


def _overlap_ramp(boxes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Cross-fade widths (rows, columns): how much the first tile overlaps the next one along each axis."""
    top, left, box_height, box_width = boxes[0]
    next_top = min((other[0] for other in boxes if other[0] > top), default=None)
    next_left = min((other[1] for other in boxes if other[1] > left), default=None)
    rows = top + box_height - next_top if next_top is not None else 1
    columns = left + box_width - next_left if next_left is not None else 1
    return max(1, rows), max(1, columns)




def check_processor_matches_model(processor: Any, image_size: int, source: str = "the model") -> None:
    """Refuse a processor that resizes images to another size than the model's `config.image_size`.

    The model takes any multiple of its patch size, so a mismatch would silently change every score; neither side
    wins: the pipeline, `predict_images` and `load_model_and_processor` call this before scoring anything.

    Args:
        processor: a `CoPSProcessor` (or its `CoPSImageProcessor`).
        image_size: the model's `config.image_size`.
        source: the model folder or Hub id, for the message.

    Raises:
        ValueError: the sizes differ (the message gives both and the fix).
    """
    image_processor = getattr(processor, "image_processor", processor)
    size = getattr(image_processor, "size", None)
    if size is not None and size != image_size:
        raise ValueError(
            f"The processor of {source} resizes images to {size} px but the model's config.json says image_size="
            f"{image_size}: scores would silently change. Use the processor saved with the model, or "
            f"CoPSProcessor.for_image_size({image_size}) (save both again to fix the folder)."
        )


class CoPSImageProcessor(BaseImageProcessor):
    r"""Turns images (and optional masks) into CoPS inputs, exactly as the reference preprocesses them.

    Args:
        size (`int`): square side in pixels (518 for the official checkpoints).
        image_mean, image_std (`list[float]`): CLIP normalization.
        tile_size (`int`, *optional*): score large images by tiles of this many ORIGINAL pixels (each tile is then
            resized to `size` like a whole image), e.g. 518 for 2,000-5,000 px inspection images where a thin defect
            would vanish in one 518 px resize. `None` (default): the whole image, resized.
        tile_overlap (`float`): fraction of a tile shared with its neighbour (default 0.25); the overlaps are
            cross-faded when `post_process_anomaly_detection` stitches the maps.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 518,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.size = int(size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.tile_size, self.tile_overlap = check_tiling(tile_size, tile_overlap)

    def __call__(self, images: ImageLike | Sequence[ImageLike], **kwargs: Any) -> BatchFeature:
        """Same as `preprocess`."""
        return self.preprocess(images, **kwargs)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> normalized `[3, size, size]` float tensor."""
        resized = image.resize((self.size, self.size), Image.Resampling.BICUBIC).convert("RGB")
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (pixels - mean) / std

    def preprocess_mask(self, mask: ImageLike) -> torch.Tensor:
        """One mask (read by `load_mask`: any non-zero pixel is anomalous) -> binary `[size, size]` float tensor."""
        binary = Image.fromarray(load_mask(mask).astype(np.uint8) * 255, mode="L")
        resized = binary.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy((np.asarray(resized, dtype=np.float32) / 255.0 > 0.5).astype(np.float32))

    def preprocess(
        self,
        images: ImageLike | Sequence[ImageLike],
        masks: ImageLike | Sequence[ImageLike | None] | None = None,
        return_tensors: str | None = "pt",
        tile_size: int | None | str = "default",
        tile_overlap: float | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocess a batch.

        Args:
            images: one image or a list (paths, PIL images of any mode, numpy arrays, tensors).
            masks: optional masks, one per image (`None` entries mean "normal": an all-zero mask), read by
                `load_mask`. A mask whose size differs from its image's is resized on its own to the input size,
                with a warning that names it.
            return_tensors: "pt" (torch tensors, the default) or "np" (numpy arrays) for `pixel_values` and
                `masks`.
            tile_size, tile_overlap: tiling for this call (default: the processor's `tile_size`/`tile_overlap`;
                `tile_size=None` turns it off).

        Returns:
            `BatchFeature` with `pixel_values` `[B, 3, size, size]`, `original_sizes` (list of `(height, width)`)
            and, when masks are given, `masks` `[B, size, size]`. With tiling, `pixel_values` holds every tile of
            every image, image after image (`[sum of tiles, 3, size, size]`), and `tiles` lists each image's boxes
            `(top, left, height, width)` for `post_process_anomaly_detection(outputs, tiles=...)`; masks stay one
            per image.
        """
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or 'np'.")
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        if not image_list:
            raise ImageLoadError("No images were given.")
        tile_size = self.tile_size if tile_size == "default" else tile_size
        tile_size, tile_overlap = check_tiling(tile_size, self.tile_overlap if tile_overlap is None else tile_overlap)
        loaded = [load_image(item, index) for index, item in enumerate(image_list)]
        data: dict[str, Any] = {"original_sizes": [(image.height, image.width) for image in loaded]}
        if tile_size is None:
            data["pixel_values"] = torch.stack([self.preprocess_image(image) for image in loaded])
        else:
            data["tiles"] = [tile_boxes(image.height, image.width, tile_size, tile_overlap) for image in loaded]
            data["pixel_values"] = torch.stack([
                self.preprocess_image(image.crop((left, top, left + width, top + height)))
                for image, boxes in zip(loaded, data["tiles"], strict=True)
                for top, left, height, width in boxes
            ])  # fmt: skip
        if masks is not None:
            mask_list = list(masks) if isinstance(masks, (list, tuple)) else [masks]
            if len(mask_list) != len(loaded):
                raise ImageLoadError(f"Got {len(mask_list)} masks for {len(loaded)} images; give one per image.")
            processed = []
            for index, (mask_item, image) in enumerate(zip(mask_list, loaded, strict=True)):
                if mask_item is None:
                    processed.append(torch.zeros(self.size, self.size))
                    continue
                mask = load_mask(mask_item, index)
                if mask.shape != (image.height, image.width):
                    logger.warning(
                        "Mask %s is %dx%d but its image %s is %dx%d; resizing the mask on its own to %d px.",
                        describe_input(mask_item, index), mask.shape[1], mask.shape[0],
                        describe_input(image_list[index], index), image.width, image.height, self.size,
                    )  # fmt: skip
                processed.append(self.preprocess_mask(mask))
            data["masks"] = torch.stack(processed)
        if return_tensors == "np":
            data = {name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in data.items()}
        return BatchFeature(data=data, tensor_type=None)


def packaged_tokenizer() -> CLIPTokenizer:
    """CLIP's BPE tokenizer from the vocabulary shipped with cops_hf (works offline)."""
    with resources.as_file(resources.files("cops_hf") / "assets" / "clip_tokenizer") as directory:
        return CLIPTokenizer.from_pretrained(str(directory))


def prompt_template(num_context_tokens: int) -> str:
    """The text of the CoPS prompt template: `num_context_tokens` placeholders "X" and a full stop."""
    return " ".join(["X"] * num_context_tokens) + "."


def prompt_suffix_token_ids(tokenizer: CLIPTokenizer | None = None) -> list[int]:
    """The ids the tokenizer gives to the template's text after its placeholders (".").

    Start and end tokens are left out; `tokenizer` defaults to the packaged CLIP tokenizer.
    """
    tokenizer = tokenizer or packaged_tokenizer()
    with_suffix = tokenizer(prompt_template(1))["input_ids"]
    placeholder_only = tokenizer(prompt_template(1)[:-1])["input_ids"]
    return with_suffix[len(placeholder_only) - 1 : -1]


class CoPSProcessor(ProcessorMixin):
    r"""CoPS processor: `CoPSImageProcessor` for images and masks plus a CLIP tokenizer.

    Class names are carried through untouched (for per-category metrics). The tokenizer gives the prompt
    template's token ids (`"X X ... X."`): `CoPSConfig.from_clip_config` takes the suffix ids from it. CoPS itself
    needs no text input.
    """

    def __init__(self, image_processor: CoPSImageProcessor | None = None, tokenizer: CLIPTokenizer | None = None):
        super().__init__(image_processor or CoPSImageProcessor(), tokenizer or packaged_tokenizer())

    @classmethod
    def for_image_size(cls, image_size: int) -> CoPSProcessor:
        """The default processor for a model whose input is `image_size` pixels (`config.image_size`)."""
        return cls(CoPSImageProcessor(size=image_size))

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike] | None = None,
        masks: ImageLike | Sequence[ImageLike | None] | None = None,
        class_names: str | Sequence[str] | None = None,
        text: str | list[str] | None = None,
        return_tensors: str = "pt",
        tile_size: int | None | str = "default",
        tile_overlap: float | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocess images (and masks); tokenize `text` if given; pass `class_names` through.

        `return_tensors` ("pt" or "np") applies to the image and mask arrays and to the token ids. `tile_size` and
        `tile_overlap` override the image processor's tiling for this call (see `CoPSImageProcessor.preprocess`).
        """
        if images is None and text is None:
            raise ValueError("Pass images (and optionally masks / class_names) or text.")
        features = BatchFeature()
        if images is not None:
            features = self.image_processor(
                images, masks=masks, return_tensors=return_tensors, tile_size=tile_size, tile_overlap=tile_overlap
            )
            if class_names is not None:
                names = [class_names] if isinstance(class_names, str) else list(class_names)
                if len(names) != len(features["original_sizes"]):
                    raise ValueError(f"Got {len(names)} class names for {len(features['original_sizes'])} images.")
                features["class_names"] = names
        if text is not None:
            features.update(self.tokenizer(text, return_tensors=return_tensors, padding=True))
        return features

    def prompt_template_ids(self, num_context_tokens: int) -> list[int]:
        """Token ids of the CoPS prompt template with `num_context_tokens` placeholders ("X ... X.")."""
        return self.tokenizer(prompt_template(num_context_tokens))["input_ids"]

    def prompt_suffix_token_ids(self) -> list[int]:
        """Token ids between the template's placeholders and its end token (those of ".").

        `CoPSConfig.prompt_suffix_token_ids` holds them (`PROMPT_SUFFIX_TOKEN_IDS`).
        """
        return prompt_suffix_token_ids(self.tokenizer)

    def post_process_anomaly_detection(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | None = None,
        threshold: float | None = None,
        image_threshold: float | None = None,
        tiles: Sequence[Sequence[Sequence[int]]] | None = None,
        image_score_beta: float | None = None,
    ) -> list[dict[str, Any]]:
        """Per image: `pred_score`, `anomaly_map` at the original size and, with thresholds, `pred_mask`, `pred_label`.

        The keys are `cops_hf.schema`'s; the former `score`, `mask` and `label` still read, with a
        `DeprecationWarning`, for one release.

        Args:
            outputs: a `CoPSAnomalyDetectionOutput` (needs `image_scores` and `anomaly_maps`; with `tiles` also
                `patch_scores` and `global_scores`).
            target_sizes: `(height, width)` per image, e.g. the processor's `original_sizes`; maps are resized
                bilinearly. `None` uses `outputs.original_sizes` when the model was given them, else keeps the
                resolution of the maps (with `tiles`: the original size the boxes cover, or the model's for an image
                of one tile).
            threshold: pixel threshold on the map: adds a boolean `pred_mask`.
            image_threshold: threshold on the score: adds `pred_label` ("anomalous" / "normal").
            tiles: each image's tile boxes, as the processor returned them with `tile_size`; `outputs` then holds
                one row per tile, image after image. An image of several tiles gets its map stitched (see
                `stitch_tiles`) and its score by the model's rule applied to the stitched result: `image_score_beta`
                times the highest class-token probability of its tiles, plus `1 - image_score_beta` times the
                maximum of the stitched patch-score map. An image of one tile keeps the model's own score and map.
            image_score_beta: the model's `config.image_score_beta`; needed with `tiles`.

        The decision rule, here and in calibration: a value `>=` its threshold is anomalous (calibrated thresholds
        are attained values, e.g. the lowest anomalous score kept by the F1-optimal choice).
        """
        scores = outputs.image_scores.detach().float().cpu()
        check_finite_scores(scores)
        threshold = None if threshold is None else check_threshold(threshold, "threshold")
        image_threshold = None if image_threshold is None else check_threshold(image_threshold, "image_threshold")
        maps = outputs.anomaly_maps.detach().float().cpu()
        if tiles is not None:
            scores, maps = self._stitch(outputs, scores, maps, tiles, image_score_beta)
        if target_sizes is None:
            target_sizes = getattr(outputs, "original_sizes", None)
        if target_sizes is not None and len(target_sizes) != len(scores):
            raise ValueError(f"Got {len(target_sizes)} target sizes for {len(scores)} images.")
        results = []
        for index, (score, anomaly_map) in enumerate(zip(scores, maps, strict=True)):
            if target_sizes is not None and tuple(target_sizes[index]) != tuple(anomaly_map.shape):
                anomaly_map = F.interpolate(
                    anomaly_map[None, None], size=tuple(target_sizes[index]), mode="bilinear", align_corners=False
                )[0, 0]
            result = Prediction({PRED_SCORE: float(score), ANOMALY_MAP: anomaly_map})
            if threshold is not None:
                result[PRED_MASK] = anomaly_map >= threshold
            if image_threshold is not None:
                result[PRED_LABEL] = decision_label(float(score), image_threshold)
            results.append(result)
        return results

    @staticmethod
    def _stitch(
        outputs: Any,
        scores: torch.Tensor,
        maps: torch.Tensor,
        tiles: Sequence[Sequence[Sequence[int]]],
        image_score_beta: float | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image, the score and the map of its tiles' rows (see `post_process_anomaly_detection`)."""
        if sum(len(boxes) for boxes in tiles) != len(scores):
            raise ValueError(f"Got {len(scores)} tile outputs for {sum(len(boxes) for boxes in tiles)} tile boxes.")
        if image_score_beta is None:
            raise ValueError("Stitching tiles needs image_score_beta (the model's config.image_score_beta).")
        image_scores, image_maps, start = [], [], 0
        for boxes in tiles:
            rows = slice(start, start + len(boxes))
            start += len(boxes)
            if len(boxes) == 1:  # the whole image in one tile: the model's own result, unchanged
                image_scores.append(scores[rows][0])
                image_maps.append(maps[rows][0])
                continue
            patch_scores = outputs.patch_scores[rows].detach().float().cpu()  # [T, N]
            side = math.isqrt(patch_scores.shape[-1])
            patch_map = stitch_tiles(patch_scores.view(-1, side, side), boxes, mode="nearest")  # [H, W]
            global_part = outputs.global_scores[rows].detach().float().cpu().amax()
            image_scores.append(image_score_beta * global_part + (1.0 - image_score_beta) * patch_map.amax())
            image_maps.append(stitch_tiles(maps[rows], boxes))
        return image_scores, image_maps


__all__ = [
    "CoPSImageProcessor",
    "CoPSProcessor",
    "NonFiniteScoreError",
    "check_finite_scores",
    "check_processor_matches_model",
    "check_threshold",
    "packaged_tokenizer",
    "check_tiles_without_references",
    "check_tiling",
    "prompt_suffix_token_ids",
    "prompt_template",
    "stitch_tiles",
    "tile_boxes",
]

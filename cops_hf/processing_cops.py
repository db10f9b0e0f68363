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


class CoPSImageProcessor(BaseImageProcessor):
    r"""Turns images (and optional masks) into CoPS inputs, exactly as the reference preprocesses them.

    Args:
        size (`int`): square side in pixels (518 for the official checkpoints).
        image_mean, image_std (`list[float]`): CLIP normalization.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 518,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.size = int(size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

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

        Returns:
            `BatchFeature` with `pixel_values` `[B, 3, size, size]`, `original_sizes` (list of `(height, width)`)
            and, when masks are given, `masks` `[B, size, size]`.
        """
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or 'np'.")
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        if not image_list:
            raise ImageLoadError("No images were given.")
        loaded = [load_image(item, index) for index, item in enumerate(image_list)]
        data: dict[str, Any] = {
            "pixel_values": torch.stack([self.preprocess_image(image) for image in loaded]),
            "original_sizes": [(image.height, image.width) for image in loaded],
        }
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
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocess images (and masks); tokenize `text` if given; pass `class_names` through.

        `return_tensors` ("pt" or "np") applies to the image and mask arrays and to the token ids.
        """
        if images is None and text is None:
            raise ValueError("Pass images (and optionally masks / class_names) or text.")
        features = BatchFeature()
        if images is not None:
            features = self.image_processor(images, masks=masks, return_tensors=return_tensors)
            if class_names is not None:
                names = [class_names] if isinstance(class_names, str) else list(class_names)
                if len(names) != len(features["pixel_values"]):
                    raise ValueError(f"Got {len(names)} class names for {len(features['pixel_values'])} images.")
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
    ) -> list[dict[str, Any]]:
        """Per image: `pred_score`, `anomaly_map` at the original size and, with thresholds, `pred_mask`, `pred_label`.

        The keys are `cops_hf.schema`'s; the former `score`, `mask` and `label` still read, with a
        `DeprecationWarning`, for one release.

        Args:
            outputs: a `CoPSAnomalyDetectionOutput` (needs `image_scores` and `anomaly_maps`).
            target_sizes: `(height, width)` per image, e.g. the processor's `original_sizes`; maps are resized
                bilinearly. `None` uses `outputs.original_sizes` when the model was given them, else keeps the
                model resolution.
            threshold: pixel threshold on the map: adds a boolean `pred_mask`.
            image_threshold: threshold on the score: adds `pred_label` ("anomalous" / "normal").

        The decision rule, here and in calibration: a value `>=` its threshold is anomalous (calibrated thresholds
        are attained values, e.g. the lowest anomalous score kept by the F1-optimal choice).
        """
        scores = outputs.image_scores.detach().float().cpu()
        check_finite_scores(scores)
        threshold = None if threshold is None else check_threshold(threshold, "threshold")
        image_threshold = None if image_threshold is None else check_threshold(image_threshold, "image_threshold")
        maps = outputs.anomaly_maps.detach().float().cpu()
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


__all__ = [
    "CoPSImageProcessor",
    "CoPSProcessor",
    "NonFiniteScoreError",
    "check_finite_scores",
    "check_threshold",
    "packaged_tokenizer",
    "prompt_suffix_token_ids",
    "prompt_template",
]

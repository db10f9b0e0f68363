"""Image/mask preprocessing, tokenizer and post-processing for CoPS.

Images follow the reference exactly (method spec, section 1): PIL bicubic resize to a square (aspect not kept)
in the image's own mode, conversion to RGB, scaling to [0, 1] and CLIP normalization. Masks: read by `load_mask`
(every non-zero pixel is a defect, at any bit depth), PIL bilinear resize of the 0/255 mask to the input size,
scaled to [0, 1], thresholded at 0.5. The mask rules are listed in docs/protocol.md.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, CLIPTokenizer
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import ProcessorMixin

logger = logging.getLogger(__name__)

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

# Modes PIL cannot resample with bicubic or convert to RGB faithfully: rescaled to 8-bit first.
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def decision_label(score: float, image_threshold: float) -> str:
    """The decision for an image score: "anomalous" when `score >= image_threshold`, else "normal"."""
    return "anomalous" if score >= image_threshold else "normal"


class ImageLoadError(ValueError):
    """An input image or mask cannot be read or has the wrong layout."""


class NonFiniteScoreError(ValueError):
    """The model produced a NaN or infinite score: its weights are broken, and no decision can be made."""


def check_finite_scores(image_scores: torch.Tensor, images: list | None = None) -> None:
    """Raise [`NonFiniteScoreError`] naming the first image whose score is NaN or infinite (`images` names them)."""
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


def image_size_problem(width: int, height: int) -> str | None:
    """Why an image of `width` x `height` pixels is refused (None when it is not): over `PIL.Image.MAX_IMAGE_PIXELS`.

    The limit guards against decompression bombs (a small file declaring a huge image); raise it, as PIL documents,
    for genuine large images.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or width * height <= limit:
        return None
    return f"is {width}x{height} pixels, {_over_pixel_limit()}"


MAX_IMAGE_PIXELS_ENV = "COPS_HF_MAX_IMAGE_PIXELS"
"""Environment variable the CLI reads to set `PIL.Image.MAX_IMAGE_PIXELS` (the decompression-bomb limit)."""


def apply_pixel_limit_from_environment() -> None:
    """Set `PIL.Image.MAX_IMAGE_PIXELS` from `COPS_HF_MAX_IMAGE_PIXELS` when it is set (the CLI does this)."""
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{MAX_IMAGE_PIXELS_ENV} must be a positive number of pixels, got {value!r}.")
        Image.MAX_IMAGE_PIXELS = int(value)


def _over_pixel_limit() -> str:
    return (
        f"over the limit of {Image.MAX_IMAGE_PIXELS} pixels that guards against decompression bombs; if the image is "
        f"genuine, raise PIL.Image.MAX_IMAGE_PIXELS ({MAX_IMAGE_PIXELS_ENV} for the CLI)"
    )


@contextmanager
def open_image_file(path: str | os.PathLike, what: str) -> Iterator[Image.Image]:
    """`PIL.Image.open(path)` (header read, pixels not yet decoded) refusing images over the pixel limit.

    Errors while opening, and while decoding inside the block, become one-line `ImageLoadError`s starting with
    `what` (e.g. "Image file 'a.png'").
    """
    try:
        with warnings.catch_warnings():  # a size over the limit is refused here, with what to do about it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if problem := image_size_problem(*opened.size):
                    raise ImageLoadError(f"{what} {problem}.")
                yield opened
    except Image.DecompressionBombError as error:
        pixels = 2 * Image.MAX_IMAGE_PIXELS  # PIL refuses to open images over twice its limit
        raise ImageLoadError(f"{what} declares more than {pixels} pixels, {_over_pixel_limit()}.") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageLoadError):
            raise
        raise ImageLoadError(f"{what} cannot be read ({error}); it is not an image or is truncated.") from error


def _describe(item: Any, index: int) -> str:
    return f"'{item}'" if isinstance(item, (str, os.PathLike)) else f"input #{index} ({type(item).__name__})"


def _array_to_pil(array: np.ndarray, what: str) -> Image.Image:
    """Turn an HxW, HxWxC or CxHxW array (uint8, uint16, bool or float in [0, 1]) into a PIL image."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CxHxW -> HxWxC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(f"{what}: expected an HxW, HxWx3 or HxWx4 array, got shape {list(array.shape)}.")
    if array.size == 0:
        raise ImageLoadError(f"{what}: the array has no pixels (shape {list(array.shape)}).")
    if array.dtype == bool:
        return Image.fromarray(array.astype(np.uint8) * 255)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ImageLoadError(f"{what}: float arrays must hold finite values in [0, 1].")
        return Image.fromarray(np.round(array * 255.0).astype(np.uint8))
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    if np.issubdtype(array.dtype, np.integer) and array.ndim == 2:
        return _rescale_to_8bit(array.astype(np.float64))
    if np.issubdtype(array.dtype, np.integer):
        raise ImageLoadError(
            f"{what}: {array.dtype} arrays must be single-channel (HxW); give colour images as uint8, or as float in "
            "[0, 1]."
        )
    raise ImageLoadError(f"{what}: unsupported array dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1].")


def _rescale_to_8bit(values: np.ndarray) -> Image.Image:
    """Min-max scale a single-channel high-bit-depth image to an 8-bit 'L' image."""
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return Image.fromarray(np.round(scaled * 255.0).astype(np.uint8), mode="L")


URL_TIMEOUT = 30.0
"""Seconds an image URL may take to answer (see `load_image`)."""


def _download_image(url: str, timeout: float | None) -> Image.Image:
    """The image at an http(s) URL, read fully into memory."""
    from urllib.error import URLError
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=URL_TIMEOUT if timeout is None else timeout) as response:
            content = response.read()
    except (URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ImageLoadError(f"Image URL '{url}' cannot be downloaded ({reason}); check the address.") from error
    try:
        with Image.open(io.BytesIO(content)) as opened:
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageLoadError(f"Image URL '{url}' did not return a readable image ({error}).") from error


def _open_image(item: ImageLike, index: int, timeout: float | None = None) -> Image.Image:
    """Open a path, URL, PIL image, numpy array or tensor as a PIL image in its own mode, with clear errors."""
    what = _describe(item, index)
    if isinstance(item, str) and item.startswith(("http://", "https://")):
        return _download_image(item, timeout)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_dir():
            raise ImageLoadError(f"Image file {what} is a directory; give the image files in it.")
        if not path.is_file():
            raise ImageLoadError(f"Image file {what} does not exist; check the path.")
        with open_image_file(path, f"Image file {what}") as opened:
            opened.load()
            return opened.copy()
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, torch.Tensor):
        return _array_to_pil(item.detach().cpu().numpy(), what)
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, what)
    raise ImageLoadError(f"{what}: expected a path, PIL image, numpy array or tensor.")


def load_image(item: ImageLike, index: int = 0, timeout: float | None = None) -> Image.Image:
    """Open a path, http(s) URL, PIL image, numpy array or tensor as a PIL image (mode kept), with clear errors.

    High-bit-depth single-channel images (16-bit, 32-bit, float) are min-max scaled to 8 bits.

    Args:
        index: position of `item` in its batch, for messages about unnamed inputs.
        timeout: seconds a URL may take to answer (default `URL_TIMEOUT`).
    """
    image = _open_image(item, index, timeout)
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        image = _rescale_to_8bit(np.asarray(image, dtype=np.float64))
    return image


def load_mask(item: ImageLike, index: int = 0) -> np.ndarray:
    """A ground-truth mask as a boolean `[H, W]` array: True where the mask marks a defect.

    Every non-zero pixel is a defect, whatever the bit depth: a 16-bit mask of 0/1/1000 keeps its 1s (no
    scaling to 8 bits first). Colour and palette masks are read as the reference reads them (PIL's conversion to
    `L`, then non-zero). A mask with an alpha channel whose colour is black everywhere but whose alpha varies marks
    its defect in the alpha channel alone: then non-zero alpha is the defect, with a warning naming the file.
    Boolean, integer and float arrays: non-zero is a defect.
    """
    if isinstance(item, (np.ndarray, torch.Tensor)):
        array = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else item
        if array.ndim == 2:
            return array != 0
    mask = _open_image(item, index)
    if mask.mode in _HIGH_BIT_DEPTH_MODES:
        return np.asarray(mask) != 0
    colour = np.asarray(mask.convert("L")) > 0
    if "A" in mask.getbands() and not colour.any():
        alpha = np.asarray(mask.getchannel("A"))
        if alpha.min() != alpha.max():
            logger.warning(
                "Mask %s is black with a varying alpha channel: reading the alpha channel as the defect.",
                _describe(item, index),
            )
            return alpha > 0
    return colour


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
                        _describe(mask_item, index), mask.shape[1], mask.shape[0],
                        _describe(image_list[index], index), image.width, image.height, self.size,
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
    """The ids the tokenizer gives to the template's text after its placeholders ("."), without start and end
    tokens; the packaged CLIP tokenizer when `tokenizer` is None."""
    tokenizer = tokenizer or packaged_tokenizer()
    with_suffix = tokenizer(prompt_template(1))["input_ids"]
    placeholder_only = tokenizer(prompt_template(1)[:-1])["input_ids"]
    return with_suffix[len(placeholder_only) - 1 : -1]


class CoPSProcessor(ProcessorMixin):
    r"""CoPS processor: [`CoPSImageProcessor`] for images and masks plus a CLIP tokenizer.

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

    @classmethod
    def from_official(cls, release: str = "visa") -> CoPSProcessor:
        """The processor of the official detector `release` (see `CoPSForAnomalyDetection.from_official`)."""
        try:  # absolute and guarded: the code files saved next to a model for trust_remote_code stay self-contained
            from cops_hf.official import OFFICIAL_IMAGE_SIZE, official_release
        except ImportError as error:
            raise ImportError("from_official needs the cops-hf package installed") from error
        official_release(release)
        return cls.for_image_size(OFFICIAL_IMAGE_SIZE)

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
        """Token ids between the template's placeholders and its end token (those of "."): what
        `CoPSConfig.prompt_suffix_token_ids` holds."""
        return prompt_suffix_token_ids(self.tokenizer)

    def post_process_anomaly_detection(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | None = None,
        threshold: float | None = None,
        image_threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        """Per image: `score`, `anomaly_map` at the original size and, with thresholds, `mask` and `label`.

        Args:
            outputs: a `CoPSAnomalyDetectionOutput` (needs `image_scores` and `anomaly_maps`).
            target_sizes: `(height, width)` per image, e.g. the processor's `original_sizes`; maps are resized
                bilinearly. `None` uses `outputs.original_sizes` when the model was given them, else keeps the
                model resolution.
            threshold: pixel threshold on the map: adds a boolean `mask`.
            image_threshold: threshold on the score: adds `label` ("anomalous" / "normal").

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
            result: dict[str, Any] = {"score": float(score), "anomaly_map": anomaly_map}
            if threshold is not None:
                result["mask"] = anomaly_map >= threshold
            if image_threshold is not None:
                result["label"] = decision_label(float(score), image_threshold)
            results.append(result)
        return results


__all__ = [
    "CoPSImageProcessor",
    "CoPSProcessor",
    "ImageLoadError",
    "decision_label",
    "NonFiniteScoreError",
    "MAX_IMAGE_PIXELS_ENV",
    "apply_pixel_limit_from_environment",
    "check_finite_scores",
    "check_threshold",
    "image_size_problem",
    "open_image_file",
    "load_image",
    "load_mask",
    "packaged_tokenizer",
    "prompt_suffix_token_ids",
    "prompt_template",
]

"""Reading images and masks from anything a user hands us, with one-line errors and the pixel limit.

The one home of image reading: the processor, the data loaders, predict, the app and evaluation all call
`load_image` / `load_mask` / `open_image_file`, and `IMAGE_SUFFIXES` says which files a folder scan picks up.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
"""File suffixes (lower case) a folder scan treats as images."""


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names an image file by its suffix (see `IMAGE_SUFFIXES`)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


# Modes PIL cannot resample with bicubic or convert to RGB faithfully: rescaled to 8-bit first.
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageLoadError(ValueError):
    """An input image or mask cannot be read or has the wrong layout."""


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


def describe_input(item: Any, index: int) -> str:
    """How messages name an input: its path in quotes, or its position and type when it has no name."""
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
    what = describe_input(item, index)
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
                describe_input(item, index),
            )
            return alpha > 0
    return colour


def expand_image_sources(sources: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Image paths from files, folders (searched recursively, sorted, hidden entries skipped) and glob patterns.

    Raises:
        ValueError: a source that is neither an existing file, nor a folder, nor a pattern matching files; or a
            folder or pattern without any image file (by suffix).
    """
    paths: list[str] = []
    for source in sources:
        text = os.fspath(source)
        if Path(text).is_file():
            paths.append(text)
        elif Path(text).is_dir():
            found = _images_under(Path(text))
            if not found:
                raise ValueError(f"{text}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            found = [match for match in matches if Path(match).is_file() and _is_image(Path(match))]
            found += [image for match in matches if Path(match).is_dir() for image in _images_under(Path(match))]
            if not found:
                raise ValueError(f"{text}: the pattern matches no image files")
            paths.extend(found)
        else:
            raise ValueError(f"{text}: no such file or folder; pass image files, folders or glob patterns")
    return paths


def _is_image(path: Path) -> bool:
    return is_image_file(path) and not path.name.startswith(".")


def _images_under(folder: Path) -> list[str]:
    return [
        str(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and _is_image(path)
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]


__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS_ENV",
    "URL_TIMEOUT",
    "ImageLike",
    "ImageLoadError",
    "apply_pixel_limit_from_environment",
    "describe_input",
    "expand_image_sources",
    "image_size_problem",
    "is_image_file",
    "load_image",
    "load_mask",
    "open_image_file",
]

"""Reading images and masks from anything a user hands us, with one-line errors and the pixel limit.

The one home of image reading: the processor, the data loaders, predict, the app and evaluation all call
`load_image` / `load_mask` / `open_image_file`, and `IMAGE_SUFFIXES` says which files a folder scan picks up.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

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
def open_image_file(path: str | os.PathLike | IO[bytes], what: str) -> Iterator[Image.Image]:
    """`PIL.Image.open(path)` of a path or binary file (header read, pixels not yet decoded), within the pixel limit.

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

MAX_URL_BYTES = 64 << 20
"""Default cap on the bytes an image URL may send (64 MiB); `COPS_HF_MAX_URL_BYTES` replaces it."""

MAX_URL_BYTES_ENV = "COPS_HF_MAX_URL_BYTES"
"""Environment variable with the byte cap of image URLs (see `url_byte_limit`)."""


def url_byte_limit() -> int:
    """The most bytes an image URL may send: `COPS_HF_MAX_URL_BYTES` when set, else `MAX_URL_BYTES`."""
    value = os.environ.get(MAX_URL_BYTES_ENV, "").strip()
    if not value:
        return MAX_URL_BYTES
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{MAX_URL_BYTES_ENV} must be a positive number of bytes, got {value!r}.")
    return int(value)


def _http_only_opener() -> Any:
    """A urllib opener whose redirects may lead to http(s) URLs only (urllib alone also follows them to ftp)."""
    from urllib.error import URLError
    from urllib.parse import urlsplit
    from urllib.request import HTTPRedirectHandler, build_opener

    class HttpOnlyRedirects(HTTPRedirectHandler):
        def redirect_request(self, request, fp, code, message, headers, new_url):  # noqa: ANN001, ANN201
            if urlsplit(new_url).scheme.lower() not in ("http", "https"):
                raise URLError(f"redirect to '{new_url}' refused: only http(s) redirects are followed")
            return super().redirect_request(request, fp, code, message, headers, new_url)

    return build_opener(HttpOnlyRedirects)


class ImageTooLargeError(ImageLoadError):
    """An encoded image (an upload, a download) is over the byte limit it was given; refused before decoding."""


def load_image_bytes(
    content: bytes, what: str, max_bytes: int | None = None, unreadable: str = "is not a readable image"
) -> Image.Image:
    """Decode an encoded image (PNG, JPEG, ...) held in memory, refusing it before decoding when it is too big.

    Args:
        what: how messages name the image, e.g. "Upload 'part.png'".
        max_bytes: refuse encoded images longer than this (`ImageTooLargeError`); `None` for no limit. The pixel
            limit (decompression bombs, see `image_size_problem`) applies in any case, read from the header.
        unreadable: what the message says after `what` when the bytes are no image, or a truncated one.
    """
    if max_bytes is not None and len(content) > max_bytes:
        raise ImageTooLargeError(f"{what} is {len(content)} bytes, over the limit of {max_bytes} bytes.")
    try:
        with open_image_file(io.BytesIO(content), what) as opened:
            opened.load()
            return opened.copy()
    except ImageLoadError as error:
        cause = error.__cause__
        if cause is None or isinstance(cause, Image.DecompressionBombError):  # over the pixel limit: said already
            raise
        raise ImageLoadError(f"{what} {unreadable} (not an image file, or a truncated one).") from cause


def _download_image(url: str, timeout: float | None, max_bytes: int | None = None) -> Image.Image:
    """The image at an http(s) URL, within the byte cap and the pixel limit files get.

    The cap is `url_byte_limit()`, or `max_bytes` when smaller. Redirects are followed to http(s) URLs only.
    """
    from urllib.error import URLError

    limit = url_byte_limit() if max_bytes is None else min(max_bytes, url_byte_limit())
    too_big = f"Image URL '{url}' sends more than {limit} bytes, over the cap of {MAX_URL_BYTES_ENV}; raise it if "
    try:
        with _http_only_opener().open(url, timeout=URL_TIMEOUT if timeout is None else timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ImageTooLargeError(too_big + "the image is genuine.")
            content = response.read(limit + 1)
    except (URLError, OSError, ValueError) as error:
        if isinstance(error, ImageLoadError):
            raise
        reason = getattr(error, "reason", error)
        raise ImageLoadError(f"Image URL '{url}' cannot be downloaded ({reason}); check the address.") from error
    if len(content) > limit:
        raise ImageTooLargeError(too_big + "the image is genuine.")
    return load_image_bytes(content, f"Image URL '{url}'", unreadable="did not return a readable image")


def refuse_non_finite_pixels(image: Image.Image, what: str) -> Image.Image:
    """`image`, unless it is a float image with NaN or infinite pixels (min-max scaling would blacken it).

    Args:
        image: a decoded PIL image.
        what: how the message names it, e.g. "Image file 'a.tif'".

    Raises:
        ImageLoadError: a NaN or infinite pixel.
    """
    if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise ImageLoadError(f"{what} holds NaN or infinite pixel values; it is not a valid image.")
    return image


def _open_image(
    item: ImageLike, index: int, timeout: float | None = None, max_bytes: int | None = None
) -> Image.Image:
    """Open a path, URL, PIL image, numpy array or tensor as a PIL image in its own mode, with clear errors."""
    what = describe_input(item, index)
    if isinstance(item, str) and item.startswith(("http://", "https://")):
        return refuse_non_finite_pixels(_download_image(item, timeout, max_bytes), f"Image URL {what}")
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_dir():
            raise ImageLoadError(f"Image file {what} is a directory; give the image files in it.")
        if not path.is_file():
            raise ImageLoadError(f"Image file {what} does not exist; check the path.")
        with open_image_file(path, f"Image file {what}") as opened:
            opened.load()
            return refuse_non_finite_pixels(opened.copy(), f"Image file {what}")
    if isinstance(item, Image.Image):
        return refuse_non_finite_pixels(item, f"Image {what}")
    if isinstance(item, torch.Tensor):
        return _array_to_pil(item.detach().cpu().numpy(), what)
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, what)
    raise ImageLoadError(f"{what}: expected a path, PIL image, numpy array or tensor.")


def load_image(
    item: ImageLike, index: int = 0, timeout: float | None = None, max_bytes: int | None = None
) -> Image.Image:
    """Open a path, http(s) URL, PIL image, numpy array or tensor as a PIL image (mode kept), with clear errors.

    High-bit-depth single-channel images (16-bit, 32-bit, float) are min-max scaled to 8 bits.

    Args:
        index: position of `item` in its batch, for messages about unnamed inputs.
        timeout: seconds a URL may take to answer (default `URL_TIMEOUT`).
        max_bytes: the most bytes a URL's answer may have (`ImageTooLargeError` beyond); default no limit.
    """
    image = _open_image(item, index, timeout, max_bytes)
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
            matches = _glob_once(text)
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
    return sorted(str(path) for path in _walk_once(folder) if path.is_file() and _is_image(path))


def _walk_once(folder: Path) -> Iterator[Path]:
    """Every entry under `folder` but hidden ones, following folder symlinks yet entering each real folder once.

    A symlink loop thus ends, instead of repeating the tree until the kernel's link limit.
    """
    visited: set[tuple[int, int]] = set()
    for directory, folders, files in os.walk(folder, followlinks=True):
        status = os.stat(directory)
        if (status.st_dev, status.st_ino) in visited:
            folders.clear()
            continue
        visited.add((status.st_dev, status.st_ino))
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in [*folders, *files]:
            if not name.startswith("."):
                yield Path(directory, name)


def _glob_once(pattern: str) -> list[str]:
    """The paths matching a glob `pattern` (`**` for any depth), sorted; `**` walks with `_walk_once`."""
    if "**" not in pattern:
        return sorted(glob.glob(pattern))
    parts = Path(pattern).parts
    fixed = next(index for index, part in enumerate(parts) if glob.has_magic(part))
    anchor = Path(*parts[:fixed]) if fixed else Path(".")
    if not anchor.is_dir():
        return []
    found = [path for path in _walk_once(anchor) if _matches(path.relative_to(anchor).parts, parts[fixed:])]
    return sorted(str(path) if fixed else os.path.relpath(path) for path in found)


def _matches(names: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether the path components `names` match the glob components `pattern` (`**` matches zero or more)."""
    if not pattern:
        return not names
    if pattern[0] == "**":
        return any(_matches(names[start:], pattern[1:]) for start in range(len(names) + 1))
    return bool(names) and fnmatch.fnmatchcase(names[0], pattern[0]) and _matches(names[1:], pattern[1:])


__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS_ENV",
    "MAX_URL_BYTES",
    "MAX_URL_BYTES_ENV",
    "URL_TIMEOUT",
    "ImageLike",
    "ImageLoadError",
    "ImageTooLargeError",
    "apply_pixel_limit_from_environment",
    "describe_input",
    "expand_image_sources",
    "image_size_problem",
    "is_image_file",
    "load_image",
    "load_image_bytes",
    "load_mask",
    "open_image_file",
    "refuse_non_finite_pixels",
    "url_byte_limit",
]

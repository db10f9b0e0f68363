"""Procedural anomaly-detection datasets for offline demos and tests.

Normal images are procedural textures (``stripes``, ``checker``, ``noise_texture``, ``wood``) or simple objects on
a plain background (``disc``, ``ring``, ``bolt``), varied per image. Anomalous images get one DRAEM/CutPaste-style
defect: a noise-shaped ``blob``, a thin ``scratch``, a ``cutpaste`` patch moved from another region of the image
(flipped and re-lit), or a ``foreign_patch`` cut from another texture. The mask of an anomalous image is exactly the
set of pixels that differ from its clean version, which `render_synthetic_sample` also returns. The same
defects apply to any RGB image (`apply_defect`): normal-only training puts them on a user's own images.

Everything is derived from ``(seed, category, index)``, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .meta import NORMAL_SPECIE, Meta, make_record, write_meta_json

__all__ = [
    "DEFAULT_TEST_CATEGORIES",
    "DEFAULT_TRAIN_CATEGORIES",
    "DEFECT_TYPES",
    "OBJECT_CATEGORIES",
    "SYNTHETIC_CATEGORIES",
    "TEXTURE_CATEGORIES",
    "SyntheticSample",
    "apply_defect",
    "make_synthetic_dataset",
    "render_synthetic_sample",
]

TEXTURE_CATEGORIES = ("stripes", "checker", "noise_texture", "wood")
OBJECT_CATEGORIES = ("disc", "ring", "bolt")
SYNTHETIC_CATEGORIES = TEXTURE_CATEGORIES + OBJECT_CATEGORIES
DEFECT_TYPES = ("blob", "scratch", "cutpaste", "foreign_patch")
DEFAULT_TRAIN_CATEGORIES = ("stripes", "disc")
DEFAULT_TEST_CATEGORIES = ("checker", "ring")

_MIN_SIDE = 16
_MAX_DEFECT_ATTEMPTS = 16

RGB = tuple[float, float, float]
Rendering = tuple[np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class SyntheticSample:
    """One generated sample.

    Attributes:
        image: The sample, ``(H, W, 3)`` uint8 RGB.
        clean_image: The same sample before the defect was applied (equal to ``image`` for normal samples).
        mask: ``(H, W)`` bool, True exactly where ``image`` differs from ``clean_image``.
        defect_type: One of `DEFECT_TYPES`, or None for a normal sample.
    """

    image: np.ndarray
    clean_image: np.ndarray
    mask: np.ndarray
    defect_type: str | None


def _image_shape(image_size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if min(height, width) < _MIN_SIDE:
        raise ValueError(f"image_size must be at least {_MIN_SIDE} pixels per side, got {image_size}")
    return int(height), int(width)


def _rng(seed: int, category: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), index, stream])


def _coordinates(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:height, 0:width]
    return rows.astype(np.float32), cols.astype(np.float32)


def _value_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smoothly interpolated random lattice ("Perlin-like" value noise) in [0, 1]."""
    lattice = rng.random((cells + 1, cells + 1), dtype=np.float32)
    row_pos = np.linspace(0, cells, height, endpoint=False, dtype=np.float32)
    col_pos = np.linspace(0, cells, width, endpoint=False, dtype=np.float32)
    row0, col0 = row_pos.astype(int), col_pos.astype(int)
    row_t, col_t = row_pos - row0, col_pos - col0
    row_w = (row_t * row_t * (3 - 2 * row_t))[:, None]
    col_w = (col_t * col_t * (3 - 2 * col_t))[None, :]
    top = lattice[row0][:, col0] * (1 - col_w) + lattice[row0][:, col0 + 1] * col_w
    bottom = lattice[row0 + 1][:, col0] * (1 - col_w) + lattice[row0 + 1][:, col0 + 1] * col_w
    return top * (1 - row_w) + bottom * row_w


def _fractal_noise(rng: np.random.Generator, height: int, width: int, cells: int, octaves: int) -> np.ndarray:
    """Sum of value-noise octaves, rescaled to [0, 1]."""
    total = sum(0.5**octave * _value_noise(rng, height, width, cells * 2**octave) for octave in range(octaves))
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def _blend(weight: np.ndarray, color_a: RGB, color_b: RGB) -> np.ndarray:
    start, end = np.asarray(color_a, np.float32), np.asarray(color_b, np.float32)
    return start + weight[..., None] * (end - start)


def _stripes(rng: np.random.Generator, height: int, width: int) -> Rendering:
    rows, cols = _coordinates(height, width)
    angle = np.deg2rad(30 + rng.uniform(-5, 5))
    period = max(height, width) / rng.uniform(5, 7)
    wave = np.sin(2 * np.pi * (cols * np.cos(angle) + rows * np.sin(angle)) / period + rng.uniform(0, 2 * np.pi))
    return _blend(np.clip(1.5 * wave + 0.5, 0, 1), (30, 40, 90), (220, 200, 150)), None


def _checker(rng: np.random.Generator, height: int, width: int) -> Rendering:
    rows, cols = _coordinates(height, width)
    cell = min(height, width) / rng.uniform(6, 9)
    row_offset, col_offset = rng.uniform(0, cell, size=2)
    parity = (np.floor((rows + row_offset) / cell) + np.floor((cols + col_offset) / cell)) % 2
    return _blend(parity, (60, 60, 65), (200, 200, 190)), None


def _noise_texture(rng: np.random.Generator, height: int, width: int) -> Rendering:
    return _blend(_fractal_noise(rng, height, width, cells=4, octaves=4), (40, 90, 40), (170, 200, 120)), None


def _wood(rng: np.random.Generator, height: int, width: int) -> Rendering:
    rows, cols = _coordinates(height, width)
    center_row, center_col = rng.uniform(0, height), rng.uniform(-width, -0.5 * width)
    ring_period = min(height, width) / rng.uniform(8, 10)
    grain = _fractal_noise(rng, height, width, cells=3, octaves=3)
    radius = np.hypot(rows - center_row, cols - center_col)
    weight = 0.5 + 0.5 * np.sin(2 * np.pi * radius / ring_period + 3 * grain)
    return _blend(weight, (110, 60, 25), (200, 140, 80)), None


def _object_frame(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Plain shaded background, offsets from a jittered centre (rows, cols) and the object scale."""
    rows, cols = _coordinates(height, width)
    scale = float(min(height, width))
    center = np.array([height, width], np.float32) / 2 + rng.uniform(-0.05, 0.05, size=2) * scale
    background = _blend(0.3 * _value_noise(rng, height, width, cells=2), (235, 235, 230), (205, 205, 200))
    return rows - center[0], cols - center[1], scale, background


def _disc(rng: np.random.Generator, height: int, width: int) -> Rendering:
    rows, cols, scale, background = _object_frame(rng, height, width)
    radius = scale * rng.uniform(0.28, 0.33)
    distance = np.hypot(rows, cols)
    foreground = distance <= radius
    disc = _blend(0.4 * distance / radius, (230, 130, 40), (150, 60, 20))
    return np.where(foreground[..., None], disc, background), foreground


def _ring(rng: np.random.Generator, height: int, width: int) -> Rendering:
    rows, cols, scale, background = _object_frame(rng, height, width)
    outer = scale * rng.uniform(0.32, 0.38)
    distance = np.hypot(rows, cols)
    foreground = (distance <= outer) & (distance >= 0.6 * outer)
    light = 0.5 + 0.5 * np.cos(np.arctan2(rows, cols) - rng.uniform(0, 2 * np.pi))
    ring = _blend(light, (90, 90, 100), (190, 190, 200))
    return np.where(foreground[..., None], ring, background), foreground


def _bolt(rng: np.random.Generator, height: int, width: int) -> Rendering:
    rows, cols, scale, background = _object_frame(rng, height, width)
    angle = np.deg2rad(rng.uniform(-20, 20))
    along = rows * np.cos(angle) + cols * np.sin(angle)
    across = cols * np.cos(angle) - rows * np.sin(angle)
    head_offset = along + 0.22 * scale
    apothem = 0.14 * scale
    head = np.ones_like(rows, dtype=bool)
    for side in range(3):
        normal = side * np.pi / 3
        head &= np.abs(across * np.cos(normal) + head_offset * np.sin(normal)) <= apothem
    shaft = (np.abs(across) <= 0.06 * scale) & (along >= -0.1 * scale) & (along <= 0.38 * scale)
    threads = 0.5 + 0.5 * np.sin(2 * np.pi * along / (0.04 * scale))
    metal = np.where(shaft[..., None], _blend(threads, (120, 120, 125), (175, 175, 180)), (160, 160, 170))
    foreground = head | shaft
    return np.where(foreground[..., None], metal, background), foreground


_RENDERERS: dict[str, Callable[[np.random.Generator, int, int], Rendering]] = {
    "stripes": _stripes,
    "checker": _checker,
    "noise_texture": _noise_texture,
    "wood": _wood,
    "disc": _disc,
    "ring": _ring,
    "bolt": _bolt,
}


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _contrasting(colors: np.ndarray) -> np.ndarray:
    """A colour far from the mean of ``colors`` (N, 3): shifted by 100 away from the nearer end of [0, 255]."""
    mean = colors.reshape(-1, 3).mean(axis=0)
    return np.where(mean < 128, mean + 100, mean - 100)


def _defect_center(rng: np.random.Generator, shape: tuple[int, int], foreground: np.ndarray | None) -> np.ndarray:
    """A point on the object for object categories, anywhere away from the border for textures."""
    if foreground is not None:
        points = np.argwhere(foreground)
        return points[rng.integers(len(points))].astype(np.float32)
    return rng.uniform(0.15, 0.85, size=2).astype(np.float32) * np.array(shape, np.float32)


def _paste_region(rng: np.random.Generator, shape: tuple[int, int], center: np.ndarray) -> tuple[slice, slice]:
    """A rectangle of 12-25 % of each side around ``center``, clipped to the image."""
    height, width = shape
    size = (rng.uniform(0.12, 0.25, size=2) * np.array(shape)).astype(int) + 2
    top = int(np.clip(center[0] - size[0] / 2, 0, height - size[0]))
    left = int(np.clip(center[1] - size[1] / 2, 0, width - size[1]))
    return slice(top, top + size[0]), slice(left, left + size[1])


def _blob(rng: np.random.Generator, clean: np.ndarray, foreground: np.ndarray | None, category: str) -> np.ndarray:
    height, width = clean.shape[:2]
    rows, cols = _coordinates(height, width)
    center = _defect_center(rng, (height, width), foreground)
    radius = min(height, width) * rng.uniform(0.1, 0.22)
    falloff = np.clip(1 - np.hypot(rows - center[0], cols - center[1]) / radius, 0, 1)
    noise = _fractal_noise(rng, height, width, cells=4, octaves=2)
    shape = falloff * (0.5 + noise) > 0.35
    fill = _contrasting(clean[shape].astype(np.float32))[None, None, :] * (0.85 + 0.3 * noise[..., None])
    defective = clean.copy()
    defective[shape] = _to_uint8(fill)[shape]
    return defective


def _scratch(rng: np.random.Generator, clean: np.ndarray, foreground: np.ndarray | None, category: str) -> np.ndarray:
    height, width = clean.shape[:2]
    length = min(height, width) * rng.uniform(0.25, 0.5)
    steps = int(2 * length) + 1
    heading = rng.uniform(0, 2 * np.pi) + rng.uniform(-1.5, 1.5) * np.linspace(0, 1, steps)
    start = _defect_center(rng, (height, width), foreground)
    path_rows = start[0] + np.cumsum(np.sin(heading)) * length / steps
    path_cols = start[1] + np.cumsum(np.cos(heading)) * length / steps
    # Thickness grows with the image so a scratch stays visible (and above the minimum area) at any size.
    thickness = max(1, round(min(height, width) / 64))
    shape = np.zeros((height, width), bool)
    for row_offset in range(thickness):
        for col_offset in range(thickness):
            shape[
                np.clip(np.rint(path_rows).astype(int) + row_offset, 0, height - 1),
                np.clip(np.rint(path_cols).astype(int) + col_offset, 0, width - 1),
            ] = True
    defective = clean.copy()
    defective[shape] = _to_uint8(_contrasting(clean[shape].astype(np.float32)))
    return defective


def _relit(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CutPaste-style jitter: random flips and a brightness change of 20-40 %."""
    flipped = patch[:: rng.choice([-1, 1]), :: rng.choice([-1, 1])]
    gain = rng.uniform(0.6, 0.8) if rng.random() < 0.5 else rng.uniform(1.2, 1.4)
    return _to_uint8(flipped.astype(np.float32) * gain)


def _cutpaste(rng: np.random.Generator, clean: np.ndarray, foreground: np.ndarray | None, category: str) -> np.ndarray:
    shape = clean.shape[:2]
    target_rows, target_cols = _paste_region(rng, shape, _defect_center(rng, shape, foreground))
    patch_height, patch_width = target_rows.stop - target_rows.start, target_cols.stop - target_cols.start
    source_top = int(rng.integers(0, shape[0] - patch_height + 1))
    source_left = int(rng.integers(0, shape[1] - patch_width + 1))
    patch = clean[source_top : source_top + patch_height, source_left : source_left + patch_width]
    defective = clean.copy()
    defective[target_rows, target_cols] = _relit(patch, rng)
    return defective


def _foreign_patch(
    rng: np.random.Generator, clean: np.ndarray, foreground: np.ndarray | None, category: str
) -> np.ndarray:
    shape = clean.shape[:2]
    target_rows, target_cols = _paste_region(rng, shape, _defect_center(rng, shape, foreground))
    donors = [name for name in TEXTURE_CATEGORIES if name != category]
    donor, _ = _RENDERERS[donors[rng.integers(len(donors))]](rng, *shape)
    defective = clean.copy()
    defective[target_rows, target_cols] = _to_uint8(donor[target_rows, target_cols])
    return defective


_DEFECTS: dict[str, Callable[[np.random.Generator, np.ndarray, np.ndarray | None, str], np.ndarray]] = {
    "blob": _blob,
    "scratch": _scratch,
    "cutpaste": _cutpaste,
    "foreign_patch": _foreign_patch,
}


def render_synthetic_sample(
    category: str,
    index: int,
    *,
    image_size: int | tuple[int, int] = 64,
    seed: int = 0,
    defect_type: str | None = None,
) -> SyntheticSample:
    """Render sample ``index`` of a synthetic ``category``, with a defect of ``defect_type`` if given.

    The clean image depends only on ``(seed, category, index, image_size)``, so the normal and the anomalous
    renderings of the same index share it. ``image_size`` is a side length or ``(height, width)``.

    Raises:
        ValueError: unknown category or defect type, negative seed or index, or a side under 16 pixels.
    """
    if category not in _RENDERERS:
        raise ValueError(f"Unknown synthetic category {category!r}; choose from {SYNTHETIC_CATEGORIES}")
    if defect_type is not None and defect_type not in _DEFECTS:
        raise ValueError(f"Unknown defect type {defect_type!r}; choose from {DEFECT_TYPES}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    height, width = _image_shape(image_size)
    clean_rng = _rng(seed, category, index, stream=0)
    rendering, foreground = _RENDERERS[category](clean_rng, height, width)
    clean = _to_uint8(rendering + clean_rng.normal(0, 2.5, size=rendering.shape))
    if defect_type is None:
        return SyntheticSample(clean, clean, np.zeros((height, width), bool), None)
    defect_rng = _rng(seed, category, index, stream=1)
    sample = apply_defect(clean, defect_type, defect_rng, foreground=foreground, category=category)
    if sample is None:
        raise RuntimeError(f"Could not place a visible {defect_type} on {category} sample {index} (seed {seed})")
    return sample


def apply_defect(
    image: np.ndarray,
    defect_type: str,
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    category: str = "",
) -> SyntheticSample | None:
    """Apply one defect of `defect_type` to any RGB image; the mask is exactly the set of pixels that changed.

    Used both for the procedural categories and for a user's own normal images (normal-only training). Up to 16
    placements are drawn from `rng` until one changes at least `max(8, H * W / 500)` pixels.

    Args:
        image: `(H, W, 3)` uint8 RGB image (not modified), at least 16 pixels per side.
        defect_type: one of :data:`DEFECT_TYPES`.
        rng: the generator every random choice is drawn from (the caller seeds it).
        foreground: `(H, W)` bool object pixels to put the defect on; None places it anywhere away from the border.
        category: a procedural category the `foreign_patch` donor texture must differ from ("" for any image).

    Returns:
        The sample, or None when no placement changed enough pixels (e.g. `cutpaste` on a black image).

    Raises:
        ValueError: unknown defect type, or an image that is not `(H, W, 3)` uint8 with sides of 16 pixels or more.
    """
    if defect_type not in _DEFECTS:
        raise ValueError(f"Unknown defect type {defect_type!r}; choose from {DEFECT_TYPES}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < _MIN_SIDE:
        raise ValueError(
            f"A defect needs an (H, W, 3) uint8 RGB image with sides of {_MIN_SIDE}+ pixels, got {image.dtype} "
            f"{image.shape}"
        )
    height, width = image.shape[:2]
    min_changed = max(8, height * width // 500)
    for _ in range(_MAX_DEFECT_ATTEMPTS):
        defective = _DEFECTS[defect_type](rng, image, foreground, category)
        mask = np.any(defective != image, axis=-1)
        if mask.sum() >= min_changed:
            return SyntheticSample(defective, image, mask, defect_type)
    return None


def _split_categories(
    categories: Sequence[str] | None, train_categories: Sequence[str] | None, test_categories: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    if categories is not None:
        if train_categories is not None or test_categories is not None:
            raise ValueError("Pass either categories or train_categories/test_categories, not both")
        half = len(categories) // 2
        return list(categories[:half]), list(categories[half:])
    train = list(DEFAULT_TRAIN_CATEGORIES if train_categories is None else train_categories)
    test = list(DEFAULT_TEST_CATEGORIES if test_categories is None else test_categories)
    return train, test


def make_synthetic_dataset(
    root: str | os.PathLike[str],
    categories: Sequence[str] | None = None,
    train_categories: Sequence[str] | None = None,
    test_categories: Sequence[str] | None = None,
    images_per_category: int = 8,
    anomalous_fraction: float = 0.5,
    image_size: int | tuple[int, int] = 64,
    seed: int = 0,
) -> Path:
    """Write a synthetic zero-shot dataset (PNG images, masks and ``meta.json``) under ``root``.

    Layout (MVTec-like): ``root/<category>/<split>/<specie>/<index>.png`` with ``<specie>`` = ``good`` or the defect
    type, and masks ``root/<category>/ground_truth/<specie>/<index>_mask.png`` (0/255) for anomalous images only.
    ``meta["train"]`` holds the training categories (normal and anomalous samples with masks, as CoPS trains on),
    ``meta["test"]`` the disjoint test categories. Defect types cycle through `DEFECT_TYPES`.

    Args:
        root: Output folder (created; existing files of the same names are overwritten).
        categories: Shortcut: the first half become training, the rest test categories.
        train_categories: Training categories (default `DEFAULT_TRAIN_CATEGORIES`; may be empty).
        test_categories: Test categories (default `DEFAULT_TEST_CATEGORIES`; may be empty).
        images_per_category: Images per category.
        anomalous_fraction: Share of anomalous images per category, rounded; at least one normal and one
            anomalous image whenever ``0 < anomalous_fraction < 1`` and there are two or more images.
        image_size: Side length or ``(height, width)``.
        seed: Non-negative seed; the same arguments give byte-identical files.

    Returns:
        ``root`` as a `pathlib.Path`.

    Raises:
        ValueError: unknown or overlapping categories, or out-of-range arguments.
    """
    train, test = _split_categories(categories, train_categories, test_categories)
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise ValueError(f"Train and test categories must be disjoint (zero-shot protocol); both have {overlap}")
    unknown = sorted(set(train + test) - set(SYNTHETIC_CATEGORIES))
    if unknown:
        raise ValueError(f"Unknown synthetic categories {unknown}; choose from {SYNTHETIC_CATEGORIES}")
    if images_per_category < 1 or not 0 <= anomalous_fraction <= 1:
        raise ValueError("images_per_category must be >= 1 and anomalous_fraction within [0, 1]")
    num_anomalous = round(images_per_category * anomalous_fraction)
    if 0 < anomalous_fraction < 1 and images_per_category >= 2:
        num_anomalous = min(max(num_anomalous, 1), images_per_category - 1)
    defects = [None] * (images_per_category - num_anomalous) + [
        DEFECT_TYPES[position % len(DEFECT_TYPES)] for position in range(num_anomalous)
    ]
    root = Path(root)
    meta: Meta = {"train": {}, "test": {}}
    for split, split_categories in (("train", train), ("test", test)):
        for category in split_categories:
            meta[split][category] = [
                _write_sample(root, split, category, index, defect, image_size, seed)
                for index, defect in enumerate(defects)
            ]
    write_meta_json(root, meta)
    return root


def _write_sample(
    root: Path,
    split: str,
    category: str,
    index: int,
    defect: str | None,
    image_size: int | tuple[int, int],
    seed: int,
) -> dict[str, Any]:
    """Render one sample, save its image (and mask) in the MVTec-like layout, and return its meta.json record."""
    sample = render_synthetic_sample(category, index, image_size=image_size, seed=seed, defect_type=defect)
    specie = defect or NORMAL_SPECIE
    image_path = f"{category}/{split}/{specie}/{index:03d}.png"
    _save_png(root / image_path, sample.image)
    mask_path = ""
    if defect is not None:
        mask_path = f"{category}/ground_truth/{specie}/{index:03d}_mask.png"
        _save_png(root / mask_path, sample.mask.astype(np.uint8) * 255)
    return make_record(
        image_path, cls_name=category, anomaly=int(defect is not None), specie_name=specie, mask_path=mask_path
    )


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")

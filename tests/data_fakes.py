"""Helpers for the data tests: tiny image and mask files in fake dataset layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: tuple[int, int] = (8, 8), value: int = 128) -> Path:
    """Write a ``size`` = (width, height) RGB image filled with ``value``; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def write_mask(path: Path, size: tuple[int, int] = (8, 8)) -> Path:
    """Write a ``size`` = (width, height) binary L mask whose top-left quarter is 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0]), np.uint8)
    pixels[: size[1] // 2, : size[0] // 2] = 255
    Image.fromarray(pixels).save(path)
    return path

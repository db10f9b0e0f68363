"""``meta.json`` builders for the 13 benchmark datasets of the CoPS paper, from their download layouts.

Industrial (pixel-level): MVTec AD, VisA, BTAD, MPDD, DTD-Synthetic. Medical image-level: HeadCT, BrainMRI, Br35H.
Medical pixel-level: ISIC, CVC-ColonDB, CVC-ClinicDB, Kvasir, Endo. The expected folder layouts (the ones the CoPS
and AnomalyCLIP preparation scripts read) are given in each builder's docstring. Use `prepare_dataset`::

    prepare_dataset("btad", "/data/BTAD")          # writes /data/BTAD/meta.json
    prepare_folder_dataset("/data/mine", "good", "bad", "ground_truth")   # a user's own images
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .builders import (
    build_folder_meta,
    build_mvtec_meta,
    build_visa_meta,
    finish_meta,
    mvtec_layout_meta,
    species_records,
)
from .meta import DataError, Meta, write_meta_json
from .registry import REGISTRY, benchmark_name

__all__ = [
    "BENCHMARKS",
    "DATASET_BUILDERS",
    "build_br35h_meta",
    "build_brainmri_meta",
    "build_btad_meta",
    "build_dtd_synthetic_meta",
    "build_endo_meta",
    "build_headct_meta",
    "build_isic_meta",
    "build_mpdd_meta",
    "build_polyp_meta",
    "prepare_dataset",
    "prepare_folder_dataset",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def build_btad_meta(root: PathLike, *, write: bool = True) -> Meta:
    """BTAD: ``root/{01,02,03}/{train,test}/{ok,ko}/*`` with masks ``root/<cat>/ground_truth/ko/<stem>.*``."""
    return finish_meta(root, mvtec_layout_meta(root, normal_specie="ok"), write)


def build_mpdd_meta(root: PathLike, *, write: bool = True) -> Meta:
    """MPDD: MVTec layout, ``root/<cat>/{train,test}/<defect>/*.png``, ``ground_truth/<defect>/<stem>_mask.png``."""
    return finish_meta(root, mvtec_layout_meta(root), write)


def build_dtd_synthetic_meta(root: PathLike, *, write: bool = True) -> Meta:
    """DTD-Synthetic: MVTec layout, ``root/<texture>/{train,test}/{good,bad}/*``, ``<texture>/ground_truth/bad``."""
    return finish_meta(root, mvtec_layout_meta(root), write)


def build_headct_meta(root: PathLike, *, write: bool = True) -> Meta:
    """HeadCT (image-level): ``root/brain/test/good/*`` normal, every other ``root/brain/test/<folder>`` anomalous."""
    return finish_meta(root, mvtec_layout_meta(root, categories=["brain"], with_masks=False), write)


def build_brainmri_meta(root: PathLike, *, write: bool = True) -> Meta:
    """BrainMRI (image-level): ``root/brain_tumor_dataset/no/*`` normal, ``root/brain_tumor_dataset/yes/*`` tumour."""
    return build_folder_meta(
        root,
        "brain_tumor_dataset/no",
        "brain_tumor_dataset/yes",
        category="brain",
        anomalous_specie="tumor",
        write=write,
    )


def build_br35h_meta(root: PathLike, *, write: bool = True) -> Meta:
    """Br35H (image-level): ``root/no/*`` normal, ``root/yes/*`` tumour (the unlabelled ``root/pred`` is ignored)."""
    return build_folder_meta(root, "no", "yes", category="brain", anomalous_specie="tumor", write=write)


def build_isic_meta(root: PathLike, *, write: bool = True) -> Meta:
    """ISIC 2016: ``root/skin/test/<folder>/*.jpg``, masks ``root/skin/ISBI2016_ISIC_Part1_Test_GroundTruth``.

    ``good`` folders are normal, every other folder holds lesions with masks ``<stem>_Segmentation.png``.
    """
    masks = Path(os.path.abspath(root)) / "skin" / "ISBI2016_ISIC_Part1_Test_GroundTruth"
    records = species_records(
        root, "skin/test", category="skin", mask_dir_for=lambda _specie: masks, mask_suffix="_Segmentation"
    )
    return finish_meta(root, {"train": {}, "test": {"skin": records}}, write)


def build_polyp_meta(root: PathLike, *, write: bool = True) -> Meta:
    """CVC-ColonDB, CVC-ClinicDB, Kvasir: every image of ``root/images`` is a polyp, mask ``root/masks/<stem>.*``."""
    return build_folder_meta(root, None, "images", "masks", category="colon", anomalous_specie="polyp", write=write)


def build_endo_meta(root: PathLike, *, write: bool = True) -> Meta:
    """Endo: ``root/<folder>/*`` (``good`` normal, others anomalous) with masks ``root/masks/<stem>.*``."""
    masks = Path(os.path.abspath(root)) / "masks"
    records = species_records(root, ".", category="colon", mask_dir_for=lambda _specie: masks, exclude=["masks"])
    return finish_meta(root, {"train": {}, "test": {"colon": records}}, write)


BENCHMARKS = REGISTRY
"""The paper's 13 benchmark datasets by canonical name (`cops_hf.data.registry.REGISTRY`)."""

_BUILDER_FUNCTIONS = {
    builder.__name__: builder
    for builder in (
        build_mvtec_meta, build_visa_meta, build_btad_meta, build_mpdd_meta, build_dtd_synthetic_meta,
        build_headct_meta, build_brainmri_meta, build_br35h_meta, build_isic_meta, build_polyp_meta, build_endo_meta,
    )
}  # fmt: skip
DATASET_BUILDERS: dict[str, Callable[..., Meta]] = {
    name: _BUILDER_FUNCTIONS[entry.builder] for name, entry in REGISTRY.items()
}
"""Canonical name -> builder writing ``meta.json`` from the dataset's download layout (named by the registry)."""


def _require_images(meta: Meta, root: PathLike, layout: str) -> None:
    """Refuse a meta with no record: the folder does not hold the layout the builder reads."""
    if not any(records for categories in meta.values() for records in categories.values()):
        raise DataError(f"No images found under {root}. Expected layout: {layout}")


def prepare_dataset(name: str, root: PathLike) -> Path:
    """Write ``root/meta.json`` for benchmark ``name`` (e.g. ``"mvtec"``, ``"VisA"``, ``"CVC-ClinicDB"``).

    The file records the benchmark's registry name (``"dataset": "mvtec"``), from which ``cops-hf evaluate`` picks
    the test preset. Logs a warning listing expected categories that are absent (a partial download).

    Returns:
        The path of the written ``meta.json``.

    Raises:
        ValueError: unknown name. DataError: the layout does not match, or holds no image (the message names the
            folder or file and the layout expected).
    """
    info = BENCHMARKS[benchmark_name(name)]
    builder = DATASET_BUILDERS[info.name]
    meta = builder(root, write=False)
    _require_images(meta, root, (builder.__doc__ or "").strip().splitlines()[0].replace("``", ""))
    found = {category for split in meta.values() for category, records in split.items() if records}
    missing = [category for category in info.categories if category not in found]
    if missing:
        logger.warning("%s at %s lacks categories %s (partial download?)", info.name, root, missing)
    return write_meta_json(root, meta, dataset=info.name)


def prepare_folder_dataset(
    root: PathLike,
    normal_dir: PathLike | None,
    anomalous_dir: PathLike | None,
    mask_dir: PathLike | None = None,
    *,
    mask_suffix: str = "_mask",
) -> Path:
    """Write ``root/meta.json`` for a user's own images (``cops-hf data prepare folder``), all in the test split.

    Args:
        root: Dataset root; the folders are relative to it (or absolute).
        normal_dir: Folder of normal images (None: none).
        anomalous_dir: Folder of anomalous images (None: none).
        mask_dir: Folder of masks of the anomalous images, matched by stem (``<stem><mask_suffix>.*`` or ``<stem>.*``).
        mask_suffix: Suffix of mask stems.

    Raises:
        DataError: a folder is missing, an anomalous image has no mask, or no image was found.
    """
    meta = build_folder_meta(root, normal_dir, anomalous_dir, mask_dir, mask_suffix=mask_suffix, write=False)
    layout = f"normal images in {root}/{normal_dir}, anomalous images in {root}/{anomalous_dir}"
    _require_images(
        meta, root, layout + (f", masks in {root}/{mask_dir}/<stem>{mask_suffix}.<ext>" if mask_dir else "")
    )
    return write_meta_json(root, meta)

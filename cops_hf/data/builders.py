"""Builders that index original dataset folder layouts into ``meta.json``.

Every builder returns the meta dict and, unless ``write=False``, writes it to ``ROOT/meta.json`` atomically. Masks
are matched to images by file stem, so a missing or extra mask is an error that names the file instead of a silent
misalignment. Only a mask folder whose names match none of its images' but whose count does is paired in sorted
order, as the reference's builders pair every folder, with a warning.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..image_utils import IMAGE_SUFFIXES, is_image_file
from .meta import NORMAL_SPECIE, DataError, Meta, make_record, write_meta_json

__all__ = [
    "IMAGE_SUFFIXES",
    "build_folder_meta",
    "build_mvtec_meta",
    "build_visa_meta",
    "finish_meta",
    "folder_records",
    "list_image_files",
    "mvtec_layout_meta",
    "species_records",
]

logger = logging.getLogger(__name__)



def list_image_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Image files (by suffix, case-insensitive) directly inside ``directory``, sorted by name; hidden files skipped.

    Raises:
        DataError: ``directory`` does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"Directory not found: {directory}")
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and not path.name.startswith(".") and is_image_file(path)
    )


def _relative_posix(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _masks_by_stem(mask_dir: Path) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for mask in list_image_files(mask_dir):
        index.setdefault(mask.stem, []).append(mask)
    return index


def _matching_mask(image: Path, masks_by_stem: dict[str, list[Path]], mask_dir: Path, mask_suffix: str) -> Path:
    """The mask named ``<stem><mask_suffix>.*`` or, failing that, ``<stem>.*``."""
    for stem in dict.fromkeys((image.stem + mask_suffix, image.stem)):
        candidates = masks_by_stem.get(stem, [])
        if len(candidates) > 1:
            raise DataError(f"Several masks for {image}: {[str(path) for path in candidates]}")
        if candidates:
            return candidates[0]
    raise DataError(
        f"No mask for {image} in {mask_dir} (expected {image.stem}{mask_suffix}.<ext> or {image.stem}.<ext>)"
    )


def _masks_for(images: list[Path], mask_dir: Path, mask_suffix: str) -> list[Path]:
    """Each image's mask, matched by stem.

    Failing that, masks are paired in sorted order when both folders hold as many files (what the reference's
    builders do), with a warning naming the folder.
    """
    masks_by_stem = _masks_by_stem(mask_dir)
    try:
        return [_matching_mask(image, masks_by_stem, mask_dir, mask_suffix) for image in images]
    except DataError:
        masks = list_image_files(mask_dir)
        if len(masks) != len(images):
            raise
        logger.warning(
            "The %d masks in %s do not share their images' names: paired with the images in sorted order.",
            len(masks),
            mask_dir,
        )
        return masks


def folder_records(
    root: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    *,
    category: str,
    anomaly: int,
    specie_name: str | None = None,
    mask_dir: str | os.PathLike[str] | None = None,
    mask_suffix: str = "_mask",
) -> list[dict[str, Any]]:
    """meta.json records for every image in one folder, all with the same label.

    Args:
        root: Dataset root; record paths are written relative to it.
        image_dir: Folder of images (relative to ``root`` or absolute).
        category: ``cls_name`` of the records.
        anomaly: 0 or 1 for every image of the folder.
        specie_name: Defect type; default ``"good"`` for normal images and the folder name for anomalous ones.
        mask_dir: Folder of masks for anomalous images, matched by stem (``<stem><mask_suffix>`` or ``<stem>``);
            when the names do not match but the counts do, paired in sorted order with a warning. Normal images
            never get a mask.
        mask_suffix: Suffix of mask file stems, e.g. ``"_mask"`` (MVTec) or ``"_Segmentation"`` (ISIC).

    Raises:
        DataError: a folder is missing, or an anomalous image has no (or several) matching masks.
    """
    root = Path(os.path.abspath(root))
    image_dir = root / image_dir
    specie = specie_name if specie_name is not None else (NORMAL_SPECIE if anomaly == 0 else image_dir.name)
    images = list_image_files(image_dir)
    masks: list[Path | None] = [None] * len(images)
    if mask_dir is not None and anomaly == 1:
        masks = list(_masks_for(images, root / mask_dir, mask_suffix))
    records = []
    for image, mask in zip(images, masks, strict=True):
        records.append(
            make_record(
                _relative_posix(image, root),
                cls_name=category,
                anomaly=anomaly,
                specie_name=specie,
                mask_path=_relative_posix(mask, root) if mask is not None else "",
            )
        )
    return records


def species_records(
    root: str | os.PathLike[str],
    parent_dir: str | os.PathLike[str],
    *,
    category: str,
    normal_specie: str = NORMAL_SPECIE,
    mask_dir_for: Callable[[str], Path] | None = None,
    mask_suffix: str = "_mask",
    exclude: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """meta.json records for every ``<specie>`` subfolder of ``parent_dir`` (sorted), via `folder_records`.

    Args:
        root: Dataset root; record paths are written relative to it.
        parent_dir: Folder whose subfolders are the species (relative to ``root`` or absolute).
        category: ``cls_name`` of the records.
        normal_specie: The subfolder of normal images; every other subfolder is anomalous.
        mask_dir_for: Maps an anomalous specie name to its mask folder; None for an image-level dataset.
        mask_suffix: Suffix of mask stems.
        exclude: Subfolder names that are not species (e.g. a mask folder beside them).
    """
    root = Path(os.path.abspath(root))
    parent = root / parent_dir
    if not parent.is_dir():
        raise DataError(f"Directory not found: {parent}")
    excluded = set(exclude)
    records = []
    for specie_dir in sorted(path for path in parent.iterdir() if path.is_dir() and path.name not in excluded):
        anomaly = int(specie_dir.name != normal_specie)
        records += folder_records(
            root,
            specie_dir,
            category=category,
            anomaly=anomaly,
            specie_name=specie_dir.name,
            mask_dir=mask_dir_for(specie_dir.name) if mask_dir_for is not None and anomaly else None,
            mask_suffix=mask_suffix,
        )
    return records


def finish_meta(root: str | os.PathLike[str], meta: Meta, write: bool) -> Meta:
    """Return ``meta`` after writing it to ``root/meta.json`` when ``write`` (the tail of every builder)."""
    if write:
        write_meta_json(root, meta)
    return meta


def mvtec_layout_meta(
    root: str | os.PathLike[str],
    categories: Iterable[str] | None = None,
    *,
    normal_specie: str = NORMAL_SPECIE,
    mask_suffix: str = "_mask",
    with_masks: bool = True,
) -> Meta:
    """Index an MVTec-AD-style layout (shared by MPDD, BTAD, DTD-Synthetic, ...) without writing anything.

    Layout: ``root/<category>/<split>/<specie>/*.<img>`` with ``<split>`` in train/test, ``<specie>`` ==
    ``normal_specie`` for normal images, and masks ``root/<category>/ground_truth/<specie>/<stem><mask_suffix>.*``.

    Args:
        root: Dataset root.
        categories: Category folders to index; default every folder of ``root`` with a ``train`` or ``test`` folder.
        normal_specie: Name of the normal folders (``"good"``; BTAD uses ``"ok"``).
        mask_suffix: Suffix of mask stems (``"_mask"``; a mask named exactly like its image also matches).
        with_masks: Look up masks for anomalous images (False for image-level datasets).
    """
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(f"Dataset root not found: {root}")
    if categories is None:
        categories = [
            path.name for path in sorted(root.iterdir()) if (path / "train").is_dir() or (path / "test").is_dir()
        ]
    categories = list(categories)
    if not categories:
        raise DataError(f"No categories under {root}: expected {root}/<category>/test/<defect>/<image>")
    meta: Meta = {"train": {}, "test": {}}
    for category in categories:
        category_dir = root / category
        if not category_dir.is_dir():
            raise DataError(f"Category folder not found: {category_dir}")
        for split in ("train", "test"):
            split_dir = category_dir / split
            if not split_dir.is_dir():
                continue
            meta[split][category] = species_records(
                root,
                split_dir,
                category=category,
                normal_specie=normal_specie,
                mask_dir_for=(category_dir / "ground_truth").joinpath if with_masks else None,
                mask_suffix=mask_suffix,
            )
    return meta


def build_mvtec_meta(
    root: str | os.PathLike[str], categories: Iterable[str] | None = None, *, write: bool = True
) -> Meta:
    """Index MVTec AD (``root/<category>/{train,test}/<defect>/*.png``, ``ground_truth/<defect>/<stem>_mask.png``).

    The train split indexes every ``train/<specie>`` folder (only ``good`` in MVTec AD), the test split every
    ``test/<defect>`` folder (``good`` is normal).
    Categories default to every category folder found. Returns the meta dict and writes ``root/meta.json``.
    """
    return finish_meta(root, mvtec_layout_meta(root, categories), write)


_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_VISA_LABELS = {"normal": 0, "anomaly": 1}


def build_visa_meta(root: str | os.PathLike[str], *, write: bool = True) -> Meta:
    """Index VisA from its ``root/split_csv/1cls.csv`` (columns object, split, label, image, mask).

    Rows go to the split named in the csv (``train``/``test``), categories sorted by name, rows in csv order.
    ``label`` is ``normal`` (specie ``"good"``, no mask) or ``anomaly`` (specie ``"anomaly"``, mask from the csv).
    The zero-shot protocol evaluates every VisA image: load both splits (e.g. concatenate them) for that.

    Raises:
        DataError: the csv is missing, lacks a column, or has an unknown label or split (the line is named).
    """
    root = Path(root)
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataError(
            f"VisA split file not found: {csv_path} (it ships with the VisA download as split_csv/1cls.csv)"
        )
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in _VISA_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path} lacks columns {missing}; found {reader.fieldnames}")
        rows = list(reader)
    grouped: Meta = {"train": {}, "test": {}}
    for line_number, row in enumerate(rows, start=2):
        label, split = row["label"].strip(), row["split"].strip()
        if label not in _VISA_LABELS or split not in grouped:
            raise DataError(f"{csv_path} line {line_number}: unknown label {label!r} or split {split!r}")
        anomaly = _VISA_LABELS[label]
        category = row["object"].strip()
        grouped[split].setdefault(category, []).append(
            make_record(
                row["image"].strip(),
                cls_name=category,
                anomaly=anomaly,
                specie_name="anomaly" if anomaly else NORMAL_SPECIE,
                mask_path=row["mask"].strip() if anomaly else "",
            )
        )
    meta = {split: dict(sorted(categories.items())) for split, categories in grouped.items()}
    return finish_meta(root, meta, write)


def build_folder_meta(
    root: str | os.PathLike[str],
    normal_dir: str | os.PathLike[str] | None,
    anomalous_dir: str | os.PathLike[str] | None,
    mask_dir: str | os.PathLike[str] | None = None,
    *,
    category: str | None = None,
    split: str = "test",
    mask_suffix: str = "_mask",
    anomalous_specie: str | None = None,
    write: bool = True,
) -> Meta:
    """Index a generic layout: normal images in one folder, anomalous images in another, optional masks.

    Args:
        root: Dataset root; folders may be given relative to it or absolute.
        normal_dir: Folder of normal images (None when there are none, e.g. polyp segmentation sets).
        anomalous_dir: Folder of anomalous images (None for a normal-only set); their specie is the folder name.
        mask_dir: Folder of masks for the anomalous images, matched by stem (``<stem><mask_suffix>.*`` or
            ``<stem>.*``); None for an image-level dataset.
        category: ``cls_name`` of every record; default the name of ``root``.
        split: Split to put the records in (the other split is left empty).
        mask_suffix: Suffix of mask stems.
        anomalous_specie: ``specie_name`` of the anomalous records; default the name of ``anomalous_dir``.
        write: Write ``root/meta.json``.

    Raises:
        DataError: no folder given, a folder is missing, or an anomalous image has no matching mask.
    """
    if normal_dir is None and anomalous_dir is None:
        raise DataError("build_folder_meta needs a normal_dir, an anomalous_dir or both")
    category = category if category is not None else Path(os.path.abspath(root)).name
    records = []
    if normal_dir is not None:
        records += folder_records(root, normal_dir, category=category, anomaly=0)
    if anomalous_dir is not None:
        records += folder_records(
            root,
            anomalous_dir,
            category=category,
            anomaly=1,
            specie_name=anomalous_specie,
            mask_dir=mask_dir,
            mask_suffix=mask_suffix,
        )
    meta: Meta = {"train": {}, "test": {}}
    meta[split] = {category: records}
    return finish_meta(root, meta, write)

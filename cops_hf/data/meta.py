"""The ``meta.json`` index format shared by CoPS and AnomalyCLIP, with strict reading and atomic writing.

A dataset root holds ``ROOT/meta.json``::

    {"train": {cls_name: [record, ...]}, "test": {cls_name: [record, ...]}}

and every record is::

    {"img_path": "bottle/test/broken_large/000.png",   # relative to ROOT, and must stay inside it
     "mask_path": "bottle/ground_truth/broken_large/000_mask.png",   # or "" when there is no mask
     "cls_name": "bottle", "specie_name": "broken_large",   # defect type, "good" for normal samples
     "anomaly": 1}                                           # 0 normal, 1 anomalous

Either split may be absent or empty. Extra record fields are kept but ignored. Category and specie names must be
plain folder names, and every path must lead inside ROOT (symlinks included) unless trusted explicitly
(``allow_outside_root`` of the loaders): a dataset file never decides where outputs go or which files are read.
``cops-hf data prepare`` also records which benchmark the folder holds, as a top-level string ``"dataset": "visa"``
(read by `meta_dataset_name`; the reference's loaders read only the split they are asked for).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ..file_utils import atomic_write

__all__ = [
    "DataError",
    "DataProblem",
    "META_DATASET_KEY",
    "META_FILENAME",
    "Meta",
    "NORMAL_SPECIE",
    "SPLITS",
    "make_record",
    "meta_dataset_name",
    "meta_json_path",
    "path_component_problem",
    "read_meta_json",
    "record_problems",
    "write_meta_json",
]

META_FILENAME = "meta.json"
META_DATASET_KEY = "dataset"
SPLITS = ("train", "test")
NORMAL_SPECIE = "good"

Meta = dict[str, dict[str, list[dict[str, Any]]]]
"""Type of a meta.json document: ``{split: {category: [record, ...]}}``."""

_BUILDER_HINT = (
    "Create it with a builder from cops_hf.data: build_mvtec_meta(root), build_visa_meta(root), "
    "build_folder_meta(root, normal_dir, anomalous_dir, mask_dir), prepare_dataset(name, root) for the "
    "benchmark datasets, or make_synthetic_dataset(root) for an offline synthetic dataset."
)


class DataError(ValueError):
    """A dataset on disk or its ``meta.json`` is missing, malformed or inconsistent; the message names the file."""


class DataProblem(NamedTuple):
    """One problem found in a dataset: the file (or meta.json entry) concerned and what is wrong with it."""

    path: str
    reason: str
    location: str = ""

    def __str__(self) -> str:
        where = f" [{self.location}]" if self.location else ""
        return f"{self.path}: {self.reason}{where}"


def meta_json_path(root: str | os.PathLike[str]) -> Path:
    """Return the path of the ``meta.json`` file of the dataset rooted at ``root``."""
    return Path(root) / META_FILENAME


def make_record(
    img_path: str, *, cls_name: str, anomaly: int, specie_name: str = NORMAL_SPECIE, mask_path: str = ""
) -> dict[str, Any]:
    """Build one meta.json record (paths should be relative to the dataset root, POSIX separators)."""
    return {
        "img_path": img_path,
        "mask_path": mask_path,
        "cls_name": cls_name,
        "specie_name": specie_name,
        "anomaly": int(anomaly),
    }


def path_component_problem(name: str, what: str) -> str | None:
    """Why ``name`` cannot be used as one folder or file name inside an output folder (None when it can).

    Category and defect names from a meta.json become folder names (e.g. evaluation pictures): a name with a path
    separator, ``..`` or ``.`` could write outside the output folder, so it is refused rather than altered.
    """
    if not name or name in (".", "..") or any(character in name for character in ("/", "\\", "\0")):
        return f"{what} {name!r} is not a plain folder name (no '/', '\\', '.', '..' or empty names)"
    return None


def record_problems(record: Any, category: str) -> list[str]:
    """Return what is structurally wrong with a meta.json ``record`` listed under ``category`` (empty if valid)."""
    if not isinstance(record, Mapping):
        return [f"record must be a JSON object, got {type(record).__name__}"]
    problems = []
    for field in ("img_path", "mask_path", "cls_name", "specie_name"):
        if field not in record:
            problems.append(f"missing field '{field}'")
        elif not isinstance(record[field], str):
            problems.append(f"field '{field}' must be a string, got {record[field]!r}")
    if isinstance(record.get("img_path"), str) and not record["img_path"]:
        problems.append("field 'img_path' is empty")
    if isinstance(record.get("specie_name"), str) and (
        problem := path_component_problem(record["specie_name"], "field 'specie_name'")
    ):
        problems.append(problem)
    if isinstance(record.get("cls_name"), str) and record["cls_name"] != category:
        problems.append(f"field 'cls_name' is {record['cls_name']!r} but the record is listed under {category!r}")
    if "anomaly" not in record:
        problems.append("missing field 'anomaly'")
    elif not isinstance(record["anomaly"], int) or record["anomaly"] not in (0, 1):
        problems.append(f"field 'anomaly' must be 0 or 1, got {record['anomaly']!r}")
    return problems


def _check_structure(meta: Any, source: str) -> None:
    """Raise `DataError` unless ``meta`` is ``{split: {category: [record, ...]}}``."""
    if not isinstance(meta, Mapping):
        raise DataError(f"{source}: top level must be a JSON object {{split: {{category: [records]}}}}")
    for split, categories in meta.items():
        if split == META_DATASET_KEY and isinstance(categories, str):
            continue
        if not isinstance(categories, Mapping):
            raise DataError(f"{source}: split {split!r} must map category names to lists of records")
        for category, records in categories.items():
            if problem := path_component_problem(category, f"split {split!r}: category"):
                raise DataError(f"{source}: {problem}")
            if not isinstance(records, list):
                kind = type(records).__name__
                raise DataError(f"{source}: {split}/{category} must be a list of records, got {kind}")


def _read_document(root: str | os.PathLike[str]) -> dict[str, Any]:
    path = meta_json_path(root)
    if not path.is_file():
        raise DataError(f"No {META_FILENAME} at {path}. {_BUILDER_HINT}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON: {error}") from error
    _check_structure(document, str(path))
    return document


def meta_dataset_name(root: str | os.PathLike[str]) -> str | None:
    """The benchmark name ``ROOT/meta.json`` records (written by ``cops-hf data prepare``), or None.

    Raises:
        DataError: the file is missing or malformed (as `read_meta_json`).
    """
    return _read_document(root).get(META_DATASET_KEY)


def read_meta_json(root: str | os.PathLike[str]) -> Meta:
    """Read ``ROOT/meta.json``, checking its top-level structure (records are checked when loading).

    The recorded dataset name (see `meta_dataset_name`) is left out: the result maps splits only.

    Raises:
        DataError: the file is missing (the message says how to create it), is not valid JSON, or does not have
            the ``{split: {category: [records]}}`` shape.
    """
    document = _read_document(root)
    document.pop(META_DATASET_KEY, None)
    return document


def write_meta_json(
    root: str | os.PathLike[str], meta: Mapping[str, Mapping[str, list[Any]]], dataset: str | None = None
) -> Path:
    """Validate ``meta`` and write it to ``ROOT/meta.json`` atomically (``cops_hf.file_utils.atomic_write``).

    Both ``"train"`` and ``"test"`` keys are always written (empty when absent) for compatibility with loaders that
    expect them. Only the structure is validated here; `cops_hf.data.validate_meta_dataset` checks the files.
    ``dataset`` (a benchmark name such as ``"visa"``) is recorded as the top-level ``"dataset"`` entry.

    Returns:
        The path of the written file.

    Raises:
        DataError: the structure or a record is malformed (the message names the split, category, index and field).
    """
    path = meta_json_path(root)
    _check_structure(meta, "meta to write")
    problems = [
        f"{split}/{category}[{index}]: {problem}"
        for split, categories in meta.items()
        for category, records in categories.items()
        for index, record in enumerate(records)
        for problem in record_problems(record, category)
    ]
    if problems:
        raise DataError(f"Refusing to write {path}; malformed records:\n  " + "\n  ".join(problems))
    document = {split: {} for split in SPLITS}
    document.update({split: {cat: list(recs) for cat, recs in cats.items()} for split, cats in meta.items()})
    if dataset is not None:
        document[META_DATASET_KEY] = dataset
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path

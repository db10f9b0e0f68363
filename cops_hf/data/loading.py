"""Validate a ``meta.json`` dataset and load it as a lazily decoded `datasets.Dataset`.

Design of invalid-data handling:

* `validate_meta_dataset` never stops at the first problem: it returns a `ValidationReport` listing every
  problem (missing, unreadable or truncated files, malformed records, ...) and every note (records used otherwise
  than they are written, see below).
* `load_meta_dataset` raises `cops_hf.data.meta.DataError` listing every problem unless
  ``skip_invalid=True``; then invalid records are dropped, a warning with the count is logged, the one-line summary
  is stored in ``dataset.info.description``, and `load_meta_dataset_with_report` returns the full report
  (``report.skipped`` lists each dropped file and why).

Mask rules of the records (the reference's, see docs/protocol.md), applied here for training, evaluation and
calibration alike; each case is a note of the report and a warning that names the file:

* a record labelled normal gets no mask (all-zero) even if it lists a mask file;
* an anomalous record whose ``mask_path`` is empty or a folder has no mask: it counts at image level only;
* a mask whose size differs from its image is not a problem: the processor resizes it on its own to the input size.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets

from ..image_utils import ImageLoadError, open_image_file, refuse_non_finite_pixels
from ..schema import LABEL_NAMES
from .meta import SPLITS, DataError, DataProblem, meta_dataset_name, meta_json_path, read_meta_json, record_problems

__all__ = [
    "ALLOW_OUTSIDE_ROOT_ENV",
    "META_FEATURES",
    "ValidationReport",
    "has_masks",
    "labelled_split",
    "normal_split",
    "load_meta_dataset",
    "load_meta_dataset_with_report",
    "split_label_counts",
    "validate_meta_dataset",
]

logger = logging.getLogger(__name__)

# Images keep their file's mode: CoPSImageProcessor resizes first and converts to RGB after, as the reference does.
META_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "mask": datasets.Image(mode="L"),
        "gt_label": datasets.ClassLabel(names=list(LABEL_NAMES)),
        "cls_name": datasets.Value("string"),
        "specie_name": datasets.Value("string"),
        "image_path": datasets.Value("string"),
        "mask_path": datasets.Value("string"),
    }
)
"""Columns of a loaded dataset. ``image`` decodes in its file's mode and ``mask`` to single-channel ``L``. Masks are
binarized by CoPSImageProcessor as the reference does (any non-zero pixel is anomalous), which also counts the
compression noise of JPEG masks (Kvasir) as anomalous: that is what the paper's numbers were computed with.
``mask`` is ``None`` when the record has no mask: normal samples (all-normal pixels, whatever they list),
image-level datasets and anomalous records whose mask path is empty or a folder."""

_MAX_PROBLEMS_IN_MESSAGE = 20
_UNMASKED_ANOMALY = "anomalous record without a mask: image-level only"


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    """What checking one split of a meta.json dataset found.

    Attributes:
        meta_path: The ``meta.json`` that was checked.
        split: The split that was checked.
        categories: The categories that were checked, in row order.
        num_records: Records listed for those categories.
        num_valid: Records without any problem.
        num_anomalous: Valid records with ``anomaly == 1``.
        num_anomalous_with_mask: Valid anomalous records that have a mask.
        problems: Every problem found, in record order (a record can have several).
        dropped_invalid: True when the invalid records were dropped (``skip_invalid=True``).
        notes: Valid records used otherwise than written: a normal record's mask ignored, an anomalous record
            without a mask file counted at image level only.
    """

    meta_path: Path
    split: str
    categories: tuple[str, ...]
    num_records: int
    num_valid: int
    num_anomalous: int
    num_anomalous_with_mask: int
    problems: tuple[DataProblem, ...]
    dropped_invalid: bool = False
    notes: tuple[DataProblem, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def num_invalid(self) -> int:
        """Number of records with at least one problem."""
        return self.num_records - self.num_valid

    @property
    def skipped(self) -> tuple[DataProblem, ...]:
        """The problems of the records that were dropped (empty unless ``dropped_invalid``)."""
        return self.problems if self.dropped_invalid else ()

    @property
    def num_skipped(self) -> int:
        """Number of records dropped."""
        return self.num_invalid if self.dropped_invalid else 0

    @property
    def pixel_level(self) -> bool:
        """True when there are anomalous samples and every one has a mask, so pixel-level metrics are defined."""
        return self.num_anomalous > 0 and self.num_anomalous_with_mask == self.num_anomalous

    def summary(self) -> str:
        """One line: counts of records, anomalies, masks and problems."""
        level = "pixel-level" if self.pixel_level else "image-level"
        dropped = f", {self.num_skipped} invalid skipped" if self.dropped_invalid else ""
        return (
            f"{self.meta_path} [{self.split}]: {self.num_records} records in {len(self.categories)} categories, "
            f"{self.num_valid} valid ({self.num_anomalous} anomalous, {level}), "
            f"{len(self.problems)} problems{dropped}"
        )

    def describe(self, max_problems: int = _MAX_PROBLEMS_IN_MESSAGE) -> str:
        """The summary followed by one line per problem, then per note (at most ``max_problems`` of each)."""
        lines = [self.summary()]
        for prefix, entries in (("  - ", self.problems), ("  note: ", self.notes)):
            lines += [f"{prefix}{entry}" for entry in entries[:max_problems]]
            if len(entries) > max_problems:
                lines.append(f"  ... and {len(entries) - max_problems} more")
        return "\n".join(lines)

    def log_notes(self, max_notes: int = _MAX_PROBLEMS_IN_MESSAGE) -> None:
        """Log one warning per note (at most ``max_notes``, then a count of the rest)."""
        for note in self.notes[:max_notes]:
            logger.warning("%s", note)
        if len(self.notes) > max_notes:
            logger.warning("... and %d more such records in %s", len(self.notes) - max_notes, self.meta_path)

    def raise_for_problems(self) -> None:
        """Raise `DataError` listing the problems, if there are any."""
        if self.problems:
            raise DataError(self.describe())


ALLOW_OUTSIDE_ROOT_ENV = "COPS_HF_ALLOW_PATHS_OUTSIDE_ROOT"
"""Set to ``1`` to trust meta.json paths that lead outside the dataset root (the default ``allow_outside_root``)."""


def _allow_outside_root(allow_outside_root: bool | None) -> bool:
    if allow_outside_root is not None:
        return allow_outside_root
    return os.environ.get(ALLOW_OUTSIDE_ROOT_ENV, "").strip().lower() in ("1", "true", "yes")


def _absolute(root: Path, relative_or_absolute: str) -> Path:
    return Path(os.path.abspath(root / relative_or_absolute))


def _record_path(root: Path, value: str, allow_outside_root: bool) -> Path | None:
    """Absolute path of a meta.json path, or None when it leads outside ``root`` (symlinks followed) unless allowed.

    Nothing outside the root is opened or even checked for existence, so a refused path reveals nothing.
    """
    path = _absolute(root, value)
    if allow_outside_root or path.resolve().is_relative_to(root.resolve()):
        return path
    return None


def _outside_root_problem(root: Path, kind: str, value: str, location: str) -> DataProblem:
    reason = (
        f"{kind} path leads outside the dataset root {root}; meta.json paths must stay inside it "
        f"(set {ALLOW_OUTSIDE_ROOT_ENV}=1 or pass allow_outside_root=True to trust them)"
    )
    return DataProblem(value, reason, location)


def _select_categories(
    meta: Mapping[str, Mapping[str, list[Any]]], split: str, categories: str | Iterable[str] | None, meta_path: Path
) -> list[str]:
    split_records = meta.get(split) or {}
    if not any(split_records.values()):
        with_records = [name for name, cats in meta.items() if any(cats.values())]
        raise DataError(f"{meta_path} has no records in split {split!r}; splits with records: {with_records}")
    if categories is None:
        return list(split_records)
    selected = [categories] if isinstance(categories, str) else list(categories)
    unknown = [name for name in selected if name not in split_records]
    if unknown:
        raise DataError(f"{meta_path} split {split!r} has no categories {unknown}; available: {list(split_records)}")
    if not any(split_records[name] for name in selected):
        raise DataError(f"{meta_path} split {split!r} has no records for categories {selected}")
    return selected


def _decoding_problems(image_path: Path, mask_path: Path | None, location: str, decode: bool) -> list[DataProblem]:
    """Open the image and mask (fully when ``decode``, else headers only); a size mismatch is not a problem."""
    files = {"image": image_path} if mask_path is None else {"image": image_path, "mask": mask_path}
    problems = []
    for kind, path in files.items():
        try:
            with open_image_file(path, kind) as image:
                if decode:
                    image.load()
                    refuse_non_finite_pixels(image, kind)
        except ImageLoadError as error:
            problems.append(DataProblem(str(path), str(error).removesuffix("."), location))
    return problems


def _usable_mask(root: Path, record: Mapping[str, Any], location: str) -> tuple[Path | None, list[DataProblem]]:
    """The mask file a record is scored with (None: all-zero or image level) and the notes on that choice."""
    if not record["mask_path"]:
        return None, []
    mask_path = _absolute(root, record["mask_path"])
    if record["anomaly"] == 0:
        return None, [DataProblem(str(mask_path), "normal record lists a mask: ignored (all-zero mask)", location)]
    if mask_path.is_dir():
        return None, [DataProblem(str(mask_path), "mask path is a folder: image-level only", location)]
    return mask_path, []


def _check_record(
    root: Path,
    record: Any,
    category: str,
    location: str,
    meta_path: Path,
    check_images: bool,
    require_masks: bool,
    allow_outside_root: bool,
) -> tuple[dict[str, Any] | None, list[DataProblem], list[DataProblem]]:
    """Return the dataset row of a record (None if invalid), its problems and its notes."""
    structural = record_problems(record, category)
    if structural:
        return None, [DataProblem(str(meta_path), reason, location) for reason in structural], []
    escaping = [(kind, record[field]) for kind, field in (("image", "img_path"), ("mask", "mask_path"))
                if record[field] and _record_path(root, record[field], allow_outside_root) is None]  # fmt: skip
    if escaping:
        return None, [_outside_root_problem(root, kind, value, location) for kind, value in escaping], []
    image_path = _absolute(root, record["img_path"])
    mask_path, notes = _usable_mask(root, record, location)
    problems = []
    if not image_path.is_file():
        problems.append(DataProblem(str(image_path), "image file not found", location))
    if mask_path is not None and not mask_path.is_file():
        problems.append(DataProblem(str(mask_path), "mask file not found", location))
    if require_masks and record["anomaly"] == 1 and mask_path is None:
        problems.append(DataProblem(str(image_path), "anomalous sample has no mask but masks are required", location))
    if problems:
        return None, problems, []
    problems += _decoding_problems(image_path, mask_path, location, decode=check_images)
    if problems:
        return None, problems, []
    if record["anomaly"] == 1 and mask_path is None and not record["mask_path"]:
        notes.append(DataProblem(str(image_path), _UNMASKED_ANOMALY, location))
    row = {
        "image": str(image_path),
        "mask": str(mask_path) if mask_path is not None else None,
        "gt_label": int(record["anomaly"]),
        "cls_name": category,
        "specie_name": record["specie_name"],
        "image_path": str(image_path),
        "mask_path": str(mask_path) if mask_path is not None else "",
    }
    return row, [], notes


def _inspect(
    root: str | os.PathLike[str],
    split: str,
    categories: str | Iterable[str] | None,
    check_images: bool,
    require_masks: bool,
    dropped_invalid: bool,
    allow_outside_root: bool | None,
) -> tuple[list[dict[str, Any]], ValidationReport]:
    root_path = Path(os.path.abspath(root))
    meta_path = meta_json_path(root_path)
    meta = read_meta_json(root_path)
    selected = _select_categories(meta, split, categories, meta_path)
    allow_outside_root = _allow_outside_root(allow_outside_root)
    rows, problems, notes, num_records = [], [], [], 0
    first_location: dict[Path, str] = {}
    for category in selected:
        for index, record in enumerate(meta[split][category]):
            num_records += 1
            location = f"{split}/{category}[{index}]"
            row, record_problems_found, record_notes = _check_record(
                root_path, record, category, location, meta_path, check_images, require_masks, allow_outside_root
            )
            if row is not None:
                image = Path(row["image_path"]).resolve()
                if image in first_location:
                    reason = f"duplicate record: the same image is listed at {first_location[image]}"
                    record_problems_found, row = [DataProblem(row["image_path"], reason, location)], None
                else:
                    first_location[image] = location
            problems.extend(record_problems_found)
            notes.extend(record_notes)
            if row is not None:
                rows.append(row)
    anomalous = [row for row in rows if row["gt_label"] == 1]
    if not any(row["mask"] for row in anomalous):  # an image-level split: no mask is missing
        notes = [note for note in notes if note.reason != _UNMASKED_ANOMALY]
    report = ValidationReport(
        meta_path=meta_path,
        split=split,
        categories=tuple(selected),
        num_records=num_records,
        num_valid=len(rows),
        num_anomalous=len(anomalous),
        num_anomalous_with_mask=sum(row["mask"] is not None for row in anomalous),
        problems=tuple(problems),
        dropped_invalid=dropped_invalid and bool(problems),
        notes=tuple(notes),
    )
    return rows, report


def _no_anomaly_problem(report: ValidationReport) -> DataProblem:
    return DataProblem(
        str(report.meta_path), "no valid anomalous sample, but masks are required (e.g. for training)", report.split
    )


def validate_meta_dataset(
    root: str | os.PathLike[str],
    split: str = "test",
    check_images: bool = True,
    require_masks: bool = False,
    categories: str | Iterable[str] | None = None,
    allow_outside_root: bool | None = None,
) -> ValidationReport:
    """Check every record of one split of ``ROOT/meta.json`` and report all problems found.

    Args:
        root: Dataset root holding ``meta.json``.
        split: ``"train"`` or ``"test"``.
        check_images: Fully decode every image and mask with PIL (``.load()``), catching unreadable and truncated
            files; otherwise only existence and mask/image size agreement (from the file headers) are checked.
        require_masks: Every anomalous sample must have a mask, and there must be at least one anomalous sample.
        categories: Restrict the check to these categories (default: all of the split).
        allow_outside_root: Trust record paths that lead outside ``root`` (absolute paths, ``..``, symlinks out of
            the root); by default they are problems, and nothing outside the root is opened. ``None`` reads
            `ALLOW_OUTSIDE_ROOT_ENV`.

    Returns:
        The report; ``report.ok`` is True when nothing is wrong, ``report.raise_for_problems()`` raises.

    Raises:
        DataError: meta.json is missing or malformed at the top level, or the split/categories have no records.
    """
    _, report = _inspect(root, split, categories, check_images, require_masks, False, allow_outside_root)
    if require_masks and report.num_anomalous == 0:
        return dataclasses.replace(report, problems=report.problems + (_no_anomaly_problem(report),))
    return report


def load_meta_dataset_with_report(
    root: str | os.PathLike[str],
    split: str = "test",
    categories: str | Iterable[str] | None = None,
    skip_invalid: bool = False,
    check_images: bool = False,
    require_masks: bool = False,
    allow_outside_root: bool | None = None,
) -> tuple[datasets.Dataset, ValidationReport]:
    """Like `load_meta_dataset`, and also return the `ValidationReport` (e.g. ``report.skipped``)."""
    rows, report = _inspect(
        root, split, categories, check_images, require_masks, skip_invalid, allow_outside_root=allow_outside_root
    )
    if report.problems and not skip_invalid:
        raise DataError(
            f"{report.meta_path} [{split}]: {report.num_invalid} invalid of {report.num_records} records, first "
            f"{report.problems[0]}. Fix them, or drop invalid records with skip_invalid=True (CLI: --skip-invalid).\n"
            f"{report.describe()}"
        )
    if not rows:
        raise DataError(f"No valid records left.\n{report.describe()}")
    if require_masks and report.num_anomalous == 0:
        raise DataError(str(_no_anomaly_problem(report)))
    if report.dropped_invalid:
        logger.warning("Skipped %d invalid records: %s", report.num_skipped, report.summary())
    report.log_notes()
    columns = {name: [row[name] for row in rows] for name in META_FEATURES}
    name = meta_dataset_name(root) or os.path.abspath(root)
    info = datasets.DatasetInfo(description=report.summary(), features=META_FEATURES, dataset_name=name)
    return datasets.Dataset.from_dict(columns, features=META_FEATURES, info=info, split=split), report


def load_meta_dataset(
    root: str | os.PathLike[str],
    split: str = "test",
    categories: str | Iterable[str] | None = None,
    skip_invalid: bool = False,
    check_images: bool = False,
    require_masks: bool = False,
    allow_outside_root: bool | None = None,
) -> datasets.Dataset:
    """Load one split of ``ROOT/meta.json`` as a `datasets.Dataset` with lazily decoded images.

    Columns are `META_FEATURES`: ``image`` (the file's mode), ``mask`` (``L`` or None), ``gt_label`` (0/1),
    ``cls_name``, ``specie_name``, ``image_path`` (absolute) and ``mask_path`` (absolute or ""). Rows are grouped
    by category, in meta.json order (or in the order of ``categories``), then in file order. ``dataset.split`` is
    ``split``; ``dataset.info.dataset_name`` is the benchmark name meta.json records, else the root's absolute path.

    Every record is checked first: structure, paths inside ``root``, image and mask files exist and their headers
    read, no image listed twice. The mask rules of the module docstring apply; each record they change is logged as
    a warning naming the file.

    Args:
        root: Dataset root holding ``meta.json``; relative record paths are resolved against it.
        split: ``"train"`` or ``"test"``.
        categories: A category name or names to keep (default: all of the split).
        skip_invalid: Drop invalid records instead of raising; a warning gives the count and the summary is stored
            in ``dataset.info.description`` (use `load_meta_dataset_with_report` for the list).
        check_images: Also fully decode every image and mask to catch unreadable or truncated files (slower).
        require_masks: Every anomalous sample must have a mask and at least one must exist (training data).
        allow_outside_root: Trust record paths outside ``root`` (see `validate_meta_dataset`).

    Raises:
        DataError: meta.json missing or malformed, unknown split/categories, any invalid record (unless
            ``skip_invalid``), no valid record left, or no anomalous sample when ``require_masks``.
    """
    dataset, _ = load_meta_dataset_with_report(
        root, split, categories, skip_invalid, check_images, require_masks, allow_outside_root
    )
    return dataset


def has_masks(dataset: datasets.Dataset) -> bool:
    """True when the dataset has anomalous samples and every one has a mask (pixel-level metrics are defined).

    False for image-level datasets (no masks) and for datasets without anomalous samples. Reads only the
    ``gt_label`` and ``mask_path`` columns, no image is decoded.
    """
    labels_and_masks = zip(dataset["gt_label"], dataset["mask_path"], strict=True)
    anomalous_masks = [mask for label, mask in labels_and_masks if label == 1]
    return bool(anomalous_masks) and all(anomalous_masks)


def split_label_counts(
    root: str | os.PathLike[str], categories: str | Iterable[str] | None = None
) -> dict[str, tuple[int, int]]:
    """``{split: (normal records, anomalous records)}`` of ``ROOT/meta.json`` (restricted to ``categories``).

    Reads meta.json only: no file is checked. Records without a valid ``anomaly`` field count as neither.
    """
    selected = None if categories is None else {categories} if isinstance(categories, str) else set(categories)
    counts = {}
    for split, split_categories in read_meta_json(root).items():
        labels = [
            record.get("anomaly") if isinstance(record, Mapping) else None
            for category, records in split_categories.items()
            if selected is None or category in selected
            for record in records
        ]
        counts[split] = (labels.count(0), labels.count(1))
    return counts


def labelled_split(root: str | os.PathLike[str], categories: str | Iterable[str] | None = None) -> str:
    """The split to train on: the first of ``train``, ``test`` (then any other) holding normal and anomalous records.

    CoPS trains on labelled images of an auxiliary dataset. The benchmarks' ``train`` splits hold normal images
    only, so for MVTec AD and VisA this is ``test``, the split the reference's ``train.py`` reads; a synthetic
    dataset (`cops_hf.data.make_synthetic_dataset`) has a labelled ``train`` split.

    Raises:
        DataError: no split holds both classes (the message gives each split's counts).
    """
    counts = split_label_counts(root, categories)
    for split in _splits_in_order(counts):
        if all(counts[split]):
            return split
    raise DataError(
        f"No split of {meta_json_path(root)} holds both normal and anomalous images ({_describe_counts(counts)}). "
        "CoPS trains on an auxiliary set with both, e.g. MVTec AD or VisA prepared with `cops-hf data prepare`."
    )


def normal_split(root: str | os.PathLike[str], categories: str | Iterable[str] | None = None) -> str:
    """The split to put synthetic defects on: the first of ``train``, ``test`` (then any other) with normal records.

    Raises:
        DataError: no split holds a normal record (the message gives each split's counts).
    """
    counts = split_label_counts(root, categories)
    for split in _splits_in_order(counts):
        if counts[split][0]:
            return split
    raise DataError(
        f"No split of {meta_json_path(root)} holds a normal image ({_describe_counts(counts)}): --synthesize puts "
        "defects on normal images; list good ones, e.g. with `cops-hf data prepare folder ROOT --normal good`."
    )


def _splits_in_order(counts: Mapping[str, Any]) -> list[str]:
    """``train``, ``test``, then any other split by name."""
    return sorted(counts, key=lambda name: (SPLITS.index(name) if name in SPLITS else len(SPLITS), name))


def _describe_counts(counts: Mapping[str, tuple[int, int]]) -> str:
    return ", ".join(
        f"{split}: {normal} normal, {anomalous} anomalous" for split, (normal, anomalous) in counts.items()
    )

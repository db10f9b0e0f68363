"""Data layer of cops-hf: the ``meta.json`` dataset format, builders for original layouts, synthetic data.

Typical use::

    from cops_hf.data import build_mvtec_meta, load_meta_dataset

    build_mvtec_meta("/data/mvtec")                    # or prepare_dataset("mvtec", "/data/mvtec"), once
    test_set = load_meta_dataset("/data/mvtec", split="test")
    test_set[0]["image"], test_set[0]["mask"], test_set[0]["gt_label"]
"""

from .benchmarks import (
    BENCHMARKS,
    DATASET_BUILDERS,
    BenchmarkInfo,
    benchmark_name,
    prepare_dataset,
    prepare_folder_dataset,
)
from .builders import (
    IMAGE_SUFFIXES,
    build_folder_meta,
    build_mvtec_meta,
    build_visa_meta,
    finish_meta,
    folder_records,
    list_image_files,
    mvtec_layout_meta,
    species_records,
)
from .loading import (
    ALLOW_OUTSIDE_ROOT_ENV,
    META_FEATURES,
    ValidationReport,
    has_masks,
    labelled_split,
    load_meta_dataset,
    load_meta_dataset_with_report,
    normal_split,
    split_label_counts,
    validate_meta_dataset,
)
from .meta import (
    META_DATASET_KEY,
    META_FILENAME,
    NORMAL_SPECIE,
    SPLITS,
    DataError,
    DataProblem,
    Meta,
    make_record,
    meta_dataset_name,
    meta_json_path,
    read_meta_json,
    write_meta_json,
)
from .synthetic import (
    DEFAULT_TEST_CATEGORIES,
    DEFAULT_TRAIN_CATEGORIES,
    DEFECT_TYPES,
    OBJECT_CATEGORIES,
    SYNTHETIC_CATEGORIES,
    TEXTURE_CATEGORIES,
    SyntheticSample,
    apply_defect,
    make_synthetic_dataset,
    render_synthetic_sample,
)

__all__ = [
    "ALLOW_OUTSIDE_ROOT_ENV",
    "BENCHMARKS",
    "DATASET_BUILDERS",
    "BenchmarkInfo",
    "benchmark_name",
    "prepare_dataset",
    "prepare_folder_dataset",
    "DEFAULT_TEST_CATEGORIES",
    "DEFAULT_TRAIN_CATEGORIES",
    "DEFECT_TYPES",
    "IMAGE_SUFFIXES",
    "META_FEATURES",
    "META_DATASET_KEY",
    "META_FILENAME",
    "Meta",
    "NORMAL_SPECIE",
    "OBJECT_CATEGORIES",
    "SPLITS",
    "SYNTHETIC_CATEGORIES",
    "TEXTURE_CATEGORIES",
    "DataError",
    "DataProblem",
    "SyntheticSample",
    "ValidationReport",
    "apply_defect",
    "build_folder_meta",
    "build_mvtec_meta",
    "build_visa_meta",
    "finish_meta",
    "folder_records",
    "has_masks",
    "labelled_split",
    "normal_split",
    "list_image_files",
    "load_meta_dataset",
    "load_meta_dataset_with_report",
    "make_record",
    "meta_dataset_name",
    "make_synthetic_dataset",
    "meta_json_path",
    "mvtec_layout_meta",
    "read_meta_json",
    "render_synthetic_sample",
    "species_records",
    "split_label_counts",
    "validate_meta_dataset",
    "write_meta_json",
]

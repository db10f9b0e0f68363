"""Data layer of cops-hf: the ``meta.json`` dataset format, builders for original layouts, synthetic data.

Typical use::

    from cops_hf.data import build_mvtec_meta, load_meta_dataset

    build_mvtec_meta("/data/mvtec")                    # or prepare_dataset("mvtec", "/data/mvtec"), once
    test_set = load_meta_dataset("/data/mvtec", split="test")
    test_set[0]["image"], test_set[0]["mask"], test_set[0]["gt_label"]
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

# Public name -> the module defining it; loaded on first access, so that light users (the CLI's --help reads
# the dataset registry) do not import datasets and torch.
_PUBLIC_NAMES = {
    "BENCHMARKS": "benchmarks",
    "DATASET_BUILDERS": "benchmarks",
    "GENERAL_PRESET": "registry",
    "REGISTRY": "registry",
    "SUITES": "registry",
    "BenchmarkEntry": "registry",
    "accepted_names": "registry",
    "benchmark_name": "registry",
    "resolve_test_preset": "registry",
    "prepare_dataset": "benchmarks",
    "prepare_folder_dataset": "benchmarks",
    "IMAGE_SUFFIXES": "builders",
    "build_folder_meta": "builders",
    "build_mvtec_meta": "builders",
    "build_visa_meta": "builders",
    "finish_meta": "builders",
    "folder_records": "builders",
    "list_image_files": "builders",
    "mvtec_layout_meta": "builders",
    "species_records": "builders",
    "ALLOW_OUTSIDE_ROOT_ENV": "loading",
    "META_FEATURES": "loading",
    "ValidationReport": "loading",
    "has_masks": "loading",
    "labelled_split": "loading",
    "normal_split": "loading",
    "load_meta_dataset": "loading",
    "load_meta_dataset_with_report": "loading",
    "split_label_counts": "loading",
    "validate_meta_dataset": "loading",
    "DataError": "meta",
    "DataProblem": "meta",
    "META_DATASET_KEY": "meta",
    "META_FILENAME": "meta",
    "Meta": "meta",
    "NORMAL_SPECIE": "meta",
    "SPLITS": "meta",
    "make_record": "meta",
    "meta_dataset_name": "meta",
    "meta_json_path": "meta",
    "read_meta_json": "meta",
    "write_meta_json": "meta",
    "DEFAULT_TEST_CATEGORIES": "synthetic",
    "DEFAULT_TRAIN_CATEGORIES": "synthetic",
    "DEFECT_TYPES": "synthetic",
    "OBJECT_CATEGORIES": "synthetic",
    "SYNTHETIC_CATEGORIES": "synthetic",
    "SyntheticSample": "synthetic",
    "apply_defect": "synthetic",
    "TEXTURE_CATEGORIES": "synthetic",
    "make_synthetic_dataset": "synthetic",
    "render_synthetic_sample": "synthetic",
}

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC_NAMES)


__all__ = sorted(_PUBLIC_NAMES)

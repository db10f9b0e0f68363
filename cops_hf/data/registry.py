"""The one dataset registry: each benchmark of the CoPS paper with its aliases, its builder and its test preset.

`cops-hf data prepare`, `evaluate --preset`, `benchmark`, the configuration's presets and every `--help` read it.
It imports nothing heavy (the CLI's help lists the names without loading torch): a builder is named here and
defined in `cops_hf.data.benchmarks`. The preset VALUES live in `CoPSConfig`'s `TEST_DATASET_PRESETS`, keyed by
the canonical names below (the configuration is part of the core, which cannot import this layer); this registry
maps every spelling of a dataset to its canonical name and so to its preset.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import dataset_key

GENERAL_PRESET = "general"
"""The test preset of a dataset that is not a benchmark of the paper (the reference's values for all but VisA)."""


@dataclass(frozen=True)
class BenchmarkEntry:
    """A benchmark dataset of the paper.

    Attributes:
        name: Canonical name: the registry key, the `dataset` meta.json records and the configuration's preset key.
        aliases: Other accepted spellings (after `cops_hf.schema.dataset_key`), e.g. "mvtec_ad".
        builder: Name of the function of `cops_hf.data.benchmarks` that writes meta.json from the download layout.
        categories: The categories the full dataset has.
        pixel_level: Whether anomalous images have ground-truth masks.
        domain: "industrial" or "medical".
        test_preset: Key of `TEST_DATASET_PRESETS` the dataset is tested with.
    """

    name: str
    aliases: tuple[str, ...]
    builder: str
    categories: tuple[str, ...]
    pixel_level: bool
    domain: str
    test_preset: str


_MVTEC_CATEGORIES = tuple(
    "bottle cable capsule carpet grid hazelnut leather metal_nut"
    " pill screw tile toothbrush transistor wood zipper".split()
)
_VISA_CATEGORIES = tuple(
    "candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum".split()
)
_DTD_CATEGORIES = tuple(
    "Blotchy_099 Fibrous_183 Marbled_078 Matted_069 Mesh_114 Perforated_037"
    " Stratified_154 Woven_001 Woven_068 Woven_104 Woven_125 Woven_127".split()
)
_MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")

REGISTRY: dict[str, BenchmarkEntry] = {
    entry.name: entry
    for entry in (
        BenchmarkEntry("mvtec", ("mvtec_ad", "mvtecad"), "build_mvtec_meta", _MVTEC_CATEGORIES, True, "industrial",
                       "mvtec"),
        BenchmarkEntry("visa", (), "build_visa_meta", _VISA_CATEGORIES, True, "industrial", "visa"),
        BenchmarkEntry("btad", (), "build_btad_meta", ("01", "02", "03"), True, "industrial", "btad"),
        BenchmarkEntry("mpdd", (), "build_mpdd_meta", _MPDD_CATEGORIES, True, "industrial", "mpdd"),
        BenchmarkEntry("dtd_synthetic", ("dtd",), "build_dtd_synthetic_meta", _DTD_CATEGORIES, True, "industrial",
                       "dtd_synthetic"),
        BenchmarkEntry("headct", ("head_ct",), "build_headct_meta", ("brain",), False, "medical", "headct"),
        BenchmarkEntry("brainmri", ("brain_mri",), "build_brainmri_meta", ("brain",), False, "medical", "brainmri"),
        BenchmarkEntry("br35h", ("br35",), "build_br35h_meta", ("brain",), False, "medical", "br35h"),
        BenchmarkEntry("isic", ("isic2016",), "build_isic_meta", ("skin",), True, "medical", "isic"),
        BenchmarkEntry("cvc_colondb", ("colondb",), "build_polyp_meta", ("colon",), True, "medical", "cvc_colondb"),
        BenchmarkEntry("cvc_clinicdb", ("clinicdb",), "build_polyp_meta", ("colon",), True, "medical",
                       "cvc_clinicdb"),
        BenchmarkEntry("kvasir", (), "build_polyp_meta", ("colon",), True, "medical", "kvasir"),
        BenchmarkEntry("endo", (), "build_endo_meta", ("colon",), True, "medical", "endo"),
    )
}  # fmt: skip
"""The paper's 13 benchmark datasets by canonical name."""

_BY_SPELLING = {spelling: entry.name for entry in REGISTRY.values() for spelling in (entry.name, *entry.aliases)}

SUITES: dict[str, tuple[str, ...]] = {
    "industrial": tuple(name for name, entry in REGISTRY.items() if entry.domain == "industrial"),
    "medical": tuple(name for name, entry in REGISTRY.items() if entry.domain == "medical"),
    "all": tuple(REGISTRY),
}
"""Benchmark suites of `cops-hf benchmark`: datasets by domain, or all of them."""


def accepted_names() -> list[str]:
    """Every spelling the registry accepts for a benchmark (canonical names and aliases), sorted."""
    return sorted(_BY_SPELLING)


def benchmark_name(name: str) -> str:
    """The canonical name of a benchmark name or alias ("MVTec-AD" -> "mvtec").

    Raises:
        ValueError: the name is no benchmark's; the message lists the names.
    """
    key = dataset_key(name)
    if key not in _BY_SPELLING:
        raise ValueError(f"Unknown dataset {name!r}; choose from {sorted(REGISTRY)} (or an alias: {aliases_text()})")
    return _BY_SPELLING[key]


def resolve_test_preset(name: str) -> str:
    """The `TEST_DATASET_PRESETS` key for a dataset name or alias, or for "general".

    Raises:
        ValueError: the name is neither a benchmark's nor "general"; the message lists the choices.
    """
    if dataset_key(name) == GENERAL_PRESET:
        return GENERAL_PRESET
    try:
        return REGISTRY[benchmark_name(name)].test_preset
    except ValueError:
        raise ValueError(
            f"Unknown test preset {name!r}; choose a dataset ({', '.join(REGISTRY)}, or an alias: {aliases_text()}) "
            f"or {GENERAL_PRESET!r}."
        ) from None


def aliases_text() -> str:
    """The aliases as "alias=name" pairs, for messages and `--help`."""
    return ", ".join(f"{alias}={entry.name}" for entry in REGISTRY.values() for alias in entry.aliases)


__all__ = [
    "GENERAL_PRESET",
    "REGISTRY",
    "SUITES",
    "BenchmarkEntry",
    "accepted_names",
    "aliases_text",
    "benchmark_name",
    "resolve_test_preset",
]

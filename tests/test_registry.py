"""The one dataset registry (cops_hf.data.registry): every spelling `data prepare` accepts works for
`evaluate --preset`, and the presets, the builders, the suites and `--help` all come from it."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from cops_hf import TEST_DATASET_PRESETS, CoPSProcessor
from cops_hf.cli import main
from cops_hf.data import read_meta_json
from cops_hf.data.benchmarks import DATASET_BUILDERS
from cops_hf.data.registry import GENERAL_PRESET, REGISTRY, SUITES, accepted_names, benchmark_name, resolve_test_preset
from cops_hf.evaluation.evaluator import AUTO_PRESET, choose_test_preset
from cops_hf.hub import save_detector

from .test_data_benchmarks import FAKE_LAYOUTS, _make_fake_download
from .tiny_models import tiny_model

ALIASES = {alias: entry.name for entry in REGISTRY.values() for alias in entry.aliases}


def test_the_registry_is_what_presets_builders_and_suites_are_made_of() -> None:
    assert set(TEST_DATASET_PRESETS) == {entry.test_preset for entry in REGISTRY.values()} | {GENERAL_PRESET}
    assert set(DATASET_BUILDERS) == set(REGISTRY) == set(SUITES["all"])
    assert set(SUITES["industrial"]) | set(SUITES["medical"]) == set(REGISTRY)
    assert ALIASES == {
        "mvtec_ad": "mvtec", "mvtecad": "mvtec", "dtd": "dtd_synthetic", "head_ct": "headct",
        "brain_mri": "brainmri", "br35": "br35h", "isic2016": "isic", "colondb": "cvc_colondb",
        "clinicdb": "cvc_clinicdb",
    }  # fmt: skip
    assert accepted_names() == sorted([*REGISTRY, *ALIASES])


@pytest.mark.parametrize("spelling", [*accepted_names(), "MVTec-AD", "CVC ClinicDB", "General"])
def test_every_spelling_names_one_benchmark_and_its_preset(spelling: str) -> None:
    key = spelling.lower().replace("-", "_").replace(" ", "_")
    if key == GENERAL_PRESET:
        assert resolve_test_preset(spelling) == GENERAL_PRESET
        return
    canonical = ALIASES.get(key, key)
    assert benchmark_name(spelling) == canonical
    assert resolve_test_preset(spelling) == REGISTRY[canonical].test_preset


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(ValueError, match=r"Unknown test preset 'imagenet'; choose a dataset \(mvtec, visa, .*general"):
        resolve_test_preset("imagenet")
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'; choose from .*mvtec_ad=mvtec"):
        benchmark_name("imagenet")


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_data_prepare_accepts_every_alias(alias: str, tmp_path: Path) -> None:
    canonical = ALIASES[alias]
    _make_fake_download(tmp_path, FAKE_LAYOUTS[canonical][0])
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "prepare", alias, str(tmp_path)]) == 0
    assert json.loads((tmp_path / "meta.json").read_text())["dataset"] == canonical
    assert read_meta_json(tmp_path)  # the splits read back


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("registry")
    model = tiny_model()
    save_detector(model, CoPSProcessor.for_image_size(model.config.image_size), root / "model")
    _make_fake_download(root / "data", FAKE_LAYOUTS["btad"][0])
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "prepare", "btad", str(root / "data")]) == 0
    return root / "model", root / "data"


@pytest.mark.parametrize(("preset", "expected"), [("mvtec_ad", "mvtec"), ("VisA", "visa"), ("dtd", "dtd_synthetic")])
def test_evaluate_preset_takes_any_spelling(
    model_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], preset: str, expected: str
) -> None:
    model_dir, data = model_and_data
    argv = ["evaluate", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path), "--cpu",
            "--num-visualizations", "0", "--preset", preset]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert f"Test preset: {expected} (--preset)" in capsys.readouterr().out
    protocol = json.loads((tmp_path / "metrics.json").read_text())["protocol"]
    assert protocol["test_preset"] == expected
    assert protocol["test_kernel_size"] == TEST_DATASET_PRESETS[expected]["test_kernel_size"]


def test_auto_preset_order_lives_in_the_library(model_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    """"auto": the dataset meta.json records, else the model's recorded preset, else none."""
    model_dir, data = model_and_data
    model = tiny_model()
    (tmp_path / "meta.json").write_text(json.dumps({"test": {}}))  # records no dataset
    assert choose_test_preset(AUTO_PRESET, model, data).name == "btad"
    assert choose_test_preset(AUTO_PRESET, model, tmp_path).name is None  # nothing recorded anywhere
    model.config.test_preset = "visa"
    choice = choose_test_preset(AUTO_PRESET, model, tmp_path)
    assert (choice.name, choice.source) == ("visa", "the preset the model's config records")
    assert choose_test_preset("MVTec-AD", model, data).name == "mvtec"  # asked for: wins over the data
    assert choose_test_preset(None, model, data).name is None  # the model's config as it is

"""Few-shot normal references: the memory, its search and coreset, fusion, saving, pipeline and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

from cops_hf import CoPSForAnomalyDetection, CoPSProcessor
from cops_hf.cli import main
from cops_hf.data import DEFAULT_TEST_CATEGORIES, DEFECT_TYPES, render_synthetic_sample
from cops_hf.demo import run_demo
from cops_hf.evaluation.metrics import pixel_auroc
from cops_hf.modeling_cops import greedy_coreset, nearest_reference_distance
from cops_hf.testing_utils import random_cops_config, random_cops_model
from tests.hub_server import USER_NAME, LocalHub
from tests.test_hub_integration import _inputs, _run_python

from .tiny_models import tiny_model


def _synthetic_category(category: str, size: int, count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """`count` images of `category` at `size` px, every other one with a defect, and their masks."""
    samples = [
        render_synthetic_sample(
            category, index, image_size=size, defect_type=DEFECT_TYPES[index % 4] if index % 2 else None
        )
        for index in range(count)
    ]
    return [sample.image for sample in samples], np.stack([sample.mask for sample in samples])


def _normals(category: str, size: int, count: int) -> list[np.ndarray]:
    """Normal images of `category` with indices the test images do not use."""
    return [render_synthetic_sample(category, 500 + index, image_size=size).image for index in range(count)]


def _scored(model: CoPSForAnomalyDetection, pixel_values: torch.Tensor):
    with torch.no_grad():
        return model(pixel_values, vae_noise=model.seeded_prior_noise(pixel_values.shape[0], 0))


@pytest.mark.parametrize(("tower", "size"), [("tiny", 98), ("small", 112)])
def test_references_raise_pixel_auroc_on_held_out_categories(tower: str, size: int) -> None:
    """Four normal references of each unseen category; measured: tiny 0.76 -> 0.97 and 0.54 -> 0.94, small
    0.81 -> 0.96 and 0.84 -> 0.95 (checker, ring)."""
    model = random_cops_model(random_cops_config(tower, image_size=size))
    processor = CoPSProcessor.for_image_size(size)
    gains = []
    for category in DEFAULT_TEST_CATEGORIES:
        images, masks = _synthetic_category(category, size, 6)
        pixel_values = processor(images=images)["pixel_values"]
        zero_shot = pixel_auroc(_scored(model, pixel_values).anomaly_maps.numpy(), masks)
        model.set_references(processor(images=_normals(category, size, 4))["pixel_values"])
        few_shot = pixel_auroc(_scored(model, pixel_values).anomaly_maps.numpy(), masks)
        model.clear_references()
        assert few_shot > 0.9 and few_shot > zero_shot + 0.05, (tower, category, zero_shot, few_shot)
        gains.append(few_shot - zero_shot)
    assert np.mean(gains) > 0.1, gains


def test_an_empty_memory_gives_todays_outputs_exactly() -> None:
    model, untouched = tiny_model(seed=3), tiny_model(seed=3)
    pixel_values = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    model.set_references(torch.randn(2, 3, 98, 98))
    assert model.num_references == 2 and "reference_memory" in model.state_dict()
    model.clear_references()
    assert model.num_references == 0 and "reference_memory" not in model.state_dict()
    assert model.state_dict().keys() == untouched.state_dict().keys()
    cleared, expected = _scored(model, pixel_values), _scored(untouched, pixel_values)
    assert cleared.reference_maps is None
    # Exact: without references the forward takes the zero-shot path alone, on the same weights and batch.
    assert torch.equal(cleared.anomaly_maps, expected.anomaly_maps)
    assert torch.equal(cleared.image_scores, expected.image_scores)


def test_fusion_rule_and_reference_map() -> None:
    model = tiny_model()
    pixel_values = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(1))
    zero_shot = _scored(model, pixel_values)
    model.set_references(pixel_values[:1])
    model.config.reference_weight = 0.3
    fused = _scored(model, pixel_values)
    reference = fused.reference_maps
    assert reference.shape == (2, 98, 98) and 0.0 <= reference.min() and reference.max() <= 1.0
    # The first image is its own reference: each of its patches has itself in the memory.
    assert reference[0].max() < 1e-5 < reference[1].max()
    torch.testing.assert_close(fused.anomaly_maps, 0.7 * zero_shot.anomaly_maps + 0.3 * reference)
    torch.testing.assert_close(fused.image_scores, 0.7 * zero_shot.image_scores + 0.3 * reference.flatten(1).amax(1))


def test_chunked_search_equals_the_full_one() -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(300, 16, generator=generator), dim=1)
    memory = torch.nn.functional.normalize(torch.randn(500, 16, generator=generator), dim=1)
    full = (1 - (queries @ memory.T).amax(dim=1)) / 2
    for chunk_size in (7, 64, 1000):
        torch.testing.assert_close(nearest_reference_distance(queries, memory, chunk_size), full, atol=1e-6, rtol=0)


def test_coreset_keeps_the_limit_deterministically_and_covers_the_memory() -> None:
    generator = torch.Generator().manual_seed(0)
    # Four tight clusters of 100 rows each in 200 dimensions (projected to 128 for the selection).
    centres = torch.randn(4, 200, generator=generator) * 10
    features = (centres.repeat_interleave(100, dim=0) + torch.randn(400, 200, generator=generator) * 0.1).float()
    picked = greedy_coreset(features, 8)
    assert picked.shape == (8,) and len(set(picked.tolist())) == 8
    assert torch.equal(picked, greedy_coreset(features, 8))  # deterministic: same rows, same order
    assert {int(index) // 100 for index in picked[:4]} == {0, 1, 2, 3}  # the first picks visit every cluster
    assert torch.equal(greedy_coreset(features, 1000), torch.arange(400))

    model = tiny_model(reference_memory_limit=60)
    model.set_references(torch.randn(3, 3, 98, 98))  # 3 images x 49 patches = 147 rows
    assert model.reference_memory.shape == (1, 60, 48) and model.config.reference_memory_size == 60
    assert model.num_references == 3


def test_saved_referenced_model_reloads_identically(tmp_path: Path) -> None:
    model = tiny_model()
    model.set_references(torch.randn(2, 3, 98, 98), sources=["/home/me/good/a.png", "good/b.png"])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["reference_count"] == 2 and config["reference_sources"] == ["a.png", "good/b.png"]
    loaded = CoPSForAnomalyDetection.from_pretrained(tmp_path)
    # Exact: the memory is stored as float32 tensors and read back byte for byte.
    assert torch.equal(loaded.reference_memory, model.reference_memory) and loaded.num_references == 2
    pixel_values = torch.randn(2, 3, 98, 98)
    expected, actual = _scored(model, pixel_values), _scored(loaded, pixel_values)
    torch.testing.assert_close(actual.anomaly_maps, expected.anomaly_maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(actual.reference_maps, expected.reference_maps, atol=1e-6, rtol=0)


def test_a_folder_saved_before_references_loads_as_zero_shot(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for name in ("reference_weight", "reference_memory_limit", "reference_memory_size", "reference_count"):
        config.pop(name, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = CoPSForAnomalyDetection.from_pretrained(tmp_path)  # no "missing weights" refusal
    assert loaded.num_references == 0 and loaded.reference_memory.shape == (1, 0, 48)


def test_pipeline_references_from_paths_arrays_and_a_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(60, 80, 3), (98, 98), (40, 40, 4)]]
    path = tmp_path / "good.png"
    Image.fromarray(arrays[0]).save(path)
    model = tiny_model()
    detector = pipeline("anomaly-detection", model=model, references=[str(path), arrays[1], arrays[2]])
    assert model.num_references == 3 and model.config.reference_sources[0] == "good.png"
    first_score = detector(arrays[1])["score"]  # arrays[1] is in this memory: its reference map is 0

    dataset = Dataset.from_dict({"image": [str(path), str(path)]}).cast_column("image", ImageFeature())
    assert detector.set_references(dataset["image"]) == 2
    assert detector(arrays[1])["score"] != first_score
    # Another size or mode is processed like any image: same memory as the processor's own pixels.
    other = tiny_model()
    other.set_references(CoPSProcessor.for_image_size(98)(images=[Image.open(path)] * 2)["pixel_values"])
    torch.testing.assert_close(other.reference_memory, model.reference_memory, atol=1e-6, rtol=0)


def test_cli_references_then_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    for index in range(3):
        Image.fromarray(_normals("checker", 64, 3)[index]).save(tmp_path / f"good{index}.png")
    images, _ = _synthetic_category("checker", 64, 2)
    (tmp_path / "new").mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "new" / f"{index}.png")
    glob_pattern = str(tmp_path / "good*.png")
    argv = [
        "references",
        "--model",
        str(tmp_path / "model"),
        "--images",
        glob_pattern,
        "--output",
        str(tmp_path / "ref"),
    ]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"cops-hf references: error: --output {tmp_path / 'ref'} already holds files; "
        "pass --overwrite to replace them\n"
    )
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert config["reference_count"] == 3 and config["reference_sources"] == [f"good{i}.png" for i in range(3)]

    predict = ["predict", str(tmp_path / "new"), "--no-overlays", "-q"]
    assert main([*predict, "--model", str(tmp_path / "ref"), "--output", str(tmp_path / "saved")]) == 0
    assert main([*predict, "--model", str(tmp_path / "model"), "--references", glob_pattern,
                 "--output", str(tmp_path / "flag")]) == 0  # fmt: skip
    saved = (tmp_path / "saved" / "scores.csv").read_text()
    assert saved == (tmp_path / "flag" / "scores.csv").read_text()


def test_referenced_model_from_the_local_hub_with_remote_code(
    hub_env: dict[str, str], hub_server: LocalHub, tmp_path: Path
) -> None:
    """Pushed with transformers' own `push_to_hub`, the memory comes back in a process that cannot import cops_hf."""
    model = tiny_model()
    model.set_references(torch.randn(2, 3, 98, 98), sources=["a.png", "b.png"])
    repo_id = f"{USER_NAME}/tiny-cops-referenced"
    model.push_to_hub(repo_id)
    CoPSProcessor.for_image_size(98).push_to_hub(repo_id)
    inputs = _inputs(model, tmp_path / "inputs.safetensors")
    output = _run_python(
        f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel

        model = AutoModel.from_pretrained({repo_id!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            result = model(**load_file("inputs.safetensors"))
        save_file({{"memory": model.reference_memory.contiguous(), "anomaly_maps": result.anomaly_maps.contiguous(),
                   "image_scores": result.image_scores.contiguous(),
                   "reference_maps": result.reference_maps.contiguous()}}, "outputs.safetensors")
        print("references", model.num_references, model.config.reference_sources, type(model).__module__)
        """,
        hub_env,
        tmp_path,
        with_cops_hf=False,
    )
    assert "references 2 ['a.png', 'b.png'] transformers_modules." in output
    remote = load_file(str(tmp_path / "outputs.safetensors"))
    # Exact: the memory is stored float32 and read back byte for byte.
    assert torch.equal(remote["memory"], model.reference_memory)
    with torch.no_grad():
        expected = model(**inputs)
    for name in ("anomaly_maps", "image_scores", "reference_maps"):
        torch.testing.assert_close(remote[name], getattr(expected, name), atol=1e-6, rtol=0, msg=name)


def test_demo_reports_zero_shot_next_to_two_shot(tmp_path: Path) -> None:
    result = run_demo(tmp_path, num_epochs=1, images_per_category=4, image_size=56, progress_bar=False)
    assert result.shots == 2 and result.few_shot.per_category.keys() == result.evaluation.report.per_category.keys()
    assert result.few_shot.mean["pixel_auroc"] > result.evaluation.report.mean["pixel_auroc"] + 0.1
    mean_row = result.comparison_table().splitlines()[-1]
    zero_shot, two_shot = result.evaluation.report.mean["pixel_auroc"], result.few_shot.mean["pixel_auroc"]
    assert mean_row.startswith("mean") and f"{100 * zero_shot:.1f} / {100 * two_shot:.1f}" in mean_row

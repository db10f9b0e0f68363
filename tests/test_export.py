"""ONNX export: one graph with dynamic batch that matches the PyTorch model, the runner and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from cops_hf.cli import main
from cops_hf.export import ONNX_METADATA_KEY, CoPSOnnxDetector, export_onnx, fixed_vae_noise
from cops_hf.processing_cops import CoPSProcessor, NonFiniteScoreError
from cops_hf.schema import ANOMALY_MAP, PRED_LABEL, PRED_MASK, PRED_SCORE

from .tiny_models import tiny_model

VAE_SAMPLES = 4
SEED = 7


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model with thresholds, saved and exported through `cops-hf export` (with the int8 variant)."""
    directory = tmp_path_factory.mktemp("export")
    model = tiny_model(seed=3, image_threshold=0.5, pixel_threshold=0.4)
    model.save_pretrained(directory / "model")
    output = directory / "cops.onnx"
    arguments = ["export", "--format", "onnx", "--model", str(directory / "model"), "--output", str(output)]
    exit_code = main([*arguments, "--vae-samples", str(VAE_SAMPLES), "--seed", str(SEED), "--int8"])
    assert exit_code == 0
    return model, output


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnx_graph_matches_pytorch_with_the_same_fixed_noise(exported, batch_size):
    model, path = exported
    pixel_values = torch.randn(batch_size, 3, 98, 98, generator=torch.Generator().manual_seed(batch_size))
    noise = fixed_vae_noise(model, VAE_SAMPLES, SEED).expand(batch_size, -1, -1)
    with torch.no_grad():
        expected = model(pixel_values, vae_noise=noise)
    outputs = CoPSOnnxDetector(path)(pixel_values=pixel_values)
    assert outputs.image_scores.shape == (batch_size,)
    assert outputs.anomaly_maps.shape == (batch_size, 98, 98)
    torch.testing.assert_close(outputs.image_scores, expected.image_scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.anomaly_maps, expected.anomaly_maps, atol=1e-4, rtol=0)
    # The noise is part of the graph: other noise gives measurably different scores.
    with torch.no_grad():
        other = model(pixel_values, vae_noise=fixed_vae_noise(model, VAE_SAMPLES, SEED + 1).expand_as(noise))
    assert (other.anomaly_maps - outputs.anomaly_maps).abs().max() > 1e-3


def test_metadata_holds_the_runner_fields(exported):
    model, path = exported
    stored = {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
    metadata = json.loads(stored[ONNX_METADATA_KEY])
    assert metadata["image_size"] == 98
    assert metadata["image_threshold"] == 0.5
    assert metadata["pixel_threshold"] == 0.4
    assert (metadata["vae_samples"], metadata["seed"]) == (VAE_SAMPLES, SEED)
    assert metadata["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_detector_takes_images_and_returns_maps_at_their_original_size(exported):
    model, path = exported
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)) for shape in [(120, 90, 3), (64, 64, 3)]
    ]
    detector = CoPSOnnxDetector(path)
    results = detector.detect(images)
    pixel_values = CoPSProcessor(detector.processor.image_processor)(images=images)["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values, vae_noise=fixed_vae_noise(model, VAE_SAMPLES, SEED).expand(2, -1, -1))
    assert [result["anomaly_map"].shape for result in results] == [(120, 90), (64, 64)]
    assert [result["score"] for result in results] == pytest.approx(expected.image_scores.tolist(), abs=1e-4)
    assert [result["label"] for result in results] == [
        "anomalous" if score > 0.5 else "normal" for score in expected.image_scores.tolist()
    ]
    assert results[0]["mask"].dtype == torch.bool


def test_int8_graph_quantizes_matmuls_and_stays_close(exported):
    _, path = exported
    quantized_path = path.with_suffix(".int8.onnx")
    operators = {node.op_type for node in onnx.load(str(quantized_path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= operators
    pixel_values = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    full = CoPSOnnxDetector(path)(pixel_values=pixel_values)
    quantized = CoPSOnnxDetector(quantized_path)(pixel_values=pixel_values)
    assert CoPSOnnxDetector(quantized_path).metadata["seed"] == SEED
    assert (quantized.image_scores - full.image_scores).abs().max() < 0.05
    assert (quantized.anomaly_maps - full.anomaly_maps).abs().max() < 0.05


def test_detector_rejects_wrong_input(exported, tmp_path):
    _, path = exported
    detector = CoPSOnnxDetector(path)
    with pytest.raises(ValueError, match="exactly one"):
        detector()
    with pytest.raises(ValueError, match="exactly one"):
        detector(tmp_path / "a.png", pixel_values=torch.zeros(1, 3, 98, 98))
    with pytest.raises(ValueError, match=r"\[batch, 3, 98, 98\]"):
        detector(pixel_values=torch.zeros(1, 3, 112, 112))
    bare = tmp_path / "bare.onnx"
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    onnx.save(graph, str(bare))
    with pytest.raises(ValueError, match=ONNX_METADATA_KEY):
        CoPSOnnxDetector(bare)


def test_outputs_name_their_dimensions(exported):
    _, path = exported
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {
        output.name: [dim.dim_param or dim.dim_value for dim in output.type.tensor_type.shape.dim]
        for output in graph.output
    }
    assert shapes == {"image_scores": ["batch"], "anomaly_maps": ["batch", 98, 98]}


def test_detector_is_called_like_the_pipeline_with_paths_pil_images_and_arrays(exported, tmp_path):
    model, path = exported
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(120, 90, 3), (64, 80, 3), (70, 70, 3)]]
    Image.fromarray(arrays[0]).save(tmp_path / "part.png")
    detector = CoPSOnnxDetector(path)
    results = detector([str(tmp_path / "part.png"), Image.fromarray(arrays[1]), arrays[2]])
    single = detector(str(tmp_path / "part.png"))
    pixel_values = detector.processor(images=[Image.fromarray(array) for array in arrays])["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values, vae_noise=fixed_vae_noise(model, VAE_SAMPLES, SEED).expand(3, -1, -1))
    assert [result[PRED_SCORE] for result in results] == pytest.approx(expected.image_scores.tolist(), abs=1e-4)
    assert [result[ANOMALY_MAP].shape for result in results] == [(120, 90), (64, 80), (70, 70)]
    assert all(result[ANOMALY_MAP].dtype == np.float32 for result in results)
    assert results[0][PRED_MASK].dtype == np.bool_ and results[0][PRED_LABEL] in ("normal", "anomalous")
    assert isinstance(single, dict) and single[PRED_SCORE] == pytest.approx(results[0][PRED_SCORE], abs=1e-6)


def test_detector_refuses_non_finite_scores(tmp_path):
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.prompt_synthesizer.normal_context.fill_(float("nan"))
    path = export_onnx(model, tmp_path / "broken.onnx", vae_samples=2)
    Image.fromarray(np.zeros((50, 60, 3), dtype=np.uint8)).save(tmp_path / "part.png")
    with pytest.raises(NonFiniteScoreError, match=f"non-finite anomaly score .* for '{tmp_path / 'part.png'}'"):
        CoPSOnnxDetector(path)(str(tmp_path / "part.png"))


def test_quiet_export_prints_nothing_not_even_loading_bars(exported, tmp_path):
    model, _ = exported
    model.save_pretrained(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)

    def export(*flags: str) -> subprocess.CompletedProcess:
        output = tmp_path / f"model{len(flags)}.onnx"
        command = ["export", *flags, "--model", str(tmp_path / "model"), "--output", str(output)]
        return subprocess.run([sys.executable, "-m", "cops_hf.cli", *command], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    loud, quiet = export(), export("-q")
    assert loud.returncode == 0 and "Loading weights" in loud.stderr and "Wrote" in loud.stdout
    assert quiet.returncode == 0 and (quiet.stdout, quiet.stderr) == ("", "")
    assert (tmp_path / "model1.onnx").is_file()

"""ONNX export: one graph with dynamic batch that matches the PyTorch model, the runner and the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from cops_hf.cli import main
from cops_hf.export import ONNX_METADATA_KEY, CoPSOnnxDetector, fixed_vae_noise
from cops_hf.processing_cops import CoPSProcessor

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
    with pytest.raises(ValueError, match=r"\[batch, 3, 98, 98\]"):
        detector(pixel_values=torch.zeros(1, 3, 112, 112))
    bare = tmp_path / "bare.onnx"
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    onnx.save(graph, str(bare))
    with pytest.raises(ValueError, match=ONNX_METADATA_KEY):
        CoPSOnnxDetector(bare)

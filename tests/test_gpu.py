"""The GPU path: half precision, fused attention kernels, mixed-precision training, onnxruntime on CUDA.

Tests marked `gpu` need CUDA: tests/conftest.py skips them without it, and `benchmarks/gpu_check.sh` runs them on a
GPU machine. The unmarked tests hold on any CPU: they guard what the GPU path relies on (the attention needs no
unfused fallback, distances stay float32 in half precision) and check that the GPU check refuses to run without a
GPU and that the GPU tests are collected and skipped with their reason.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cops_hf import CoPSForAnomalyDetection
from cops_hf.modeling_cops import nearest_prototype_distance
from cops_hf.testing_utils import random_cops_config, random_cops_model

from .conftest import CUDA_SKIP_REASON
from .tiny_models import tiny_model

REPOSITORY = Path(__file__).resolve().parents[1]
FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
# Max |difference| to float32 of the tiny model with random weights: bfloat16 gave up to 6e-3 (scores) and 9e-3
# (maps) on the CPU, float16 up to 7e-4 and 1.3e-3; the bounds leave about 3x room for other kernels.
HALF_TOLERANCES = {torch.bfloat16: (2e-2, 3e-2), torch.float16: (3e-3, 5e-3)}
NUMBER_OF_GPU_TESTS = 8


def without_cuda() -> dict[str, str]:
    """The environment of a subprocess that sees no GPU, importing this checkout."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPOSITORY), "PYTHON": sys.executable}


def model_with_64_wide_heads(device: str = "cpu") -> CoPSForAnomalyDetection:
    """Two-layer random towers whose attention heads are all 64 wide, as in ViT-L/14 (the fused kernels' case)."""
    tower = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}
    clip = {
        "text_config": tower,
        "vision_config": {**tower, "image_size": 112, "patch_size": 14},
        "projection_dim": 128,
    }
    config = random_cops_config(clip, image_size=112, prototype_attention_heads=2)
    with torch.device(device):
        return random_cops_model(config)


def random_inputs(model: CoPSForAnomalyDetection, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixel values `[B, 3, H, W]` and shared prior noise `[B, S, D]` for `model`."""
    generator = torch.Generator().manual_seed(seed)
    size, config = model.config.image_size, model.config
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    noise = torch.randn(1, config.vae_samples, config.projection_dim, generator=generator)
    return pixel_values, noise.expand(batch_size, -1, -1)


# ---------------------------------------------------------------------------------------------- any CPU


def test_gpu_check_without_cuda_says_so_in_one_line_and_does_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    completed = subprocess.run(
        ["bash", str(REPOSITORY / "benchmarks" / "gpu_check.sh")],
        env={**without_cuda(), "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 3
    assert completed.stdout == ""
    message = completed.stderr.strip()
    assert len(message.splitlines()) == 1
    assert message.startswith("gpu_check.sh: no CUDA GPU visible (torch ")
    assert "nothing measured" in message
    assert not out.exists()


class SetupReports:
    """A pytest plugin that keeps the setup reports of a nested run (where a skip shows)."""

    def __init__(self) -> None:
        self.reports: list[pytest.TestReport] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "setup":
            self.reports.append(report)


def test_gpu_tests_are_collected_and_skipped_with_the_reason_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU machine runs this test too
    recorder = SetupReports()
    exit_code = pytest.main(["-q", "-m", "gpu", "-p", "no:cacheprovider", __file__], plugins=[recorder])
    assert exit_code == pytest.ExitCode.OK
    assert len(recorder.reports) == NUMBER_OF_GPU_TESTS
    assert all(report.skipped for report in recorder.reports)
    assert {report.longrepr[2] for report in recorder.reports} == {f"Skipped: {CUDA_SKIP_REASON}"}


def test_clip_attention_is_sdpa_when_built_and_when_loaded(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    for candidate in (model, CoPSForAnomalyDetection.from_pretrained(tmp_path)):
        layers = [*candidate.clip.vision_model.encoder.layers, *candidate.clip.text_model.encoder.layers]
        assert {layer.self_attn.config._attn_implementation for layer in layers} == {"sdpa"}


def test_every_attention_call_runs_on_a_fused_kernel_on_the_cpu() -> None:
    """On the CPU the flash backend takes masks too: restricted to it, SDPA raises rather than fall back."""
    model = model_with_64_wide_heads()
    pixel_values, noise = random_inputs(model, 1)
    with torch.no_grad():
        expected = model(pixel_values, vae_noise=noise)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            outputs = model(pixel_values, vae_noise=noise)
    torch.testing.assert_close(outputs.image_scores, expected.image_scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs.anomaly_maps, expected.anomaly_maps, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prototype_distances_are_float32_in_half_precision(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 49, 32, generator=generator).to(dtype)
    prototypes = torch.randn(2, 5, 32, generator=generator).to(dtype)
    distances = nearest_prototype_distance(features, prototypes)
    assert distances.dtype == torch.float32
    expected = nearest_prototype_distance(features.float(), prototypes.float())
    torch.testing.assert_close(distances, expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_float32_matches_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # plain float32 convolutions (the patch embedding)
    model = tiny_model(seed=2)
    pixel_values, noise = random_inputs(model, 3)
    with torch.no_grad():
        expected = model(pixel_values, vae_noise=noise)
        outputs = model.to("cuda")(pixel_values.cuda(), vae_noise=noise.cuda())
    assert outputs.image_scores.device.type == "cuda"
    torch.testing.assert_close(outputs.image_scores.cpu(), expected.image_scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.anomaly_maps.cpu(), expected.anomaly_maps, atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cuda_stays_close_to_float32(dtype: torch.dtype) -> None:
    model = tiny_model(seed=2).to("cuda")
    pixel_values, noise = random_inputs(model, 4)
    pixel_values, noise = pixel_values.cuda(), noise.cuda()
    with torch.no_grad():
        expected = model(pixel_values, vae_noise=noise)
        outputs = copy.deepcopy(model).to(dtype)(pixel_values.to(dtype), vae_noise=noise.to(dtype))
    assert outputs.image_scores.dtype == torch.float32 and torch.isfinite(outputs.anomaly_maps).all()
    score_tolerance, map_tolerance = HALF_TOLERANCES[dtype]
    torch.testing.assert_close(outputs.image_scores, expected.image_scores, atol=score_tolerance, rtol=0)
    torch.testing.assert_close(outputs.anomaly_maps, expected.anomaly_maps, atol=map_tolerance, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_runs_on_fused_kernels_on_cuda(dtype: torch.dtype) -> None:
    """Restricted to the fused SDPA backends, SDPA raises instead of falling back to the unfused math path.

    The heads are 64 wide everywhere, as in ViT-L/14. In half precision the whole vision tower (ordinary and
    value-value attention) runs on flash attention alone; the text tower's causal mask and the prototype
    cross-attention may take the memory-efficient or cuDNN kernels.
    """
    model = model_with_64_wide_heads("cuda").to(dtype)
    pixel_values, noise = (tensor.to("cuda", dtype) for tensor in random_inputs(model, 2))
    with torch.no_grad():
        expected = model(pixel_values, vae_noise=noise)
        with sdpa_kernel(FUSED_BACKENDS):
            outputs = model(pixel_values, vae_noise=noise)
        if dtype != torch.float32:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                vision = model.dual_path_vision_forward(pixel_values)
            assert torch.isfinite(vision.patch_embeds).all()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(outputs.image_scores, expected.image_scores, atol=tolerance, rtol=0)


@pytest.mark.gpu
def test_mixed_precision_training_on_cuda_lowers_the_loss_from_cached_features(tmp_path: Path) -> None:
    from cops_hf.data import make_synthetic_dataset
    from cops_hf.training import (
        CoPSTrainer,
        TrainingConfig,
        cops_model_for_training,
        load_training_dataset,
        processor_for,
        random_clip_model,
    )

    root = make_synthetic_dataset(tmp_path / "data", test_categories=[], images_per_category=8, image_size=64)
    model = cops_model_for_training(random_clip_model("tiny", seed=0), image_size=56)
    config = TrainingConfig(
        output_dir=tmp_path / "run", num_epochs=4, batch_size=4, mixed_precision="bf16", progress_bar=False
    )
    trainer = CoPSTrainer(model, processor_for(model), load_training_dataset(root), config)
    assert trainer.accelerator.device.type == "cuda"
    history = trainer.train().history
    losses = [record["loss"] for record in history]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.9 * losses[0], losses
    assert [record["cached_features"] for record in history] == [False, True, True, True]
    assert next(model.prompt_synthesizer.parameters()).device.type == "cuda"


@pytest.mark.gpu
def test_onnxruntime_cuda_provider_matches_pytorch(tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip(f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (needs onnxruntime-gpu)")
    from cops_hf.export import CoPSOnnxDetector, export_onnx, fixed_vae_noise

    model = tiny_model(seed=2)
    pixel_values, _ = random_inputs(model, 2)
    path = export_onnx(model, tmp_path / "cops.onnx")
    detector = CoPSOnnxDetector(path, providers=["CUDAExecutionProvider"])
    assert detector.session.get_providers()[0] == "CUDAExecutionProvider"
    noise = fixed_vae_noise(model)[None].expand(2, -1, -1)
    with torch.no_grad():
        expected = model.to("cuda")(pixel_values.cuda(), vae_noise=noise.cuda())
    outputs = detector(pixel_values=pixel_values)
    torch.testing.assert_close(outputs.image_scores, expected.image_scores.cpu(), atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.anomaly_maps, expected.anomaly_maps.cpu(), atol=1e-4, rtol=0)

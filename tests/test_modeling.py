"""Behaviour of CoPSForAnomalyDetection beyond reference parity (see test_conversion.py for parity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel

from cops_hf import CoPSForAnomalyDetection
from cops_hf.modeling_cops import gaussian_blur, neighbour_average

from .tiny_models import TEXT_WIDTH, tiny_config, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_output_shapes_and_ranges(model):
    pixel_values = torch.randn(3, 3, 98, 98)
    with torch.no_grad():
        outputs = model(pixel_values, vae_noise=torch.randn(3, 10, TEXT_WIDTH))
    assert outputs.image_scores.shape == (3,)
    assert outputs.anomaly_maps.shape == (3, 98, 98)
    assert outputs.patch_scores.shape == (3, 49)
    assert outputs.text_embeds.shape == (3, 2, TEXT_WIDTH)
    assert outputs.loss is None
    assert ((outputs.image_scores >= 0) & (outputs.image_scores <= 1)).all()
    torch.testing.assert_close(outputs.text_embeds.norm(dim=-1), torch.ones(3, 2))


def test_batch_equals_single_images(model):
    pixel_values, noise = torch.randn(3, 3, 98, 98), torch.randn(3, 10, TEXT_WIDTH)
    with torch.no_grad():
        batched = model(pixel_values, vae_noise=noise)
        singles = [model(pixel_values[i : i + 1], vae_noise=noise[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(batched.image_scores, torch.cat([s.image_scores for s in singles]), atol=1e-6, rtol=0)
    torch.testing.assert_close(batched.anomaly_maps, torch.cat([s.anomaly_maps for s in singles]), atol=1e-6, rtol=0)


def test_noise_makes_runs_reproducible(model):
    pixel_values = torch.randn(1, 3, 98, 98)
    noise = torch.randn(1, 10, TEXT_WIDTH)
    with torch.no_grad():
        first, second = model(pixel_values, vae_noise=noise), model(pixel_values, vae_noise=noise)
        torch.manual_seed(1)
        drawn_a = model(pixel_values).image_scores
        torch.manual_seed(1)
        drawn_b = model(pixel_values).image_scores
        other = model(pixel_values, vae_noise=torch.randn(1, 10, TEXT_WIDTH))
    # Exact: the same inputs and noise through the same batch shape in one process.
    assert torch.equal(first.anomaly_maps, second.anomaly_maps)
    assert torch.equal(drawn_a, drawn_b)
    assert not torch.equal(first.image_scores, other.image_scores)


def test_rectangular_input(model):
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 70, 112), vae_noise=torch.randn(2, 4, TEXT_WIDTH))
    assert outputs.anomaly_maps.shape == (2, 70, 112)
    assert outputs.patch_scores.shape == (2, 40)


def test_training_path_returns_loss_and_trains_only_cops(model):
    model.train()
    try:
        assert not model.clip.training
        masks = torch.zeros(2, 98, 98)
        masks[1, 20:50, 30:60] = 1
        outputs = model(torch.randn(2, 3, 98, 98), labels=torch.tensor([0, 1]), masks=masks)
        assert set(outputs.loss_terms) == {"cls", "seg", "gather", "scatter", "kl", "recon"}
        expected = (
            outputs.loss_terms["cls"] + 4 * outputs.loss_terms["seg"] + outputs.loss_terms["gather"]
            + outputs.loss_terms["scatter"] + outputs.loss_terms["kl"] + outputs.loss_terms["recon"]
        )  # fmt: skip
        torch.testing.assert_close(outputs.loss.detach(), expected)
        outputs.loss.backward()
        trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        assert trainable and not any(name.startswith("clip.") for name in trainable)
        assert all(model.get_parameter(name).grad is not None for name in trainable if "vae" not in name)
        image_only = model(torch.randn(2, 3, 98, 98), labels=torch.tensor([0, 1]))
        assert image_only.loss_terms["seg"] == 0 and image_only.loss_terms["gather"] == 0
    finally:
        model.zero_grad()
        model.eval()


def test_recon_switch(model):
    model.train()
    try:
        model.config.use_recon_loss = False
        outputs = model(torch.randn(2, 3, 98, 98), labels=torch.tensor([0, 1]), masks=torch.zeros(2, 98, 98))
        assert outputs.loss_terms["recon"] == 0
    finally:
        model.config.use_recon_loss = True
        model.eval()


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "cops"
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(reloaded, CoPSForAnomalyDetection)
    assert not any(parameter.requires_grad for parameter in reloaded.clip.parameters())
    pixel_values, noise = torch.randn(1, 3, 98, 98), torch.randn(1, 10, TEXT_WIDTH)
    with torch.no_grad():
        expected, actual = model(pixel_values, vae_noise=noise), reloaded(pixel_values, vae_noise=noise)
    # Exact: reloaded weights are bit copies, and both forwards run the same batch shape.
    assert torch.equal(expected.anomaly_maps, actual.anomaly_maps)


def test_from_clip_wraps_pretrained_clip(tmp_path):
    clip_config = CLIPConfig(
        text_config=tiny_config().text_config.to_dict(),
        vision_config=tiny_config().vision_config.to_dict(),
        projection_dim=TEXT_WIDTH,
    )
    torch.manual_seed(0)
    CLIPModel(clip_config).save_pretrained(tmp_path / "clip")
    clip = CLIPModel.from_pretrained(tmp_path / "clip")
    model = CoPSForAnomalyDetection.from_clip(str(tmp_path / "clip"), image_size=98, deep_prompt_depth=3)
    assert model.config.dpam_layers == 3 and model.config.feature_layers == [3]
    for name, tensor in clip.state_dict().items():
        # Exact: the CLIP weights are copied, never computed.
        assert torch.equal(model.clip.state_dict()[name], tensor), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(model, dtype):
    pixel_values, noise = torch.randn(1, 3, 98, 98), torch.randn(1, 10, TEXT_WIDTH)
    half = tiny_model().to(dtype)
    with torch.no_grad():
        reference = model(pixel_values, vae_noise=noise)
        outputs = half(pixel_values.to(dtype), vae_noise=noise.to(dtype))
    assert outputs.anomaly_maps.dtype == torch.float32 and torch.isfinite(outputs.anomaly_maps).all()
    assert (outputs.image_scores - reference.image_scores).abs().max() < 0.1


@pytest.mark.parametrize(
    ("pixel_values", "message"),
    [
        (torch.randn(3, 98, 98), "shape"),
        (torch.randn(1, 1, 98, 98), "shape"),
        (torch.randn(1, 3, 100, 98), "multiples of the patch size"),
        (torch.full((1, 3, 98, 98), float("nan")), "NaN"),
        (torch.full((1, 3, 98, 98), float("inf")), "infinite"),
    ],
)
def test_bad_pixel_values_are_explained(model, pixel_values, message):
    with pytest.raises(ValueError, match=message):
        model(pixel_values)


def test_bad_noise_and_masks_are_explained(model):
    with pytest.raises(ValueError, match=r"vae_noise must have shape \[1, S, 48\]"):
        model(torch.randn(1, 3, 98, 98), vae_noise=torch.randn(1, 10, 7))
    with pytest.raises(ValueError, match=r"masks must have shape \[2, 98, 98\]"):
        model(torch.randn(2, 3, 98, 98), labels=torch.tensor([0, 1]), masks=torch.zeros(2, 50, 50))


@pytest.mark.parametrize("shape", [(2, 98, 98), (1, 20, 9), (1, 5, 40)])
def test_gaussian_blur_matches_scipy(shape):
    maps = torch.rand(shape, dtype=torch.float64)
    expected = np.stack([gaussian_filter(single, sigma=4) for single in maps.numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, 4.0).numpy(), expected, atol=1e-12)


def test_neighbour_average_counts_zero_padding():
    tokens = torch.ones(1, 9, 2)
    smoothed = neighbour_average(tokens, (3, 3), 3)
    assert smoothed[0, 4, 0] == 1.0  # centre: all 9 neighbours inside
    torch.testing.assert_close(smoothed[0, 0, 0], torch.tensor(4 / 9))  # corner: 4 of 9 inside

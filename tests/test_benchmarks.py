"""The benchmark's reference-like baseline computes our model's numbers, and its FLOP counts add up."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.common import make_synthetic_images
from benchmarks.inference import ReferenceLikeCoPS, flop_counts, text_flops, vision_flops
from cops_hf import CoPSConfig

from .tiny_models import tiny_config, tiny_model


def test_reference_like_baseline_matches_the_model_to_1e_5():
    model = tiny_model(seed=2)
    baseline = ReferenceLikeCoPS.sharing_weights(model)
    assert baseline.clip is model.clip
    pixel_values = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 10, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values, vae_noise=noise)
        outputs = baseline(pixel_values, vae_noise=noise)
        vision = model.dual_path_vision_forward(pixel_values)
        baseline_vision = baseline.dual_path_vision_forward(pixel_values)
    torch.testing.assert_close(outputs.image_scores, expected.image_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs.anomaly_maps, expected.anomaly_maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(baseline_vision.patch_embeds, vision.patch_embeds, atol=2e-5, rtol=0)
    torch.testing.assert_close(baseline_vision.image_embeds, vision.image_embeds, atol=2e-5, rtol=0)


def test_flop_counts_by_hand_for_the_official_geometry():
    config = CoPSConfig()
    tokens, width = 37 * 37 + 1, 1024
    full_dual_path_layer = 2 * tokens * width * width * 5 + 2 * 2 * tokens * width * 4096 + 2 * 4 * tokens**2 * width
    counts = flop_counts(config, num_samples=10)
    saved_in_last_layer = 2 * (tokens - 1) * width * (2 * width + 2 * 4096) + 4 * (tokens - 1) * tokens * width
    assert counts["baseline"].vision - counts["ours"].vision == saved_in_last_layer
    patch_embedding = 2 * 1369 * 588 * width
    projections = 2 * 1370 * width * 768
    assert counts["baseline"].vision == 24 * full_dual_path_layer + patch_embedding + projections
    text_layer = 2 * 17 * 768 * 768 * 4 + 2 * 2 * 17 * 768 * 3072 + 4 * 17 * 17 * 768
    assert counts["ours"].text == 20 * (12 * text_layer + 2 * 768 * 768)
    assert 1.2e12 < counts["ours"].total < 1.3e12
    assert counts["baseline"].text == text_flops(config, 77, 20)


def test_value_stream_past_the_last_feature_layer_is_not_counted():
    config = tiny_config(feature_layers=[2])
    assert vision_flops(config, reference_like=False) < vision_flops(tiny_config(), reference_like=False)
    assert vision_flops(config, reference_like=True) == vision_flops(tiny_config(), reference_like=True)


def test_synthetic_images_have_defects_where_the_masks_say():
    images, masks, labels = make_synthetic_images(8, 64, seed=0)
    assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8
    assert labels.sum() == 4
    assert all(masks[index].any() == bool(labels[index]) for index in range(8))
    again = make_synthetic_images(8, 64, seed=0)
    assert np.array_equal(again[0], images)

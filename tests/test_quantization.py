"""Int8 CPU path: which layers are quantized, the float model is left alone, and the outputs stay close."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cops_hf.quantization import quantize_int8

from .tiny_models import tiny_model


def _outputs(model, pixel_values, noise):
    with torch.inference_mode():
        return model(pixel_values, vae_noise=noise)


def test_quantizes_only_the_vision_encoder_linears_of_a_copy():
    model = tiny_model(seed=1)
    quantized = quantize_int8(model)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    quantized_layers = [module for module in quantized.modules() if isinstance(module, dynamic)]
    vision_layers = [m for m in quantized.clip.vision_model.encoder.modules() if isinstance(m, dynamic)]
    # 6 linears (q, k, v, out, fc1, fc2) per layer of the 3 vision layers, nothing else.
    assert len(quantized_layers) == len(vision_layers) == 6 * 3
    mlp_only = quantize_int8(model, include_attention=False)
    assert sum(isinstance(module, dynamic) for module in mlp_only.modules()) == 2 * 3
    assert type(mlp_only.clip.vision_model.encoder.layers[0].self_attn.q_proj) is nn.Linear
    assert not any(isinstance(module, dynamic) for module in model.modules())
    assert type(quantized.clip.visual_projection) is nn.Linear
    assert type(quantized.state_prototypes.extractor.fc1) is nn.Linear


def test_int8_outputs_stay_close_to_float32():
    model = tiny_model(seed=1)
    pixel_values = torch.randn(3, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(1))
    full = _outputs(model, pixel_values, noise)
    quantized = _outputs(quantize_int8(model), pixel_values, noise)
    score_difference = (quantized.image_scores - full.image_scores).abs().max().item()
    map_difference = (quantized.anomaly_maps - full.anomaly_maps).abs().max().item()
    assert 0 < score_difference < 0.05
    assert 0 < map_difference < 0.05
    torch.testing.assert_close(_outputs(model, pixel_values, noise).anomaly_maps, full.anomaly_maps)


def test_inplace_quantizes_the_model_itself_and_rejects_non_float32():
    model = tiny_model(seed=1)
    assert quantize_int8(model, inplace=True) is model
    with pytest.raises(ValueError, match="float32 model on CPU"):
        quantize_int8(tiny_model().to(torch.bfloat16))

"""CoPSConfig: validation messages, dataset presets, and `from_clip_config` (fields derived from the CLIP)."""

from __future__ import annotations

import pytest
from transformers import CLIPConfig

from cops_hf import CoPSConfig
from cops_hf.configuration_cops import PROMPT_SUFFIX_TOKEN_IDS, preset_fields
from cops_hf.processing_cops import packaged_tokenizer, prompt_suffix_token_ids
from cops_hf.testing_utils import RANDOM_CLIP_CONFIGS, random_clip_config

from .tiny_models import tiny_config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dpam_layers": 4}, "dpam_layers=4"),
        ({"feature_layers": [0]}, "feature_layers"),
        ({"prototype_length": 13}, "prototype_length=13"),
        ({"image_size": 100}, "multiple of the patch size 14 \\(e.g. 98\\)"),
        ({"deep_prompt_depth": 4}, "deep_prompt_depth=4"),
        ({"test_kernel_size": 4}, "odd"),
        ({"prototype_attention_heads": 5}, "must divide projection_dim=48"),
        ({"projection_dim": 32}, "must equal the text width 48"),
    ],
)
def test_config_validation_says_what_to_change(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_presets_follow_the_reference_switches():
    config = CoPSConfig()
    visa_test = config.with_preset(test_dataset="visa")
    assert (visa_test.test_kernel_size, visa_test.distance_alpha, visa_test.image_score_beta) == (3, 0.35, 1.0)
    mvtec_test = config.with_preset(test_dataset="MVTec")
    assert (mvtec_test.test_kernel_size, mvtec_test.distance_alpha, mvtec_test.image_score_beta) == (5, 0.26, 0.9)
    assert config.with_preset(train_dataset="visa").use_recon_loss is False
    assert config.with_preset(train_dataset="mvtec").train_kernel_size == 3
    with pytest.raises(ValueError, match="Unknown test dataset preset 'nope'"):
        config.with_preset(test_dataset="nope")
    assert config.test_kernel_size == 5  # presets return copies


def resolve_test_presets_are_normalised_once() -> None:
    assert preset_fields("test", " VisA ") == preset_fields("test", "visa")
    assert preset_fields("test", "DTD-Synthetic") == preset_fields("test", "dtd_synthetic")
    assert preset_fields("train", None) == {}
    with pytest.raises(ValueError, match="Unknown training dataset preset 'imagenet'"):
        preset_fields("train", "imagenet")


def test_from_clip_config_derives_the_depth_fields_from_the_clip() -> None:
    small = CoPSConfig.from_clip_config(random_clip_config("small"), image_size=224)
    assert (small.dpam_layers, small.feature_layers, small.deep_prompt_depth) == (12, [12], 3)
    assert small.vision_config.hidden_size == RANDOM_CLIP_CONFIGS["small"]["vision_config"]["hidden_size"]
    assert small.projection_dim == 48
    vit_l = CoPSConfig.from_clip_config(CLIPConfig(text_config=CoPSConfig().text_config.to_dict(),
                                                   vision_config=CoPSConfig().vision_config.to_dict(),
                                                   projection_dim=768))  # fmt: skip
    assert (vit_l.dpam_layers, vit_l.feature_layers, vit_l.deep_prompt_depth) == (24, [24], 8)
    explicit = CoPSConfig.from_clip_config(random_clip_config("small"), image_size=224, feature_layers=[6, 12])
    assert explicit.feature_layers == [6, 12] and explicit.dpam_layers == 12


def test_from_clip_config_applies_presets_under_explicit_fields() -> None:
    config = CoPSConfig.from_clip_config(
        random_clip_config("tiny"), train_preset="visa", test_preset="visa", image_size=56, train_kernel_size=7
    )
    assert (config.use_recon_loss, config.train_kernel_size) == (False, 7)  # explicit fields win
    assert (config.test_kernel_size, config.distance_alpha, config.image_score_beta) == (3, 0.35, 1.0)


def test_prompt_suffix_constant_is_what_clips_tokenizer_gives() -> None:
    """The config holds the template's suffix ids as a constant (no tokenizer needed); CLIP's BPE gives the same."""
    assert list(PROMPT_SUFFIX_TOKEN_IDS) == prompt_suffix_token_ids(packaged_tokenizer()) == [269]
    assert CoPSConfig().prompt_suffix_token_ids == list(PROMPT_SUFFIX_TOKEN_IDS)

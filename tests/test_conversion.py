"""Parity with the reference implementation, through the conversion of its checkpoints.

The fixtures in tests/fixtures/ hold, for tiny random configurations, the reference's weights (OpenAI CLIP layout
and its `prompt_learner` state dict), inputs, noise and outputs (see tests/fixtures/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPConfig

from cops_hf.conversion import CheckpointConversionError, convert_original_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_NAMES = ["reference_parity_full_dpam", "reference_parity_partial_dpam"]


def load_fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(FIXTURES / f"{name}.safetensors", "pt") as handle:
        return json.loads(handle.metadata()["config"]), {key: handle.get_tensor(key) for key in handle.keys()}


def reference_weights(meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The fixture's OpenAI-layout CLIP state dict (token table rebuilt) and reference CoPS state dict."""
    clip = {
        key.removeprefix("clip."): value.float()
        for key, value in tensors.items()
        if key.startswith("clip.") and not key.startswith("clip.token_embedding.")
    }
    token_table = torch.zeros(meta["vocab_size"], meta["text_width"])
    token_table[tensors["clip.token_embedding.ids"]] = tensors["clip.token_embedding.rows"].float()
    clip["token_embedding.weight"] = token_table
    cops = {key.removeprefix("cops."): value for key, value in tensors.items() if key.startswith("cops.")}
    cops.update(
        {key.removeprefix("cops_train."): value for key, value in tensors.items() if key.startswith("cops_train.")}
    )
    return clip, cops


def fixture_clip_config(meta: dict) -> CLIPConfig:
    """The head counts of the tiny fixtures are not width // 64, so the CLIP config is given explicitly."""
    return CLIPConfig(
        text_config={
            "hidden_size": meta["text_width"],
            "intermediate_size": 4 * meta["text_width"],
            "num_hidden_layers": meta["text_layers"],
            "num_attention_heads": meta["text_heads"],
            "max_position_embeddings": meta["context_length"],
            "projection_dim": meta["embed_dim"],
        },
        vision_config={
            "hidden_size": meta["vision_width"],
            "intermediate_size": 4 * meta["vision_width"],
            "num_hidden_layers": meta["vision_layers"],
            "num_attention_heads": meta["vision_heads"],
            "image_size": meta["image_resolution"],
            "patch_size": meta["patch_size"],
            "projection_dim": meta["embed_dim"],
        },
        projection_dim=meta["embed_dim"],
    )


def fixture_fields(meta: dict) -> dict:
    return {
        "image_size": meta["input_size"],
        "dpam_layers": meta["dpam"],
        "feature_layers": meta["features_list"],
        "test_kernel_size": meta["test_kernel"],
        "train_kernel_size": meta["train_kernel"],
        "distance_alpha": meta["alpha"],
        "image_score_beta": meta["beta"],
        "use_recon_loss": meta["use_recon"],
        "vae_samples": meta["vae_samples"],
    }


def converted_model(name: str, round_deep_prompts: bool = False):
    meta, tensors = load_fixture(name)
    clip, cops = reference_weights(meta, tensors)
    model = convert_original_checkpoint(
        clip, cops, clip_config=fixture_clip_config(meta), round_deep_prompts=round_deep_prompts,
        **fixture_fields(meta),
    )  # fmt: skip
    return model, tensors


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_inference_matches_reference(name):
    model, tensors = converted_model(name)
    assert not model.training
    with torch.no_grad():
        outputs = model(tensors["input.pixel_values"].float(), vae_noise=tensors["input.test_noise"])
    # The reference rounds deep prompts through fp16; we do not (allowed by the method spec): 1e-4 bar.
    torch.testing.assert_close(outputs.image_scores, tensors["output.image_scores"], atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.anomaly_maps, tensors["output.anomaly_maps"], atol=1e-4, rtol=0)
    # Against the reference with that rounding removed, the match is to float32 round-off.
    exact = "output_fp32prompts."
    torch.testing.assert_close(outputs.image_scores, tensors[exact + "image_scores"], atol=2e-6, rtol=0)
    torch.testing.assert_close(outputs.anomaly_maps, tensors[exact + "anomaly_maps"], atol=2e-6, rtol=0)
    torch.testing.assert_close(outputs.text_embeds, tensors[exact + "text_features"], atol=2e-6, rtol=0)
    torch.testing.assert_close(outputs.image_embeds, tensors[exact + "image_token"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.normal_distances, tensors[exact + "distance_n"], atol=2e-6, rtol=0)
    torch.testing.assert_close(outputs.anomalous_distances, tensors[exact + "distance_a"], atol=2e-6, rtol=0)
    torch.testing.assert_close(outputs.patch_scores, tensors[exact + "patch_probs"][..., 1], atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fp16_rounded_deep_prompts_match_the_reference_to_round_off(name):
    """Converted as by default (deep prompts rounded like the reference's `.half()`), the match is to 1e-6."""
    model, tensors = converted_model(name, round_deep_prompts=True)
    unrounded = tensors["cops.compound_prompts_text.0"]
    # Exact: rounding to fp16 and back is a deterministic cast, the same on every CPU.
    assert torch.equal(model.prompt_synthesizer.deep_prompts[0], unrounded.half().float())
    assert not torch.equal(model.prompt_synthesizer.deep_prompts[0], unrounded)
    with torch.no_grad():
        outputs = model(tensors["input.pixel_values"].float(), vae_noise=tensors["input.test_noise"])
    torch.testing.assert_close(outputs.image_scores, tensors["output.image_scores"], atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs.anomaly_maps, tensors["output.anomaly_maps"], atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs.text_embeds, tensors["output.text_features"], atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs.patch_scores, tensors["output.patch_probs"][..., 1], atol=1e-6, rtol=0)
    model.train()
    loss = model(
        tensors["input.pixel_values"].float(),
        labels=tensors["input.labels"],
        masks=tensors["input.masks"].float(),
        vae_noise=tensors["input.train_noise"],
    ).loss
    torch.testing.assert_close(loss.detach(), tensors["output.loss"], rtol=1e-6, atol=0)
    assert model.prompt_synthesizer.deep_prompts.dtype == torch.float32


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_training_loss_matches_reference(name):
    model, tensors = converted_model(name)
    model.train()
    outputs = model(
        tensors["input.pixel_values"].float(),
        labels=tensors["input.labels"],
        masks=tensors["input.masks"].float(),
        vae_noise=tensors["input.train_noise"],
    )
    torch.testing.assert_close(outputs.loss.detach(), tensors["output.loss"], rtol=1e-4, atol=0)
    torch.testing.assert_close(outputs.loss.detach(), tensors["output_fp32prompts.loss"], rtol=1e-6, atol=0)
    for term, value in outputs.loss_terms.items():
        torch.testing.assert_close(value, tensors[f"output_fp32prompts.loss_{term}"], rtol=1e-5, atol=1e-6)
    outputs.loss.backward()
    assert model.prompt_synthesizer.deep_prompts.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in model.clip.parameters())


def test_partial_dual_path_differs_from_full():
    """The fixtures exercise different code paths: their outputs differ, and so do ours."""
    _, full = load_fixture(FIXTURE_NAMES[0])
    _, partial = load_fixture(FIXTURE_NAMES[1])
    assert (full["output.image_scores"] - partial["output.image_scores"]).abs().max() > 1e-3


class _ScriptedStateDict(torch.nn.Module):
    """A module holding an OpenAI-layout state dict, to write a TorchScript archive like OpenAI's."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, tensor in state.items():
            owner = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs


def test_conversion_from_files(tmp_path):
    """OpenAI's TorchScript archive and the reference's .pth load from paths and give the same model."""
    meta, tensors = load_fixture(FIXTURE_NAMES[0])
    clip, cops = reference_weights(meta, tensors)
    clip_path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(_ScriptedStateDict(clip)), str(clip_path))
    cops_path = tmp_path / "epoch_1.pth"
    torch.save({"prompt_learner": cops}, cops_path)
    config = fixture_clip_config(meta)
    from_files = convert_original_checkpoint(clip_path, cops_path, clip_config=config, **fixture_fields(meta))
    from_dicts = convert_original_checkpoint(clip, cops, clip_config=config, **fixture_fields(meta))
    for (name, left), (_, right) in zip(from_files.state_dict().items(), from_dicts.state_dict().items(), strict=True):
        # Exact: both paths copy the same tensors; no arithmetic runs.
        assert torch.equal(left, right), name


def test_reference_checkpoint_without_training_only_keys():
    """Checkpoints as the reference saves them lack the VAE encoder: inference still matches."""
    meta, tensors = load_fixture(FIXTURE_NAMES[0])
    clip, cops = reference_weights(meta, tensors)
    cops = {key: value for key, value in cops.items() if not key.startswith("vae_encoder")}
    cops["extractor_.ln_1.weight"] = torch.ones(meta["embed_dim"])  # unused by the method: dropped
    model = convert_original_checkpoint(clip, cops, clip_config=fixture_clip_config(meta), **fixture_fields(meta))
    with torch.no_grad():
        outputs = model(tensors["input.pixel_values"].float(), vae_noise=tensors["input.test_noise"])
    # Converted with the default fp16 rounding of the deep prompts: the reference as it computes.
    torch.testing.assert_close(outputs.anomaly_maps, tensors["output.anomaly_maps"], atol=2e-6, rtol=0)


def test_conversion_errors_name_the_key(tmp_path):
    meta, tensors = load_fixture(FIXTURE_NAMES[0])
    clip, cops = reference_weights(meta, tensors)
    config = fixture_clip_config(meta)
    fields = fixture_fields(meta)
    with pytest.raises(CheckpointConversionError, match="'t_a'"):
        convert_original_checkpoint(clip, {k: v for k, v in cops.items() if k != "t_a"}, clip_config=config, **fields)
    with pytest.raises(CheckpointConversionError, match="'surprise.weight'"):
        convert_original_checkpoint(clip, {**cops, "surprise.weight": torch.ones(1)}, clip_config=config, **fields)
    with pytest.raises(CheckpointConversionError, match="'visual.surprise'"):
        convert_original_checkpoint({**clip, "visual.surprise": torch.ones(1)}, cops, clip_config=config, **fields)
    with pytest.raises(CheckpointConversionError, match="prototype_length=4"):
        convert_original_checkpoint(clip, cops, clip_config=config, prototype_length=4, **fields)
    with pytest.raises(CheckpointConversionError, match="does not exist"):
        convert_original_checkpoint(tmp_path / "missing.pt")
    not_cops = tmp_path / "other.pth"
    torch.save({"model": {}}, not_cops)
    with pytest.raises(CheckpointConversionError, match="prompt_learner"):
        convert_original_checkpoint(clip, not_cops, clip_config=config, **fields)

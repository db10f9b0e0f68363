"""Conversion of the official release: CLIP in any published form and reference CoPS checkpoints -> our model.

* CLIP comes in any form `cops_hf.clip_loading.load_clip_model` takes (an OpenAI file, a transformers folder, a
  Hub id).
* A reference CoPS checkpoint (`{"prompt_learner": state_dict}`, as saved by the reference's train.py) is
  mapped onto our CoPS modules. Keys the reference saves but the method never reads (`projector*`,
  `extractor_*`, `token_*`, `tokenized_prompts_*`) are dropped; `vae_encoder*` may be absent (only training
  needs it). Any other unknown key, and any missing required key, is an error that names the key.
* The reference casts its deep text prompts to fp16 in every forward (`.half()` before inserting them), so its
  released models compute with fp16-rounded deep prompts. Conversion stores them rounded the same way (still as
  float32 tensors), so a converted release reproduces the reference's scores and maps to float32 round-off;
  `round_deep_prompts=False` (`cops-hf convert --no-round-deep-prompts`) keeps the checkpoint's exact values.
  Training never rounds.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch
from transformers import CLIPConfig, CLIPModel

from .clip_loading import (
    OPENAI_CLIP_HUB_IDS,
    VIT_L14_336_HUB_ID,
    CheckpointConversionError,
    StateDict,
    clip_config_from_openai,
    convert_openai_clip_state_dict,
    load_clip_model,
    load_exact,
    load_openai_clip_state_dict,
    load_weights_file,
    read_torchscript_tensors,
)
from .modeling_cops import CoPSForAnomalyDetection

logger = logging.getLogger(__name__)

# Reference CoPS names -> ours.
_COPS_RENAMES = {
    "t_n": "state_prototypes.normal_queries",
    "t_a": "state_prototypes.anomalous_queries",
    "extractor.attn.in_proj_weight": "state_prototypes.extractor.cross_attention.in_proj_weight",
    "extractor.attn.in_proj_bias": "state_prototypes.extractor.cross_attention.in_proj_bias",
    "extractor.attn.out_proj.weight": "state_prototypes.extractor.cross_attention.out_proj.weight",
    "extractor.attn.out_proj.bias": "state_prototypes.extractor.cross_attention.out_proj.bias",
    "extractor.ln_1.weight": "state_prototypes.extractor.layer_norm1.weight",
    "extractor.ln_1.bias": "state_prototypes.extractor.layer_norm1.bias",
    "extractor.ln_2.weight": "state_prototypes.extractor.layer_norm2.weight",
    "extractor.ln_2.bias": "state_prototypes.extractor.layer_norm2.bias",
    "extractor.mlp.c_fc.weight": "state_prototypes.extractor.fc1.weight",
    "extractor.mlp.c_fc.bias": "state_prototypes.extractor.fc1.bias",
    "extractor.mlp.c_proj.weight": "state_prototypes.extractor.fc2.weight",
    "extractor.mlp.c_proj.bias": "state_prototypes.extractor.fc2.bias",
    "vae_decoder.net.0.weight": "class_token_vae.decoder.0.weight",
    "vae_decoder.net.0.bias": "class_token_vae.decoder.0.bias",
    "vae_decoder.net.2.weight": "class_token_vae.decoder.2.weight",
    "vae_decoder.net.2.bias": "class_token_vae.decoder.2.bias",
}
_COPS_ENCODER_RENAMES = {
    "vae_encoder.net.0.weight": "class_token_vae.encoder.0.weight",
    "vae_encoder.net.0.bias": "class_token_vae.encoder.0.bias",
    "vae_encoder.mean.weight": "class_token_vae.mean_head.weight",
    "vae_encoder.mean.bias": "class_token_vae.mean_head.bias",
    "vae_encoder.log_var.weight": "class_token_vae.log_var_head.weight",
    "vae_encoder.log_var.bias": "class_token_vae.log_var_head.bias",
}
_VAE_ENCODER_PREFIXES = ("class_token_vae.encoder.", "class_token_vae.mean_head.", "class_token_vae.log_var_head.")
_COPS_UNUSED = re.compile(r"^(projector|extractor_\.|token_|tokenized_prompts_)")
_DEEP_PROMPT = re.compile(r"^compound_prompts_text\.(\d+)$")


def load_reference_cops_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a reference CoPS checkpoint (`{"prompt_learner": ...}`) with `weights_only=True`."""
    checkpoint = load_weights_file(path, "CoPS checkpoint")
    if not isinstance(checkpoint, Mapping) or "prompt_learner" not in checkpoint:
        raise CheckpointConversionError(
            f"'{path}' is not a reference CoPS checkpoint: expected a dict with a 'prompt_learner' entry."
        )
    return dict(checkpoint["prompt_learner"])


def _cops_fields_from_reference(state: StateDict, class_token_length: int) -> dict:
    deep_prompts = sorted(
        (int(match.group(1)), tensor) for key, tensor in state.items() if (match := _DEEP_PROMPT.match(key))
    )
    context = state["ctx_pos"].reshape(-1, state["ctx_pos"].shape[-1])
    fields = {
        "prompt_length": context.shape[0] - class_token_length,
        "prototype_length": state["t_n"].shape[0],
        "deep_prompt_depth": len(deep_prompts),
    }
    if deep_prompts:
        fields["deep_prompt_length"] = deep_prompts[0][1].shape[0]
    return fields


def convert_reference_cops_state_dict(state: StateDict) -> tuple[dict[str, torch.Tensor], bool]:
    """Rename a reference `prompt_learner` state dict to our CoPS keys.

    Returns:
        `(converted, has_vae_encoder)`.
    """
    converted: dict[str, torch.Tensor] = {}
    deep_prompts: dict[int, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in ("ctx_pos", "ctx_neg"):
            name = "normal_context" if key == "ctx_pos" else "anomalous_context"
            converted[f"prompt_synthesizer.{name}"] = tensor.reshape(-1, tensor.shape[-1])
        elif key in _COPS_RENAMES:
            converted[_COPS_RENAMES[key]] = tensor
        elif key in _COPS_ENCODER_RENAMES:
            converted[_COPS_ENCODER_RENAMES[key]] = tensor
        elif match := _DEEP_PROMPT.match(key):
            deep_prompts[int(match.group(1))] = tensor
        elif not _COPS_UNUSED.match(key):
            raise CheckpointConversionError(f"Unexpected key '{key}' in the CoPS checkpoint.")
    if deep_prompts:
        if sorted(deep_prompts) != list(range(len(deep_prompts))):
            raise CheckpointConversionError(
                f"Deep prompt keys compound_prompts_text.N are not contiguous: found N in {sorted(deep_prompts)}."
            )
        converted["prompt_synthesizer.deep_prompts"] = torch.stack([deep_prompts[i] for i in sorted(deep_prompts)])
    required = ["prompt_synthesizer.normal_context", "prompt_synthesizer.anomalous_context", *_COPS_RENAMES.values()]
    reference_names = {value: key for key, value in _COPS_RENAMES.items()}
    reference_names.update({"prompt_synthesizer.normal_context": "ctx_pos",
                            "prompt_synthesizer.anomalous_context": "ctx_neg"})  # fmt: skip
    for name in required:
        if name not in converted:
            raise CheckpointConversionError(f"Missing key '{reference_names[name]}' in the CoPS checkpoint.")
    has_encoder = all(name in converted for name in _COPS_ENCODER_RENAMES.values())
    return converted, has_encoder


def convert_original_checkpoint(
    clip: str | os.PathLike | StateDict | CLIPModel,
    cops: str | os.PathLike | StateDict | None = None,
    *,
    clip_config: CLIPConfig | None = None,
    clip_kwargs: dict | None = None,
    round_deep_prompts: bool = True,
    **cops_fields,
) -> CoPSForAnomalyDetection:
    """Build a `CoPSForAnomalyDetection` from the official release files.

    Args:
        clip: the CLIP, in any form `load_clip_model` takes: an OpenAI `.pt` file (TorchScript archive or
            checkpoint) or state dict, a transformers CLIP folder, a Hub id or a `CLIPModel`.
        cops: reference CoPS checkpoint path or its `prompt_learner` state dict; `None` gives fresh CoPS modules.
        clip_config: overrides the CLIP configuration read off OpenAI weights' shapes (e.g. head counts that are
            not width // 64).
        clip_kwargs: arguments of `CLIPModel.from_pretrained` for a folder or Hub id (`revision`, `cache_dir`).
        round_deep_prompts: store the deep prompts rounded to fp16 values, as the reference computes with them
            (it casts them with `.half()` in every forward). False keeps the checkpoint's float32 values, which
            moves scores by up to ~4e-5 from the reference's.
        **cops_fields: `CoPSConfig` fields (image_size, presets' fields, ...). Fields implied by the checkpoint
            (prompt_length, prototype_length, deep prompt sizes) are read from it; a conflicting value is an error.

    Returns:
        The model in eval mode.
    """
    clip_model = load_clip_model(clip, clip_config=clip_config, **(clip_kwargs or {}))

    cops_weights: dict[str, torch.Tensor] = {}
    has_encoder = False
    if cops is not None:
        cops_state = load_reference_cops_state_dict(cops) if isinstance(cops, (str, os.PathLike)) else dict(cops)
        cops_weights, has_encoder = convert_reference_cops_state_dict(cops_state)
        deep_prompts = cops_weights.get("prompt_synthesizer.deep_prompts")
        if round_deep_prompts and deep_prompts is not None:
            cops_weights["prompt_synthesizer.deep_prompts"] = deep_prompts.half().to(deep_prompts.dtype)
        implied = _cops_fields_from_reference(cops_state, cops_fields.get("class_token_length", 2))
        for name, value in implied.items():
            if name in cops_fields and cops_fields[name] != value:
                raise CheckpointConversionError(
                    f"{name}={cops_fields[name]} was given but the CoPS checkpoint implies {name}={value}."
                )
            cops_fields[name] = value

    model = CoPSForAnomalyDetection.from_clip(clip_model, **cops_fields)
    if cops_weights:
        expected = {name for name in model.state_dict() if not name.startswith("clip.")}
        if not has_encoder:
            expected -= {name for name in expected if name.startswith(_VAE_ENCODER_PREFIXES)}
            logger.warning("The CoPS checkpoint has no VAE encoder: fine for inference, re-initialized for training.")
        load_exact(model, cops_weights, "CoPS", expected=expected)
    return model.eval()


__all__ = [  # the CLIP names are defined in cops_hf.clip_loading and stay importable from here
    "OPENAI_CLIP_HUB_IDS",
    "VIT_L14_336_HUB_ID",
    "CheckpointConversionError",
    "clip_config_from_openai",
    "convert_openai_clip_state_dict",
    "convert_original_checkpoint",
    "convert_reference_cops_state_dict",
    "load_clip_model",
    "load_openai_clip_state_dict",
    "load_reference_cops_state_dict",
    "load_weights_file",
    "read_torchscript_tensors",
]

"""CLIP in any form it is published in -> transformers' `CLIPModel`: the one home of CLIP loading.

CLIP comes as OpenAI ships it (`ViT-L-14-336px.pt`, a TorchScript archive read by a restricted unpickler that
builds tensors only, or any OpenAI-layout state dict: mapped onto transformers' `CLIPModel` names, its configuration
read off the tensor shapes), as a transformers CLIP folder, or as a Hub id such as
`openai/clip-vit-large-patch14-336` (`CLIPModel.from_pretrained`). Used by conversion and by the trainer.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

StateDict = Mapping[str, torch.Tensor]

# OpenAI residual-block names -> transformers CLIPEncoderLayer names (in_proj is split separately).
_BLOCK_RENAMES = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_CLIP_RENAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_CLIP_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Scalars the TorchScript archive stores beside the weights.
_CLIP_METADATA_KEYS = {"input_resolution", "context_length", "vocab_size"}
_TOWER_PREFIXES = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
                   "transformer.resblocks.": "text_model.encoder.layers."}  # fmt: skip

VIT_L14_336_HUB_ID = "openai/clip-vit-large-patch14-336"
"""OpenAI's CLIP ViT-L/14@336px on the Hub, in transformers format: the CLIP CoPS is published with."""

OPENAI_CLIP_HUB_IDS = {"3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02": VIT_L14_336_HUB_ID}
"""SHA-256 of OpenAI's published CLIP files -> the Hub repository with the same weights in transformers format.

A CLIP converted from such a file records that id as its `name_or_path` (and so as the CoPS model's
`clip_model_id`, the model card's `base_model`)."""

# A Hub model id ("name" or "namespace/name"); a string naming a file that does not exist is not one.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class CheckpointConversionError(ValueError):
    """A checkpoint does not have the layout conversion expects (the message names the key or file)."""


# Storage classes a TorchScript archive names for its tensors, and their element types.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}  # fmt: skip


class _ScriptedObject:
    """Stands in for a TorchScript class (`__torch__.*`) while its archive is read: keeps its state, runs nothing."""

    def __setstate__(self, state: object) -> None:
        self.state = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_unused: object) -> torch.Tensor:
    """`torch._utils._rebuild_tensor_v2` on a flat storage tensor, without requires_grad or hooks."""
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


class _TorchScriptDataUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's `data.pkl`: tensors and plain containers only (pickle's "restricting globals").

    Every `__torch__.*` class becomes a `_ScriptedObject` holding its pickled state, so no `__setstate__` or
    scripted method of the archive runs; any other global (`os.system`, `builtins.eval`, ...) is refused.
    """

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.scripted_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> object:
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            return self.scripted_classes.setdefault(key, type(name, (_ScriptedObject,), {"__module__": module}))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise CheckpointConversionError(
            f"'{self.path}' is a TorchScript archive that refers to {module}.{name}; only tensors are read from "
            "CLIP archives, so it is refused."
        )

    def persistent_load(self, pid: object) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise CheckpointConversionError(f"'{self.path}' has a malformed tensor reference {pid!r}.")
        _, dtype, key, _, numel = pid
        try:
            data = self.archive.read(f"{self.prefix}data/{key}")
        except KeyError as error:
            raise CheckpointConversionError(f"'{self.path}' lacks the tensor data 'data/{key}'.") from error
        element_size = torch.empty((), dtype=dtype).element_size()
        if len(data) != numel * element_size:
            raise CheckpointConversionError(f"'{self.path}': tensor data 'data/{key}' is truncated.")
        return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)


def _named_tensors(item: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensor attributes of a tree of scripted modules, with dotted names (what `state_dict()` would list)."""
    if isinstance(item, _ScriptedObject) and isinstance(getattr(item, "state", None), Mapping):
        named = {}
        for key, value in item.state.items():
            if isinstance(value, torch.Tensor):
                named[f"{prefix}{key}"] = value
            else:
                named.update(_named_tensors(value, f"{prefix}{key}."))
        return named
    return {}


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The named tensors of a TorchScript archive (such as OpenAI's CLIP `.pt` files), read without running code.

    The archive's `data.pkl` is unpickled with an allowlist of tensor rebuilding and plain containers; its scripted
    classes are kept as plain state and its code is never compiled or run (unlike `torch.jit.load`).

    Raises:
        CheckpointConversionError: the archive refers to anything but tensors and scripted modules, or is broken.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        data_files = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
        if len(data_files) != 1:
            raise CheckpointConversionError(f"'{path}' is not a TorchScript archive: no single <name>/data.pkl.")
        prefix = data_files[0].removesuffix("data.pkl")
        try:
            root = _TorchScriptDataUnpickler(archive, prefix, path).load()
        except CheckpointConversionError:
            raise
        except Exception as error:  # any malformed pickle stream: one line instead of the unpickler's trace
            raise CheckpointConversionError(f"'{path}' has a corrupt TorchScript data.pkl ({error}).") from error
    tensors = _named_tensors(root)
    if not tensors:
        raise CheckpointConversionError(f"'{path}' is a TorchScript archive without any tensor.")
    return tensors


def load_weights_file(path: str | os.PathLike, what: str) -> object:
    """`torch.load(path, weights_only=True)` on the CPU, with every failure as one line naming the file.

    A pickle that asks for anything but tensors and plain containers is refused by `weights_only`, and said so.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointConversionError(f"{what} '{path}' is a directory, not a file.")
    if not path.is_file():
        raise CheckpointConversionError(f"{what} '{path}' does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise CheckpointConversionError(
            f"{what} '{path}' was refused: it holds more than tensors ({reason})."
        ) from error
    except Exception as error:  # truncated, empty, text, wrong format: torch raises many kinds
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointConversionError(
            f"{what} '{path}' cannot be read as a PyTorch checkpoint ({reason})."
        ) from error


def load_openai_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an OpenAI CLIP file: a TorchScript archive (as OpenAI ships) or a plain state-dict checkpoint.

    TorchScript archives are read by `read_torchscript_tensors`, which runs none of the archive's code; plain
    checkpoints are loaded with `weights_only=True`.
    """
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            is_torchscript = any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())
        if is_torchscript:
            return {name: tensor.float() for name, tensor in read_torchscript_tensors(path).items()}
    state = load_weights_file(path, "CLIP file")
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointConversionError(f"'{path}' holds no state dict of tensors (found {type(state).__name__}).")
    return {name.removeprefix("module."): tensor for name, tensor in state.items()}


def clip_config_from_openai(state: StateDict) -> CLIPConfig:
    """Infer a `CLIPConfig` from OpenAI CLIP tensor shapes (heads = width // 64, as OpenAI builds them)."""
    for key in ("visual.conv1.weight", "visual.positional_embedding", "ln_final.weight", "text_projection"):
        if key not in state:
            raise CheckpointConversionError(f"Not an OpenAI ViT CLIP state dict: key '{key}' is missing.")

    def count_layers(prefix: str) -> int:
        return len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})

    vision_width, _, patch_size, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    embed_dim = state["text_projection"].shape[1]
    return CLIPConfig(
        text_config={
            "hidden_size": text_width,
            "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": count_layers("transformer.resblocks."),
            "num_attention_heads": max(1, text_width // 64),
            "max_position_embeddings": state["positional_embedding"].shape[0],
            "vocab_size": state["token_embedding.weight"].shape[0],
            "projection_dim": embed_dim,
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": count_layers("visual.transformer.resblocks."),
            "num_attention_heads": max(1, vision_width // 64),
            "image_size": grid * patch_size,
            "patch_size": patch_size,
            "projection_dim": embed_dim,
        },
        projection_dim=embed_dim,
    )


def convert_openai_clip_state_dict(state: StateDict) -> dict[str, torch.Tensor]:
    """Rename an OpenAI CLIP state dict to transformers' `CLIPModel` keys (q/k/v split from in_proj)."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in _CLIP_METADATA_KEYS:
            continue
        if key in _CLIP_RENAMES:
            converted[_CLIP_RENAMES[key]] = tensor
            continue
        if key in _CLIP_TRANSPOSED:
            converted[_CLIP_TRANSPOSED[key]] = tensor.t().contiguous()
            continue
        prefix = next((prefix for prefix in _TOWER_PREFIXES if key.startswith(prefix)), None)
        if prefix is None:
            raise CheckpointConversionError(f"Unexpected key '{key}' in the OpenAI CLIP state dict.")
        index, name = key[len(prefix) :].split(".", 1)
        target = f"{_TOWER_PREFIXES[prefix]}{index}.self_attn."
        if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if name.endswith("weight") else "bias"
            for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                converted[f"{target}{projection}.{kind}"] = part.contiguous()
        elif name in _BLOCK_RENAMES:
            converted[f"{_TOWER_PREFIXES[prefix]}{index}.{_BLOCK_RENAMES[name]}"] = tensor
        else:
            raise CheckpointConversionError(f"Unexpected key '{key}' in the OpenAI CLIP state dict.")
    return converted


def load_clip_model(
    clip: str | os.PathLike | StateDict | CLIPModel,
    *,
    clip_config: CLIPConfig | None = None,
    **from_pretrained_kwargs,
) -> CLIPModel:
    """A transformers `CLIPModel` from any form CLIP is published in, in float32 unless told otherwise.

    Args:
        clip: an OpenAI CLIP file (TorchScript archive as OpenAI ships it, or a state-dict checkpoint), an
            OpenAI-layout state dict, a transformers CLIP folder, a Hub id (`"openai/clip-vit-large-patch14-336"`),
            or a `CLIPModel` (returned as is).
        clip_config: for OpenAI weights, overrides the configuration read off the shapes (e.g. head counts that are
            not width // 64).
        **from_pretrained_kwargs: for folders and Hub ids, arguments of `CLIPModel.from_pretrained` (`revision`,
            `cache_dir`, `dtype`, ...).
    """
    if isinstance(clip, CLIPModel):
        return clip
    if isinstance(clip, Mapping):
        state = dict(clip)
    else:
        path = Path(clip)
        is_hub_id = not path.exists() and _HUB_ID.fullmatch(str(clip)) and not str(clip).endswith(_FILE_SUFFIXES)
        if path.is_dir() or is_hub_id:
            return CLIPModel.from_pretrained(str(clip), **{"dtype": torch.float32, **from_pretrained_kwargs}).eval()
        state = load_openai_clip_state_dict(path)
    model = CLIPModel(clip_config or clip_config_from_openai(state))
    load_exact(model, convert_openai_clip_state_dict(state), "OpenAI CLIP")
    if not isinstance(clip, Mapping):
        model.name_or_path = OPENAI_CLIP_HUB_IDS.get(_file_sha256(Path(clip)), "")
    return model.eval()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_exact(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str, expected=None) -> None:
    """Copy `weights` into `module`, erroring on any missing, unexpected or mis-shaped key."""
    own = module.state_dict()
    expected = set(own) if expected is None else expected
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing:
        raise CheckpointConversionError(f"{source} weights lack '{missing[0]}' ({len(missing)} missing in all).")
    if unexpected:
        raise CheckpointConversionError(f"{source} weights have unexpected '{unexpected[0]}'.")
    for name, tensor in weights.items():
        if own[name].shape != tensor.shape:
            raise CheckpointConversionError(
                f"{source} weight '{name}' has shape {list(tensor.shape)}, expected {list(own[name].shape)}."
            )
    module.load_state_dict(weights, strict=False)

__all__ = [
    "OPENAI_CLIP_HUB_IDS",
    "VIT_L14_336_HUB_ID",
    "CheckpointConversionError",
    "StateDict",
    "clip_config_from_openai",
    "convert_openai_clip_state_dict",
    "load_clip_model",
    "load_exact",
    "load_openai_clip_state_dict",
    "load_weights_file",
    "read_torchscript_tensors",
]

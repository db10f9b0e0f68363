"""CoPS: Conditional Prompt Synthesis for zero-shot anomaly detection, on transformers' CLIP.

The frozen CLIP towers are transformers' own `CLIPModel` (its modules and weight names). CoPS adds:

* a dual-path vision forward (value-value attention beside the ordinary one) run on CLIP's own layers,
* explicit state prototypes: learnable queries that attend to the smoothed patch tokens,
* implicit class tokens: a small VAE on the global image token,
* prompt synthesis (context vectors shifted by prototypes and class tokens) and a text forward with deep prompts
  that stops at the end-of-text token,
* scoring (patch/image probabilities, distance weighting, maps, Gaussian smoothing); the training loss comes from
  `losses.cops_objective`.

Symbols in shape comments: B batch, H x W pixels, N patches (an s_h x s_w grid), E vision width, D joint embedding
size, F feature layers, P prototypes per state, S class-token samples, C class tokens per prompt, T context tokens
per prompt, M prompts, L tokens in a sequence (1 + N in the vision tower).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import CLIPConfig, CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import QuickGELUActivation
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import ModelOutput

from .configuration_cops import CoPSConfig
from .hub_errors import check_model_source
from .losses import cops_objective

NORMAL, ANOMALOUS = 0, 1

DEFAULT_NOISE_SEED = 0
"""Seed of the VAE prior noise an eval-mode forward uses when no `vae_noise` is passed (see `forward`)."""


@dataclass
class CoPSVisionOutput(ModelOutput):
    """Outputs of the frozen dual-path vision forward; what the training loop caches.

    Args:
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            Global image token g: the class token of the original stream after the last block, projected
            (without `post_layernorm`, as in the reference).
        patch_embeds (`torch.FloatTensor` of shape `(batch_size, num_feature_layers, num_patches, projection_dim)`):
            Patch tokens of each layer in `config.feature_layers` (value stream for dual-path layers), after
            `post_layernorm` and the visual projection, before neighbour averaging.
    """

    image_embeds: torch.FloatTensor | None = None
    patch_embeds: torch.FloatTensor | None = None


class IncompleteCheckpointError(OSError):
    """A saved model lacks weights or its weight file cannot be read; loading it would give random weights."""


def remote_pipeline_entry(pipeline_class: type) -> dict[str, Any]:
    """The `custom_pipelines` entry that makes `pipeline(task, trust_remote_code=True)` load `pipeline_class`.

    It names the code file saved beside a model (its module's file name), then the class name.
    """
    module = pipeline_class.__module__.rsplit(".", 1)[-1]
    return {"impl": f"{module}.{pipeline_class.__name__}", "pt": ["AutoModel"], "type": "image"}


@dataclass
class CoPSAnomalyDetectionOutput(ModelOutput):
    """Outputs of `CoPSForAnomalyDetection`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            cls + 4 * seg + gather + scatter + kl + recon (recon only when `config.use_recon_loss`).
        loss_terms (`dict[str, torch.FloatTensor]`, *optional*, returned when `labels` is given):
            The detached scalar terms `cls`, `seg`, `gather`, `scatter`, `kl`, `recon`.
        image_scores (`torch.FloatTensor` of shape `(batch_size,)`):
            Anomaly score per image in [0, 1]. In training mode (labels given) this is the unfused global
            probability of the anomalous state.
        global_scores (`torch.FloatTensor` of shape `(batch_size,)`, *optional*, at inference):
            The class-token part of `image_scores`: the anomalous-state probability of the global image token,
            before `config.image_score_beta` fuses it with the maximum patch score (tiling re-fuses them).
        anomaly_maps (`torch.FloatTensor` of shape `(batch_size, height, width)`):
            Per-pixel anomaly map at input resolution: distance-weighted, nearest-upsampled and Gaussian-smoothed
            at inference; the unweighted, unsmoothed anomalous-state probability in training mode.
        patch_scores (`torch.FloatTensor` of shape `(batch_size, num_patches)`):
            Anomalous-state probability per patch of the last feature layer (weighted at inference).
        text_embeds (`torch.FloatTensor` of shape `(batch_size, 2, projection_dim)`):
            L2-normalized (normal, anomalous) text features synthesized for each image.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            Global image token g (not normalized).
        normal_distances, anomalous_distances (`torch.FloatTensor` of shape `(batch_size, num_patches)`):
            Cosine distance of each smoothed patch token to its nearest normal / anomalous prototype.
        reference_maps (`torch.FloatTensor` of shape `(batch_size, height, width)`, *optional*, returned at inference
            when references are set):
            The few-shot reference map before fusion: per patch, `(1 - cos) / 2` to the nearest patch of the normal
            reference memory, averaged over the feature layers, nearest-upsampled and Gaussian-smoothed like the
            zero-shot map. `anomaly_maps` and `image_scores` are then the fused ones (`config.reference_weight`).
        original_sizes (`list[tuple[int, int]]`, *optional*, returned when passed to the forward):
            `(height, width)` of each input image before preprocessing, so that
            `processor.post_process_anomaly_detection(outputs)` restores them.
    """

    loss: torch.FloatTensor | None = None
    loss_terms: dict[str, torch.Tensor] | None = None
    image_scores: torch.FloatTensor | None = None
    anomaly_maps: torch.FloatTensor | None = None
    patch_scores: torch.FloatTensor | None = None
    global_scores: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    normal_distances: torch.FloatTensor | None = None
    anomalous_distances: torch.FloatTensor | None = None
    reference_maps: torch.FloatTensor | None = None
    original_sizes: list[tuple[int, int]] | None = None


def neighbour_average(patch_tokens: torch.Tensor, grid: tuple[int, int], kernel_size: int) -> torch.Tensor:
    """Average each patch token with its k x k neighbours (zero padding counted, as avg_pool2d's default).

    Args:
        patch_tokens: `[B, N, D]` tokens of an `s_h x s_w` grid.
        grid: `(s_h, s_w)`.
        kernel_size: odd kernel size k.
    """
    batch_size, _, dim = patch_tokens.shape
    # [B, N, D] -> [B, D, s_h, s_w]
    spatial = patch_tokens.transpose(1, 2).reshape(batch_size, dim, *grid)
    pooled = F.avg_pool2d(spatial, kernel_size, stride=1, padding=kernel_size // 2)
    # [B, D, s_h, s_w] -> [B, N, D]
    return pooled.flatten(2).transpose(1, 2)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized 1-D Gaussian weights with scipy's radius `int(truncate * sigma + 0.5)`."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).to(dtype)


def reflect_indices(length: int, radius: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices that extend `range(length)` by `radius` on both sides with scipy's "reflect" mode.

    scipy's reflect repeats the edge sample (d c b a | a b c d | d c b a), valid for any radius.
    """
    positions = torch.arange(-radius, length + radius, device=device)
    period = 2 * length
    folded = torch.remainder(positions, period)
    return torch.where(folded >= length, period - 1 - folded, folded)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """`scipy.ndimage.gaussian_filter(map, sigma)` (truncate 4, mode reflect) on each `[B, H, W]` map."""
    if sigma <= 0:
        return maps
    weights = gaussian_kernel1d(sigma, dtype=maps.dtype).to(maps.device)
    radius = weights.numel() // 2
    height, width = maps.shape[-2:]
    blurred = maps.unsqueeze(1)  # [B, 1, H, W]
    blurred = blurred.index_select(2, reflect_indices(height, radius, maps.device))
    blurred = F.conv2d(blurred, weights.view(1, 1, -1, 1))
    blurred = blurred.index_select(3, reflect_indices(width, radius, maps.device))
    blurred = F.conv2d(blurred, weights.view(1, 1, 1, -1))
    return blurred.squeeze(1)


def minmax_per_image(values: torch.Tensor) -> torch.Tensor:
    """Scale each row of `[B, N]` to [0, 1] (a constant row becomes 0)."""
    low = values.amin(dim=1, keepdim=True)
    span = (values.amax(dim=1, keepdim=True) - low).clamp_min(torch.finfo(values.dtype).tiny)
    return (values - low) / span


def nearest_prototype_distance(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """`min_j (1 - cos(features[b, i], prototypes[b, j]))` -> `[B, N]` for `[B, N, D]` and `[B, P, D]` inputs.

    Computed in float32 whatever the input dtype: the distances sit near 1, where bfloat16 resolves only 8e-3,
    and the per-image min-max weighting of the maps magnifies that step about tenfold.
    """
    features, prototypes = features.float(), prototypes.float()
    eps = 1e-8
    features_unit = features / features.norm(dim=-1, keepdim=True).clamp_min(eps)
    prototypes_unit = prototypes / prototypes.norm(dim=-1, keepdim=True).clamp_min(eps)
    cosine = features_unit @ prototypes_unit.transpose(1, 2)  # [B, N, P]
    return (1.0 - cosine).amin(dim=-1)


REFERENCE_SEARCH_CHUNK = 2048
"""Rows of queries and of memory compared at once by `nearest_reference_distance`: a block of similarities is at most
2048 x 2048 float32 (16 MiB), whatever the batch and the memory size."""

CORESET_PROJECTION_DIM = 128
"""Features are randomly projected to this many dimensions (when wider) to pick the coreset, as PatchCore does."""


def nearest_reference_distance(
    queries: torch.Tensor, memory: torch.Tensor, chunk_size: int = REFERENCE_SEARCH_CHUNK
) -> torch.Tensor:
    """`(1 - max_j cos(queries[i], memory[j])) / 2` in [0, 1] for L2-normalized `[Q, D]` queries and `[M, D]` memory.

    The search runs over blocks of `chunk_size` queries by `chunk_size` memory rows, keeping a running maximum, so
    its memory is bounded by one block; it is computed in float32 whatever the input dtype.
    """
    best = torch.full((queries.shape[0],), -1.0, device=queries.device)
    for start in range(0, queries.shape[0], chunk_size):
        query_block = queries[start : start + chunk_size].float()
        block_best = best[start : start + chunk_size]
        for memory_start in range(0, memory.shape[0], chunk_size):
            similarity = query_block @ memory[memory_start : memory_start + chunk_size].float().T  # [q, m]
            block_best = torch.maximum(block_best, similarity.amax(dim=1))
        best[start : start + chunk_size] = block_best
    return ((1.0 - best) / 2.0).clamp(0.0, 1.0)


def greedy_coreset(features: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Indices of `size` rows of `[M, D]` `features` picked by greedy k-center (PatchCore's coreset).

    Starting from row 0, each step adds the row farthest (Euclidean) from every row picked so far, so the kept rows
    cover the whole memory; distances are computed after a random Gaussian projection to `CORESET_PROJECTION_DIM`
    dimensions drawn from `seed`. Deterministic for the same features and seed.

    Returns:
        `[size]` int64 indices in selection order (all rows, in order, when `size >= M`).
    """
    num_rows, dim = features.shape
    if size >= num_rows:
        return torch.arange(num_rows, device=features.device)
    projected = features.float()
    if dim > CORESET_PROJECTION_DIM:
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(dim, CORESET_PROJECTION_DIM, generator=generator) / math.sqrt(CORESET_PROJECTION_DIM)
        projected = projected @ projection.to(projected.device)  # [M, p]
    selected = torch.empty(size, dtype=torch.long, device=features.device)
    selected[0] = 0
    min_distances = (projected - projected[0]).norm(dim=1)  # [M]
    for step in range(1, size):
        index = int(min_distances.argmax())
        selected[step] = index
        min_distances = torch.minimum(min_distances, (projected - projected[index]).norm(dim=1))
    return selected


def reference_source_name(source: str | os.PathLike) -> str:
    """The name a reference image is recorded under: the file name of an absolute path, else `source` as given."""
    text = os.fspath(source)
    return os.path.basename(text) if os.path.isabs(text) else text


class CoPSPrototypeExtractor(nn.Module):
    """Pre-norm cross-attention block: queries attend to the patch tokens, then an MLP."""

    def __init__(self, dim: int, num_heads: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.cross_attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.layer_norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.fc1 = nn.Linear(dim, dim)
        self.activation = QuickGELUActivation()
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Map `[P, D]` queries and `[B, N, D]` patch tokens to `[B, P, D]` prototypes."""
        prototypes = queries.unsqueeze(0).expand(patch_tokens.shape[0], -1, -1)
        normed_tokens = self.layer_norm1(patch_tokens)
        attended, _ = self.cross_attention(
            self.layer_norm1(prototypes), normed_tokens, normed_tokens, need_weights=False
        )
        prototypes = prototypes + attended
        return prototypes + self.fc2(self.activation(self.fc1(self.layer_norm2(prototypes))))


class CoPSStatePrototypes(nn.Module):
    """Explicit state prototypes: normal and anomalous query sets read out by one shared extractor."""

    def __init__(self, config: CoPSConfig) -> None:
        super().__init__()
        dim = config.projection_dim
        self.normal_queries = nn.Parameter(torch.empty(config.prototype_length, dim))
        self.anomalous_queries = nn.Parameter(torch.empty(config.prototype_length, dim))
        self.extractor = CoPSPrototypeExtractor(
            dim, config.prototype_attention_heads, config.text_config.layer_norm_eps
        )

    def forward(self, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(normal_prototypes, anomalous_prototypes)`, each `[B, P, D]`, for `[B, N, D]` tokens.

        Both query sets go through the extractor in one call: every query row is independent, so this equals two
        calls while normalizing and projecting the patch tokens (keys and values) once instead of twice.
        """
        queries = torch.cat([self.normal_queries, self.anomalous_queries])  # [2P, D]
        normal_prototypes, anomalous_prototypes = self.extractor(queries, patch_tokens).chunk(2, dim=1)
        return normal_prototypes, anomalous_prototypes


class CoPSClassTokenVAE(nn.Module):
    """Implicit class tokens: a VAE whose decoder turns latent samples into a class-token shift."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.mean_head = nn.Linear(dim, dim)
        self.log_var_head = nn.Linear(dim, dim)
        self.decoder = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def encode(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior `(mean, log_var)`, each `[B, D]`, of the global image token."""
        hidden = self.encoder(image_embeds)
        return self.mean_head(hidden), self.log_var_head(hidden)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Class tokens `[..., D]` from latents `[..., D]`."""
        return self.decoder(latents)


class CoPSPromptSynthesizer(nn.Module):
    """Learnable prompt context (normal, anomalous) and deep text prompts; builds per-image prompts."""

    def __init__(self, config: CoPSConfig) -> None:
        super().__init__()
        dim = config.text_config.hidden_size
        self.prompt_length = config.prompt_length
        self.prototype_length = config.prototype_length
        self.normal_context = nn.Parameter(torch.empty(config.num_prompt_tokens, dim))
        self.anomalous_context = nn.Parameter(torch.empty(config.num_prompt_tokens, dim))
        self.deep_prompts = nn.Parameter(torch.empty(config.deep_prompt_depth, config.deep_prompt_length, dim))

    def forward(
        self, normal_prototypes: torch.Tensor, anomalous_prototypes: torch.Tensor, class_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Synthesize the context tokens of both prompts for every image and class-token sample.

        Args:
            normal_prototypes, anomalous_prototypes: `[B, P, D]`.
            class_tokens: `[B, S, D]`, added to every class token of both prompts.

        Returns:
            `[B, 2, S, T, D]` context tokens, index 0 the normal prompt and 1 the anomalous one. The normal
            prompt's state tokens are shifted by the ANOMALOUS prototypes and vice versa, as in the reference.
        """
        batch_size, num_samples, dim = class_tokens.shape
        state_start = self.prompt_length - self.prototype_length
        context = torch.stack([self.normal_context, self.anomalous_context])  # [2, T, D]
        state_shift = torch.stack([anomalous_prototypes, normal_prototypes], dim=1)  # [B, 2, P, D]
        shape = (batch_size, 2, num_samples)
        generic = context[None, :, None, :state_start].expand(*shape, -1, dim)
        state = (context[:, state_start : self.prompt_length] + state_shift).unsqueeze(2).expand(*shape, -1, dim)
        # [1, 2, 1, C, D] + [B, 1, S, 1, D] -> [B, 2, S, C, D]
        classes = context[None, :, None, self.prompt_length :] + class_tokens[:, None, :, None, :]
        return torch.cat([generic, state, classes], dim=3)


class CoPSPreTrainedModel(PreTrainedModel):
    """Weight initialization and loading glue shared by CoPS models."""

    config_class = CoPSConfig
    base_model_prefix = "cops"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CLIPEncoderLayer", "CLIPTextEmbeddings", "CLIPVisionEmbeddings"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, CoPSPromptSynthesizer):
            for parameter in (module.normal_context, module.anomalous_context, module.deep_prompts):
                init.normal_(parameter, mean=0.0, std=std)
        elif isinstance(module, CoPSStatePrototypes):
            init.normal_(module.normal_queries, mean=0.0, std=std)
            init.normal_(module.anomalous_queries, mean=0.0, std=std)
        elif isinstance(module, nn.MultiheadAttention):
            init.normal_(module.in_proj_weight, mean=0.0, std=std)
            init.zeros_(module.in_proj_bias)
            init.normal_(module.out_proj.weight, mean=0.0, std=std)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class CoPSForAnomalyDetection(CoPSPreTrainedModel):
    """CoPS zero-shot anomaly detector: a frozen `CLIPModel` plus the learnable CoPS modules.

    Only `prompt_synthesizer`, `state_prototypes` and `class_token_vae` train; `clip` stays frozen and in eval
    mode. Saved checkpoints hold the CLIP weights too, so a saved model is self-contained.
    """

    companion_pipelines: ClassVar[dict[str, type]] = {}
    """Pipeline classes saved with the model, by task (filled by `cops_hf.register_with_transformers`).

    `save_pretrained` copies their code beside the weights and names them in the saved `custom_pipelines`, so the
    folder serves `pipeline(task, trust_remote_code=True)` where cops_hf is not installed. The model never imports
    a pipeline: the package wires the two together.
    """

    def __init__(self, config: CoPSConfig) -> None:
        super().__init__(config)
        clip_config = CLIPConfig(
            text_config=config.text_config,
            vision_config=config.vision_config,
            projection_dim=config.projection_dim,
            logit_scale_init_value=config.logit_scale_init_value,
        )
        self.clip = CLIPModel(clip_config)
        self.clip.requires_grad_(False)
        self.prompt_synthesizer = CoPSPromptSynthesizer(config)
        self.state_prototypes = CoPSStatePrototypes(config)
        self.class_token_vae = CoPSClassTokenVAE(config.projection_dim)
        self._register_reference_memory(
            torch.zeros(len(config.feature_layers), config.reference_memory_size, config.projection_dim)
        )
        self.post_init()

    @classmethod
    def from_clip(
        cls,
        clip: str | CLIPModel,
        *,
        clip_kwargs: dict | None = None,
        train_preset: str | None = None,
        test_preset: str | None = None,
        **cops_fields,
    ) -> CoPSForAnomalyDetection:
        """Build a fresh (untrained) CoPS around pretrained CLIP weights; what training starts from.

        Args:
            clip: a `CLIPModel` or a name/path for `CLIPModel.from_pretrained`, e.g.
                `"openai/clip-vit-large-patch14-336"`.
            clip_kwargs: extra arguments for `CLIPModel.from_pretrained` (revision, cache_dir, ...).
            train_preset, test_preset: dataset presets, as in `CoPSConfig.from_clip_config`.
            **cops_fields: `CoPSConfig` fields (e.g. `image_size=518`); see `CoPSConfig.from_clip_config` for the
                ones derived from the CLIP's depth.
        """
        if isinstance(clip, str):
            clip = CLIPModel.from_pretrained(clip, **(clip_kwargs or {}))
        cops_fields.setdefault("logit_scale_init_value", float(clip.logit_scale.detach()))
        published = clip.name_or_path and not os.path.exists(clip.name_or_path)  # a Hub id, not a local folder
        cops_fields.setdefault("clip_model_id", clip.name_or_path if published else None)
        config = CoPSConfig.from_clip_config(
            clip.config, train_preset=train_preset, test_preset=test_preset, **cops_fields
        )
        model = cls(config)
        model.clip.load_state_dict(clip.state_dict())
        return model.to(clip.dtype)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs
    ) -> CoPSForAnomalyDetection:
        """`PreTrainedModel.from_pretrained`, refusing incomplete or unreadable checkpoints; CLIP frozen again.

        Raises:
            IncompleteCheckpointError: the checkpoint lacks weights (they would be random), has weights of other
                shapes than its config.json implies (unless `ignore_mismatched_sizes=True`), or cannot be read.
            OSError: `pretrained_model_name_or_path` is neither an existing folder nor a Hub id, or is a folder
                without config.json (refused before any model is built).
        """
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            check_model_source(pretrained_model_name_or_path)
            folder = Path(pretrained_model_name_or_path)
            if folder.is_dir() and not (folder / "config.json").is_file() and kwargs.get("config") is None:
                raise OSError(
                    f"'{folder}' has no config.json, so it is not a saved model: give the folder written by "
                    "save_pretrained or `cops-hf convert` (config.json next to model.safetensors)."
                )
        wants_loading_info = kwargs.pop("output_loading_info", False)
        refuse_mismatched = not kwargs.pop("ignore_mismatched_sizes", False)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except (SafetensorError, pickle.UnpicklingError, EOFError) as error:
            raise IncompleteCheckpointError(
                f"The weights of '{pretrained_model_name_or_path}' cannot be read ({error}): the file is truncated "
                "or not a checkpoint. Save or download the model again."
            ) from error
        mismatched = sorted(loading_info["mismatched_keys"]) if refuse_mismatched else []
        if mismatched:
            name, stored, expected = mismatched[0]
            raise IncompleteCheckpointError(
                f"The weight '{name}' of '{pretrained_model_name_or_path}' has shape {list(stored)} but its "
                f"config.json implies {list(expected)} ({len(mismatched)} mismatched in all): the weights and the "
                "config do not belong together. Save or download the model again."
            )
        missing = sorted(loading_info["missing_keys"])
        if missing:
            raise IncompleteCheckpointError(
                f"'{pretrained_model_name_or_path}' lacks {len(missing)} weights (e.g. '{missing[0]}'), which would "
                "be random: it is not a complete CoPS checkpoint. Save it again with save_pretrained, or convert "
                "the original release with `cops-hf convert`."
            )
        model.clip.requires_grad_(False)
        return (model, loading_info) if wants_loading_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, with the `companion_pipelines` named in the saved configuration.

        Importing cops_hf registers the CoPS classes for the Auto classes, so transformers writes an `auto_map` and
        copies this file and the modules it imports relatively next to the weights; the companion pipelines' files
        are copied the same way. The folder, or the repository `push_to_hub` makes of it, then loads with
        `AutoModel` and `pipeline` and `trust_remote_code=True` where cops_hf is not installed. The model's own
        `config` is left unchanged.

        The weight files get the permissions of the config written beside them: safetensors writes through a
        private temporary file (mode 0600) that it renames into place, so without this `model.safetensors` would be
        the one file of the folder that other users cannot read.
        """
        original_config = self.config
        self.config = copy.deepcopy(original_config)
        if self.companion_pipelines:
            self.config.custom_pipelines = {
                task: remote_pipeline_entry(pipeline) for task, pipeline in self.companion_pipelines.items()
            }
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config = original_config
        for pipeline_class in self.companion_pipelines.values():
            custom_object_save(pipeline_class, save_directory)
        directory = Path(save_directory)
        mode = (directory / "config.json").stat().st_mode & 0o777
        for weights in directory.glob("*.safetensors"):
            weights.chmod(mode)

    def train(self, mode: bool = True) -> CoPSForAnomalyDetection:
        """Set the CoPS modules' training mode; CLIP always stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ vision tower

    def _interpolated_position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embeddings `[1 + s_h * s_w, E]`, bilinearly resized from CLIP's own grid (class kept)."""
        table = self.clip.vision_model.embeddings.position_embedding.weight
        side = math.isqrt(table.shape[0] - 1)
        if (side, side) == tuple(grid):
            return table
        # [side*side, E] -> [1, E, side, side]
        patch_table = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(patch_table, size=grid, mode="bilinear", align_corners=False)
        # [1, E, s_h, s_w] -> [s_h*s_w, E]
        return torch.cat([table[:1], resized.flatten(2).squeeze(0).transpose(0, 1)])

    @staticmethod
    def _split_heads(states: torch.Tensor, num_heads: int) -> torch.Tensor:
        # [B, L, E] -> [B, heads, L, E/heads]
        batch_size, length, width = states.shape
        return states.view(batch_size, length, num_heads, width // num_heads).transpose(1, 2)

    @staticmethod
    def _merge_heads(states: torch.Tensor) -> torch.Tensor:
        # [B, heads, L, E/heads] -> [B, L, E]
        batch_size, num_heads, length, head_dim = states.shape
        return states.transpose(1, 2).reshape(batch_size, length, num_heads * head_dim)

    def _dual_path_block(
        self, layer: nn.Module, original: torch.Tensor, value_stream: torch.Tensor | None, class_token_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One CLIP encoder layer run as two streams from the original stream's `layer_norm1`.

        The original stream gets ordinary attention and the MLP; the value stream gets value-value attention
        and no MLP. Work no output reads is skipped: with `class_token_only` the original stream is computed at
        the class token alone (all that is read of it after the last block), and a `None` value stream (past the
        last feature layer) stays `None`.
        """
        attention = layer.self_attn
        normed = layer.layer_norm1(original)
        queries = self._split_heads(
            attention.q_proj(normed[:, :1] if class_token_only else normed), attention.num_heads
        )
        keys = self._split_heads(attention.k_proj(normed), attention.num_heads)
        values = self._split_heads(attention.v_proj(normed), attention.num_heads)
        ordinary = attention.out_proj(self._merge_heads(F.scaled_dot_product_attention(queries, keys, values)))
        original = (original[:, :1] if class_token_only else original) + ordinary
        original = original + layer.mlp(layer.layer_norm2(original))
        if value_stream is None:
            return original, None
        value_value = attention.out_proj(self._merge_heads(F.scaled_dot_product_attention(values, values, values)))
        return original, value_stream + value_value

    @torch.no_grad()
    def dual_path_vision_forward(self, pixel_values: torch.Tensor) -> CoPSVisionOutput:
        """Frozen vision tower with dual-path attention in its last `config.dpam_layers` layers.

        Args:
            pixel_values: `[B, 3, H, W]` normalized images; H and W multiples of the patch size.
        """
        vision = self.clip.vision_model
        embeddings = vision.embeddings
        pixel_values = pixel_values.to(embeddings.patch_embedding.weight.dtype)
        patches = embeddings.patch_embedding(pixel_values)  # [B, E, s_h, s_w]
        grid = tuple(patches.shape[-2:])
        patches = patches.flatten(2).transpose(1, 2)  # [B, N, E]
        class_token = embeddings.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        hidden = torch.cat([class_token, patches], dim=1) + self._interpolated_position_embeddings(grid)
        hidden = vision.pre_layrnorm(hidden)  # [B, 1 + N, E]

        layers = vision.encoder.layers
        num_layers = len(layers)
        first_dual_path = num_layers - self.config.dpam_layers + 1  # 1-based
        last_feature = max(self.config.feature_layers)
        value_stream = None
        layer_features = {}
        for index, layer in enumerate(layers, start=1):
            if index < first_dual_path:
                hidden = layer(hidden, attention_mask=None)
            else:
                if index == first_dual_path:
                    value_stream = hidden
                hidden, value_stream = self._dual_path_block(
                    layer,
                    hidden,
                    value_stream if index <= last_feature else None,
                    class_token_only=index == num_layers,
                )
            if index in self.config.feature_layers:
                layer_features[index] = value_stream if value_stream is not None else hidden

        projection = self.clip.visual_projection
        image_embeds = projection(hidden[:, 0])
        patch_embeds = torch.stack(
            [projection(vision.post_layernorm(layer_features[index][:, 1:])) for index in self.config.feature_layers],
            dim=1,
        )  # [B, F, N, D]
        return CoPSVisionOutput(image_embeds=image_embeds, patch_embeds=patch_embeds)

    # ------------------------------------------------------------------ text tower

    def encode_prompts(self, context_tokens: torch.Tensor) -> torch.Tensor:
        """Text features of prompts given their context tokens, through CLIP's text tower with deep prompts.

        The prompt is `[SOS] + context + suffix ("." ) + [EOS]`; since the mask is causal and only the EOS
        position is read, the sequence stops at EOS (the reference's 77-token padding changes nothing).

        Args:
            context_tokens: `[M, T, D]` context token embeddings.

        Returns:
            `[M, D]` L2-normalized projected text features.
        """
        text_model = self.clip.text_model
        text_config = self.config.text_config
        num_prompts = context_tokens.shape[0]
        device = context_tokens.device
        token_embedding = text_model.embeddings.token_embedding
        start_ids = torch.tensor([text_config.bos_token_id], device=device)
        end_ids = torch.tensor([*self.config.prompt_suffix_token_ids, text_config.eos_token_id], device=device)
        start = token_embedding(start_ids).to(context_tokens.dtype).expand(num_prompts, -1, -1)
        end = token_embedding(end_ids).to(context_tokens.dtype).expand(num_prompts, -1, -1)
        hidden = torch.cat([start, context_tokens, end], dim=1)  # [M, L, D]
        length = hidden.shape[1]
        hidden = hidden + text_model.embeddings.position_embedding.weight[:length]
        causal_mask = torch.full((length, length), float("-inf"), device=device, dtype=hidden.dtype).triu(1)
        causal_mask = causal_mask[None, None]  # [1, 1, L, L]

        deep_prompts = self.prompt_synthesizer.deep_prompts.to(hidden.dtype)
        num_deep = deep_prompts.shape[1]
        for index, layer in enumerate(text_model.encoder.layers):
            if 1 <= index <= deep_prompts.shape[0]:
                replaced = deep_prompts[index - 1].expand(num_prompts, -1, -1)
                hidden = torch.cat([hidden[:, :1], replaced, hidden[:, 1 + num_deep :]], dim=1)
            hidden = layer(hidden, attention_mask=causal_mask)
        end_state = text_model.final_layer_norm(hidden[:, -1])
        text_embeds = self.clip.text_projection(end_state)
        return text_embeds / text_embeds.norm(dim=-1, keepdim=True)

    def synthesize_text_embeds(
        self, normal_prototypes: torch.Tensor, anomalous_prototypes: torch.Tensor, class_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Per-image (normal, anomalous) text features `[B, 2, D]`, averaged over the class-token samples.

        Args:
            normal_prototypes, anomalous_prototypes: `[B, P, D]`.
            class_tokens: `[B, S, D]`.
        """
        context = self.prompt_synthesizer(normal_prototypes, anomalous_prototypes, class_tokens)  # [B, 2, S, T, D]
        batch_size, num_states, num_samples, num_tokens, dim = context.shape
        text_embeds = self.encode_prompts(context.reshape(-1, num_tokens, dim))
        text_embeds = text_embeds.view(batch_size, num_states, num_samples, -1).mean(dim=2)
        return text_embeds / text_embeds.norm(dim=-1, keepdim=True)

    def seeded_prior_noise(self, batch_size: int, seed: int, num_samples: int | None = None) -> torch.Tensor:
        """Prior noise `[B, S, D]` from `seed`, the same S samples for every image (CPU, float32).

        Sharing the samples makes a result independent of the batch or shard an image falls in.
        """
        num_samples = num_samples or self.config.vae_samples
        generator = torch.Generator().manual_seed(seed)
        samples = torch.randn(1, num_samples, self.config.projection_dim, generator=generator)
        return samples.expand(batch_size, -1, -1)

    # ------------------------------------------------------------------ reference memory (few-shot)

    def _register_reference_memory(self, memory: torch.Tensor) -> None:
        """Store `[F, M, D]` unit patch features as the `reference_memory` buffer.

        A non-empty memory is a persistent buffer, so `save_pretrained` writes it into the weights file beside the
        others and `from_pretrained` reads it back (the config's `reference_memory_size` gives its shape); an empty
        one is not saved, so folders saved before references existed load unchanged.
        """
        self.register_buffer("reference_memory", memory, persistent=memory.shape[1] > 0)

    @property
    def num_references(self) -> int:
        """Number of normal reference images in the memory; 0 for a zero-shot model."""
        return self.config.reference_count

    @torch.no_grad()
    def reference_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalized patch features `[B, F, N, D]` of images: what the reference memory holds.

        These are the patch tokens of `config.feature_layers` that the zero-shot map scores (value stream of the
        dual-path layers, projected into the joint space), taken before the neighbour averaging: averaging k x k
        neighbours blurs what makes a patch differ from its nearest normal one, and on the synthetic benchmark
        (tiny tower, 7x7 to 8x8 patches) it cost 0.1 to 0.35 pixel AUROC.

        Args:
            pixel_values: `[B, 3, H, W]` from [`CoPSProcessor`].
        """
        self._check_pixel_values(pixel_values)
        patch_embeds = self.dual_path_vision_forward(pixel_values).patch_embeds.float()  # [B, F, N, D]
        return patch_embeds / patch_embeds.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def set_references(
        self,
        pixel_values: torch.Tensor | Iterable[torch.Tensor],
        sources: Sequence[str | os.PathLike] | None = None,
        batch_size: int = 8,
    ) -> None:
        """Build the few-shot memory from normal reference images, replacing any earlier one.

        Each feature layer's memory holds the patch features (`reference_features`) of every reference, subsampled
        by a greedy k-center coreset to `config.reference_memory_limit` rows when larger. The config records the
        count, the sources and the memory's size, so that `save_pretrained` / `from_pretrained` carry the memory.

        Args:
            pixel_values: `[K, 3, H, W]` from [`CoPSProcessor`] (any size the model takes), or an iterable of such
                batches (to stream many references without holding all their pixels).
            sources: one name per reference (e.g. file names) for the model card; absolute paths are reduced to
                their file name.
            batch_size: references run through the vision tower this many at a time.
        """
        batches = [pixel_values] if isinstance(pixel_values, torch.Tensor) else pixel_values
        layer_features = []  # per batch: [F, k*N, D]
        count = 0
        for batch in batches:
            for chunk in batch.split(batch_size):
                features = self.reference_features(chunk)  # [k, F, N, D]
                layer_features.append(features.transpose(0, 1).flatten(1, 2))  # [F, k*N, D]
                count += chunk.shape[0]
        if count == 0:
            raise ValueError("set_references got no reference image: pass pixel_values of at least one normal image.")
        if sources is not None and len(sources) != count:
            raise ValueError(f"set_references got {len(sources)} sources for {count} reference images.")
        features = torch.cat(layer_features, dim=1)  # [F, K*N, D]
        limit = self.config.reference_memory_limit
        memory = torch.stack([layer[greedy_coreset(layer, limit)] for layer in features])  # [F, M, D]
        self._register_reference_memory(memory)
        self.config.reference_count = count
        self.config.reference_memory_size = memory.shape[1]
        self.config.reference_sources = None if sources is None else [reference_source_name(s) for s in sources]

    def clear_references(self) -> None:
        """Forget the reference memory: the model is zero-shot again, exactly as without references."""
        self._register_reference_memory(
            self.reference_memory.new_zeros(len(self.config.feature_layers), 0, self.config.projection_dim)
        )
        self.config.reference_count = 0
        self.config.reference_memory_size = 0
        self.config.reference_sources = None

    def _reference_distances(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        """Distance `[B, F, N]` of each patch token `[B, F, N, D]` to its nearest memory patch, per layer."""
        units = patch_embeds.float() / patch_embeds.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
        memory = self.reference_memory
        if memory.shape[0] != units.shape[1] or memory.shape[2] != units.shape[3]:
            raise ValueError(
                f"The reference memory holds {memory.shape[0]} layers of width {memory.shape[2]} but the model scores "
                f"{units.shape[1]} layers of width {units.shape[3]}: call set_references again after changing "
                "feature_layers."
            )
        batch_size, num_layers, num_patches, _ = units.shape
        distances = [
            nearest_reference_distance(units[:, layer].flatten(0, 1), memory[layer]).view(batch_size, num_patches)
            for layer in range(num_layers)
        ]
        return torch.stack(distances, dim=1)

    # ------------------------------------------------------------------ forward

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.vision_config.num_channels:
            raise ValueError(
                f"pixel_values must have shape [batch, {self.config.vision_config.num_channels}, height, width], "
                f"got {list(pixel_values.shape)}. Use CoPSProcessor to turn images into pixel_values."
            )
        patch = self.config.vision_config.patch_size
        height, width = pixel_values.shape[-2:]
        if height % patch or width % patch or height == 0 or width == 0:
            raise ValueError(
                f"pixel_values height and width ({height}x{width}) must be positive multiples of the patch size "
                f"{patch}; resize to config.image_size={self.config.image_size} (CoPSProcessor does)."
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contains NaN or infinite values; check the input images and their scaling.")

    def _state_probs(self, patch_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Softmax over (normal, anomalous) of patch-text similarities: `[B, F, N, D]` -> `[B, F, N, 2]`."""
        patches_unit = patch_embeds / patch_embeds.norm(dim=-1, keepdim=True)
        logits = torch.einsum("bfnd,bsd->bfns", patches_unit, text_embeds) / self.config.temperature
        return logits.softmax(dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        vae_noise: torch.Tensor | None = None,
        vision_outputs: CoPSVisionOutput | None = None,
        return_dict: bool | None = None,
        original_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
    ) -> CoPSAnomalyDetectionOutput | tuple:
        r"""Score images, or compute the training loss when `labels` are given.

        Args:
            pixel_values: `[B, 3, H, W]` from `CoPSProcessor`; H, W multiples of the patch size.
            labels: `[B]` image labels (1 = anomalous). Given, the forward follows the training path: posterior
                class-token sample, training kernel, detached prototypes for the text features, and the loss.
            masks: `[B, H, W]` binary ground-truth masks for the segmentation and prototype terms. Without masks
                (image-level data) the loss is cls + kl (+ recon).
            vae_noise: noise for reproducible runs: `[B, S, D]` prior samples at inference (S may differ from
                `config.vae_samples`), `[B, 1, D]` reparameterization noise with labels. When omitted, a model in
                eval mode scores with the seeded prior noise `seeded_prior_noise(B, DEFAULT_NOISE_SEED)` (seed 0,
                the pipeline's default), so the same input gives the same output on every call; in training mode
                (or with labels) the noise is drawn from torch's generator.
            vision_outputs: precomputed `CoPSVisionOutput` (e.g. cached by the trainer) instead of pixel_values.
            return_dict: return a `CoPSAnomalyDetectionOutput` (default) or a tuple.
            original_sizes: `(height, width)` per image as `CoPSProcessor` returns them, so that
                `model(**processor(images=...))` works; not used by the computation, only carried to the output
                for `post_process_anomaly_detection`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if vision_outputs is None:
            if pixel_values is None:
                raise ValueError("Pass pixel_values (or precomputed vision_outputs).")
            self._check_pixel_values(pixel_values)
            vision_outputs = self.dual_path_vision_forward(pixel_values)
            output_size = tuple(pixel_values.shape[-2:])
        else:
            output_size = (self.config.image_size, self.config.image_size)
        patch = self.config.vision_config.patch_size
        grid = (output_size[0] // patch, output_size[1] // patch)
        training_path = labels is not None
        kernel_size = self.config.train_kernel_size if training_path else self.config.test_kernel_size

        compute_dtype = self.prompt_synthesizer.normal_context.dtype
        image_embeds = vision_outputs.image_embeds.to(compute_dtype)
        layer_patch_embeds = vision_outputs.patch_embeds.to(compute_dtype)
        batch_size = layer_patch_embeds.shape[0]
        # [B, F, N, D] -> [B*F, N, D] -> smoothed -> [B, F, N, D]
        smoothed = neighbour_average(layer_patch_embeds.flatten(0, 1), grid, kernel_size).view_as(layer_patch_embeds)
        fused = smoothed.mean(dim=1)  # [B, N, D]
        normal_prototypes, anomalous_prototypes = self.state_prototypes(fused)
        normal_distances = nearest_prototype_distance(fused, normal_prototypes)
        anomalous_distances = nearest_prototype_distance(fused, anomalous_prototypes)

        class_tokens, posterior = self._class_tokens(image_embeds, vae_noise, training_path)
        if training_path:  # as the reference trains: no gradient reaches the prototypes through the text path
            normal_prototypes, anomalous_prototypes = normal_prototypes.detach(), anomalous_prototypes.detach()
        text_embeds = self.synthesize_text_embeds(normal_prototypes, anomalous_prototypes, class_tokens)

        state_probs = self._state_probs(smoothed.float(), text_embeds.float())  # [B, F, N, 2]
        image_unit = image_embeds.float() / image_embeds.float().norm(dim=-1, keepdim=True)
        image_logits = torch.einsum("bd,bsd->bs", image_unit, text_embeds.float()) / self.config.temperature

        if training_path:
            outputs = self._training_outputs(
                state_probs, image_logits, grid, output_size, labels, masks, normal_distances, anomalous_distances,
                posterior, image_embeds, class_tokens,
            )  # fmt: skip
        else:
            outputs = self._inference_outputs(
                state_probs, image_logits, grid, output_size, normal_distances, anomalous_distances
            )
            if self.num_references:
                self._fuse_references(outputs, layer_patch_embeds, grid, output_size)
        outputs.text_embeds = text_embeds
        outputs.image_embeds = image_embeds
        outputs.normal_distances = normal_distances
        outputs.anomalous_distances = anomalous_distances
        if original_sizes is not None:
            if len(original_sizes) != batch_size:
                raise ValueError(f"Got {len(original_sizes)} original_sizes for {batch_size} images.")
            outputs.original_sizes = [(int(height), int(width)) for height, width in original_sizes]
        return outputs if return_dict else outputs.to_tuple()

    def _class_tokens(
        self, image_embeds: torch.Tensor, vae_noise: torch.Tensor | None, training_path: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Class tokens from the VAE, and the posterior `(mean, log_var)` on the training path (else None).

        Training path: one reparameterized posterior sample per image, `[B, 1, D]`. Inference: `[B, S, D]` prior
        samples decoded from `vae_noise`, else from seeded noise in eval mode, else from torch's generator.
        """
        vae = self.class_token_vae
        batch_size, dim = image_embeds.shape
        if training_path:
            mean, log_var = vae.encode(image_embeds)
            noise = vae_noise if vae_noise is not None else torch.randn_like(mean).unsqueeze(1)
            self._check_noise(noise, (batch_size, 1, dim))
            latents = mean + torch.exp(0.5 * log_var) * noise[:, 0].to(mean.dtype)
            return vae.decode(latents).unsqueeze(1), (mean, log_var)
        noise = vae_noise
        if noise is None and self.training:
            noise = torch.randn(
                batch_size, self.config.vae_samples, dim, device=image_embeds.device, dtype=image_embeds.dtype
            )
        elif noise is None:
            noise = self.seeded_prior_noise(batch_size, DEFAULT_NOISE_SEED).to(image_embeds.device)
        self._check_noise(noise, (batch_size, None, dim))
        return vae.decode(noise.to(image_embeds.dtype)), None

    def _training_outputs(
        self,
        state_probs: torch.Tensor,
        image_logits: torch.Tensor,
        grid: tuple[int, int],
        output_size: tuple[int, int],
        labels: torch.Tensor,
        masks: torch.Tensor | None,
        normal_distances: torch.Tensor,
        anomalous_distances: torch.Tensor,
        posterior: tuple[torch.Tensor, torch.Tensor],
        image_embeds: torch.Tensor,
        class_tokens: torch.Tensor,
    ) -> CoPSAnomalyDetectionOutput:
        """The training path's outputs: the loss and its terms, with the same scores and maps as inference gives."""
        batch_size, num_layers = state_probs.shape[:2]
        # [B, F, N, 2] -> [B*F, 2, N] -> [B*F, 2, H, W] -> [B, F, 2, H, W]
        state_maps = self._upsample_patches(state_probs.flatten(0, 1).transpose(1, 2), grid, output_size)
        state_maps = state_maps.view(batch_size, num_layers, 2, *output_size)
        posterior_mean, posterior_log_var = posterior
        loss, terms = cops_objective(
            image_logits=image_logits,
            labels=labels,
            state_maps=state_maps,
            masks=self._binary_masks(masks, batch_size, output_size) if masks is not None else None,
            normal_distances=normal_distances,
            anomalous_distances=anomalous_distances,
            posterior_mean=posterior_mean,
            posterior_log_var=posterior_log_var,
            image_embeds=image_embeds,
            class_tokens=class_tokens[:, 0],
            patch_size=self.config.vision_config.patch_size,
            use_recon_loss=self.config.use_recon_loss,
        )
        return CoPSAnomalyDetectionOutput(
            loss=loss,
            loss_terms={name: value.detach() for name, value in terms.items()},
            image_scores=image_logits.softmax(dim=-1)[:, ANOMALOUS],
            anomaly_maps=state_maps[:, -1, ANOMALOUS],
            patch_scores=state_probs[:, -1, :, ANOMALOUS],
        )

    @staticmethod
    def _check_noise(noise: torch.Tensor, expected: tuple[int | None, ...]) -> None:
        matches = noise.ndim == len(expected) and all(
            want is None or have == want for have, want in zip(noise.shape, expected, strict=True)
        )
        if not matches:
            described = ", ".join("S" if want is None else str(want) for want in expected)
            raise ValueError(f"vae_noise must have shape [{described}], got {list(noise.shape)}.")

    def _upsample_patches(self, patch_values: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]):
        """Nearest-neighbour upsampling of `[B, K, N]` patch values to `[B, K, H, W]` (any K)."""
        return F.interpolate(patch_values.unflatten(-1, grid), size=size, mode="nearest")

    def _pixel_maps(self, layer_values: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """Per-patch values of each layer `[B, F, N]` to one `[B, H, W]` map.

        Nearest upsampling, mean over the layers, Gaussian smoothing (the zero-shot and the reference maps both go
        through here).
        """
        layer_maps = self._upsample_patches(layer_values, grid, size)  # [B, F, H, W]
        return gaussian_blur(layer_maps.mean(dim=1), self.config.gaussian_sigma)

    def _fuse_references(
        self,
        outputs: CoPSAnomalyDetectionOutput,
        patch_embeds: torch.Tensor,
        grid: tuple[int, int],
        output_size: tuple[int, int],
    ) -> None:
        """Add the reference map to `outputs`; fuse it into the map and score with `config.reference_weight`.

        `patch_embeds` are the `[B, F, N, D]` patch tokens before neighbour averaging, as `reference_features`.
        """
        reference_maps = self._pixel_maps(self._reference_distances(patch_embeds), grid, output_size)
        weight = self.config.reference_weight
        outputs.anomaly_maps = (1.0 - weight) * outputs.anomaly_maps + weight * reference_maps
        outputs.image_scores = (1.0 - weight) * outputs.image_scores + weight * reference_maps.flatten(1).amax(dim=1)
        outputs.reference_maps = reference_maps

    def _inference_outputs(
        self,
        state_probs: torch.Tensor,
        image_logits: torch.Tensor,
        grid: tuple[int, int],
        output_size: tuple[int, int],
        normal_distances: torch.Tensor,
        anomalous_distances: torch.Tensor,
    ) -> CoPSAnomalyDetectionOutput:
        alpha = self.config.distance_alpha
        patch_weights = alpha * minmax_per_image(normal_distances.float()) + (1.0 - alpha) * (
            1.0 - minmax_per_image(anomalous_distances.float())
        )  # [B, N]
        anomalous_probs = state_probs[..., ANOMALOUS] * patch_weights.unsqueeze(1)  # [B, F, N]
        anomaly_maps = self._pixel_maps(anomalous_probs, grid, output_size)
        patch_scores = anomalous_probs[:, -1]
        global_scores = image_logits.softmax(dim=-1)[:, ANOMALOUS]
        beta = self.config.image_score_beta
        image_scores = beta * global_scores + (1.0 - beta) * patch_scores.amax(dim=-1)
        return CoPSAnomalyDetectionOutput(
            image_scores=image_scores,
            anomaly_maps=anomaly_maps,
            patch_scores=patch_scores,
            global_scores=global_scores,
        )

    @staticmethod
    def _binary_masks(masks: torch.Tensor, batch_size: int, size: tuple[int, int]) -> torch.Tensor:
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.ndim != 3 or masks.shape[0] != batch_size or tuple(masks.shape[-2:]) != tuple(size):
            raise ValueError(
                f"masks must have shape [{batch_size}, {size[0]}, {size[1]}] (one per image, at the input "
                f"resolution), got {list(masks.shape)}. CoPSProcessor(images, masks=...) prepares them."
            )
        return (masks > 0.5).float()


__all__ = [
    "DEFAULT_NOISE_SEED",
    "CoPSAnomalyDetectionOutput",
    "CoPSForAnomalyDetection",
    "CoPSPreTrainedModel",
    "CoPSVisionOutput",
    "IncompleteCheckpointError",
    "remote_pipeline_entry",
]

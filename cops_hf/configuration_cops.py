"""CoPS model configuration.

`CoPSConfig` holds the frozen CLIP towers' configurations (as transformers' `CLIPConfig` does) and every
hyperparameter of the CoPS modules. The reference implementation switches some of them by dataset name
(`'visa' in args.dataset`); here they are plain fields with the general value as default, and the switches are
named presets (`TEST_DATASET_PRESETS`, `TRAIN_DATASET_PRESETS`) applied with `CoPSConfig.with_preset`.
"""

from __future__ import annotations

import copy
import math
import os
import types
import typing
from typing import Any, ClassVar

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .schema import dataset_key

# CLIP ViT-L/14@336px, the tower CoPS is published with ("openai/clip-vit-large-patch14-336").
VIT_L14_336_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
}
VIT_L14_336_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}

# Token ids that follow the context in the prompt template "X ... X.": the "." of CLIP's BPE vocabulary. A constant of
# CLIP's vocabulary (tests/test_configuration.py checks it against the tokenizer), so no config needs a tokenizer.
PROMPT_SUFFIX_TOKEN_IDS: tuple[int, ...] = (269,)

# Test-time switches of the reference, per test dataset. Every dataset but VisA uses the general values.
_GENERAL_TEST = {"test_kernel_size": 5, "distance_alpha": 0.26, "image_score_beta": 0.9}
_VISA_TEST = {"test_kernel_size": 3, "distance_alpha": 0.35, "image_score_beta": 1.0}
TEST_DATASET_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(_VISA_TEST if name == "visa" else _GENERAL_TEST)
    for name in (
        "mvtec", "visa", "btad", "mpdd", "dtd_synthetic", "headct", "brainmri", "br35h",
        "isic", "cvc_colondb", "cvc_clinicdb", "kvasir", "endo", "general",
    )
}  # fmt: skip

# Training-time switches of the reference, per auxiliary (training) dataset.
TRAIN_DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "visa": {"train_kernel_size": 5, "use_recon_loss": False},
    "mvtec": {"train_kernel_size": 3, "use_recon_loss": True},
    "general": {"train_kernel_size": 5, "use_recon_loss": True},
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# JSON-level checks for the field annotations a config.json can get wrong; other annotations are not checked.
_FIELD_KINDS = {
    "int": ("an integer", _is_int),
    "float": ("a finite number", lambda value: (_is_int(value) or isinstance(value, float)) and math.isfinite(value)),
    "bool": ("true or false", lambda value: isinstance(value, bool)),
    "str": ("a string", lambda value: isinstance(value, str)),
    "None": ("null", lambda value: value is None),
    "list[int]": ("a list of integers", lambda value: isinstance(value, list) and all(map(_is_int, value))),
    "list[str]": (
        "a list of strings",
        lambda value: isinstance(value, list) and all(isinstance(item, str) for item in value),
    ),
}


MAX_VAE_SAMPLES = 1000
"""The most class-token samples `vae_samples` may ask for (the reference draws 10; each is a text-tower pass)."""


def _matches_annotation(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a CLIP sub-config field's annotation (int, float, str, unions, lists of them)."""
    if annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_matches_annotation(value, option) for option in options)
    if typing.get_origin(annotation) is list:
        return isinstance(value, list) and all(_matches_annotation(item, options[0]) for item in value)
    if annotation is float:
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if annotation is int:
        return _is_int(value)
    return not isinstance(annotation, type) or isinstance(value, annotation)


def _describe_annotation(annotation: Any) -> str:
    """An annotation in words ("an integer or null"), for messages about config.json values."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe_annotation(option) for option in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"a list of ({_describe_annotation(typing.get_args(annotation)[0])})"
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _sub_config_problems(name: str, value: Any, config_class: type[PretrainedConfig]) -> list[str]:
    """What is wrong with the types of a CLIP tower's config as read from config.json (one entry per bad field)."""
    if value is None or isinstance(value, PretrainedConfig):
        return []
    if not isinstance(value, dict):
        return [f"{name} must be an object of {config_class.__name__} fields, got {type(value).__name__}"]
    hints = {key: hint for key, hint in config_class.__annotations__.items() if not isinstance(hint, str)}
    return [
        f"{name}.{key} must be {_describe_annotation(hints[key])}, got {field!r}"
        for key, field in value.items()
        if key in hints and not _matches_annotation(field, hints[key])
    ]


def _token_id_problems(fields: dict[str, Any]) -> list[str]:
    """Token ids outside the text tower's vocabulary (they would fail as an index error deep in the forward)."""
    text = fields.get("text_config")
    text = text.to_dict() if isinstance(text, PretrainedConfig) else text if isinstance(text, dict) else {}
    vocab_size = text.get("vocab_size", CLIPTextConfig().vocab_size)
    if not _is_int(vocab_size):
        return []
    named_ids = [("prompt_suffix_token_ids", fields.get("prompt_suffix_token_ids") or [])]
    named_ids += [(f"text_config.{key}", text.get(key)) for key in ("bos_token_id", "eos_token_id")]
    problems = []
    for name, ids in named_ids:
        if any(_is_int(token) and not 0 <= token < vocab_size for token in (ids if isinstance(ids, list) else [ids])):
            problems.append(f"{name} must hold token ids in 0..{vocab_size - 1} (the text vocabulary), got {ids!r}")
    return problems


def config_field_problems(fields: dict[str, Any]) -> list[str]:
    """What is wrong with the types of CoPS config `fields` (as read from config.json): one entry per bad field.

    Also checked here, since they would otherwise fail deep in a forward pass: the CLIP towers' field types,
    token ids within the text vocabulary and `vae_samples` up to `MAX_VAE_SAMPLES`.
    """
    problems = _sub_config_problems("text_config", fields.get("text_config"), CLIPTextConfig)
    problems += _sub_config_problems("vision_config", fields.get("vision_config"), CLIPVisionConfig)
    for name, annotation in CoPSConfig.__annotations__.items():
        kinds = annotation.split(" | ")
        if name not in fields or not all(kind in _FIELD_KINDS for kind in kinds):
            continue
        if not any(_FIELD_KINDS[kind][1](fields[name]) for kind in kinds):
            expected = " or ".join(_FIELD_KINDS[kind][0] for kind in kinds)
            problems.append(f"{name} must be {expected}, got {fields[name]!r}")
    for name in ("image_threshold", "pixel_threshold"):
        value = fields.get(name)
        if value is not None and not any(name in problem for problem in problems) and not 0.0 <= value <= 1.0:
            problems.append(f"{name} must lie in [0, 1], got {value!r}")
    vae_samples = fields.get("vae_samples")
    if _is_int(vae_samples) and vae_samples > MAX_VAE_SAMPLES:
        problems.append(f"vae_samples must be at most {MAX_VAE_SAMPLES}, got {vae_samples!r}")
    if not problems:
        problems = _token_id_problems(fields)
    return problems


class CoPSConfig(PretrainedConfig):
    r"""Configuration of `CoPSForAnomalyDetection`.

    Args:
        text_config (`dict` or `CLIPTextConfig`, *optional*): CLIP text tower. Defaults to ViT-L/14's.
        vision_config (`dict` or `CLIPVisionConfig`, *optional*): CLIP vision tower. Defaults to ViT-L/14@336's.
        projection_dim (`int`): CLIP joint embedding size D. Must equal the text width, since prototypes (from
            projected patch tokens) are added to prompt tokens.
        logit_scale_init_value (`float`): CLIP's logit scale (kept for weight compatibility, unused by CoPS).
        prompt_length (`int`): learnable context tokens per prompt, without class tokens (reference `n_ctx`).
        prototype_length (`int`): number P of state prototypes; also the last P context tokens that receive them
            (reference `prt_length`).
        class_token_length (`int`): class tokens per prompt, shifted by the VAE class token.
        deep_prompt_length (`int`): tokens replaced at the input of deep text layers (reference `t_n_ctx`).
        deep_prompt_depth (`int`): number of text layers (1..depth) that receive deep prompts.
        dpam_layers (`int`): number of last vision layers with dual-path (value-value) attention.
        feature_layers (`list[int]`): 1-based vision layers whose patch tokens are used.
        image_size (`int`): square input size in pixels; a multiple of the patch size.
        temperature (`float`): softmax temperature of image/patch-text similarities.
        vae_samples (`int`): class-token samples S drawn from the VAE prior at inference.
        train_kernel_size, test_kernel_size (`int`): neighbour-averaging kernel in training / inference.
        distance_alpha (`float`): weight of the normal-prototype distance in the patch weighting.
        image_score_beta (`float`): weight of the global score against the max patch score.
        gaussian_sigma (`float`): sigma of the Gaussian smoothing of anomaly maps (scipy conventions).
        use_recon_loss (`bool`): add the VAE reconstruction term to the training loss.
        prototype_attention_heads (`int`): heads of the prototype extractor's cross-attention (D % heads == 0).
        prompt_suffix_token_ids (`list[int]`): token ids that follow the context in the prompt template
            "X ... X." (`PROMPT_SUFFIX_TOKEN_IDS`: the "." of CLIP's BPE vocabulary, 269); start/end ids come from
            `text_config`.
        image_threshold, pixel_threshold (`float`, *optional*): calibrated decision thresholds on image scores and
            anomaly maps, used by the pipeline to emit labels and masks.
        test_preset (`str`, *optional*): the `TEST_DATASET_PRESETS` entry the test-time fields were last set from
            (recorded by `with_preset`); the official VisA-trained model is meant for "general", the MVTec-trained
            one for "visa".
        clip_model_id (`str`, *optional*): Hub id of the CLIP weights the model is built on (set by `from_clip`);
            `None` for random or unpublished CLIPs. It is the model card's `base_model`.
        train_preset (`str`, *optional*): the `TRAIN_DATASET_PRESETS` entry the training fields were set from.
        train_dataset, train_split (`str`, *optional*): what the model was trained on, recorded by the trainer: the
            benchmark name meta.json records (else the dataset folder) and the meta.json split.
        train_real_images, train_synthetic_images (`int`, *optional*): images per epoch of that training, recorded by
            the trainer: real ones from the split, and synthetic anomalous copies of its normal images (normal-only
            adaptation, `TrainingConfig.synthesize`; 0 otherwise).
        source_checkpoint (`str`, *optional*): the published checkpoint the CoPS weights were converted from, as
            "repository/path@git blob sha1".
        reference_weight (`float`): weight w of the few-shot reference map when references are set:
            `anomaly_map = (1 - w) * zero_shot_map + w * reference_map` and
            `score = (1 - w) * zero_shot_score + w * max(reference_map)` (WinCLIP+'s average at w = 0.5). The
            default 1.0 (the reference map alone) won the ablation on synthetic data with random towers
            (`benchmarks/reference_weight.py`, table in benchmarks/README.md), whose zero-shot maps carry little
            signal; with real CLIP weights a lower weight mixes in the zero-shot map. Unused without references.
        reference_memory_limit (`int`): most memory rows (patch features) kept per feature layer; a larger memory
            is subsampled to it by a greedy k-center coreset (PatchCore's), which bounds the search cost.
        reference_memory_size (`int`): rows per feature layer of the stored memory (the `reference_memory` buffer
            is `[len(feature_layers), reference_memory_size, projection_dim]`); set by `set_references`, 0 without
            references.
        reference_count (`int`): number of normal reference images the memory was built from (0: zero-shot).
        reference_sources (`list[str]`, *optional*): names of the reference images (file names, never absolute
            local paths), for the model card.
    """

    model_type = "cops"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "text_config": SubConfigSpec(CLIPTextConfig, init_kwargs=VIT_L14_336_TEXT),
        "vision_config": SubConfigSpec(CLIPVisionConfig, init_kwargs=VIT_L14_336_VISION),
    }

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    projection_dim: int = 768
    logit_scale_init_value: float = 2.6592
    prompt_length: int = 12
    prototype_length: int = 6
    class_token_length: int = 2
    deep_prompt_length: int = 4
    deep_prompt_depth: int = 8
    dpam_layers: int = 24
    feature_layers: list[int] | None = None
    image_size: int = 518
    temperature: float = 0.07
    vae_samples: int = 10
    train_kernel_size: int = 5
    test_kernel_size: int = 5
    distance_alpha: float = 0.26
    image_score_beta: float = 0.9
    gaussian_sigma: float = 4.0
    use_recon_loss: bool = True
    prototype_attention_heads: int = 12
    prompt_suffix_token_ids: list[int] | None = None
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    test_preset: str | None = None
    source_checkpoint: str | None = None
    clip_model_id: str | None = None
    initializer_range: float = 0.02
    train_preset: str | None = None
    train_dataset: str | None = None
    train_split: str | None = None
    train_real_images: int | None = None
    train_synthetic_images: int | None = None
    reference_weight: float = 1.0
    reference_memory_limit: int = 16384
    reference_memory_size: int = 0
    reference_count: int = 0
    reference_sources: list[str] | None = None

    served_pipeline_tasks: ClassVar[set[str]] = set()
    """Pipeline tasks this process serves with registered classes (filled by `cops_hf.register_with_transformers`).

    A folder saved with remote code names its pipeline in `custom_pipelines`, for users without cops_hf; for these
    tasks the entry is dropped on loading, or transformers would demand `trust_remote_code=True` to run the copy
    of a pipeline that is already installed.
    """

    def __post_init__(self, **kwargs: Any) -> None:
        if self.feature_layers is None:
            self.feature_layers = [24]
        if self.prompt_suffix_token_ids is None:
            self.prompt_suffix_token_ids = list(PROMPT_SUFFIX_TOKEN_IDS)
        super().__post_init__(**kwargs)
        self._forget_pipelines_served_here()
        self.validate()

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """`PretrainedConfig.get_config_dict`, refusing the configuration of another kind of model with a clear error.

        `CoPSConfig.from_pretrained` and `CoPSForAnomalyDetection.from_pretrained` read the configuration here.
        """
        try:
            config_dict, unused_kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        except RecursionError as error:
            raise ValueError(
                f"The config.json of '{pretrained_model_name_or_path}' is nested too deeply to be read: it is not a "
                "model configuration. Fix the file or save the model again."
            ) from error
        if not isinstance(config_dict, dict):
            raise ValueError(
                f"The config.json of '{pretrained_model_name_or_path}' holds a {type(config_dict).__name__}, not an "
                "object of configuration fields. Fix the file or save the model again."
            )
        check_model_type(config_dict.get("model_type"), str(pretrained_model_name_or_path))
        if problems := config_field_problems(config_dict):
            raise ValueError(
                f"The config.json of '{pretrained_model_name_or_path}' is invalid: {'; '.join(problems)}. Fix the "
                "file or save the model again."
            )
        return config_dict, unused_kwargs

    def _forget_pipelines_served_here(self) -> None:
        """Drop the `custom_pipelines` entries of the tasks in `served_pipeline_tasks`."""
        custom_pipelines = getattr(self, "custom_pipelines", None)
        if not custom_pipelines:
            return
        remaining = {task: info for task, info in custom_pipelines.items() if task not in self.served_pipeline_tasks}
        if remaining:
            self.custom_pipelines = remaining
        else:
            del self.custom_pipelines

    @property
    def patch_grid_size(self) -> int:
        """Side s of the patch grid at `image_size` (37 for 518 px and patch 14)."""
        return self.image_size // self.vision_config.patch_size

    @property
    def num_prompt_tokens(self) -> int:
        """Context tokens per prompt, class tokens included (14 by default)."""
        return self.prompt_length + self.class_token_length

    def validate(self) -> None:
        """Check that the fields fit together; raise `ValueError` saying what to change."""
        if problems := config_field_problems(self.__dict__):
            raise ValueError("Invalid CoPSConfig: " + "; ".join(problems) + ".")
        vision, text = self.vision_config, self.text_config
        num_vision_layers = vision.num_hidden_layers
        problems = []
        if not 0 <= self.dpam_layers <= num_vision_layers:
            problems.append(
                f"dpam_layers={self.dpam_layers} must be between 0 and the vision tower's {num_vision_layers} layers"
            )
        if not self.feature_layers or any(not 1 <= layer <= num_vision_layers for layer in self.feature_layers):
            problems.append(
                f"feature_layers={self.feature_layers} must be a non-empty list of 1-based vision layers "
                f"in 1..{num_vision_layers}"
            )
        if not 1 <= self.prototype_length <= self.prompt_length:
            problems.append(
                f"prototype_length={self.prototype_length} must be between 1 and prompt_length={self.prompt_length}"
            )
        if self.class_token_length < 0 or self.deep_prompt_length < 0 or self.deep_prompt_depth < 0:
            problems.append("class_token_length, deep_prompt_length and deep_prompt_depth must be >= 0")
        if self.deep_prompt_depth >= text.num_hidden_layers and self.deep_prompt_depth > 0:
            problems.append(
                f"deep_prompt_depth={self.deep_prompt_depth} must be below the text tower's "
                f"{text.num_hidden_layers} layers (deep prompts enter layers 1..depth)"
            )
        if self.deep_prompt_length > self.num_prompt_tokens:
            problems.append(
                f"deep_prompt_length={self.deep_prompt_length} must not exceed the prompt's "
                f"{self.num_prompt_tokens} context tokens"
            )
        if self.image_size <= 0 or self.image_size % vision.patch_size != 0:
            problems.append(
                f"image_size={self.image_size} must be a positive multiple of the patch size {vision.patch_size} "
                f"(e.g. {max(1, round(self.image_size / vision.patch_size)) * vision.patch_size})"
            )
        if self.projection_dim != text.hidden_size:
            problems.append(
                f"projection_dim={self.projection_dim} must equal the text width {text.hidden_size}: prototypes "
                "live in the joint space and are added to prompt tokens"
            )
        if self.projection_dim % self.prototype_attention_heads != 0:
            problems.append(
                f"prototype_attention_heads={self.prototype_attention_heads} must divide projection_dim="
                f"{self.projection_dim} (ViT-B/16's 512 needs e.g. 8)"
            )
        for name in ("train_kernel_size", "test_kernel_size"):
            kernel = getattr(self, name)
            if kernel < 1 or kernel % 2 == 0:
                problems.append(f"{name}={kernel} must be a positive odd integer")
        if not 0.0 <= self.distance_alpha <= 1.0 or not 0.0 <= self.image_score_beta <= 1.0:
            problems.append("distance_alpha and image_score_beta must lie in [0, 1]")
        if not 0.0 <= self.reference_weight <= 1.0:
            problems.append(f"reference_weight={self.reference_weight} must lie in [0, 1]")
        if self.reference_memory_limit < 1 or self.reference_memory_size < 0 or self.reference_count < 0:
            problems.append("reference_memory_limit must be >= 1, reference_memory_size and reference_count >= 0")
        if (self.reference_count == 0) != (self.reference_memory_size == 0):
            problems.append(
                f"reference_count={self.reference_count} and reference_memory_size={self.reference_memory_size} "
                "must be both 0 (no references) or both positive; set references with model.set_references"
            )
        if self.reference_sources is not None and len(self.reference_sources) != self.reference_count:
            problems.append(
                f"reference_sources names {len(self.reference_sources)} images but reference_count is "
                f"{self.reference_count}"
            )
        if self.temperature <= 0 or self.gaussian_sigma < 0 or self.vae_samples < 1:
            problems.append("temperature must be > 0, gaussian_sigma >= 0 and vae_samples >= 1")
        sequence_length = 2 + self.num_prompt_tokens + len(self.prompt_suffix_token_ids)
        if sequence_length > text.max_position_embeddings:
            problems.append(
                f"the prompt needs {sequence_length} tokens but the text tower holds {text.max_position_embeddings}"
            )
        if problems:
            raise ValueError("Invalid CoPSConfig: " + "; ".join(problems) + ".")

    @classmethod
    def from_clip_config(
        cls,
        clip_config: CLIPConfig,
        *,
        train_preset: str | None = None,
        test_preset: str | None = None,
        **fields: Any,
    ) -> CoPSConfig:
        """The configuration of a CoPS around a CLIP: its towers, joint width and logit scale, plus CoPS fields.

        Fields left out (or `None`) that depend on the CLIP's depth are derived from it: `dpam_layers` (every
        vision layer), `feature_layers` (the last vision layer) and `deep_prompt_depth` (8, the reference's, capped
        below the text tower's depth). Explicit `fields` win over the presets' values.

        Args:
            clip_config: the `CLIPConfig` of the frozen CLIP.
            train_preset: auxiliary training dataset name (see `TRAIN_DATASET_PRESETS`).
            test_preset: test dataset name (see `TEST_DATASET_PRESETS`).
            **fields: other `CoPSConfig` fields (e.g. `image_size=518`).
        """
        num_vision_layers = clip_config.vision_config.num_hidden_layers
        derived = {
            "dpam_layers": num_vision_layers,
            "feature_layers": [num_vision_layers],
            "deep_prompt_depth": min(8, clip_config.text_config.num_hidden_layers - 1),
        }
        for name, value in derived.items():
            if fields.get(name) is None:
                fields[name] = value
        clip_fields = {
            "text_config": clip_config.text_config.to_dict(),
            "vision_config": clip_config.vision_config.to_dict(),
            "projection_dim": clip_config.projection_dim,
            "logit_scale_init_value": clip_config.logit_scale_init_value,
        }
        presets = {**preset_fields("test", test_preset), **preset_fields("train", train_preset)}
        return cls(**{**clip_fields, **presets, **fields})

    def with_preset(self, test_dataset: str | None = None, train_dataset: str | None = None) -> CoPSConfig:
        """Return a copy with the reference's dataset switches applied.

        Args:
            test_dataset: name of the dataset being tested (see `TEST_DATASET_PRESETS`): sets the test kernel,
                `distance_alpha` and `image_score_beta`.
            train_dataset: name of the auxiliary training dataset (see `TRAIN_DATASET_PRESETS`): sets the
                training kernel and `use_recon_loss`.
        """
        updated = copy.deepcopy(self)
        for field, value in {**preset_fields("test", test_dataset), **preset_fields("train", train_dataset)}.items():
            setattr(updated, field, value)
        updated.validate()
        return updated


def preset_fields(kind: str, name: str | None) -> dict[str, Any]:
    """The `CoPSConfig` fields of a dataset preset (empty for `None`), with its name in `test_preset`/`train_preset`.

    Args:
        kind: "test" (`TEST_DATASET_PRESETS`) or "train" (`TRAIN_DATASET_PRESETS`).
        name: the canonical dataset name (see `cops_hf.schema.dataset_key`: "VisA", "dtd-synthetic" work too);
            aliases such as "mvtec_ad" are resolved by `cops_hf.data.registry.resolve_test_preset`.
    """
    if name is None:
        return {}
    table = TEST_DATASET_PRESETS if kind == "test" else TRAIN_DATASET_PRESETS
    key = dataset_key(name)
    if key not in table:
        label = "test" if kind == "test" else "training"
        raise ValueError(f"Unknown {label} dataset preset {name!r}; choose one of {sorted(table)}.")
    return {**table[key], f"{kind}_preset": key}


def check_model_type(model_type: str | None, source: str) -> None:
    """Raise `ValueError` if a checkpoint's `model_type` shows it is not a CoPS model.

    Args:
        model_type: the `model_type` of the checkpoint's configuration (`None` when it records none).
        source: the folder or Hub repository it came from, for the message.
    """
    if model_type is not None and model_type != CoPSConfig.model_type:
        raise ValueError(
            f"{source} holds a {model_type!r} model, not a CoPS anomaly detector (model_type "
            f"{CoPSConfig.model_type!r}). Load a CoPS checkpoint: one written by CoPSForAnomalyDetection."
            "save_pretrained, `cops-hf convert` or `cops-hf push`."
        )


__all__ = [
    "MAX_VAE_SAMPLES",
    "PROMPT_SUFFIX_TOKEN_IDS",
    "CoPSConfig",
    "TEST_DATASET_PRESETS",
    "TRAIN_DATASET_PRESETS",
    "check_model_type",
    "config_field_problems",
    "preset_fields",
]

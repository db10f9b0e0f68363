"""The "anomaly-detection" pipeline: images in, score / label / anomaly map / mask out."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_cops import check_model_type
from .modeling_cops import CoPSAnomalyDetectionOutput
from .processing_cops import CoPSProcessor, ImageLike, ImageLoadError, check_threshold, load_image

logger = logging.getLogger(__name__)

TASK = "anomaly-detection"


class AnomalyDetectionPipeline(Pipeline):
    """Zero-shot anomaly detection with a CoPS model.

    Call with a path, PIL image, numpy array or a list of them. Per image it returns a dict with
    `score` (float in [0, 1]), `anomaly_map` (float32 array at the original image size), and, when thresholds
    are known (arguments, or `image_threshold` / `pixel_threshold` calibrated into the model config), `label`
    ("anomalous" / "normal") and `mask` (bool array).

    Args (at call time):
        threshold: pixel threshold on the anomaly map (default: `config.pixel_threshold`).
        image_threshold: threshold on the score (default: `config.image_threshold`).
        seed: seed of each image's VAE class-token noise (default 0), so that a result does not depend on the
            batch an image falls in; `None` draws fresh noise from torch's generator.
        skip_invalid: with `True`, unreadable images give `{"image": ..., "error": ...}` entries (and a warning)
            instead of raising; without it the first unreadable image raises an error naming it.
    """

    _load_processor = None  # optional: defaults to CoPSProcessor at config.image_size
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_model_type(self.model.config.model_type, self.model.name_or_path or type(self.model).__name__)
        if self.processor is None:
            self.processor = CoPSProcessor.for_image_size(self.model.config.image_size)
        self.image_processor = self.processor.image_processor  # lets the base class batch pixel_values

    def _sanitize_parameters(
        self,
        threshold: float | None = None,
        image_threshold: float | None = None,
        seed: int | None | str = "default",
        skip_invalid: bool | None = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        forward_params = {} if seed == "default" else {"seed": seed}
        postprocess_params = {}
        if threshold is not None:
            postprocess_params["threshold"] = check_threshold(threshold, "threshold")
        if image_threshold is not None:
            postprocess_params["image_threshold"] = check_threshold(image_threshold, "image_threshold")
        return {}, forward_params, postprocess_params

    def __call__(
        self, images: ImageLike | Sequence[ImageLike], skip_invalid: bool = False, **kwargs: Any
    ) -> dict | list[dict]:
        """Detect anomalies in one image or a list of images (see the class docstring for the outputs)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not items:
            raise ValueError("No images were given: pass a path, a PIL image, an array, or a non-empty list of them.")
        if not skip_invalid:
            results = super().__call__(items, **kwargs)
            return results[0] if single else results
        loaded, errors = [], {}
        for index, item in enumerate(items):
            try:
                loaded.append(load_image(item, index))
            except ImageLoadError as error:
                errors[index] = str(error)
        if errors:
            logger.warning("Skipped %d unreadable image(s): %s", len(errors), "; ".join(errors.values()))
        good_results = iter(super().__call__(loaded, **kwargs) if loaded else [])
        results = [
            {"image": str(item), "error": errors[index]} if index in errors else next(good_results)
            for index, item in enumerate(items)
        ]
        return results[0] if single else results

    def preprocess(self, image: ImageLike) -> dict[str, torch.Tensor]:
        features = self.processor(images=image)
        return {
            "pixel_values": features["pixel_values"].to(self.dtype or torch.float32),
            "original_size": torch.tensor([features["original_sizes"][0]]),
        }

    def _forward(self, model_inputs: dict[str, torch.Tensor], seed: int | None = 0) -> dict[str, torch.Tensor]:
        pixel_values = model_inputs["pixel_values"]
        noise = None
        if seed is not None:
            noise = self.model.seeded_prior_noise(pixel_values.shape[0], seed).to(
                pixel_values.device, pixel_values.dtype
            )
        outputs = self.model(pixel_values=pixel_values, vae_noise=noise)
        return {
            "image_scores": outputs.image_scores,
            "anomaly_maps": outputs.anomaly_maps,
            "original_size": model_inputs["original_size"],
        }

    def postprocess(
        self,
        model_outputs: dict[str, torch.Tensor],
        threshold: float | None = None,
        image_threshold: float | None = None,
    ) -> dict[str, Any]:
        config = self.model.config
        threshold = threshold if threshold is not None else config.pixel_threshold
        image_threshold = image_threshold if image_threshold is not None else config.image_threshold
        (result,) = self.processor.post_process_anomaly_detection(
            CoPSAnomalyDetectionOutput(
                image_scores=model_outputs["image_scores"].reshape(-1),
                anomaly_maps=model_outputs["anomaly_maps"].reshape(-1, *model_outputs["anomaly_maps"].shape[-2:]),
            ),
            target_sizes=[tuple(model_outputs["original_size"].reshape(-1).tolist())],
            threshold=threshold,
            image_threshold=image_threshold,
        )
        result["anomaly_map"] = result["anomaly_map"].numpy().astype(np.float32)
        if "mask" in result:
            result["mask"] = result["mask"].numpy()
        return result


NO_DEFAULT_MODEL_MESSAGE = (
    f'pipeline("{TASK}") needs a CoPS model: run `cops-hf convert --official visa --output cops-visa` and pass '
    f'model="cops-visa", or pass model=CoPSForAnomalyDetection.from_official("visa").'
)


class _NoDefaultModel(Mapping):
    """The task's "default" entry in the pipeline registry: asking it for the default model says how to get one.

    transformers looks up `default["model"]` when `pipeline()` is called without a model; with no entry at all
    that lookup is a bare `KeyError: 'default'`.
    """

    def __contains__(self, key: object) -> bool:
        return key == "model"

    def __getitem__(self, key: str) -> Any:
        raise ValueError(NO_DEFAULT_MODEL_MESSAGE)

    def __iter__(self) -> Iterator[str]:
        return iter(("model",))

    def __len__(self) -> int:
        return 1


def remote_code_pipelines() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry a saved configuration gets, so that `pipeline(TASK, model=...,
    trust_remote_code=True)` finds this pipeline in the code files saved beside the model."""
    module = AnomalyDetectionPipeline.__module__.rsplit(".", 1)[-1]
    return {TASK: {"impl": f"{module}.{AnomalyDetectionPipeline.__name__}", "pt": ["AutoModel"], "type": "image"}}


def register_pipeline() -> None:
    """Register the "anomaly-detection" task with transformers' pipeline registry."""
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=AnomalyDetectionPipeline, pt_model=AutoModel, default=_NoDefaultModel(), type="image"
    )


__all__ = ["AnomalyDetectionPipeline", "register_pipeline", "remote_code_pipelines"]

"""The "anomaly-detection" pipeline: images in, score / label / anomaly map / mask out."""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_cops import check_model_type
from .image_utils import ImageLike, ImageLoadError, load_image
from .modeling_cops import CoPSAnomalyDetectionOutput
from .processing_cops import CoPSProcessor, check_threshold
from .schema import ANOMALY_MAP, ERROR, IMAGE_PATH, PRED_LABEL, PRED_MASK, PRED_SCORE, Prediction

logger = logging.getLogger(__name__)

TASK = "anomaly-detection"


RESULT_KEYS = {
    PRED_SCORE: "float in [0, 1]: the image's anomaly score",
    ANOMALY_MAP: "float32 array [height, width] at the image's original size, values in [0, 1]",
    PRED_LABEL: '"anomalous" if pred_score >= image threshold else "normal"; only when an image threshold is known',
    PRED_MASK: "bool array [height, width], anomaly_map >= pixel threshold; only when a pixel threshold is known",
}
"""The keys of one image's result (`cops_hf.schema`'s names), the one place they are documented. The former keys
`score`, `label` and `mask` still read for one release, with a `DeprecationWarning` (`schema.Prediction`). With
`skip_invalid=True` an unreadable input gives `{"image_path": str(input), "error": message}` instead."""


class AnomalyDetectionPipeline(Pipeline):
    """Zero-shot anomaly detection with a CoPS model.

    Call with one image (a path, an http(s) URL, a PIL image, a numpy array or a tensor) to get one result, with a
    list of them to get a list, or with a generator or a torch `Dataset` (e.g. `KeyDataset(dataset, "image")`) to
    get an iterator that yields results as they are computed. Each result is a dict with the keys of
    `RESULT_KEYS`: `score`, `anomaly_map` and, when thresholds are known (arguments, or `image_threshold` /
    `pixel_threshold` calibrated into the model config), `label` and `mask`.

    Args (at call time):
        threshold: pixel threshold on the anomaly map (default: `config.pixel_threshold`).
        image_threshold: threshold on the score (default: `config.image_threshold`).
        seed: seed of each image's VAE class-token noise (default 0), so that a result does not depend on the
            batch an image falls in; `None` draws fresh noise from torch's generator.
        skip_invalid: with `True`, unreadable images give `{"image_path": ..., "error": ...}` entries (and a warning)
            instead of raising; without it the first unreadable image raises an error naming it.
        timeout: seconds an image URL may take to answer.
        batch_size, num_workers: as for every transformers pipeline.

    Other keyword arguments raise `TypeError`.

    Few-shot: `pipeline("anomaly-detection", model=..., references=[...])` or `detector.set_references(images)`
    builds the model's memory of normal references (see `set_references`); the maps and scores are then fused with
    the reference map, until `detector.model.clear_references()`.
    """

    _load_processor = None  # optional: defaults to CoPSProcessor at config.image_size
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, *args: Any, references: Iterable[ImageLike] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_model_type(self.model.config.model_type, self.model.name_or_path or type(self.model).__name__)
        if self.processor is None:
            self.processor = CoPSProcessor.for_image_size(self.model.config.image_size)
        self.image_processor = self.processor.image_processor  # lets the base class batch pixel_values
        if references is not None:
            self.set_references(references)

    def set_references(self, images: Iterable[ImageLike], timeout: float | None = None, batch_size: int = 8) -> int:
        """Build the model's few-shot memory from normal reference images (replacing an earlier one).

        Args:
            images: normal images of the part being inspected: paths, URLs, PIL images, arrays or tensors, of any
                size or mode (each is processed like an image to score); e.g. `dataset["image"]` of a `datasets`
                dataset.
            timeout: seconds an image URL may take to answer.
            batch_size: references read, processed and run through the vision tower this many at a time.

        Returns:
            The number of references in the memory.

        Raises:
            ValueError: no image was given, or one cannot be read (`ImageLoadError` names it).
        """
        items = list(images)
        if not items:
            raise ValueError("No reference images were given: pass a non-empty list of normal images.")
        parameter = next(self.model.parameters())

        def batches() -> Iterator[torch.Tensor]:
            for start in range(0, len(items), batch_size):
                try:
                    loaded = [
                        load_image(item, start + offset, timeout)
                        for offset, item in enumerate(items[start : start + batch_size])
                    ]
                except ImageLoadError as error:
                    raise ImageLoadError(f"Reference images: {error}") from error
                yield self.processor(images=loaded)["pixel_values"].to(parameter.device, parameter.dtype)

        self.model.set_references(
            batches(), sources=[reference_label(item, index) for index, item in enumerate(items)]
        )
        return self.model.num_references

    def _sanitize_parameters(
        self,
        threshold: float | None = None,
        image_threshold: float | None = None,
        seed: int | None | str = "default",
        timeout: float | None = None,
        **unknown: Any,
    ) -> tuple[dict, dict, dict]:
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {', '.join(map(repr, sorted(unknown)))}; "
                "it takes threshold, image_threshold, seed, skip_invalid, timeout, batch_size and num_workers."
            )
        preprocess_params = {} if timeout is None else {"timeout": timeout}
        forward_params = {} if seed == "default" else {"seed": seed}
        postprocess_params = {}
        if threshold is not None:
            postprocess_params["threshold"] = check_threshold(threshold, "threshold")
        if image_threshold is not None:
            postprocess_params["image_threshold"] = check_threshold(image_threshold, "image_threshold")
        return preprocess_params, forward_params, postprocess_params

    def __call__(
        self, images: ImageLike | Iterable[ImageLike], skip_invalid: bool = False, **kwargs: Any
    ) -> dict | list[dict] | Iterator[dict]:
        """Detect anomalies in one image, a list, or a stream of images (see the class docstring)."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError(
                    "No images were given: pass a path, a PIL image, an array, or a non-empty list of them."
                )
            return self._call_list(list(images), skip_invalid, kwargs)
        if isinstance(images, (Iterator, TorchDataset)):
            if skip_invalid:
                return self._stream_skipping_invalid(images, kwargs)
            if not isinstance(images, (types.GeneratorType, TorchDataset)):
                images = (item for item in images)  # transformers streams generators
            return super().__call__(images, **kwargs)
        return self._call_list([images], skip_invalid, kwargs)[0]

    def _call_list(self, items: list[ImageLike], skip_invalid: bool, kwargs: dict[str, Any]) -> list[dict]:
        if not skip_invalid:
            return super().__call__(items, **kwargs)
        loaded, errors = [], {}
        for index, item in enumerate(items):
            try:
                loaded.append(load_image(item, index, kwargs.get("timeout")))
            except ImageLoadError as error:
                errors[index] = str(error)
        if errors:
            logger.warning("Skipped %d unreadable image(s): %s", len(errors), "; ".join(errors.values()))
        good_results = iter(super().__call__(loaded, **kwargs) if loaded else [])
        return [
            Prediction({IMAGE_PATH: str(item), ERROR: errors[index]}) if index in errors else next(good_results)
            for index, item in enumerate(items)
        ]

    def _stream_skipping_invalid(self, images: Iterable[ImageLike], kwargs: dict[str, Any]) -> Iterator[dict]:
        """Results of a stream with `skip_invalid`: a few batches at a time, so memory stays flat."""
        chunk_size = 8 * max(1, kwargs.get("batch_size") or self._batch_size or 1)
        chunk: list[ImageLike] = []
        for item in images:
            chunk.append(item)
            if len(chunk) == chunk_size:
                yield from self._call_list(chunk, True, kwargs)
                chunk = []
        if chunk:
            yield from self._call_list(chunk, True, kwargs)

    def preprocess(self, image: ImageLike, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """Read one image (`load_image`) and turn it into the model's inputs, with its original size."""
        features = self.processor(images=load_image(image, timeout=timeout))
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
        """One image's result (`RESULT_KEYS`), at the thresholds given or else those the config records."""
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
        result[ANOMALY_MAP] = result[ANOMALY_MAP].numpy().astype(np.float32)
        if PRED_MASK in result:
            result[PRED_MASK] = result[PRED_MASK].numpy()
        return result


def reference_label(image: ImageLike, index: int) -> str:
    """The name a reference is recorded under in the model config.

    Its path or URL, else the PIL file name, else "reference <index>" (the model keeps only the file name of an
    absolute path).
    """
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    filename = getattr(image, "filename", "")
    return os.path.basename(filename) if filename else f"reference {index}"


NO_DEFAULT_MODEL_MESSAGE = (
    f'pipeline("{TASK}") needs a CoPS model: run `cops-hf convert --official visa --output cops-visa` and pass '
    f'model="cops-visa", or pass model=cops_hf.official.load_official("visa")[0].'
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


def register_pipeline() -> None:
    """Register the "anomaly-detection" task with transformers' pipeline registry."""
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=AnomalyDetectionPipeline, pt_model=AutoModel, default=_NoDefaultModel(), type="image"
    )


__all__ = ["RESULT_KEYS", "TASK", "AnomalyDetectionPipeline", "register_pipeline"]

"""The "anomaly-detection" pipeline: images in, score / label / anomaly map / mask out."""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_cops import check_model_type
from .image_utils import ImageLike, ImageLoadError, load_image, load_image_bytes
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


ANOMALY_MAP_FORMATS = ("png", "array")
"""How a served prediction may carry its anomaly map (request parameter `anomaly_map`): "png" is a base64 16-bit
grayscale PNG at the image's size (value / 65535 is the map), "array" a float list of lists no larger than
`ARRAY_MAP_SIDE` on its longer side."""

ARRAY_MAP_SIDE = 64
"""The longer side of an anomaly map sent as an array (resized bilinearly from the image's size)."""

MAX_REQUEST_IMAGE_BYTES = 20 * 2**20
"""The default limit on one encoded image of a request (20 MiB), checked before it is decoded."""

REQUEST_PARAMETERS = {
    "anomaly_map": f"one of {', '.join(ANOMALY_MAP_FORMATS)}: add the map to each prediction (default: no map)",
    "threshold": "pixel threshold in [0, 1] (default: the calibrated one)",
    "image_threshold": "score threshold in [0, 1] (default: the calibrated one)",
}
"""The parameters a prediction request may carry (JSON `parameters`, or form fields of a multipart upload)."""


class RequestError(ValueError):
    """A prediction request (served `/predict`, Inference Endpoints handler) is malformed; the message says how."""


@dataclass
class PredictionRequest:
    """A parsed prediction request.

    Attributes:
        images: the decoded images, in request order.
        anomaly_map: one of `ANOMALY_MAP_FORMATS`, or `None` for no map.
        pipeline_kwargs: the thresholds to call the pipeline with.
    """

    images: list[Any]
    anomaly_map: str | None = None
    pipeline_kwargs: dict[str, float] = field(default_factory=dict)


def request_parameters(parameters: Mapping[str, Any] | None) -> tuple[str | None, dict[str, float]]:
    """Check a request's `parameters` (see `REQUEST_PARAMETERS`); return the map format and the pipeline kwargs.

    Raises:
        RequestError: an unknown parameter, an unknown map format or a threshold outside [0, 1].
    """
    parameters = dict(parameters or {})
    unknown = sorted(set(parameters) - set(REQUEST_PARAMETERS))
    if unknown:
        raise RequestError(f"unknown parameter {unknown[0]!r}; use {', '.join(REQUEST_PARAMETERS)}")
    anomaly_map = parameters.pop("anomaly_map", None)
    if anomaly_map is not None and anomaly_map not in ANOMALY_MAP_FORMATS:
        raise RequestError(f"parameter 'anomaly_map' must be one of {', '.join(ANOMALY_MAP_FORMATS)}")
    pipeline_kwargs = {}
    for name, value in parameters.items():
        try:
            pipeline_kwargs[name] = check_threshold(float(value), f"parameter {name!r}")
        except (TypeError, ValueError) as error:
            raise RequestError(f"parameter {name!r} must be a number in [0, 1], got {value!r}") from error
    return anomaly_map, pipeline_kwargs


def parse_request(
    data: Mapping[str, Any], *, allow_urls: bool = True, max_image_bytes: int | None = MAX_REQUEST_IMAGE_BYTES
) -> PredictionRequest:
    """The images and parameters of a JSON prediction request `{"inputs": ..., "parameters": {...}}`.

    `inputs` is one item or a non-empty list; an item is a base64 string of an encoded image (a `data:` URL works
    too), an http(s) URL (when `allow_urls`), or a PIL image (as Inference Endpoints hands over a binary body).

    Args:
        allow_urls: whether URLs are fetched (a server reachable by others may not want to fetch for them).
        max_image_bytes: refuse encoded images longer than this, before decoding; `None` for no limit.

    Raises:
        RequestError: the request has the wrong shape; `ImageLoadError` (`ImageTooLargeError`): an image is not
            readable, is over `max_image_bytes`, or over the pixel limit.
    """
    if not isinstance(data, Mapping) or "inputs" not in data:
        raise RequestError('the request must be a JSON object with "inputs" (base64 images or URLs)')
    inputs = data["inputs"]
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items:
        raise RequestError('"inputs" is an empty list; give at least one image')
    unknown_fields = sorted(set(data) - {"inputs", "parameters"})
    if unknown_fields:
        raise RequestError(f'unknown field {unknown_fields[0]!r}; a request has "inputs" and "parameters"')
    if data.get("parameters") is not None and not isinstance(data["parameters"], Mapping):
        raise RequestError('"parameters" must be a JSON object')
    anomaly_map, pipeline_kwargs = request_parameters(data.get("parameters"))
    images = [_request_image(item, index, allow_urls, max_image_bytes) for index, item in enumerate(items)]
    return PredictionRequest(images, anomaly_map, pipeline_kwargs)


def _request_image(item: Any, index: int, allow_urls: bool, max_image_bytes: int | None) -> Any:
    import base64
    import binascii

    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if not isinstance(item, str):
        raise RequestError(f"inputs[{index}] must be a base64 string or an image URL, got {type(item).__name__}")
    if item.startswith(("http://", "https://")):
        if not allow_urls:
            raise RequestError(f"inputs[{index}] is a URL, and this server does not fetch URLs; send the image bytes")
        return load_image(item, index, max_bytes=max_image_bytes)
    encoded = item.split(",", 1)[1] if item.startswith("data:") else item
    if max_image_bytes is not None and len(encoded) * 3 // 4 > max_image_bytes + 3:
        raise ImageLoadError(f"inputs[{index}] encodes over {max_image_bytes} bytes, the limit for one image")
    try:
        content = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"inputs[{index}] is neither valid base64 nor an http(s) URL ({error})") from error
    return load_image_bytes(content, f"inputs[{index}]", max_image_bytes)


def prediction_json(result: Mapping[str, Any], anomaly_map: str | None = None) -> dict[str, Any]:
    """One pipeline result as served JSON: `pred_score`, `pred_label` when calibrated, the map if asked for.

    Args:
        result: a result of `AnomalyDetectionPipeline` (see `RESULT_KEYS`).
        anomaly_map: one of `ANOMALY_MAP_FORMATS`, or `None` to leave the map out.
    """
    prediction: dict[str, Any] = {PRED_SCORE: float(result[PRED_SCORE])}
    if PRED_LABEL in result:
        prediction[PRED_LABEL] = result[PRED_LABEL]
    if anomaly_map is not None:
        prediction[ANOMALY_MAP] = _anomaly_map_json(np.asarray(result[ANOMALY_MAP], dtype=np.float32), anomaly_map)
    return prediction


def _anomaly_map_json(values: np.ndarray, map_format: str) -> dict[str, Any]:
    import base64
    import io

    from PIL import Image

    height, width = values.shape
    if map_format == "png":
        buffer = io.BytesIO()
        levels = np.round(np.clip(values, 0.0, 1.0) * 65535.0).astype(np.uint16)
        Image.fromarray(levels).save(buffer, format="PNG")
        return {"format": "png", "size": [height, width], "png": base64.b64encode(buffer.getvalue()).decode("ascii")}
    scale = min(1.0, ARRAY_MAP_SIDE / max(height, width))
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(values).resize(small_size, Image.Resampling.BILINEAR))
    return {"format": "array", "size": [height, width], "values": small.astype(float).tolist()}


def response_json(
    results: list[Mapping[str, Any]], *, anomaly_map: str | None = None, timing: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """The served answer to a prediction request: `{"predictions": [...], "timing": {...}}`.

    The one builder of this JSON: `cops-hf serve` and the Inference Endpoints handler (`handler.py`) both call it.

    Args:
        results: the pipeline's results, one per image, in request order.
        anomaly_map: see `prediction_json`.
        timing: durations in milliseconds (e.g. `total_ms`).
    """
    return {
        "predictions": [prediction_json(result, anomaly_map) for result in results],
        "timing": {name: round(float(value), 3) for name, value in (timing or {}).items()},
    }


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


__all__ = [
    "ANOMALY_MAP_FORMATS",
    "ARRAY_MAP_SIDE",
    "MAX_REQUEST_IMAGE_BYTES",
    "REQUEST_PARAMETERS",
    "RESULT_KEYS",
    "TASK",
    "AnomalyDetectionPipeline",
    "PredictionRequest",
    "RequestError",
    "parse_request",
    "prediction_json",
    "register_pipeline",
    "request_parameters",
    "response_json",
]

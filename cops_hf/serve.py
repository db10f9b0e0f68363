"""The served detector: `cops-hf serve`, a Ray Serve deployment with dynamic batching behind a FastAPI app.

Routes:

* `POST /predict`: a multipart upload (one or more `file` parts, plus optional form fields from
  `REQUEST_PARAMETERS`) or JSON `{"inputs": <base64 | URL | list>, "parameters": {...}}`; answers
  `{"predictions": [{"pred_score", "pred_label", "anomaly_map"}], "timing": {...}}` (built by
  `cops_hf.pipeline_anomaly_detection.response_json`, which the Inference Endpoints handler shares).
* `GET /health` (the process answers), `GET /ready` (the model is loaded), `GET /docs` and `/openapi.json`.

Images of concurrent requests are scored together: `@serve.batch` gathers up to `max_batch_size` images, waiting
at most `batch_wait_timeout_s` for more. Bad requests get a 4xx with a one-line JSON `{"error": ...}`; a body over
`max_body_bytes` is refused before it is read in full, and an image over the pixel limit before it is decoded.

Ray Serve (and not LitServe) because it is the extra Ray Data scoring already needs, its replicas scale over the
same cluster, and `@serve.batch` batches across requests as the detector wants.
"""


import asyncio
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from .image_utils import ImageLoadError, ImageTooLargeError, load_image_bytes
from .pipeline_anomaly_detection import (
    MAX_REQUEST_IMAGE_BYTES,
    REQUEST_PARAMETERS,
    PredictionRequest,
    RequestError,
    parse_request,
    request_parameters,
    response_json,
)

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class ServeLimits:
    """What one request may send.

    Attributes:
        max_body_bytes: the request body, checked from `Content-Length` and while reading (413 beyond).
        max_image_bytes: one encoded image (413 beyond).
        max_images: images in one request.
        max_image_pixels: `PIL.Image.MAX_IMAGE_PIXELS` in the server (decompression bombs; `None`: PIL's default).
        allow_urls: whether JSON inputs may be http(s) URLs the server fetches (off by default: a server others
            can reach should not fetch addresses for them).
    """

    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = MAX_REQUEST_IMAGE_BYTES
    max_images: int = 64
    max_image_pixels: int | None = None
    allow_urls: bool = False


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _HTTPError(413, f"the request body is {declared} bytes, over the limit of {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _HTTPError(413, f"the request body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_multipart(request: Request, body: bytes, limits: ServeLimits) -> PredictionRequest:
    """Images (every file part) and parameters (the other fields) of a multipart upload already read as `body`."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive=replay).form(max_files=limits.max_images, max_fields=16)
    except Exception as error:  # starlette's MultiPartException and parser errors: a malformed upload
        raise RequestError(f"the multipart body cannot be parsed ({error})") from error
    files = [(name, value) for name, value in form.multi_items() if not isinstance(value, str)]
    fields = {name: value for name, value in form.multi_items() if isinstance(value, str)}
    if not files:
        raise RequestError("the upload holds no file; send the images as file parts (e.g. curl -F file=@part.png)")
    anomaly_map, pipeline_kwargs = request_parameters(fields)
    contents = [(upload.filename or name, await upload.read()) for name, upload in files]
    images = await asyncio.to_thread(
        lambda: [load_image_bytes(content, f"Upload '{name}'", limits.max_image_bytes) for name, content in contents]
    )
    return PredictionRequest(images, anomaly_map, pipeline_kwargs)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


# The deployment comes last: `serve.ingress` serializes the class, and the module globals its methods use, when it
# is applied, so everything they call must already be defined.
app = FastAPI(
    title="cops-hf anomaly detector",
    description="CoPS zero-shot anomaly detection. POST images to /predict; parameters: "
    + "; ".join(f"{name}: {meaning}" for name, meaning in REQUEST_PARAMETERS.items()),
)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class DetectorDeployment:
    """One replica: the "anomaly-detection" pipeline of a model folder, scoring batches gathered across requests.

    Args:
        model_name: model folder or Hub id.
        device, dtype: as for `cops-hf predict`.
        limits: what a request may send.
        max_batch_size: most images scored in one forward pass.
        batch_wait_timeout_s: longest wait for more images before a batch is scored.
        references: normal reference images (paths the replica can read) for few-shot scoring; `None` keeps the
            model's own memory (zero-shot unless it was saved with references).
    """

    def __init__(
        self,
        model_name: str,
        device: str | None = None,
        dtype: str | None = None,
        limits: ServeLimits | None = None,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        references: list[str] | None = None,
    ) -> None:
        from PIL import Image

        from .predict import load_detector

        limits = limits or ServeLimits()
        if limits.max_image_pixels is not None:
            Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
        self.model_name, self.limits = model_name, limits
        self.detector = load_detector(model_name, device=device, dtype=dtype)
        if references:
            self.detector.set_references(references)
        self._score.set_max_batch_size(max_batch_size)
        self._score.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @app.get("/health")
    def health(self) -> dict[str, str]:
        """The server answers."""
        return {"status": "ok"}

    @app.get("/ready")
    def ready(self) -> dict[str, Any]:
        """The model is loaded and scoring."""
        config = self.detector.model.config
        return {"ready": True, "model": self.model_name, "image_size": config.image_size,
                "num_references": self.detector.model.num_references, "image_threshold": config.image_threshold,
                "pixel_threshold": config.pixel_threshold}  # fmt: skip

    @app.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        """Score the images of a multipart upload or a JSON request (see the module docstring)."""
        started = time.perf_counter()
        try:
            parsed = await self._parse(request)
        except _HTTPError as error:
            return _error(error.status, str(error))
        except ImageTooLargeError as error:
            return _error(413, str(error))
        except (RequestError, ImageLoadError) as error:
            return _error(400, str(error))
        decoded = time.perf_counter()
        options = tuple(sorted(parsed.pipeline_kwargs.items()))
        try:
            results = await asyncio.gather(*(self._score((image, options)) for image in parsed.images))
        except ValueError as error:  # e.g. a non-finite score: the message names the problem
            return _error(422, str(error))
        finished = time.perf_counter()
        timing = {"decode_ms": 1000 * (decoded - started), "inference_ms": 1000 * (finished - decoded),
                  "total_ms": 1000 * (finished - started)}  # fmt: skip
        return JSONResponse(response_json(results, anomaly_map=parsed.anomaly_map, timing=timing))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score(self, items: list[tuple[Any, tuple[tuple[str, float], ...]]]) -> list[dict]:
        """Score images gathered from concurrent requests; images with the same thresholds share a forward pass."""
        return await asyncio.to_thread(self._score_now, items)

    def _score_now(self, items: list[tuple[Any, tuple[tuple[str, float], ...]]]) -> list[dict]:
        results: list[dict | None] = [None] * len(items)
        for options in dict.fromkeys(options for _, options in items):
            positions = [index for index, (_, item_options) in enumerate(items) if item_options == options]
            images = [items[index][0] for index in positions]
            scored = self.detector(images, batch_size=len(images), **dict(options))
            for index, result in zip(positions, scored, strict=True):
                results[index] = result
        return results

    async def _parse(self, request: Request) -> PredictionRequest:
        body = await _read_body(request, self.limits.max_body_bytes)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            parsed = await _parse_multipart(request, body, self.limits)
        elif content_type in ("application/json", ""):
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise RequestError(f"the body is not valid JSON ({error})") from error
            parsed = await asyncio.to_thread(
                parse_request, data, allow_urls=self.limits.allow_urls, max_image_bytes=self.limits.max_image_bytes
            )
        else:
            raise _HTTPError(415, f"unsupported content type {content_type!r}; send multipart/form-data or JSON")
        if len(parsed.images) > self.limits.max_images:
            raise RequestError(f"{len(parsed.images)} images in one request, over the limit of "
                               f"{self.limits.max_images}; split the request")  # fmt: skip
        return parsed


def build_app(
    model_name: str | os.PathLike[str],
    *,
    device: str | None = None,
    dtype: str | None = None,
    limits: ServeLimits | None = None,
    max_batch_size: int = 16,
    batch_wait_timeout_s: float = 0.01,
    num_replicas: int = 1,
    references: list[str] | None = None,
) -> Any:
    """The Ray Serve application of a detector (run it with `serve.run(app)`); see `DetectorDeployment`."""
    from PIL import Image

    limits = limits or ServeLimits(max_image_pixels=Image.MAX_IMAGE_PIXELS)
    return DetectorDeployment.options(num_replicas=num_replicas).bind(
        os.fspath(model_name), device, dtype, limits, max_batch_size, batch_wait_timeout_s, references
    )


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def serve_detector(
    model_name: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    address: str | None = None,
    on_ready: Sequence[Any] = (),
    **options: Any,
) -> None:
    """Serve a detector on `host:port` until interrupted (Ctrl+C, SIGTERM), then shut Serve and Ray down.

    Args:
        host: the address to bind (default 127.0.0.1: this machine only).
        address: the Ray cluster to join (default: a new local Ray instance).
        on_ready: callables run once the application answers (the CLI prints the address).
        options: see `build_app`.
    """
    import ray

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    # Ctrl+C, or a service manager stopping the server: a clean shutdown (set after ray.init, whose own SIGTERM
    # handler would abort the process).
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(model_name, **options), name="cops-hf", route_prefix="/")
        for callback in on_ready:
            callback()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


__all__ = ["DEFAULT_PORT", "DetectorDeployment", "ServeLimits", "app", "build_app", "serve_detector"]

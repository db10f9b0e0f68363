"""Hugging Face Inference Endpoints handler of a CoPS anomaly detector (written by cops-hf next to the model).

Inference Endpoints loads `EndpointHandler(path)` from this file and calls it with each request's JSON:
`{"inputs": <base64 image | image URL | list of them>, "parameters": {"anomaly_map": "png" | "array",
"threshold": ..., "image_threshold": ...}}`. The answer is the JSON `cops-hf serve` gives on `POST /predict`:
`{"predictions": [{"pred_score", "pred_label" (when calibrated), "anomaly_map" (when asked)}], "timing"}`; both are
built by `response_json` of the model's own pipeline module, so they cannot drift apart. Only transformers is
needed: the model's code comes from this folder (`trust_remote_code=True`).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from transformers import pipeline


class EndpointHandler:
    """Loads the detector in `path` once; each call scores the request's images and answers served JSON."""

    def __init__(self, path: str = "") -> None:
        self.detector = pipeline("anomaly-detection", model=path or ".", trust_remote_code=True)
        self.contract = sys.modules[type(self.detector).__module__]  # the pipeline module: request and response

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        """Score the images of one request (`{"inputs": ..., "parameters": ...}`) and answer served JSON."""
        started = time.perf_counter()
        request = self.contract.parse_request(data)
        results = self.detector(request.images, **request.pipeline_kwargs)
        total_ms = 1000.0 * (time.perf_counter() - started)
        return self.contract.response_json(results, anomaly_map=request.anomaly_map, timing={"total_ms": total_ms})

"""The Inference Endpoints handler every saved detector carries: run where cops_hf cannot be imported."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

import cops_hf  # noqa: F401  (registers the pipeline for the in-process reference results)
from cops_hf.hub import ENDPOINT_HANDLER_NAME, save_detector, write_endpoint_handler
from cops_hf.pipeline_anomaly_detection import response_json

from .test_hub_integration import _run_python
from .tiny_models import tiny_model


def _png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_write_endpoint_handler_writes_the_packaged_handler(tmp_path: Path) -> None:
    handler = write_endpoint_handler(tmp_path)
    assert handler == tmp_path / ENDPOINT_HANDLER_NAME
    assert "class EndpointHandler" in handler.read_text()
    assert [path.name for path in tmp_path.iterdir()] == [ENDPOINT_HANDLER_NAME]  # no temporary file left


def test_handler_answers_served_json_without_cops_hf(tmp_path: Path) -> None:
    model = tiny_model(seed=0, image_threshold=0.5)
    folder = tmp_path / "detector"
    assert (save_detector(model, None, folder) / ENDPOINT_HANDLER_NAME).is_file()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(60, 70, 3), (98, 98, 3)]]
    request = {"inputs": [_png_base64(image) for image in images], "parameters": {"anomaly_map": "array"}}
    (tmp_path / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    script = f"""
        import json, sys
        sys.path.insert(0, {str(folder)!r})
        from handler import EndpointHandler
        handler = EndpointHandler({str(folder)!r})
        answer = handler(json.load(open({str(tmp_path / "request.json")!r})))
        print("ANSWER" + json.dumps(answer))
        try:
            handler({{"inputs": "not base64!"}})
        except ValueError as error:
            print("ERROR" + str(error))
    """
    output = _run_python(script, env, tmp_path, with_cops_hf=False)
    answer = json.loads(output.split("ANSWER", 1)[1].splitlines()[0])
    assert "neither valid base64 nor an http(s) URL" in output.split("ERROR", 1)[1]

    detector = pipeline("anomaly-detection", model=model)
    expected = response_json(detector([Image.fromarray(image) for image in images]), anomaly_map="array")
    assert answer["timing"]["total_ms"] > 0
    assert len(answer["predictions"]) == 2
    for served, reference in zip(answer["predictions"], expected["predictions"], strict=True):
        assert served["pred_score"] == pytest.approx(reference["pred_score"], abs=1e-6)
        assert served["pred_label"] == reference["pred_label"]
        assert served["anomaly_map"]["size"] == reference["anomaly_map"]["size"]
        np.testing.assert_allclose(served["anomaly_map"]["values"], reference["anomaly_map"]["values"], atol=1e-6)

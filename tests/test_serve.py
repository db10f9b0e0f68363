"""`cops-hf serve` end to end: the server runs in a subprocess on 127.0.0.1 (one Ray startup for the module), is
asked for predictions, health, readiness and its OpenAPI page, is sent bad and oversized inputs, and is stopped."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

import cops_hf  # noqa: F401  (registers the pipeline for the reference results)
from cops_hf.cli import main

from .tiny_models import tiny_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")

REPOSITORY = Path(__file__).resolve().parents[1]
MAX_BODY_MB = 1
MAX_IMAGE_PIXELS = 1_000_000


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(60, 70, 3), (98, 98, 3), (40, 90, 3)]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("served") / "model"
    tiny_model(seed=0, image_threshold=0.5).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def references(model_dir: Path) -> list[str]:
    """Two normal reference images (few-shot) beside the model."""
    rng = np.random.default_rng(1)
    paths = []
    for index in range(2):
        path = model_dir.parent / "good" / f"good{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def server(model_dir: Path, references: list[str]) -> Iterator[str]:
    """`cops-hf serve --references GOOD_FOLDER` on a free loopback port (default host), with small limits; stopped
    with SIGTERM after."""
    port = _free_port()
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1",
                   "COPS_HF_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS)}  # fmt: skip
    command = [sys.executable, "-m", "cops_hf.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--max-body-mb", str(MAX_BODY_MB), "--max-batch-size", "8", "--references",
               str(Path(references[0]).parent)]  # fmt: skip
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not get ready within 300 s"
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert f"on http://127.0.0.1:{port}" in output


def test_json_and_multipart_predictions_agree_with_the_pipeline(
    server: str, model_dir: Path, references: list[str], images: list[np.ndarray]
) -> None:
    detector = pipeline("anomaly-detection", model=str(model_dir))
    assert detector.set_references(references) == 2  # as the server's --references did
    expected = detector([Image.fromarray(image) for image in images])
    request = {"inputs": [base64.b64encode(_png(image)).decode() for image in images],
               "parameters": {"anomaly_map": "png"}}  # fmt: skip
    answer = httpx.post(f"{server}/predict", json=request, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body["timing"]) == {"decode_ms", "inference_ms", "total_ms"}
    for served, reference in zip(body["predictions"], expected, strict=True):
        assert served["pred_score"] == pytest.approx(reference["pred_score"], abs=1e-6)
        assert served["pred_label"] == reference["pred_label"]
        png = Image.open(io.BytesIO(base64.b64decode(served["anomaly_map"]["png"])))
        assert served["anomaly_map"]["size"] == list(reference["anomaly_map"].shape)
        np.testing.assert_allclose(np.asarray(png) / 65535.0, reference["anomaly_map"], atol=1 / 65535)

    files = [("file", (f"part{index}.png", _png(image), "image/png")) for index, image in enumerate(images)]
    answer = httpx.post(f"{server}/predict", files=files, data={"image_threshold": "0.0"}, timeout=120)
    assert answer.status_code == 200, answer.text
    for served, reference in zip(answer.json()["predictions"], expected, strict=True):
        assert served["pred_score"] == pytest.approx(reference["pred_score"], abs=1e-6)
        assert served["pred_label"] == "anomalous" and "anomaly_map" not in served  # every score >= 0.0


def test_health_ready_and_openapi(server: str) -> None:
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/ready").json()
    assert ready["ready"] is True and ready["image_size"] == 98 and ready["image_threshold"] == 0.5
    assert ready["num_references"] == 2
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/predict", "/health", "/ready"} <= set(schema["paths"])
    assert "swagger" in httpx.get(f"{server}/docs").text.lower()


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"json": {"inputs": "not base64!"}}, 400, "inputs[0] is neither valid base64 nor an http(s) URL"),
        ({"json": {"inputs": []}}, 400, '"inputs" is an empty list'),
        ({"json": {"images": "x"}}, 400, 'a JSON object with "inputs"'),
        ({"json": {"inputs": "http://127.0.0.1:1/a.png"}}, 400, "this server does not fetch URLs"),
        ({"json": {"inputs": "aGVsbG8=", "parameters": {"colour": 1}}}, 400, "unknown parameter 'colour'"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
        ({"files": [("file", ("notes.png", b"plain text", "image/png"))]}, 400,
         "Upload 'notes.png' is not a readable image"),
        ({"data": {"anomaly_map": "png"}, "files": [("other", ("", b"", "text/plain"))]}, 400,
         "the upload holds no file"),
        ({"content": b"x" * (MAX_BODY_MB * 2**20 + 1), "headers": {"content-type": "application/json"}}, 413,
         "over the limit of 1048576 bytes"),
    ],
)
def test_bad_requests_get_one_line_json_errors_and_the_server_keeps_serving(
    server: str, images: list[np.ndarray], kwargs: dict, status: int, message: str
) -> None:
    answer = httpx.post(f"{server}/predict", timeout=60, **kwargs)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert message in error and "\n" not in error
    good = httpx.post(f"{server}/predict", files=[("file", ("a.png", _png(images[0]), "image/png"))], timeout=60)
    assert good.status_code == 200


def test_decompression_bomb_is_refused_before_decoding(server: str) -> None:
    bomb = io.BytesIO()
    Image.new("L", (2000, 1000)).save(bomb, format="PNG")  # 2 Mpx in a few kB, over the server's 1 Mpx limit
    answer = httpx.post(f"{server}/predict", files=[("file", ("bomb.png", bomb.getvalue(), "image/png"))])
    assert answer.status_code == 400
    assert "is 2000x1000 pixels, over the limit of 1000000 pixels" in answer.json()["error"]


def test_serve_refuses_a_port_out_of_range(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "m", "--port", "70000"])
    assert exit_info.value.code == 2
    assert "--port: must be an integer in [1, 65535], got '70000'" in capsys.readouterr().err

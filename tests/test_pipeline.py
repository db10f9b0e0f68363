"""The "anomaly-detection" pipeline on every input kind, batching, thresholds and bad input."""

from __future__ import annotations

import functools
import http.server
import threading

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline
from transformers.pipelines.pt_utils import KeyDataset

from cops_hf import AnomalyDetectionPipeline, CoPSImageProcessor, CoPSProcessor, ImageLoadError
from cops_hf.pipeline_anomaly_detection import RESULT_KEYS

from .tiny_models import tiny_model


@pytest.fixture(scope="module")
def detector():
    return pipeline("anomaly-detection", model=tiny_model(), device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (60 + 7 * i, 90 - 5 * i, 3), dtype=np.uint8) for i in range(4)]
    path = tmp_path_factory.mktemp("images") / "first.png"
    Image.fromarray(arrays[0]).save(path)
    return arrays, str(path)


def test_task_is_registered(detector):
    assert isinstance(detector, AnomalyDetectionPipeline)
    assert isinstance(detector.processor, CoPSProcessor) and detector.processor.image_processor.size == 98


def test_a_pipeline_without_a_model_says_how_to_get_one():
    with pytest.raises(ValueError) as raised:
        pipeline("anomaly-detection")
    assert "\n" not in str(raised.value) and "cops-hf convert --official visa" in str(raised.value)


def test_each_input_kind_gives_the_same_result(detector, images):
    arrays, path = images
    from_path = detector(path)
    from_pil = detector(Image.fromarray(arrays[0]))
    from_array = detector(arrays[0])
    assert set(from_path) == {"pred_score", "anomaly_map"}  # cops_hf.schema's names
    assert from_path["anomaly_map"].shape == arrays[0].shape[:2] and from_path["anomaly_map"].dtype == np.float32
    for other in (from_pil, from_array):
        assert other["score"] == pytest.approx(from_path["score"], abs=1e-6)
        np.testing.assert_allclose(other["anomaly_map"], from_path["anomaly_map"], atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_batching_does_not_change_results(detector, images, batch_size):
    arrays, _ = images
    singles = [detector(array) for array in arrays]
    batched = detector(arrays, batch_size=batch_size)
    assert len(batched) == len(arrays)
    for single, result in zip(singles, batched, strict=True):
        assert result["score"] == pytest.approx(single["score"], abs=1e-5)
        assert result["anomaly_map"].shape == single["anomaly_map"].shape
        np.testing.assert_allclose(result["anomaly_map"], single["anomaly_map"], atol=1e-5)


def test_results_match_the_model(detector, images):
    arrays, _ = images
    model, processor = detector.model, detector.processor
    features = processor(images=arrays[1])
    noise = torch.randn(
        1, model.config.vae_samples, model.config.projection_dim, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        outputs = model(features["pixel_values"], vae_noise=noise)
    expected = processor.post_process_anomaly_detection(outputs, target_sizes=features["original_sizes"])[0]
    result = detector(arrays[1])
    assert result["score"] == pytest.approx(expected["score"], abs=1e-6)
    np.testing.assert_allclose(result["anomaly_map"], expected["anomaly_map"].numpy(), atol=1e-6)


def test_thresholds_from_arguments_and_config(detector, images):
    arrays, _ = images
    plain = detector(arrays[0])
    result = detector(
        arrays[0], threshold=float(np.median(plain["anomaly_map"])), image_threshold=plain["score"] - 1e-3
    )
    assert result["label"] == "anomalous"
    assert result["mask"].dtype == bool and 0.3 < result["mask"].mean() < 0.7
    detector.model.config.image_threshold, detector.model.config.pixel_threshold = 1.0, 0.0
    try:
        configured = detector(arrays[0])
        assert configured["label"] == "normal" and configured["mask"].all()
    finally:
        detector.model.config.image_threshold = detector.model.config.pixel_threshold = None


def test_seed_controls_the_class_token_noise(detector, images):
    arrays, _ = images
    # Exact: the same image and seed, alone in its batch, through the same code path.
    assert detector(arrays[0], seed=3)["score"] == pytest.approx(detector(arrays[0], seed=3)["score"], abs=0)
    assert detector(arrays[0], seed=3)["score"] != detector(arrays[0], seed=4)["score"]


def test_unreadable_image_is_named_or_skipped(detector, images, tmp_path):
    arrays, _ = images
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="broken.png"):
        detector([arrays[0], str(broken)], batch_size=2)
    results = detector([arrays[0], str(broken), arrays[1]], skip_invalid=True, batch_size=2)
    assert results[1] == {"image_path": str(broken), "error": results[1]["error"]}
    assert "broken.png" in results[1]["error"]
    assert results[0]["score"] == pytest.approx(detector(arrays[0])["score"], abs=1e-5)
    assert results[2]["anomaly_map"].shape == arrays[1].shape[:2]


def test_pipeline_from_a_saved_directory_uses_its_processor(tmp_path, images):
    arrays, _ = images
    model = tiny_model()
    model.save_pretrained(tmp_path)
    CoPSProcessor(CoPSImageProcessor(size=70)).save_pretrained(tmp_path)
    detector = pipeline("anomaly-detection", model=str(tmp_path))
    assert detector.processor.image_processor.size == 70
    assert detector(arrays[0])["anomaly_map"].shape == arrays[0].shape[:2]


def test_generators_key_datasets_and_iterators_stream(detector, images):
    arrays, _ = images
    expected = detector(list(arrays), batch_size=2)
    streamed = detector((array for array in arrays), batch_size=2)
    assert not isinstance(streamed, list)  # an iterator, as for transformers' own pipelines
    dataset = datasets.Dataset.from_dict({"image": [Image.fromarray(array) for array in arrays]})
    from_key_dataset = list(detector(KeyDataset(dataset, "image"), batch_size=2))
    from_iterator = list(detector(iter(arrays)))
    skipping = list(detector((item for item in [arrays[0], "missing.png", arrays[1]]), skip_invalid=True))
    for results in (list(streamed), from_key_dataset, from_iterator):
        assert [result["score"] for result in results] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    assert "missing.png" in skipping[1]["error"]
    assert [skipping[0]["score"], skipping[2]["score"]] == pytest.approx(
        [expected[0]["score"], expected[1]["score"]], abs=1e-5
    )


def test_urls_are_downloaded(detector, images, tmp_path):
    arrays, path = images
    Image.fromarray(arrays[0]).save(tmp_path / "part.png")
    (tmp_path / "notes.txt").write_text("not an image")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        from_url = detector(f"{base}/part.png")
        assert from_url["score"] == pytest.approx(detector(path)["score"], abs=1e-6)
        assert from_url["anomaly_map"].shape == arrays[0].shape[:2]
        with pytest.raises(ImageLoadError, match="missing.png' cannot be downloaded"):
            detector(f"{base}/missing.png")
        with pytest.raises(ImageLoadError, match="cannot be read"):
            detector(f"{base}/notes.txt")
    finally:
        server.shutdown()
        server.server_close()


def test_unknown_keyword_arguments_raise(detector, images):
    arrays, _ = images
    with pytest.raises(TypeError, match="unexpected keyword argument.*'treshold'"):
        detector(arrays[0], treshold=0.5)
    with pytest.raises(TypeError, match="'colour'"):
        pipeline("anomaly-detection", model=detector.model, colour="red")


def test_model_accepts_the_processors_output(detector, images):
    arrays, _ = images
    processor, model = detector.processor, detector.model
    inputs = processor(images=[arrays[0], arrays[1]])
    with torch.no_grad():
        outputs = model(**inputs, vae_noise=model.seeded_prior_noise(2, 0))
    assert outputs.original_sizes == [arrays[0].shape[:2], arrays[1].shape[:2]]
    results = processor.post_process_anomaly_detection(outputs)
    assert [tuple(result["anomaly_map"].shape) for result in results] == outputs.original_sizes
    assert results[1]["score"] == pytest.approx(detector(arrays[1])["score"], abs=1e-5)
    assert set(detector(arrays[0], threshold=0.5, image_threshold=0.5)) == set(RESULT_KEYS)


def test_former_result_keys_still_read_with_a_deprecation_warning(detector, images):
    arrays, _ = images
    result = detector(arrays[0], threshold=0.5, image_threshold=0.5)
    assert set(result) == {"pred_score", "anomaly_map", "pred_label", "pred_mask"}
    for old, new in (("score", "pred_score"), ("label", "pred_label"), ("mask", "pred_mask")):
        with pytest.warns(DeprecationWarning, match=f"The result key '{old}' is deprecated .* use '{new}'"):
            assert result[old] is result[new]  # the same object under its former name
    with pytest.warns(DeprecationWarning):
        assert "score" in result and result.get("label") == result["pred_label"]

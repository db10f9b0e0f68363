"""Tiled inference for large images: tile boxes, stitching, and the pipeline/evaluation paths that use them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from cops_hf.cli import main
from cops_hf.data import make_synthetic_dataset
from cops_hf.evaluation.inference import predict_images
from cops_hf.processing_cops import CoPSImageProcessor, CoPSProcessor, check_tiling, stitch_tiles, tile_boxes
from cops_hf.schema import ANOMALY_MAP, PRED_SCORE

from .tiny_models import tiny_model

SIZE = 98


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


@pytest.fixture(scope="module")
def processor():
    return CoPSProcessor.for_image_size(SIZE)


@pytest.fixture(scope="module")
def large_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(150, 260, 3), dtype=np.uint8))


def test_tile_boxes_cover_the_image_with_the_overlap():
    boxes = tile_boxes(150, 260, 98, 0.25)
    assert {(height, width) for _, _, height, width in boxes} == {(98, 98)}
    covered = np.zeros((150, 260), dtype=int)
    for top, left, height, width in boxes:
        covered[top : top + height, left : left + width] += 1
    assert covered.min() >= 1
    lefts = sorted({left for _, left, _, _ in boxes})
    assert lefts[0] == 0 and lefts[-1] + 98 == 260
    assert all(98 - (b - a) >= 0.25 * 98 for a, b in zip(lefts, lefts[1:], strict=False))
    # An image no larger than a tile is one tile: the whole image.
    assert tile_boxes(80, 90, 518, 0.25) == [(0, 0, 80, 90)]
    assert tile_boxes(80, 900, 518, 0.0) == [(0, 0, 80, 518), (0, 382, 80, 518)]


def test_stitching_reassembles_a_map_cut_into_tiles():
    full = torch.rand(150, 260, generator=torch.Generator().manual_seed(0))
    boxes = tile_boxes(150, 260, 98, 0.25)
    tiles = torch.stack([full[top : top + h, left : left + w] for top, left, h, w in boxes])
    # Every tile holds the true values: the blended mean of equal values is that value (float rounding only).
    torch.testing.assert_close(stitch_tiles(tiles, boxes), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(stitch_tiles(tiles, boxes, mode="nearest"), full, atol=1e-6, rtol=0)


def test_overlaps_are_cross_faded_not_cut():
    boxes = [(0, 0, 10, 10), (0, 6, 10, 10)]  # 4 columns shared
    stitched = stitch_tiles(torch.stack([torch.zeros(10, 10), torch.ones(10, 10)]), boxes)
    row = stitched[0]
    assert torch.all(row[:6] == 0) and torch.all(row[10:] == 1)
    shared = row[6:10]
    assert torch.all(shared[1:] > shared[:-1]) and 0 < shared[0] and shared[-1] < 1


def test_one_tile_covering_the_image_equals_untiled_inference(model, processor, large_image):
    detector = pipeline("anomaly-detection", model=model, processor=processor)
    plain, tiled = detector(large_image), detector(large_image, tile_size=300, tile_overlap=0.5)
    # One tile is the whole image: the same pixels through the same code path, identical by construction.
    assert plain[PRED_SCORE] == tiled[PRED_SCORE]
    assert np.array_equal(plain[ANOMALY_MAP], tiled[ANOMALY_MAP])


def test_tiled_pipeline_stitches_full_resolution_maps_and_scores_by_the_model_rule(model, processor, large_image):
    detector = pipeline("anomaly-detection", model=model, processor=processor)
    result = detector(large_image, tile_size=SIZE, tile_overlap=0.25)
    assert result[ANOMALY_MAP].shape == (150, 260) and result[ANOMALY_MAP].dtype == np.float32

    boxes = tile_boxes(150, 260, SIZE, 0.25)
    crops = [large_image.crop((left, top, left + w, top + h)) for top, left, h, w in boxes]
    pixel_values = processor(images=crops)["pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values, vae_noise=model.seeded_prior_noise(len(crops), 0))
    side = SIZE // model.config.vision_config.patch_size
    expected_map = stitch_tiles(outputs.anomaly_maps, boxes)
    patch_map = stitch_tiles(outputs.patch_scores.view(-1, side, side), boxes, mode="nearest")
    beta = model.config.image_score_beta
    expected_score = beta * outputs.global_scores.max() + (1 - beta) * patch_map.max()
    np.testing.assert_allclose(result[ANOMALY_MAP], expected_map.numpy(), atol=1e-5, rtol=0)
    assert result[PRED_SCORE] == pytest.approx(float(expected_score), abs=1e-5)
    # Each tile's own fused score is the model's rule on that tile.
    torch.testing.assert_close(
        outputs.image_scores, beta * outputs.global_scores + (1 - beta) * outputs.patch_scores.amax(-1)
    )


def test_processor_tiling_defaults_are_saved_and_checked(tmp_path):
    processor = CoPSProcessor(CoPSImageProcessor(size=SIZE, tile_size=200))
    processor.save_pretrained(tmp_path)
    reloaded = CoPSProcessor.from_pretrained(tmp_path).image_processor
    assert (reloaded.tile_size, reloaded.tile_overlap) == (200, 0.25)
    features = CoPSProcessor.from_pretrained(tmp_path)(images=np.zeros((150, 450, 3), dtype=np.uint8))
    assert features["tiles"] == [[(0, 0, 150, 200), (0, 150, 150, 200), (0, 250, 150, 200)]]
    assert features["pixel_values"].shape == (3, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"tile_overlap must be a fraction of the tile in \[0, 1\), got 1.0"):
        check_tiling(518, 1.0)
    with pytest.raises(ValueError, match="tile_size must be a positive number of pixels"):
        check_tiling(0, 0.25)


def test_evaluation_scoring_with_one_tile_equals_untiled_and_tiles_give_input_size_maps(model, processor, large_image):
    images = [large_image, large_image.resize((130, 90))]
    plain = list(predict_images(model, processor, images, batch_size=2))
    one_tile = list(predict_images(model, processor, images, batch_size=2, tile_size=1000))
    tiled = list(predict_images(model, processor, images, batch_size=3, tile_size=SIZE))
    for untiled, same in zip(plain, one_tile, strict=True):
        # One tile per image: the same forward on the same pixels, identical by construction.
        assert untiled.pred_score == same.pred_score and np.array_equal(untiled.anomaly_map, same.anomaly_map)
    assert [prediction.anomaly_map.shape for prediction in tiled] == [(SIZE, SIZE)] * 2


def test_predict_cli_writes_tiled_scores(model, processor, large_image, tmp_path):
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    large_image.save(tmp_path / "part.png")
    common = ["predict", "--model", str(tmp_path / "model"), str(tmp_path / "part.png"), "--no-overlays"]
    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert main([*common, "--output", str(tmp_path / "tiled"), "--tile", "98", "--tile-overlap", "0.25"]) == 0
    detector = pipeline("anomaly-detection", model=model, processor=processor)
    expected = detector(large_image, tile_size=SIZE, tile_overlap=0.25)[PRED_SCORE]
    (row,) = csv.DictReader(open(tmp_path / "tiled" / "scores.csv"))
    assert float(row["score"]) == pytest.approx(expected, abs=1e-5)


def test_evaluate_cli_with_tiles_records_them_and_one_tile_keeps_the_metrics(model, processor, tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", images_per_category=4, image_size=120)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    common = ["evaluate", "--model", str(tmp_path / "model"), "--data", str(root), "--num-visualizations", "0"]
    reports = {}
    runs = {"plain": [], "one": ["--tile", "1000"], "tiled": ["--tile", "98", "--tile-overlap", "0.5"]}
    for name, flags in runs.items():
        assert main([*common, "--output", str(tmp_path / name), *flags]) == 0
        reports[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    # One tile per image: the same forward on the same pixels, so the same metrics.
    assert reports["one"]["mean"] == reports["plain"]["mean"]
    assert (reports["tiled"]["protocol"]["tile_size"], reports["tiled"]["protocol"]["tile_overlap"]) == (98, 0.5)
    assert reports["plain"]["protocol"]["tile_size"] is None


def test_tiles_are_refused_for_a_model_holding_references(processor, large_image):
    model = tiny_model(seed=5)
    model.set_references(processor(images=[large_image])["pixel_values"])
    detector = pipeline("anomaly-detection", model=model, processor=processor)
    with pytest.raises(ValueError, match="Tiled scoring does not support a model holding references yet"):
        detector(large_image, tile_size=SIZE)
    assert detector(large_image, tile_size=1000)[PRED_SCORE] == detector(large_image)[PRED_SCORE]

"""The mask rules of docs/protocol.md, each against hand-made files, through the processor, the data layer,
evaluation and calibration."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from cops_hf import CoPSImageProcessor, CoPSProcessor
from cops_hf.data import load_meta_dataset, load_meta_dataset_with_report, make_record, write_meta_json
from cops_hf.evaluation.calibration import calibrate_thresholds
from cops_hf.evaluation.evaluator import evaluate_dataset
from cops_hf.image_utils import load_mask

from .tiny_models import tiny_model


def _noise_image(path: Path, seed: int, size: int = 32) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def _square_mask(path: Path, size: int = 32, value: int = 255, mode: str = "L") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size, size), np.int32)
    pixels[: size // 2, : size // 2] = value
    Image.fromarray(pixels).convert(mode).save(path)
    return str(path)


# ---------------------------------------------------------------- reading one mask


def test_16_bit_mask_keeps_small_values(tmp_path: Path) -> None:
    path = tmp_path / "mask16.png"
    pixels = np.zeros((4, 6), np.uint16)
    pixels[0, 0], pixels[1, 1], pixels[2, 2] = 1, 1000, 65535
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == "I;16"

    assert np.array_equal(load_mask(path), pixels != 0)
    processed = CoPSImageProcessor(size=6).preprocess(Image.new("RGB", (6, 4)), masks=str(path))["masks"][0]
    # Bilinear upsampling of each isolated defect pixel keeps a defect near it: the 1 did not vanish.
    assert processed[:2, :2].sum() > 0 and processed[1:4, 1:3].sum() > 0


def test_any_non_zero_pixel_is_a_defect_at_every_depth(tmp_path: Path) -> None:
    expected = np.zeros((8, 8), bool)
    expected[:4, :4] = True
    for mode, value in (("L", 1), ("I", 7), ("1", 255)):
        path = _square_mask(tmp_path / f"{mode}.png", size=8, value=value, mode=mode)
        assert np.array_equal(load_mask(path), expected), mode
    # Palette masks are read through their colours, as the reference's convert("L"): a black entry is normal.
    palette = Image.fromarray(np.array([[0, 1, 2]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 0, 0, 0, 128, 0, 0])
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(load_mask(tmp_path / "palette.png"), [[False, False, True]])
    assert np.array_equal(load_mask(np.array([[0, 3], [0, 0]], np.uint16)), [[False, True], [False, False]])
    assert np.array_equal(load_mask(np.array([[0.0, 0.01]])), [[False, True]])


def test_rgba_mask_marked_only_in_alpha_uses_alpha(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[2:5, 3:6, 3] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(pixels, mode="RGBA").save(path)

    with caplog.at_level(logging.WARNING, logger="cops_hf.processing_cops"):
        mask = load_mask(path)
    assert np.array_equal(mask, pixels[..., 3] > 0)
    assert "alpha.png" in caplog.text and "alpha channel" in caplog.text

    opaque = np.zeros((8, 8, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[:2, :2, 0] = 200
    Image.fromarray(opaque, mode="RGBA").save(path)
    assert np.array_equal(load_mask(path), np.pad(np.ones((2, 2), bool), ((0, 6), (0, 6))))


def test_mask_of_wrong_size_is_resized_on_its_own_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    small = _square_mask(tmp_path / "small_mask.png", size=10)
    full = _square_mask(tmp_path / "full_mask.png", size=20)
    processor = CoPSImageProcessor(size=28)

    with caplog.at_level(logging.WARNING, logger="cops_hf.processing_cops"):
        resized = processor.preprocess(Image.new("RGB", (20, 20)), masks=small)["masks"][0]
    assert "small_mask.png' is 10x10 but its image" in caplog.text and "20x20" in caplog.text
    expected = processor.preprocess(Image.new("RGB", (20, 20)), masks=full)["masks"][0]
    # Exact: thresholded 0/1 masks from the same resize code, compared away from the edited rows.
    assert torch.equal(expected[:13, :13], resized[:13, :13]) and torch.equal(expected[15:], resized[15:])
    assert resized[:13, :13].all() and not resized[15:].any() and not resized[:, 15:].any()


# ---------------------------------------------------------------- records of a dataset


@pytest.fixture()
def mixed_dataset(tmp_path: Path) -> Path:
    """Category 'part': 2 normal (one listing a mask), 2 anomalous with masks (one of the wrong size),
    1 anomalous whose mask path is a folder and 1 with an empty mask path."""
    root = tmp_path / "data"
    images = [_noise_image(root / f"part/{index}.png", seed=index) for index in range(6)]
    _square_mask(root / "gt/0_mask.png")
    _square_mask(root / "gt/2_mask.png")
    _square_mask(root / "gt/3_mask.png", size=16)
    (root / "gt/folder").mkdir()
    masks = ["gt/0_mask.png", "", "gt/2_mask.png", "gt/3_mask.png", "gt/folder", ""]
    labels = [0, 0, 1, 1, 1, 1]
    records = [
        make_record(str(Path(image).relative_to(root)), cls_name="part", anomaly=label, mask_path=mask)
        for image, mask, label in zip(images, masks, labels, strict=True)
    ]
    write_meta_json(root, {"test": {"part": records}})
    return root


def test_loader_applies_the_record_rules_and_names_the_files(
    mixed_dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cops_hf.data.loading"):
        dataset, report = load_meta_dataset_with_report(mixed_dataset)

    assert dataset["gt_label"] == [0, 0, 1, 1, 1, 1]
    assert [Path(path).name if path else "" for path in dataset["mask_path"]] == [
        "", "", "2_mask.png", "3_mask.png", "", ""
    ]  # fmt: skip
    assert dataset[0]["mask"] is None and dataset[4]["mask"] is None
    assert report.ok and report.num_anomalous == 4 and report.num_anomalous_with_mask == 2
    assert [(Path(note.path).name, note.location) for note in report.notes] == [
        ("0_mask.png", "test/part[0]"),
        ("folder", "test/part[4]"),
        ("5.png", "test/part[5]"),
    ]
    assert "normal record lists a mask: ignored" in report.notes[0].reason
    assert "image-level only" in report.notes[1].reason and "image-level only" in report.notes[2].reason
    for note in report.notes:
        assert note.path in caplog.text


def test_an_image_level_dataset_has_no_missing_mask_notes(mixed_dataset: Path) -> None:
    meta = json.loads((mixed_dataset / "meta.json").read_text())
    for record in meta["test"]["part"]:
        record["mask_path"] = ""
    (mixed_dataset / "meta.json").write_text(json.dumps(meta))
    _, report = load_meta_dataset_with_report(mixed_dataset)
    assert report.ok and report.notes == () and not report.pixel_level


def test_evaluation_counts_unmasked_anomalies_at_image_level_only(mixed_dataset: Path) -> None:
    model, processor = tiny_model(), CoPSProcessor(CoPSImageProcessor(size=98))
    result = evaluate_dataset(model, processor, mixed_dataset, batch_size=2)

    dataset = load_meta_dataset(mixed_dataset)
    maps, masks = [], []
    with torch.no_grad():
        for path, mask in zip(dataset["image_path"], dataset["mask_path"], strict=True):
            features = processor(images=path, masks=[mask or None])
            output = model(pixel_values=features["pixel_values"], vae_noise=model.seeded_prior_noise(1, 0))
            maps.append(output.anomaly_maps[0].numpy())
            masks.append(features["masks"][0].numpy())
    pixel_rows = [0, 1, 2, 3]  # the normal images and the anomalous images with a mask file
    expected = roc_auc_score(np.stack(masks)[pixel_rows].ravel(), np.stack(maps)[pixel_rows].ravel())
    assert result.report.per_category["part"]["pixel_auroc"] == pytest.approx(expected, abs=1e-5)
    assert result.protocol["pixel_level"] is True
    assert roc_auc_score(result.image_labels, result.image_scores) == pytest.approx(
        result.report.per_category["part"]["image_auroc"]
    )
    assert len(result.image_scores) == 6


def test_calibration_leaves_unmasked_anomalies_out_of_the_pixel_threshold(mixed_dataset: Path) -> None:
    model, processor = tiny_model(), CoPSProcessor(CoPSImageProcessor(size=98))
    dataset = load_meta_dataset(mixed_dataset)
    images, labels = dataset["image_path"], dataset["gt_label"]
    masks = [path or None for path in dataset["mask_path"]]

    everything = calibrate_thresholds(model, processor, images, labels, masks, batch_size=1, update_config=False)
    masked_only = calibrate_thresholds(
        model, processor, images[:4], labels[:4], masks[:4], batch_size=1, update_config=False
    )
    assert everything.pixel_threshold == pytest.approx(masked_only.pixel_threshold, abs=1e-6)

"""Tests of the data layer: meta.json I/O, validation, loading, builders and the synthetic source."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_hf.data import (
    DEFECT_TYPES,
    META_FEATURES,
    SYNTHETIC_CATEGORIES,
    DataError,
    build_folder_meta,
    build_mvtec_meta,
    build_visa_meta,
    has_masks,
    load_meta_dataset,
    load_meta_dataset_with_report,
    make_record,
    make_synthetic_dataset,
    read_meta_json,
    render_synthetic_sample,
    validate_meta_dataset,
    write_meta_json,
)
from tests.data_fakes import write_image, write_mask


def _pixel_dataset(root: Path) -> dict:
    """Two categories: 'bottle' (1 normal, 1 anomalous with mask) and 'cable' (1 normal); returns the meta."""
    write_image(root / "bottle/good/0.png")
    write_image(root / "bottle/crack/1.png")
    write_mask(root / "bottle/gt/1_mask.png")
    write_image(root / "cable/good/0.png", size=(6, 4))
    return {
        "test": {
            "bottle": [
                make_record("bottle/good/0.png", cls_name="bottle", anomaly=0),
                make_record(
                    "bottle/crack/1.png",
                    cls_name="bottle",
                    anomaly=1,
                    specie_name="crack",
                    mask_path="bottle/gt/1_mask.png",
                ),
            ],
            "cable": [make_record("cable/good/0.png", cls_name="cable", anomaly=0)],
        }
    }


# ---------------------------------------------------------------- meta.json round trip


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    meta = _pixel_dataset(tmp_path)
    path = write_meta_json(tmp_path, meta)

    assert path == tmp_path / "meta.json"
    assert json.loads(path.read_text()) == {"train": {}, "test": meta["test"]}
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["meta.json"]  # no temp file left

    dataset = load_meta_dataset(tmp_path, split="test")
    assert dataset.features == META_FEATURES
    assert dataset["cls_name"] == ["bottle", "bottle", "cable"]
    assert dataset["specie_name"] == ["good", "crack", "good"]
    assert dataset["gt_label"] == [0, 1, 0]
    assert dataset["image_path"] == [
        str(tmp_path / p) for p in ("bottle/good/0.png", "bottle/crack/1.png", "cable/good/0.png")
    ]
    assert dataset["mask_path"] == ["", str(tmp_path / "bottle/gt/1_mask.png"), ""]
    anomalous = dataset[1]
    assert anomalous["image"].mode == "RGB" and anomalous["image"].size == (8, 8)
    assert anomalous["mask"].mode == "L"
    assert np.array_equal(np.asarray(anomalous["mask"]) > 0, np.pad(np.ones((4, 4), bool), ((0, 4), (0, 4))))
    assert dataset[0]["mask"] is None
    assert dataset[2]["image"].size == (6, 4)
    assert has_masks(dataset)


def test_failed_write_keeps_the_previous_meta_json(tmp_path: Path) -> None:
    meta = _pixel_dataset(tmp_path)
    write_meta_json(tmp_path, meta)
    before = (tmp_path / "meta.json").read_bytes()
    meta["test"]["cable"][0]["extra"] = {1, 2}  # extra fields are allowed but must be JSON-serialisable

    with pytest.raises(TypeError):
        write_meta_json(tmp_path, meta)

    assert (tmp_path / "meta.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["meta.json"]


def test_load_selects_categories_in_requested_order(tmp_path: Path) -> None:
    write_meta_json(tmp_path, _pixel_dataset(tmp_path))

    normal_only = load_meta_dataset(tmp_path, categories="cable")
    assert normal_only["cls_name"] == ["cable"] and not has_masks(normal_only)
    assert load_meta_dataset(tmp_path, categories=["cable", "bottle"])["cls_name"] == ["cable", "bottle", "bottle"]
    with pytest.raises(DataError, match=r"no categories \['carpet'\].*available: \['bottle', 'cable'\]"):
        load_meta_dataset(tmp_path, categories=["carpet"])
    with pytest.raises(DataError, match=r"no records in split 'train'; splits with records: \['test'\]"):
        load_meta_dataset(tmp_path, split="train")


def test_absolute_record_paths_outside_the_root_need_trust(tmp_path: Path) -> None:
    image = write_image(tmp_path / "elsewhere" / "a.png")
    inside = write_image(tmp_path / "root" / "b.png")
    records = [make_record(str(path), cls_name="brain", anomaly=label) for path, label in ((image, 1), (inside, 0))]
    write_meta_json(tmp_path / "root", {"test": {"brain": records}})

    with pytest.raises(DataError, match="image path leads outside the dataset root"):
        load_meta_dataset(tmp_path / "root")
    dataset = load_meta_dataset(tmp_path / "root", allow_outside_root=True)

    assert dataset["image_path"] == [str(image), str(inside)]


def test_image_level_dataset_is_first_class(tmp_path: Path) -> None:
    write_image(tmp_path / "no/0.png")
    write_image(tmp_path / "yes/0.png")
    build_folder_meta(tmp_path, "no", "yes", category="brain")

    dataset, report = load_meta_dataset_with_report(tmp_path)

    assert dataset["gt_label"] == [0, 1] and dataset["mask_path"] == ["", ""]
    assert dataset[1]["mask"] is None
    assert not has_masks(dataset)
    assert not report.pixel_level and report.ok
    assert "image-level" in dataset.info.description


# ---------------------------------------------------------------- bad data


def test_missing_meta_json_names_the_path_and_the_builders(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_meta_dataset(tmp_path)
    assert str(tmp_path / "meta.json") in str(error.value)
    assert "build_mvtec_meta" in str(error.value) and "make_synthetic_dataset" in str(error.value)


def test_malformed_json_is_reported(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text('{"test": {"bottle": [}')
    with pytest.raises(DataError, match="meta.json is not valid JSON"):
        load_meta_dataset(tmp_path)
    (tmp_path / "meta.json").write_text('{"test": {"bottle": {"img_path": "a.png"}}}')
    with pytest.raises(DataError, match="test/bottle must be a list of records, got dict"):
        read_meta_json(tmp_path)


def test_malformed_record_names_category_index_and_field(tmp_path: Path) -> None:
    meta = _pixel_dataset(tmp_path)
    del meta["test"]["bottle"][1]["anomaly"]
    meta["test"]["cable"][0]["cls_name"] = "bottle"
    with pytest.raises(DataError, match=r"test/bottle\[1\]: missing field 'anomaly'") as error:
        write_meta_json(tmp_path, meta)
    assert "test/cable[0]: field 'cls_name' is 'bottle' but the record is listed under 'cable'" in str(error.value)
    assert not (tmp_path / "meta.json").exists()

    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"missing field 'anomaly' \[test/bottle\[1\]\]"):
        load_meta_dataset(tmp_path)


def test_missing_image_is_named(tmp_path: Path) -> None:
    write_meta_json(tmp_path, _pixel_dataset(tmp_path))
    (tmp_path / "cable/good/0.png").unlink()

    with pytest.raises(DataError, match="skip_invalid=True") as error:
        load_meta_dataset(tmp_path)
    assert f"{tmp_path / 'cable/good/0.png'}: image file not found [test/cable[0]]" in str(error.value)


def test_validate_reports_every_problem_including_truncated_images(tmp_path: Path) -> None:
    write_meta_json(tmp_path, _pixel_dataset(tmp_path))
    truncated = tmp_path / "bottle/good/0.png"
    write_image(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:-30])
    (tmp_path / "cable/good/0.png").unlink()
    (tmp_path / "bottle/gt/1_mask.png").write_bytes(b"not a png")

    report = validate_meta_dataset(tmp_path, "test")

    assert not report.ok
    assert (report.num_records, report.num_valid, report.num_invalid) == (3, 0, 3)
    assert [(Path(problem.path).name, problem.location) for problem in report.problems] == [
        ("0.png", "test/bottle[0]"),
        ("1_mask.png", "test/bottle[1]"),
        ("0.png", "test/cable[0]"),
    ]
    assert report.problems[0].reason.startswith("image cannot be read (")
    assert report.problems[1].reason.startswith("mask cannot be read (")
    with pytest.raises(DataError, match="3 problems"):
        report.raise_for_problems()
    with pytest.raises(DataError, match=f"{truncated}: image cannot be read"):
        load_meta_dataset(tmp_path, categories="bottle", check_images=True)


def test_header_checks_do_not_decode_unless_asked(tmp_path: Path) -> None:
    write_meta_json(tmp_path, _pixel_dataset(tmp_path))
    truncated = tmp_path / "cable/good/0.png"
    write_image(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:-30])

    assert len(load_meta_dataset(tmp_path)) == 3
    assert validate_meta_dataset(tmp_path, check_images=False).ok
    assert not validate_meta_dataset(tmp_path, check_images=True).ok


def test_require_masks(tmp_path: Path) -> None:
    meta = _pixel_dataset(tmp_path)
    meta["test"]["bottle"][1]["mask_path"] = ""
    write_meta_json(tmp_path, meta)

    report = validate_meta_dataset(tmp_path, require_masks=True)
    assert [problem.reason for problem in report.problems] == [
        "anomalous sample has no mask but masks are required",
        "no valid anomalous sample, but masks are required (e.g. for training)",
    ]
    with pytest.raises(DataError, match="crack/1.png: anomalous sample has no mask"):
        load_meta_dataset(tmp_path, require_masks=True)
    with pytest.raises(DataError, match="no valid anomalous sample"):
        load_meta_dataset(tmp_path, skip_invalid=True, require_masks=True)


def test_skip_invalid_drops_counts_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_meta_json(tmp_path, _pixel_dataset(tmp_path))
    (tmp_path / "bottle/gt/1_mask.png").unlink()

    with caplog.at_level(logging.WARNING, logger="cops_hf.data"):
        dataset, report = load_meta_dataset_with_report(tmp_path, skip_invalid=True)

    assert dataset["image_path"] == [str(tmp_path / "bottle/good/0.png"), str(tmp_path / "cable/good/0.png")]
    assert report.dropped_invalid and report.num_skipped == 1
    assert [(problem.path, problem.reason) for problem in report.skipped] == [
        (str(tmp_path / "bottle/gt/1_mask.png"), "mask file not found")
    ]
    assert "Skipped 1 invalid records" in caplog.text
    assert "1 invalid skipped" in dataset.info.description
    assert len(load_meta_dataset(tmp_path, skip_invalid=True)) == 2


def test_all_records_invalid_raises_even_when_skipping(tmp_path: Path) -> None:
    write_meta_json(tmp_path, {"test": {"x": [make_record("gone.png", cls_name="x", anomaly=0)]}})
    with pytest.raises(DataError, match="No valid records left"):
        load_meta_dataset(tmp_path, skip_invalid=True)


# ---------------------------------------------------------------- builders


def _fake_mvtec(root: Path) -> None:
    for name in ("000.png", "001.png"):
        write_image(root / "bottle/train/good" / name)
        write_image(root / "bottle/test/good" / name)
    for name in ("000.png", "002.png"):
        write_image(root / "bottle/test/broken_large" / name)
        write_mask(root / "bottle/ground_truth/broken_large" / name.replace(".png", "_mask.png"))
    write_image(root / "screw/train/good/000.png")
    write_image(root / "screw/test/thread_top/005.png")
    write_mask(root / "screw/ground_truth/thread_top/005_mask.png")
    (root / "screw/test/thread_top/.DS_Store").write_text("")
    (root / "license.txt").write_text("not a category")


def test_build_mvtec_meta(tmp_path: Path) -> None:
    _fake_mvtec(tmp_path)

    meta = build_mvtec_meta(tmp_path)

    assert read_meta_json(tmp_path) == meta
    assert list(meta["test"]) == ["bottle", "screw"]
    assert [r["img_path"] for r in meta["train"]["bottle"]] == [
        "bottle/train/good/000.png",
        "bottle/train/good/001.png",
    ]
    assert [(r["specie_name"], r["anomaly"], r["mask_path"]) for r in meta["test"]["bottle"]] == [
        ("broken_large", 1, "bottle/ground_truth/broken_large/000_mask.png"),
        ("broken_large", 1, "bottle/ground_truth/broken_large/002_mask.png"),
        ("good", 0, ""),
        ("good", 0, ""),
    ]
    assert meta["test"]["screw"] == [
        make_record(
            "screw/test/thread_top/005.png",
            cls_name="screw",
            anomaly=1,
            specie_name="thread_top",
            mask_path="screw/ground_truth/thread_top/005_mask.png",
        )
    ]
    dataset = load_meta_dataset(tmp_path, check_images=True)
    assert dataset["gt_label"] == [1, 1, 0, 0, 1] and has_masks(dataset)


def test_build_mvtec_meta_requires_a_mask_per_defect_image(tmp_path: Path) -> None:
    _fake_mvtec(tmp_path)
    (tmp_path / "bottle/ground_truth/broken_large/002_mask.png").unlink()

    with pytest.raises(DataError, match=r"No mask for .*bottle/test/broken_large/002.png"):
        build_mvtec_meta(tmp_path)
    assert not (tmp_path / "meta.json").exists()
    with pytest.raises(DataError, match="No categories under"):
        build_mvtec_meta(tmp_path / "bottle/train")


def test_build_visa_meta(tmp_path: Path) -> None:
    rows = [
        ("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""),
        ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"),
        ("candle", "test", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
        ("candle", "train", "normal", "candle/Data/Images/Normal/0002.JPG", ""),
    ]
    for _, _, _, image, mask in rows:
        write_image(tmp_path / image)
        if mask:
            write_mask(tmp_path / mask)
    (tmp_path / "split_csv").mkdir()
    lines = ["object,split,label,image,mask"] + [",".join(row) for row in rows]
    (tmp_path / "split_csv/1cls.csv").write_text("\n".join(lines) + "\n")

    meta = build_visa_meta(tmp_path)

    assert list(meta["train"]) == ["candle", "pcb1"]
    assert meta["test"]["candle"] == [
        make_record(rows[1][3], cls_name="candle", anomaly=1, specie_name="anomaly", mask_path=rows[1][4]),
        make_record(rows[2][3], cls_name="candle", anomaly=0),
    ]
    assert load_meta_dataset(tmp_path, "test", check_images=True)["gt_label"] == [1, 0]
    assert load_meta_dataset(tmp_path, "train")["cls_name"] == ["candle", "pcb1"]

    (tmp_path / "split_csv/1cls.csv").write_text("\n".join([*lines, "pcb1,test,defect,x.JPG,"]) + "\n")
    with pytest.raises(DataError, match="1cls.csv line 6: unknown label 'defect'"):
        build_visa_meta(tmp_path)
    (tmp_path / "split_csv/1cls.csv").unlink()
    with pytest.raises(DataError, match="VisA split file not found: .*split_csv/1cls.csv"):
        build_visa_meta(tmp_path)


def test_build_folder_meta_matches_masks_by_stem(tmp_path: Path) -> None:
    write_image(tmp_path / "normal/b.png")
    write_image(tmp_path / "normal/a.jpg")
    write_image(tmp_path / "bad/x.png")
    write_image(tmp_path / "bad/y.bmp")
    write_mask(tmp_path / "gt/y.png")
    write_mask(tmp_path / "gt/x_mask.png")

    meta = build_folder_meta(tmp_path, "normal", "bad", "gt", category="part", split="train")

    assert meta["test"] == {}
    assert [(r["img_path"], r["specie_name"], r["mask_path"]) for r in meta["train"]["part"]] == [
        ("normal/a.jpg", "good", ""),
        ("normal/b.png", "good", ""),
        ("bad/x.png", "bad", "gt/x_mask.png"),
        ("bad/y.bmp", "bad", "gt/y.png"),
    ]
    assert has_masks(load_meta_dataset(tmp_path, "train", require_masks=True))

    write_mask(tmp_path / "gt/y.jpg")
    with pytest.raises(DataError, match=r"Several masks for .*bad/y.bmp"):
        build_folder_meta(tmp_path, "normal", "bad", "gt")
    (tmp_path / "gt/y.jpg").unlink()
    write_image(tmp_path / "bad/z.png")
    with pytest.raises(DataError, match=r"No mask for .*bad/z.png in .*gt"):
        build_folder_meta(tmp_path, "normal", "bad", "gt")
    with pytest.raises(DataError, match="Directory not found: .*missing"):
        build_folder_meta(tmp_path, "missing", None)
    assert build_folder_meta(tmp_path, "normal", None, write=False)["test"][tmp_path.name][0]["anomaly"] == 0


# ---------------------------------------------------------------- synthetic data


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_synthetic_dataset_is_byte_identical_per_seed(tmp_path: Path) -> None:
    first = _tree_bytes(make_synthetic_dataset(tmp_path / "a", seed=3))
    second = _tree_bytes(make_synthetic_dataset(tmp_path / "b", seed=3))
    other_seed = _tree_bytes(make_synthetic_dataset(tmp_path / "c", seed=4))

    assert first == second
    assert first.keys() == other_seed.keys()
    images = [name for name in first if name.endswith(".png") and "ground_truth" not in name]
    assert len(images) == 32 and all(first[name] != other_seed[name] for name in images)


def test_synthetic_masks_are_exactly_the_altered_pixels(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path, images_per_category=8, image_size=(40, 72), seed=1)

    for split in ("train", "test"):
        dataset = load_meta_dataset(root, split, check_images=True, require_masks=True)
        assert dataset["gt_label"] == [0, 0, 0, 0, 1, 1, 1, 1] * 2
        assert dataset["specie_name"][4:8] == list(DEFECT_TYPES)
        for index, row in enumerate(dataset):
            saved = np.asarray(row["image"])
            assert saved.shape == (40, 72, 3) and saved.dtype == np.uint8
            defect = row["specie_name"] if row["gt_label"] else None
            sample = render_synthetic_sample(
                row["cls_name"], index % 8, image_size=(40, 72), seed=1, defect_type=defect
            )
            assert np.array_equal(saved, sample.image)
            if row["gt_label"] == 0:
                assert row["mask"] is None and np.array_equal(sample.image, sample.clean_image)
                continue
            mask = np.asarray(row["mask"])
            assert set(np.unique(mask)) == {0, 255}
            assert np.array_equal(mask > 0, np.any(saved != sample.clean_image, axis=-1))
            assert 8 <= (mask > 0).sum() < 0.5 * mask.size


def test_synthetic_train_and_test_categories_are_disjoint(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path, categories=["wood", "bolt", "noise_texture"], images_per_category=3)
    meta = read_meta_json(root)

    assert list(meta["train"]) == ["wood"] and list(meta["test"]) == ["bolt", "noise_texture"]
    assert [r["anomaly"] for r in meta["train"]["wood"]] == [0, 1, 1]
    with pytest.raises(ValueError, match=r"disjoint .* \['disc'\]"):
        make_synthetic_dataset(tmp_path, train_categories=["disc"], test_categories=["disc", "ring"])
    with pytest.raises(ValueError, match="Unknown synthetic categories"):
        make_synthetic_dataset(tmp_path, train_categories=["cat"])


def test_synthetic_anomalous_fraction_bounds(tmp_path: Path) -> None:
    def labels(fraction: float, count: int) -> list[int]:
        root = make_synthetic_dataset(
            tmp_path / f"{fraction}-{count}",
            train_categories=[],
            test_categories=["ring"],
            images_per_category=count,
            anomalous_fraction=fraction,
        )
        return [record["anomaly"] for record in read_meta_json(root)["test"]["ring"]]

    assert labels(0.0, 3) == [0, 0, 0]
    assert labels(1.0, 2) == [1, 1]
    assert labels(0.5, 4) == [0, 0, 1, 1]
    assert labels(0.1, 4) == [0, 0, 0, 1]
    assert labels(0.9, 4) == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="not both"):
        make_synthetic_dataset(tmp_path, categories=["ring", "disc"], train_categories=["wood"])


def test_synthetic_dataset_is_rebuildable_by_the_mvtec_builder(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path, train_categories=[], test_categories=["stripes", "disc"])

    original = read_meta_json(root)["test"]
    rebuilt = build_mvtec_meta(root, write=False)["test"]
    assert list(rebuilt) == ["disc", "stripes"]
    for category in original:
        assert sorted(map(json.dumps, rebuilt[category])) == sorted(map(json.dumps, original[category]))


def test_synthetic_image_size_and_argument_checks() -> None:
    sample = render_synthetic_sample("bolt", 0, image_size=(32, 48), defect_type="scratch")
    assert sample.image.shape == (32, 48, 3) and sample.mask.shape == (32, 48)
    assert Image.fromarray(sample.image).mode == "RGB"
    with pytest.raises(ValueError, match="at least 16"):
        render_synthetic_sample("bolt", 0, image_size=8)
    with pytest.raises(ValueError, match="Unknown defect type"):
        render_synthetic_sample("bolt", 0, defect_type="dent")


@pytest.mark.parametrize("image_size", [518, (200, 520)])
def test_every_defect_renders_at_large_sizes(image_size) -> None:
    for category in SYNTHETIC_CATEGORIES:
        for defect_type in DEFECT_TYPES:
            sample = render_synthetic_sample(category, 1, image_size=image_size, defect_type=defect_type)
            assert (
                sample.mask.any() and (sample.image[sample.mask] != sample.clean_image[sample.mask]).any(axis=-1).all()
            )

"""Each benchmark builder on a tiny fake copy of the dataset's download layout."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cops_hf.data import has_masks, load_meta_dataset, read_meta_json
from cops_hf.data.benchmarks import BENCHMARKS, DATASET_BUILDERS, prepare_dataset
from tests.data_fakes import write_image, write_mask

# Per dataset: the files of a tiny download ("mask:" marks masks, other entries are images; "text:" plain files),
# and the expected records as (split, category, img_path, specie_name, anomaly, mask_path).
FAKE_LAYOUTS: dict[str, tuple[list[str], list[tuple[str, str, str, str, int, str]]]] = {
    "mvtec": (
        [
            "bottle/train/good/000.png",
            "bottle/test/good/000.png",
            "bottle/test/broken_large/000.png",
            "mask:bottle/ground_truth/broken_large/000_mask.png",
        ],
        [
            ("train", "bottle", "bottle/train/good/000.png", "good", 0, ""),
            ("test", "bottle", "bottle/test/broken_large/000.png", "broken_large", 1,
             "bottle/ground_truth/broken_large/000_mask.png"),
            ("test", "bottle", "bottle/test/good/000.png", "good", 0, ""),
        ],
    ),
    "visa": (
        [
            "candle/Data/Images/Normal/0000.JPG",
            "candle/Data/Images/Anomaly/000.JPG",
            "mask:candle/Data/Masks/Anomaly/000.png",
            "text:split_csv/1cls.csv=object,split,label,image,mask\n"
            "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
            "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n",
        ],
        [
            ("train", "candle", "candle/Data/Images/Normal/0000.JPG", "good", 0, ""),
            ("test", "candle", "candle/Data/Images/Anomaly/000.JPG", "anomaly", 1,
             "candle/Data/Masks/Anomaly/000.png"),
        ],
    ),
    "btad": (
        ["01/train/ok/0000.bmp", "01/test/ok/0001.bmp", "01/test/ko/0002.bmp", "mask:01/ground_truth/ko/0002.png"],
        [
            ("train", "01", "01/train/ok/0000.bmp", "ok", 0, ""),
            ("test", "01", "01/test/ko/0002.bmp", "ko", 1, "01/ground_truth/ko/0002.png"),
            ("test", "01", "01/test/ok/0001.bmp", "ok", 0, ""),
        ],
    ),
    "mpdd": (
        ["tubes/test/good/001.png", "tubes/test/anomalous/000.png", "mask:tubes/ground_truth/anomalous/000_mask.png"],
        [
            ("test", "tubes", "tubes/test/anomalous/000.png", "anomalous", 1,
             "tubes/ground_truth/anomalous/000_mask.png"),
            ("test", "tubes", "tubes/test/good/001.png", "good", 0, ""),
        ],
    ),
    "dtd_synthetic": (
        ["Woven_001/test/good/010.png", "Woven_001/test/bad/000.png", "mask:Woven_001/ground_truth/bad/000_mask.png"],
        [
            ("test", "Woven_001", "Woven_001/test/bad/000.png", "bad", 1, "Woven_001/ground_truth/bad/000_mask.png"),
            ("test", "Woven_001", "Woven_001/test/good/010.png", "good", 0, ""),
        ],
    ),
    "headct": (
        ["brain/test/good/000.png", "brain/test/hemorrhage/100.png"],
        [
            ("test", "brain", "brain/test/good/000.png", "good", 0, ""),
            ("test", "brain", "brain/test/hemorrhage/100.png", "hemorrhage", 1, ""),
        ],
    ),
    "brainmri": (
        ["brain_tumor_dataset/no/1 no.jpeg", "brain_tumor_dataset/yes/Y1.jpg", "yes/Y1.jpg"],
        [
            ("test", "brain", "brain_tumor_dataset/no/1 no.jpeg", "good", 0, ""),
            ("test", "brain", "brain_tumor_dataset/yes/Y1.jpg", "tumor", 1, ""),
        ],
    ),
    "br35h": (
        ["no/no0.jpg", "yes/y0.jpg", "pred/pred0.jpg"],
        [("test", "brain", "no/no0.jpg", "good", 0, ""), ("test", "brain", "yes/y0.jpg", "tumor", 1, "")],
    ),
    "isic": (
        [
            "skin/test/good/ISIC_0000001.jpg",
            "skin/test/defect/ISIC_0000003.jpg",
            "mask:skin/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000003_Segmentation.png",
        ],
        [
            ("test", "skin", "skin/test/defect/ISIC_0000003.jpg", "defect", 1,
             "skin/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000003_Segmentation.png"),
            ("test", "skin", "skin/test/good/ISIC_0000001.jpg", "good", 0, ""),
        ],
    ),
    "cvc_colondb": (
        ["images/1.png", "images/2.png", "mask:masks/2.png", "mask:masks/1.png"],
        [
            ("test", "colon", "images/1.png", "polyp", 1, "masks/1.png"),
            ("test", "colon", "images/2.png", "polyp", 1, "masks/2.png"),
        ],
    ),
    "cvc_clinicdb": (
        ["images/1.tif", "mask:masks/1.tif"],
        [("test", "colon", "images/1.tif", "polyp", 1, "masks/1.tif")],
    ),
    "kvasir": (
        ["images/cju0qkwl35piu0993l0dewei2.jpg", "mask:masks/cju0qkwl35piu0993l0dewei2.jpg"],
        [("test", "colon", "images/cju0qkwl35piu0993l0dewei2.jpg", "polyp", 1, "masks/cju0qkwl35piu0993l0dewei2.jpg")],
    ),
    "endo": (
        ["good/n0.jpg", "abnormal/a0.jpg", "mask:masks/a0.png"],
        [
            ("test", "colon", "abnormal/a0.jpg", "abnormal", 1, "masks/a0.png"),
            ("test", "colon", "good/n0.jpg", "good", 0, ""),
        ],
    ),
}  # fmt: skip


def _make_fake_download(root: Path, entries: list[str]) -> None:
    for entry in entries:
        kind, _, rest = entry.partition(":") if entry.startswith(("mask:", "text:")) else ("image", "", entry)
        if kind == "text":
            name, _, content = rest.partition("=")
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(content)
        elif kind == "mask":
            write_mask(root / rest)
        else:
            write_image(root / rest)


def test_registry_covers_the_thirteen_benchmarks() -> None:
    assert sorted(DATASET_BUILDERS) == sorted(FAKE_LAYOUTS)
    assert len(DATASET_BUILDERS) == 13
    assert [name for name, info in BENCHMARKS.items() if not info.pixel_level] == ["headct", "brainmri", "br35h"]


@pytest.mark.parametrize("name", sorted(FAKE_LAYOUTS))
def test_builder_indexes_the_download_layout(tmp_path: Path, name: str) -> None:
    entries, expected = FAKE_LAYOUTS[name]
    _make_fake_download(tmp_path, entries)

    assert prepare_dataset(name, tmp_path) == tmp_path / "meta.json"

    meta = read_meta_json(tmp_path)
    found = [
        (split, category, r["img_path"], r["specie_name"], r["anomaly"], r["mask_path"])
        for split, categories in meta.items()
        for category, records in categories.items()
        for r in records
    ]
    assert found == expected
    test_set = load_meta_dataset(tmp_path, "test", check_images=True)
    assert has_masks(test_set) == BENCHMARKS[name].pixel_level


def test_prepare_dataset_names_and_partial_downloads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _make_fake_download(tmp_path, FAKE_LAYOUTS["cvc_clinicdb"][0])
    assert prepare_dataset("CVC-ClinicDB", tmp_path) == tmp_path / "meta.json"
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'; choose from"):
        prepare_dataset("imagenet", tmp_path)

    _make_fake_download(tmp_path / "mvtec", FAKE_LAYOUTS["mvtec"][0])
    with caplog.at_level(logging.WARNING, logger="cops_hf.data"):
        prepare_dataset("MVTec-AD", tmp_path / "mvtec")
    assert "lacks categories ['cable', 'capsule'," in caplog.text

"""The paper's protocol end to end from fake MVTec AD and VisA downloads, through the CLI: `data prepare`,
`train` on the labelled split with the dataset's preset, `evaluate` with the preset meta.json records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_hf import CoPSImageProcessor, CoPSProcessor
from cops_hf.cli import build_parser, main
from cops_hf.data import (
    BENCHMARKS,
    DataError,
    labelled_split,
    load_meta_dataset,
    make_synthetic_dataset,
    meta_dataset_name,
    read_meta_json,
)
from cops_hf.evaluation.evaluator import evaluate_dataset

from .tiny_models import tiny_model

IMAGE_SIZE = "56"

# category -> specie -> number of test images ("good" is normal); every category also has TRAIN_GOOD train images.
MVTEC_TEST = {"bottle": {"good": 2, "broken_large": 2, "contamination": 1}, "screw": {"good": 2, "scratch_head": 2}}
# category -> (train normal, test normal, test anomalous), as VisA's split_csv/1cls.csv assigns them.
VISA_SPLITS = {"candle": (3, 2, 3), "pcb1": (2, 1, 2)}
TRAIN_GOOD = 3


def _image(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _mask(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0]), np.uint8)
    top, left = np.random.default_rng(seed).integers(0, 16, 2)
    pixels[top : top + 12, left : left + 16] = 255
    Image.fromarray(pixels).save(path)


def make_fake_mvtec(root: Path) -> Path:
    """MVTec AD's layout: <cat>/train/good, <cat>/test/<specie>, <cat>/ground_truth/<defect>/<stem>_mask.png."""
    seed = 0
    for category, species in MVTEC_TEST.items():
        for index in range(TRAIN_GOOD):
            _image(root / category / "train/good" / f"{index:03d}.png", seed := seed + 1)
        for specie, count in species.items():
            for index in range(count):
                _image(root / category / "test" / specie / f"{index:03d}.png", seed := seed + 1)
                if specie != "good":
                    _mask(root / category / "ground_truth" / specie / f"{index:03d}_mask.png", seed)
    return root


def make_fake_visa(root: Path) -> Path:
    """VisA's layout: <cat>/Data/Images/{Normal,Anomaly}/*.JPG, <cat>/Data/Masks/Anomaly/*.png, split_csv/1cls.csv."""
    rows, seed = ["object,split,label,image,mask"], 100
    for category, (train_normal, test_normal, test_anomalous) in VISA_SPLITS.items():
        for index in range(train_normal + test_normal):
            image = f"{category}/Data/Images/Normal/{index:04d}.JPG"
            _image(root / image, seed := seed + 1)
            rows.append(f"{category},{'train' if index < train_normal else 'test'},normal,{image},")
        for index in range(test_anomalous):
            image, mask = (
                f"{category}/Data/Images/Anomaly/{index:03d}.JPG",
                f"{category}/Data/Masks/Anomaly/{index:03d}.png",
            )
            _image(root / image, seed := seed + 1)
            _mask(root / mask, seed)
            rows.append(f"{category},test,anomaly,{image},{mask}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def _read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("downloads")
    make_fake_mvtec(base / "mvtec_like")
    make_fake_visa(base / "visa_like")
    return base


@pytest.fixture(scope="module")
def prepared(downloads: Path) -> Path:
    """`data prepare` with roots relative to the working directory, as a user types them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(downloads)
        assert main(["data", "prepare", "mvtec", "mvtec_like"]) == 0
        assert main(["data", "prepare", "visa", "visa_like"]) == 0
    return downloads


def test_prepare_indexes_the_mvtec_layout(prepared: Path) -> None:
    root = prepared / "mvtec_like"
    assert meta_dataset_name(root) == "mvtec"
    meta = read_meta_json(root)
    assert {category: len(records) for category, records in meta["train"].items()} == dict.fromkeys(MVTEC_TEST, 3)
    for category, species in MVTEC_TEST.items():
        records = meta["test"][category]
        assert sorted(record["specie_name"] for record in records) == sorted(
            specie for specie, count in species.items() for _ in range(count)
        )
        for record in records:
            assert record["anomaly"] == int(record["specie_name"] != "good")
            assert bool(record["mask_path"]) == bool(record["anomaly"])
            assert record["img_path"].startswith(f"{category}/test/{record['specie_name']}/")
            assert (root / record["img_path"]).is_file()
    assert labelled_split(root) == "test"


def test_prepare_indexes_the_visa_layout(prepared: Path) -> None:
    root = prepared / "visa_like"
    assert meta_dataset_name(root) == "visa"
    test_set = load_meta_dataset(root, split="test", check_images=True)
    train_set = load_meta_dataset(root, split="train")
    for category, (train_normal, test_normal, test_anomalous) in VISA_SPLITS.items():
        labels = [
            label for label, name in zip(test_set["gt_label"], test_set["cls_name"], strict=True) if name == category
        ]
        assert (labels.count(0), labels.count(1)) == (test_normal, test_anomalous)
        assert train_set["cls_name"].count(category) == train_normal
    assert set(train_set["gt_label"]) == {0}
    assert labelled_split(root) == "test"


@pytest.mark.parametrize(
    ("dataset", "other", "kernel", "recon"), [("visa", "mvtec", 5, False), ("mvtec", "visa", 3, True)]
)
def test_paper_run_trains_on_the_labelled_split_and_evaluates_with_the_recorded_preset(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture, dataset: str, other: str, kernel: int, recon: bool
) -> None:
    data, run = prepared / f"{dataset}_like", tmp_path / "run"
    arguments = ["train", "--random-clip", "tiny", "--data", str(data), "--preset", dataset, "--output", str(run)]
    assert main([*arguments, "--epochs", "2", "--image-size", IMAGE_SIZE, "--batch-size", "4"]) == 0

    labels = load_meta_dataset(data, split="test")["gt_label"]
    normal, anomalous = labels.count(0), labels.count(1)
    assert f"Training on split 'test' of {data}: {normal} normal and {anomalous} anomalous images" in (
        capsys.readouterr().out
    )
    log = _read_log(run)
    assert [(record["epoch"], record["images"]) for record in log] == [
        (1, normal + anomalous),
        (2, normal + anomalous),
    ]
    assert {(record["dataset"], record["split"], record["preset"]) for record in log} == {(dataset, "test", dataset)}
    assert all((record["recon"] > 0) == recon for record in log)
    config = json.loads((run / "config.json").read_text())
    assert (config["train_dataset"], config["train_split"], config["train_preset"]) == (dataset, "test", dataset)
    assert config["train_kernel_size"] == kernel and config["use_recon_loss"] is recon

    output = tmp_path / "evaluation"
    arguments = ["evaluate", "--model", str(run), "--data", str(prepared / f"{other}_like"), "--output", str(output)]
    assert main([*arguments, "--batch-size", "4", "--num-visualizations", "1", "--cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"Test preset: {other} (the dataset" in printed
    assert "\ncategory " in printed and "\nmean " in printed  # the per-category table
    assert f"files to {output}" in printed
    protocol = json.loads((output / "metrics.json").read_text())["protocol"]
    assert protocol["test_preset"] == other
    assert protocol["test_kernel_size"] == (3 if other == "visa" else 5)
    assert protocol["image_score_beta"] == (1.0 if other == "visa" else 0.9)


def test_train_split_option_and_errors(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    arguments = ["train", "--random-clip", "tiny", "--data", str(prepared / "mvtec_like"), "--output", str(tmp_path)]
    assert main([*arguments, "--split", "train", "--image-size", IMAGE_SIZE]) == 2
    assert "The training split has no anomalous sample (6 images, 0 anomalous)" in capsys.readouterr().err

    normal_only = tmp_path / "normal_only"
    make_fake_mvtec(normal_only)
    for defect_dir in normal_only.glob("*/test/*"):
        if defect_dir.name != "good":
            for image in defect_dir.iterdir():
                image.unlink()
    assert main(["data", "prepare", "mvtec", str(normal_only)]) == 0
    with pytest.raises(
        DataError, match=r"holds both normal and anomalous images \(train: 6 normal, 0 anomalous, test"
    ):
        labelled_split(normal_only)


def test_synthetic_data_trains_on_its_labelled_train_split(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path, train_categories=["stripes"], test_categories=["disc"], images_per_category=2
    )
    assert labelled_split(root) == "train"
    assert meta_dataset_name(root) is None


def test_prepare_refuses_a_folder_without_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty/good").mkdir(parents=True)
    assert main(["data", "prepare", "endo", str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err
    assert f"cops-hf data: error: No images found under {tmp_path / 'empty'}. Expected layout: Endo:" in error
    assert not (tmp_path / "empty/meta.json").exists()


def test_prepare_folder_for_your_own_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "mine"
    for index in range(3):
        _image(root / "good" / f"n{index}.png", index)
    for index in range(2):
        _image(root / "bad" / f"a{index}.png", 10 + index)
        _mask(root / "ground_truth" / f"a{index}_mask.png", 10 + index)
    arguments = ["data", "prepare", "folder", str(root), "--normal", "good", "--anomalous", "bad"]
    assert main([*arguments, "--masks", "ground_truth"]) == 0
    dataset = load_meta_dataset(root)
    assert dataset["gt_label"] == [0, 0, 0, 1, 1]
    assert [Path(path).name for path in dataset["mask_path"]] == ["", "", "", "a0_mask.png", "a1_mask.png"]
    assert meta_dataset_name(root) is None

    assert main(["data", "prepare", "folder", str(root)]) == 2
    assert "needs --normal DIR, --anomalous DIR or both" in capsys.readouterr().err
    (tmp_path / "void/good").mkdir(parents=True)
    assert main(["data", "prepare", "folder", str(tmp_path / "void"), "--normal", "good"]) == 2
    assert "No images found under" in capsys.readouterr().err


def test_data_help_lists_the_thirteen_datasets() -> None:
    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    text = " ".join(subparsers.choices["data"].format_help().split())
    for name in BENCHMARKS:
        assert name in text, name
    assert "'folder'" in text


def test_evaluate_with_a_preset_leaves_the_callers_config_alone(prepared: Path) -> None:
    model = tiny_model(image_size=56)
    before = model.config.to_dict()
    processor = CoPSProcessor(CoPSImageProcessor(size=56))
    result = evaluate_dataset(model, processor, prepared / "visa_like", test_preset="visa", batch_size=4)
    assert model.config.to_dict() == before and model.config.test_kernel_size == 5
    assert (result.protocol["test_kernel_size"], result.protocol["distance_alpha"]) == (3, 0.35)

    with_preset = tiny_model(image_size=56)
    with_preset.config = with_preset.config.with_preset(test_dataset="visa")
    expected = evaluate_dataset(with_preset, processor, prepared / "visa_like", batch_size=4)
    np.testing.assert_allclose(result.image_scores, expected.image_scores, atol=1e-6)


def test_masks_named_otherwise_pair_in_sorted_order_as_the_reference_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_fake_mvtec(tmp_path / "mvtec_like")
    defect_masks = root / "bottle/ground_truth/broken_large"
    for index, mask in enumerate(sorted(defect_masks.iterdir())):
        mask.rename(defect_masks / f"gt_{index}.png")
    assert main(["data", "prepare", "mvtec", str(root)]) == 0
    assert f"The 2 masks in {defect_masks} do not share their images' names" in caplog.text
    records = [record for record in read_meta_json(root)["test"]["bottle"] if record["specie_name"] == "broken_large"]
    assert [(record["img_path"], record["mask_path"]) for record in records] == [
        (f"bottle/test/broken_large/{index:03d}.png", f"bottle/ground_truth/broken_large/gt_{index}.png")
        for index in range(2)
    ]
    (defect_masks / "gt_1.png").unlink()
    assert main(["data", "prepare", "mvtec", str(root)]) == 2

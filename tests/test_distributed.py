"""Scaling predict out: Ray Data scoring into Parquet shards (one local Ray instance for the module) and
`torchrun` sharding of `cops-hf predict` over two CPU processes."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_hf.cli import main
from cops_hf.distributed import score_images
from cops_hf.predict import load_detector

from .tiny_models import tiny_model

REPOSITORY = Path(__file__).resolve().parents[1]
NUM_IMAGES = 7
BROKEN = 3  # the index of the unreadable image


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A calibrated tiny model folder and `NUM_IMAGES` images of different sizes, one of them unreadable."""
    root = tmp_path_factory.mktemp("archive")
    tiny_model(seed=0, image_threshold=0.5).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(NUM_IMAGES):
        path = root / "images" / f"part{index}.png"
        path.parent.mkdir(exist_ok=True)
        if index == BROKEN:
            path.write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (40 + 6 * index, 60, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return root, paths


@pytest.fixture(scope="module")
def single_process_scores(archive: tuple[Path, list[str]]) -> list[dict]:
    """What single-process predict's pipeline gives for every image (errors for the unreadable one)."""
    root, paths = archive
    return load_detector(root / "model", device="cpu")(paths, skip_invalid=True)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance with 2 CPUs for the whole module (starting Ray takes seconds), shut down after."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _assert_rows_match(table: dict[str, list], paths: list[str], reference: list[dict]) -> None:
    assert table["image_path"] == paths  # input order, across shards
    for index, (score, expected) in enumerate(zip(table["pred_score"], reference, strict=True)):
        if index == BROKEN:
            assert score is None and "part3.png" in table["error"][index] and "cannot be read" in table["error"][index]
            assert table["pred_label"][index] is None
        else:
            assert score == pytest.approx(expected["pred_score"], abs=1e-6)
            assert table["pred_label"][index] == expected["pred_label"]
            assert table["error"][index] == ""


@pytest.fixture(scope="module")
def ray_output(local_ray: None, archive: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shards (of 2 images) and maps `cops-hf predict --engine ray` writes for the archive."""
    root, _ = archive
    output = tmp_path_factory.mktemp("ray") / "shards"
    code = main(["predict", "--engine", "ray", "--model", str(root / "model"), str(root / "images"), "--output",
                 str(output), "--shard-size", "2", "--batch-size", "2", "--maps", "-q"])  # fmt: skip
    assert code == 0
    return output


def test_cli_ray_engine_matches_single_process_predict(
    ray_output: Path, archive: tuple[Path, list[str]], single_process_scores: list[dict]
) -> None:
    from cops_hf.distributed import read_shards

    _, paths = archive
    assert sorted(path.name for path in ray_output.glob("*.parquet")) == [f"shard-0000{k}.parquet" for k in range(4)]
    table = read_shards(ray_output).to_pydict()
    _assert_rows_match(table, paths, single_process_scores)
    for index, expected in enumerate(single_process_scores):
        if index != BROKEN:  # the map at the image's size, as the pipeline gives it
            np.testing.assert_allclose(np.load(ray_output / table["anomaly_map"][index]), expected["anomaly_map"],
                                       atol=1e-6)  # fmt: skip


def test_rerun_skips_finished_shards_and_refuses_other_inputs(
    ray_output: Path, archive: tuple[Path, list[str]], single_process_scores: list[dict], tmp_path: Path
) -> None:
    from cops_hf.distributed import read_shards

    root, paths = archive
    output = tmp_path / "shards"
    shutil.copytree(ray_output, output)
    # A run killed after its first shards: the later ones were never written (shards are written atomically).
    shard_paths = sorted(output.glob("*.parquet"))
    finished = {path: path.stat().st_mtime_ns for path in shard_paths[:2]}
    for path in shard_paths[2:]:
        path.unlink()
    resumed = score_images(root / "model", [str(root / "images")], output, shard_size=2, batch_size=2,
                           anomaly_maps=True)  # fmt: skip
    assert (resumed.skipped_shards, resumed.num_scored, resumed.num_failed) == (2, NUM_IMAGES - 4, 0)
    assert resumed.shard_paths == shard_paths
    assert {path: path.stat().st_mtime_ns for path in shard_paths[:2]} == finished  # not rescored
    _assert_rows_match(read_shards(output).to_pydict(), paths, single_process_scores)

    with pytest.raises(ValueError, match=r"holds shards of another run \(shard_size differ\)"):
        score_images(root / "model", [str(root / "images")], output, shard_size=3, anomaly_maps=True)


def test_fsspec_urls_expand_like_paths(archive: tuple[Path, list[str]]) -> None:
    from cops_hf.distributed import expand_sources

    root, paths = archive
    urls = expand_sources([f"file://{root}/images/*.png"])
    assert urls == [f"file://{path}" for path in paths]
    with pytest.raises(ValueError, match="names no image files"):
        expand_sources([f"file://{root}/model/"])


def test_torchrun_two_processes_merge_one_csv_in_input_order(
    archive: tuple[Path, list[str]], single_process_scores: list[dict], tmp_path: Path
) -> None:
    root, paths = archive
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cops_hf.cli",
        "predict", "--model", str(root / "model"), *paths, "--output", str(tmp_path), "--skip-invalid",
        "--device", "cpu", "--batch-size", "2",
    ]  # fmt: skip
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"Scored {NUM_IMAGES - 1} image(s), 1 unreadable" in completed.stdout
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert [row["image_path"] for row in rows] == paths
    for index, (row, expected) in enumerate(zip(rows, single_process_scores, strict=True)):
        if index == BROKEN:
            assert "part3.png" in row["error"] and not row["overlay"]
        else:  # the CSV keeps 6 decimals
            assert float(row["pred_score"]) == pytest.approx(expected["pred_score"], abs=1e-6)
            assert row["overlay"] == f"{index:05d}_part{index}_overlay.png" and (tmp_path / row["overlay"]).is_file()
    assert not list(tmp_path.glob(".scores-process*"))  # shard tables merged and removed

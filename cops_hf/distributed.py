"""Scoring an archive of images on Ray Data: decoding in tasks, scoring in an actor pool, Parquet shards out.

`score_images` (and `cops-hf predict --engine ray`) turns files, folders, glob patterns and fsspec URLs into a Ray
dataset in input order, cut into shards of `shard_size` images. Tasks decode and preprocess the images; a pool of
actors, each holding one model (one per GPU, or CPU workers sharing the cores), scores them with the same seeded
noise as the pipeline, so every row equals single-process `cops-hf predict` up to float rounding. The driver
writes each shard as `shard-NNNNN.parquet` (atomically) as soon as its last row arrives: a rerun skips the shards
already written, so a killed run resumes where it stopped. An unreadable image becomes a row with an `error`.

Ray is an optional extra (`pip install "cops-hf[ray]"`), imported only here.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .image_utils import is_image_file
from .schema import ANOMALY_MAP, ERROR, IMAGE_PATH, PRED_LABEL, PRED_SCORE, decision_label

SHARD_PATTERN = "shard-{:05d}.parquet"
"""File name of shard k (k = image index // shard_size)."""

MANIFEST_NAME = "manifest.json"
"""What the shards of an output folder were made from (inputs, shard size, model); a rerun must match it."""

MAPS_FOLDER = "maps"
"""Sub-folder of the anomaly maps (`NNNNNNN_<stem>.npy`, float32 at the image's size) when they are asked for."""

RAY_EXTRA_HINT = 'Ray Data scoring needs Ray: pip install "cops-hf[ray]"'


@dataclass
class ScoringSummary:
    """What `score_images` did.

    Attributes:
        output_dir: the folder of the shards.
        shard_paths: every shard of the run, in input order (written now or before).
        num_images: images in the input.
        num_scored, num_failed: images scored, and unreadable, in this run (skipped shards not counted).
        skipped_shards: shards found complete from an earlier run and not scored again.
        errors: the messages of the unreadable images of this run.
    """

    output_dir: Path
    shard_paths: list[Path] = field(default_factory=list)
    num_images: int = 0
    num_scored: int = 0
    num_failed: int = 0
    skipped_shards: int = 0
    errors: list[str] = field(default_factory=list)


def _is_url(source: str) -> bool:
    return "://" in source and not source.startswith(("http://", "https://"))


def expand_sources(sources: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Image paths and fsspec URLs from files, folders, glob patterns and fsspec URLs, in the given order.

    Local sources are expanded as `cops-hf predict` expands them (`cops_hf.predict.expand_image_sources`); an
    fsspec URL (`s3://bucket/dir/`, `gs://b/*.png`, `file:///data/x.png`, ...) is expanded on its filesystem,
    which must be installed (e.g. `s3fs`).

    Raises:
        ValueError: a source that names no image file, or a URL whose filesystem is not installed.
    """
    from .predict import expand_image_sources

    paths: list[str] = []
    for source in map(os.fspath, sources):
        paths.extend(_expand_url(source) if _is_url(source) else expand_image_sources([source]))
    return paths


def _expand_url(url: str) -> list[str]:
    import fsspec

    try:
        filesystem, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise ValueError(f"{url}: cannot open this URL's filesystem ({error}); install its fsspec package") from error
    if glob.has_magic(path):
        found = sorted(filesystem.glob(path))
    elif filesystem.isdir(path):
        found = sorted(filesystem.find(path))
    elif filesystem.isfile(path):
        found = [path]
    else:
        raise ValueError(f"{url}: no such file or folder")
    images = [filesystem.unstrip_protocol(item) for item in found if is_image_file(item) and filesystem.isfile(item)]
    if not images:
        raise ValueError(f"{url}: names no image files")
    return images


def _read_image(source: str) -> Any:
    from .image_utils import load_image, load_image_bytes

    if not _is_url(source):
        return load_image(source)
    import fsspec

    try:
        with fsspec.open(source, "rb") as handle:
            content = handle.read()
    except OSError as error:
        raise OSError(f"Image URL '{source}' cannot be read ({error})") from error
    return load_image_bytes(content, f"Image URL '{source}'")


def decode_images(batch: dict[str, Any], image_processor: Any) -> dict[str, Any]:
    """Ray Data task: read and preprocess a batch of images; an unreadable one gets zeros and an `error`.

    Args:
        batch: columns `index`, `shard`, `image_path` (numpy arrays).
        image_processor: the model's `CoPSImageProcessor`.

    Returns:
        The batch plus `pixel_values` `[B, 3, S, S]` float32, `original_size` `[B, 2]` (height, width) and `error`
        ("" when the image was read).
    """
    import numpy as np

    size = image_processor.size
    pixel_values = np.zeros((len(batch[IMAGE_PATH]), 3, size, size), dtype=np.float32)
    original_sizes = np.zeros((len(batch[IMAGE_PATH]), 2), dtype=np.int64)
    errors = []
    for row, source in enumerate(batch[IMAGE_PATH]):
        try:
            image = _read_image(str(source))
            pixel_values[row] = image_processor(images=[image], return_tensors="np")["pixel_values"][0]
            original_sizes[row] = (image.height, image.width)
            errors.append("")
        except (ValueError, OSError) as error:
            errors.append(str(error))
    return {**batch, "pixel_values": pixel_values, "original_size": original_sizes, ERROR: np.array(errors)}


class ImageScorer:
    """Ray Data actor: one CoPS model, scoring preprocessed batches with the pipeline's seeded noise.

    Args:
        model_name: model folder or Hub id (every actor loads its own copy).
        device, dtype: as for `cops-hf predict`; `None` picks the actor's GPU when Ray gave it one.
        num_threads: torch threads of this actor (CPU workers divide the cores among them).
        image_threshold: threshold of `pred_label` (default: the calibrated one; no label without one).
        maps_dir: folder for the anomaly maps, or `None` to write none.
        seed: seed of the class-token noise (the pipeline's default, 0).
    """

    def __init__(
        self,
        model_name: str,
        device: str | None = None,
        dtype: str | None = None,
        num_threads: int | None = None,
        image_threshold: float | None = None,
        maps_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        import torch

        from .predict import load_model_and_processor

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model, self.processor = load_model_and_processor(model_name, device=device, dtype=dtype)
        self.image_threshold = image_threshold if image_threshold is not None else self.model.config.image_threshold
        self.maps_dir = None if maps_dir is None else Path(maps_dir)
        self.seed = seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Score a decoded batch; rows with an `error` pass through unscored (null score, no label)."""
        import numpy as np
        import torch

        from .modeling_cops import CoPSAnomalyDetectionOutput

        valid = np.flatnonzero(batch[ERROR] == "")
        scores = np.full(len(batch[IMAGE_PATH]), np.nan)
        labels = [""] * len(scores)
        map_files = [""] * len(scores)
        if len(valid):
            device, dtype = self.model.device, self.model.dtype
            pixel_values = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"][valid])).to(device, dtype)
            noise = self.model.seeded_prior_noise(len(valid), self.seed).to(device, dtype)
            with torch.no_grad():
                outputs = self.model(pixel_values=pixel_values, vae_noise=noise)
            sizes = [tuple(size) for size in batch["original_size"][valid].tolist()]
            results = self.processor.post_process_anomaly_detection(
                CoPSAnomalyDetectionOutput(image_scores=outputs.image_scores, anomaly_maps=outputs.anomaly_maps),
                target_sizes=sizes if self.maps_dir is not None else None,
            )
            for row, result in zip(valid, results, strict=True):
                scores[row] = result[PRED_SCORE]
                if self.image_threshold is not None:
                    labels[row] = decision_label(result[PRED_SCORE], self.image_threshold)
                if self.maps_dir is not None:
                    map_files[row] = self._save_map(batch, row, result[ANOMALY_MAP])
        keep = ("index", "shard", IMAGE_PATH, ERROR)
        return {name: batch[name] for name in keep} | {
            PRED_SCORE: scores, PRED_LABEL: np.array(labels), ANOMALY_MAP: np.array(map_files)
        }  # fmt: skip

    def _save_map(self, batch: dict[str, Any], row: int, anomaly_map: Any) -> str:
        import numpy as np

        from .file_utils import atomic_write

        name = f"{int(batch['index'][row]):07d}_{Path(str(batch[IMAGE_PATH][row])).stem}.npy"
        with atomic_write(self.maps_dir / name) as temporary, open(temporary, "wb") as handle:
            np.save(handle, anomaly_map.numpy().astype(np.float32))
        return f"{MAPS_FOLDER}/{name}"


def _manifest(paths: Sequence[str], shard_size: int, model_name: str, maps: bool, threshold: float | None) -> dict:
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    return {
        "num_images": len(paths), "inputs_sha256": digest, "shard_size": shard_size, "model": model_name,
        "anomaly_maps": maps, "image_threshold": threshold,
    }  # fmt: skip


def _check_manifest(output: Path, manifest: dict) -> None:
    """Write the run's manifest, or check that the folder's shards come from the same inputs and settings."""
    from .file_utils import atomic_write, read_json_file

    path = output / MANIFEST_NAME
    if path.is_file():
        recorded = read_json_file(path, "Shard manifest")
        changed = [name for name in manifest if recorded.get(name) != manifest[name]]
        if changed:
            raise ValueError(
                f"{output} holds shards of another run ({', '.join(changed)} differ); give a new --output folder, "
                "or delete its shards to start over"
            )
        return
    output.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(manifest, indent=2) + "\n")


def _actor_pool_size(device: str | None, num_workers: int | None) -> tuple[int, dict[str, float], int | None]:
    """How many scoring actors, the Ray resources of each, and their torch threads.

    On GPUs: one actor per GPU (or `num_workers`). On CPUs: `num_workers` actors (default: one per 4 cores), each
    asking Ray for one CPU (the others stay free for decoding tasks) and using `cores // actors` torch threads.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and (device is None or device.startswith("cuda")):
        return num_workers or gpus, {"num_gpus": 1}, None
    cpus = max(1, int(resources.get("CPU", 1)))
    actors = num_workers or max(1, cpus // 4)
    return actors, {"num_cpus": 1}, max(1, cpus // actors)


def score_images(
    model_name: str | os.PathLike[str],
    sources: Iterable[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    shard_size: int = 1024,
    batch_size: int = 8,
    num_workers: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    image_threshold: float | None = None,
    anomaly_maps: bool = False,
    address: str | None = None,
) -> ScoringSummary:
    """Score images on Ray Data into Parquet shards; resumable (see the module docstring).

    Each shard has one row per image, in input order: `image_path`, `pred_score` (null for an unreadable image),
    `pred_label` (when an image threshold is known: the argument or the calibrated one), `anomaly_map` (the map
    file under `maps/`, with `anomaly_maps`) and `error` (empty when the image was read).

    Args:
        model_name: model folder or Hub id; every actor loads it (on a cluster, a path all nodes can read).
        sources: image files, folders, glob patterns or fsspec URLs (see `expand_sources`).
        output_dir: folder of `shard-NNNNN.parquet`, `manifest.json` and `maps/`.
        shard_size: images per shard (the unit of resumption).
        batch_size: images per forward pass of an actor.
        num_workers: scoring actors (default: one per GPU, else one per 4 CPU cores).
        device, dtype: the actors' device and precision (default: the GPU Ray gives an actor, fp32).
        image_threshold: threshold of `pred_label` (default: the calibrated one).
        anomaly_maps: write each map as a float32 `.npy` file at the image's size.
        address: the Ray cluster to join ("auto", "ray://host:10001", ...); default: the running Ray instance,
            else a new local one.

    Raises:
        ValueError: no images, bad sizes, or an output folder holding shards of another run.
    """
    if shard_size < 1 or batch_size < 1 or (num_workers is not None and num_workers < 1):
        raise ValueError(f"shard_size, batch_size and num_workers must be >= 1; got {shard_size}, {batch_size}, "
                         f"{num_workers}")  # fmt: skip
    try:
        import ray
    except ImportError as error:
        raise ImportError(RAY_EXTRA_HINT) from error

    from .configuration_cops import CoPSConfig
    from .hub import friendly_hub_errors
    from .predict import load_processor

    paths = expand_sources(sources)
    output = Path(output_dir)
    model_name = os.fspath(model_name)
    with friendly_hub_errors(model_name):
        config = CoPSConfig.from_pretrained(model_name)
    processor = load_processor(model_name, config.image_size)
    with_labels = (image_threshold if image_threshold is not None else config.image_threshold) is not None
    _check_manifest(output, _manifest(paths, shard_size, model_name, anomaly_maps, image_threshold))
    summary = ScoringSummary(output_dir=output, num_images=len(paths))
    num_shards = -(-len(paths) // shard_size)
    summary.shard_paths = [output / SHARD_PATTERN.format(shard) for shard in range(num_shards)]
    pending = [shard for shard in range(num_shards) if not summary.shard_paths[shard].is_file()]
    summary.skipped_shards = num_shards - len(pending)
    if not pending:
        return summary
    if anomaly_maps:
        (output / MAPS_FOLDER).mkdir(exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    items = [
        {"index": index, "shard": shard, IMAGE_PATH: paths[index]}
        for shard in pending
        for index in range(shard * shard_size, min((shard + 1) * shard_size, len(paths)))
    ]
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in input order: shards complete one by one
    actors, resources, threads = _actor_pool_size(device, num_workers)
    scored = (
        ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch_size)))
        # Half a CPU per decoding task: besides packing two per core, resources unlike the actors' keep Ray from
        # fusing decoding into the scoring actors, so it runs in tasks of its own.
        .map_batches(decode_images, batch_size=batch_size, num_cpus=0.5,
                     fn_kwargs={"image_processor": processor.image_processor})  # fmt: skip
        .map_batches(
            ImageScorer, batch_size=batch_size, concurrency=actors, **resources,
            fn_constructor_kwargs={
                "model_name": model_name, "device": device, "dtype": dtype, "num_threads": threads,
                "image_threshold": image_threshold,
                "maps_dir": str(output / MAPS_FOLDER) if anomaly_maps else None,
            },
        )
    )  # fmt: skip
    for shard, rows in _rows_by_shard(scored.iter_rows()):
        _write_shard(summary.shard_paths[shard], rows, with_labels=with_labels, with_maps=anomaly_maps)
        failed = [str(row[ERROR]) for row in rows if row[ERROR]]
        summary.num_failed += len(failed)
        summary.num_scored += len(rows) - len(failed)
        summary.errors += failed
    return summary


def _rows_by_shard(rows: Iterable[dict[str, Any]]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Group consecutive rows (in input order) by their shard."""
    current: list[dict[str, Any]] = []
    for row in rows:
        if current and row["shard"] != current[0]["shard"]:
            yield int(current[0]["shard"]), current
            current = []
        current.append(row)
    if current:
        yield int(current[0]["shard"]), current


def _write_shard(path: Path, rows: list[dict[str, Any]], *, with_labels: bool, with_maps: bool) -> None:
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .file_utils import atomic_write

    columns: dict[str, list] = {
        IMAGE_PATH: [str(row[IMAGE_PATH]) for row in rows],
        PRED_SCORE: [None if math.isnan(row[PRED_SCORE]) else float(row[PRED_SCORE]) for row in rows],
    }
    if with_labels:
        columns[PRED_LABEL] = [str(row[PRED_LABEL]) or None for row in rows]
    if with_maps:
        columns[ANOMALY_MAP] = [str(row[ANOMALY_MAP]) or None for row in rows]
    columns[ERROR] = [str(row[ERROR]) for row in rows]
    with atomic_write(path) as temporary:
        pq.write_table(pa.table(columns), temporary)


def read_shards(output_dir: str | os.PathLike[str]) -> Any:
    """All shards of `output_dir` as one `pyarrow.Table`, in input order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = sorted(Path(output_dir).glob("shard-*.parquet"))
    return pa.concat_tables([pq.read_table(shard) for shard in shards], promote_options="default")


__all__ = [
    "MANIFEST_NAME",
    "MAPS_FOLDER",
    "SHARD_PATTERN",
    "ImageScorer",
    "ScoringSummary",
    "decode_images",
    "expand_sources",
    "read_shards",
    "score_images",
]

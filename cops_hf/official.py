r"""The official CoPS detectors in one call: downloaded, verified, converted.

The reference release (github cqylunlun/CoPS) publishes two checkpoints of the CoPS modules, both on CLIP
ViT-L/14@336px:

* ``"visa"``: ``results/models/visa/epoch_10.pth``, trained on VisA, meant for testing on every other dataset
  (general test preset);
* ``"mvtec"``: ``results/models/mvtec/epoch_5.pth``, trained on MVTec AD, meant for testing on VisA (VisA test
  preset).

`load_official` takes the CLIP from the Hugging Face Hub (``openai/clip-vit-large-patch14-336`` through
``CLIPModel.from_pretrained``, so ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, the cache and ``revision=`` work as
everywhere) and the checkpoint from the reference repository's raw files, under a base URL that
``COPS_OFFICIAL_BASE_URL`` or ``base_url=`` overrides (for mirrors). Before it is used, the checkpoint's git blob
SHA-1 (``sha1(b"blob <size>\0" + content)``, the id git and GitHub give the file) must equal the release's; a file
that does not is refused and nothing is kept.

The checkpoint is downloaded as the Hub client downloads: into the Hugging Face assets cache
(``HF_ASSETS_CACHE``, by default ``~/.cache/huggingface/assets/cops_hf/cqylunlun--CoPS/<blob sha1>/``) or under
``cache_dir``, with a progress bar, resuming an interrupted download with an HTTP ``Range`` request, and moved
into place only once complete and verified.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache
from huggingface_hub.utils import WeakFileLock, get_session, hf_raise_for_status, tqdm

from .conversion import VIT_L14_336_HUB_ID, convert_original_checkpoint
from .file_utils import is_sha1, open_no_follow
from .hub_errors import CoPSHubError, friendly_hub_errors
from .modeling_cops import CoPSForAnomalyDetection
from .processing_cops import CoPSProcessor

OFFICIAL_CLIP = VIT_L14_336_HUB_ID
"""Hub id of the CLIP the official checkpoints were trained on (OpenAI's ViT-L/14@336px, transformers format)."""

OFFICIAL_REPOSITORY = "github.com/cqylunlun/CoPS"
"""Where the official CoPS checkpoints are published."""

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/cqylunlun/CoPS/main"
"""Raw-file root of the reference repository; a checkpoint's URL is ``{base URL}/{its path in the repository}``."""

BASE_URL_ENV = "COPS_OFFICIAL_BASE_URL"
"""Environment variable that replaces `DEFAULT_BASE_URL` (a mirror with the repository's layout)."""

OFFICIAL_IMAGE_SIZE = 518
"""Input size the official checkpoints were trained and tested at."""

MAX_DOWNLOAD_ATTEMPTS = 5
"""How many times one download request is sent (the first and its restarts after a dropped connection) before the
download gives up and deletes what it received."""

_ASSETS_LIBRARY, _ASSETS_NAMESPACE = "cops_hf", "cqylunlun--CoPS"
_BLOB_CHUNK = 1 << 20


@dataclass(frozen=True)
class OfficialRelease:
    """One official CoPS checkpoint of the reference repository.

    Attributes:
        name: ``"visa"`` or ``"mvtec"``.
        path: the file's path in the repository.
        blob_sha1: its git blob SHA-1.
        train_dataset: the auxiliary dataset it was trained on (a ``TRAIN_DATASET_PRESETS`` key).
        test_preset: the test preset it is meant for (a ``TEST_DATASET_PRESETS`` key).
    """

    name: str
    path: str
    blob_sha1: str
    train_dataset: str
    test_preset: str

    @property
    def filename(self) -> str:
        """The checkpoint's file name, e.g. ``epoch_10.pth``."""
        return self.path.rsplit("/", 1)[-1]


OFFICIAL_RELEASES: dict[str, OfficialRelease] = {
    "visa": OfficialRelease(
        "visa", "results/models/visa/epoch_10.pth", "9b658b4cf04d05b69af77c151d22b10b24786fc2", "visa", "general"
    ),
    "mvtec": OfficialRelease(
        "mvtec", "results/models/mvtec/epoch_5.pth", "eddc18e60823ac370a0c43526226fe745c1caf07", "mvtec", "visa"
    ),
}
"""The official checkpoints by name."""


class OfficialReleaseError(OSError):
    """An official file could not be had: not reachable, not cached while offline, or not the published file."""


def official_release(name: str) -> OfficialRelease:
    """The `OfficialRelease` called ``name`` (``"visa"`` or ``"mvtec"``, any case)."""
    key = name.strip().lower()
    if key not in OFFICIAL_RELEASES:
        raise ValueError(f"Unknown official CoPS release {name!r}; choose one of {sorted(OFFICIAL_RELEASES)}.")
    return OFFICIAL_RELEASES[key]


def git_blob_sha1(path: str | os.PathLike) -> str:
    r"""The git blob SHA-1 of a file: ``sha1(b"blob <size>\0" + content)``, read in chunks.

    The file is never read through a symbolic link.
    """
    with open_no_follow(path, "rb") as handle:
        digest = hashlib.sha1(b"blob %d\0" % os.fstat(handle.fileno()).st_size)
        while chunk := handle.read(_BLOB_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checked_sha1(blob_sha1: str | None, spec: OfficialRelease) -> str:
    """``blob_sha1`` in lower case (the release's when None).

    Anything but 40 hex digits is refused, since it names a cache folder.
    """
    if blob_sha1 is None:
        return spec.blob_sha1
    if not is_sha1(blob_sha1):
        raise ValueError(f"The checkpoint SHA-1 (--checkpoint-sha1) must be 40 hex digits, got {blob_sha1!r}.")
    return blob_sha1.lower()


def checkpoint_url(release: str | OfficialRelease, base_url: str | None = None) -> str:
    """The URL of a release's checkpoint under ``base_url``.

    The default base is ``$COPS_OFFICIAL_BASE_URL``, else the reference repository's raw files.
    """
    release = official_release(release) if isinstance(release, str) else release
    base_url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return f"{base_url.rstrip('/')}/{release.path}"


def _cache_folder(blob_sha1: str, cache_dir: str | os.PathLike | None) -> Path:
    """Where a checkpoint with this blob SHA-1 is cached (the layout of ``huggingface_hub.cached_assets_path``)."""
    assets = Path(cache_dir) if cache_dir is not None else Path(constants.HF_ASSETS_CACHE)
    return assets / _ASSETS_LIBRARY / _ASSETS_NAMESPACE / blob_sha1


def cached_official_checkpoint(
    release: str, *, blob_sha1: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path | None:
    """The cached, verified checkpoint of ``release``, or ``None`` when the cache does not hold it."""
    spec = official_release(release)
    blob_sha1 = _checked_sha1(blob_sha1, spec)
    path = _cache_folder(blob_sha1, cache_dir) / spec.filename
    return path if path.is_file() and not path.is_symlink() and git_blob_sha1(path) == blob_sha1 else None


def download_official_checkpoint(
    release: str,
    *,
    base_url: str | None = None,
    blob_sha1: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The verified checkpoint of ``release`` in the cache, downloaded first if needed.

    An interrupted download leaves ``<file>.incomplete`` in the cache folder; the next call verifies it (it may be
    complete) or resumes it with an HTTP ``Range`` request. A dropped connection is resumed, at most
    ``MAX_DOWNLOAD_ATTEMPTS`` requests in all; a server that refuses the range (416) gets one fresh download.
    A downloaded file whose git blob SHA-1 differs from ``blob_sha1`` is deleted and refused, and so is what a
    download that gives up received. Cache files are never opened through a symbolic link.

    Args:
        release: ``"visa"`` or ``"mvtec"``.
        base_url: raw-file root of the repository (default ``$COPS_OFFICIAL_BASE_URL``, else the reference's).
        blob_sha1: the git blob SHA-1 the file must have (default: the published file's).
        cache_dir: assets folder to cache in (default ``HF_ASSETS_CACHE``).

    Raises:
        OfficialReleaseError: offline without the file in the cache, the server could not be reached or answered
            with an error, or the file is not the expected one. Nothing is cached in these cases.
    """
    spec = official_release(release)
    blob_sha1 = _checked_sha1(blob_sha1, spec)
    cached = cached_official_checkpoint(release, blob_sha1=blob_sha1, cache_dir=cache_dir)
    if cached is not None:
        return cached
    url = checkpoint_url(spec, base_url)
    if is_offline_mode():
        raise OfficialReleaseError(f"{url} is not cached and HF_HUB_OFFLINE=1 forbids downloading it.")
    folder = _cache_folder(blob_sha1, cache_dir)
    target = folder / spec.filename
    incomplete = folder / f"{spec.filename}.incomplete"
    with _created_folder(folder), WeakFileLock(folder / f"{spec.filename}.lock"):
        if cached_official_checkpoint(release, blob_sha1=blob_sha1, cache_dir=cache_dir) is not None:
            return target  # another process finished it while this one waited for the lock
        try:
            verified = incomplete.is_file() and git_blob_sha1(incomplete) == blob_sha1  # killed after the last byte
            if not verified:
                _download(url, incomplete, spec.filename)
        except (OSError, httpx2.HTTPError) as error:
            if not incomplete.is_symlink() and (incomplete.is_file() and incomplete.stat().st_size == 0):
                incomplete.unlink()  # nothing to resume from
            reason = str(error).splitlines()[0]
            raise OfficialReleaseError(
                f"Could not download {url}: {reason}. Check the connection, or set {BASE_URL_ENV} to a mirror."
            ) from error
        actual = git_blob_sha1(incomplete)
        if actual != blob_sha1:
            incomplete.unlink()
            raise OfficialReleaseError(
                f"{url} is not the published {spec.filename}: its git blob SHA-1 is {actual}, expected {blob_sha1}. "
                "The file was refused and nothing was cached; check the base URL (a mirror serving another file?) "
                "and try again."
            )
        os.replace(incomplete, target)
    return target


class _RangeNotSatisfiable(OSError):
    """The server answered 416 to a resumed download: what the cache holds does not fit the file it serves."""


def _download(url: str, incomplete: Path, filename: str) -> None:
    """Append ``url``'s bytes to ``incomplete``, resuming after dropped connections.

    At most ``MAX_DOWNLOAD_ATTEMPTS`` requests are sent. A 416 answer discards the partial file and starts over
    once. When the download gives up, the partial file is deleted: nothing is left behind.
    """
    restarted = False
    for attempt in range(1, MAX_DOWNLOAD_ATTEMPTS + 1):
        try:
            with open_no_follow(incomplete, "ab") as handle:
                _request_into(url, handle, filename)
            return
        except _RangeNotSatisfiable:
            if restarted:
                incomplete.unlink(missing_ok=True)
                raise
            restarted = True
            incomplete.unlink()
        except httpx2.TransportError as error:  # dropped, timed out, refused
            if attempt == MAX_DOWNLOAD_ATTEMPTS:
                incomplete.unlink(missing_ok=True)
                raise OSError(
                    f"the connection dropped {attempt} times ({str(error).splitlines()[0] or type(error).__name__}); "
                    "gave up and deleted the partial file"
                ) from error
    incomplete.unlink(missing_ok=True)
    raise OSError(f"no complete download in {MAX_DOWNLOAD_ATTEMPTS} requests; gave up and deleted the partial file")


def _request_into(url: str, handle: Any, filename: str) -> None:
    """One GET of ``url`` appended to ``handle`` (an append-mode file), asking only for the bytes it lacks.

    A server that sends the whole file instead (200 to a ``Range`` request) has the partial content replaced.
    """
    offset = handle.tell()
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
    with get_session().stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as response:
        if response.status_code == 416:
            raise _RangeNotSatisfiable(f"the server refused to resume from byte {offset} (416)")
        hf_raise_for_status(response)
        if offset and response.status_code != 206:  # the Range was ignored: the body is the whole file
            handle.seek(0)
            handle.truncate()
            offset = 0
        length = response.headers.get("Content-Length", "")
        total = offset + int(length) if length.isdigit() else None
        bar = {"total": total, "initial": offset, "unit": "B", "unit_scale": True, "desc": filename}
        with tqdm(**bar, disable=None) as progress:  # None: no bar when stderr is not a terminal
            for chunk in response.iter_bytes():  # as they arrive: a dropped connection keeps what came
                handle.write(chunk)
                progress.update(len(chunk))
    if total is not None and handle.tell() != total:
        raise httpx2.RemoteProtocolError(f"the server sent {handle.tell() - offset} of {total - offset} bytes")


@contextmanager
def _created_folder(folder: Path) -> Iterator[None]:
    """Create ``folder`` (and missing parents) for the block.

    What was created is removed if the block ends with no checkpoint or partial download in it, so that a refused or
    failed download leaves nothing in the cache.
    """
    missing = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        if not any(path.suffix != ".lock" for path in folder.iterdir()):
            for path in folder.glob("*.lock"):
                path.unlink(missing_ok=True)
            for created in missing:  # deepest first
                if created.is_dir() and not any(created.iterdir()):
                    shutil.rmtree(created, ignore_errors=True)


def load_official(
    release: str = "visa",
    *,
    clip: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    blob_sha1: str | None = None,
    image_size: int = OFFICIAL_IMAGE_SIZE,
    **cops_fields: Any,
) -> tuple[CoPSForAnomalyDetection, CoPSProcessor]:
    """The official CoPS detector ``release`` and its processor, ready for inference.

    Args:
        release: ``"visa"`` (trained on VisA, for testing on other datasets) or ``"mvtec"`` (trained on MVTec AD,
            for testing on VisA).
        clip: the CLIP to build on: a Hub id (default `OFFICIAL_CLIP`), a transformers CLIP folder or an
            OpenAI CLIP file.
        revision: the CLIP's Hub revision (branch, tag or commit sha).
        cache_dir: cache folder for both files (default: the Hub cache for the CLIP, ``HF_ASSETS_CACHE`` for the
            checkpoint).
        base_url: raw-file root of the reference repository (default ``$COPS_OFFICIAL_BASE_URL``, else GitHub's).
        blob_sha1: git blob SHA-1 the checkpoint must have (default: the published file's).
        image_size: input size in pixels (the release's 518 by default).
        **cops_fields: other `CoPSConfig` fields.

    Returns:
        ``(model, processor)``: the model in eval mode, with the release's test and training presets applied and
        recorded in its config with its provenance (``test_preset``, ``train_preset``, ``train_dataset``,
        ``source_checkpoint``, ``clip_model_id``).

    Raises:
        OfficialReleaseError: a file is unavailable (offline and not cached, unreachable) or not the published one.
    """
    spec = official_release(release)
    clip = clip or OFFICIAL_CLIP
    url = checkpoint_url(spec, base_url)
    checkpoint = None
    try:
        checkpoint = download_official_checkpoint(
            spec.name, base_url=base_url, blob_sha1=blob_sha1, cache_dir=cache_dir
        )
        with friendly_hub_errors(clip):
            model = convert_original_checkpoint(
                clip, checkpoint, clip_kwargs={"revision": revision, "cache_dir": cache_dir},
                image_size=image_size, **cops_fields,
            )  # fmt: skip
    except (OSError, CoPSHubError) as error:
        if not is_offline_mode():
            raise
        cached = {clip: _clip_is_cached(clip, revision, cache_dir), url: checkpoint is not None}
        missing = " and ".join(name for name, present in cached.items() if not present) or "a file"
        raise OfficialReleaseError(
            f"HF_HUB_OFFLINE=1 and {missing} is not cached: the official {spec.name} detector needs {clip} "
            f"(Hugging Face Hub) and {url}. Connect once without HF_HUB_OFFLINE to cache them, or convert local "
            f"copies: cops-hf convert --clip ViT-L-14-336px.pt --checkpoint {spec.filename} --output DIR"
        ) from error
    model.config = model.config.with_preset(test_dataset=spec.test_preset, train_dataset=spec.train_dataset)
    model.config.source_checkpoint = f"{OFFICIAL_REPOSITORY}/{spec.path}@{_checked_sha1(blob_sha1, spec)}"
    model.config.train_dataset = spec.train_dataset
    return model, CoPSProcessor.for_image_size(model.config.image_size)


def _clip_is_cached(clip: str, revision: str | None, cache_dir: str | os.PathLike | None) -> bool:
    """Whether a CLIP loads without the network: a local path, or its configuration in the Hub cache."""
    if Path(clip).exists():
        return True
    return isinstance(try_to_load_from_cache(clip, "config.json", cache_dir=cache_dir, revision=revision), str)


__all__ = [
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "MAX_DOWNLOAD_ATTEMPTS",
    "OFFICIAL_CLIP",
    "OFFICIAL_IMAGE_SIZE",
    "OFFICIAL_RELEASES",
    "OfficialRelease",
    "OfficialReleaseError",
    "cached_official_checkpoint",
    "checkpoint_url",
    "download_official_checkpoint",
    "git_blob_sha1",
    "load_official",
    "official_release",
]

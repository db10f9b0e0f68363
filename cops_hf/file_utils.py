"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; once the block succeeds, move the file written there into place.

    The temporary file is flushed to disk and made world-readable (0o644, as `open` would) before one `os.replace`,
    so readers see either the old file or the complete new one. When the block raises, the temporary file is
    removed and `path` is left as it was.

    Example::

        with atomic_write(root / "meta.json") as temporary:
            temporary.write_text(json.dumps(meta))
    """
    path = Path(path)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def named_write_failures(target: str | os.PathLike[str], kept: str) -> Iterator[None]:
    """Turn a failed write inside the block (disk full, quota, read-only folder) into one `OSError` naming `target`.

    `kept` says what the failure left intact and what to do, e.g. "the last complete checkpoint ... is kept".
    torch and safetensors report a failed write as `RuntimeError` / `SafetensorError`; the block must only write.
    """
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        raise OSError(f"could not write {target} ({reason}); {kept}") from error


STAGING_PREFIX = ".staging-"
"""Name prefix of the folders `staged_folder` writes in before moving them into place (left only by a crash)."""


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """Flush every file below `folder`, then the folders themselves, to disk."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), key=lambda path: len(path.parts), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as written:
                os.fsync(written.fileno())
        elif path.is_dir():
            fsync_folder(path)
    fsync_folder(folder)


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_folder(complete: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move the `complete` folder to `target` (same file system) by renames; an existing `target` is deleted after.

    The old `target` is first renamed aside, so it is never deleted before the new one is in place.
    """
    complete, target = Path(complete), Path(target)
    if target.exists():
        retired = target.with_name(f"{STAGING_PREFIX}{target.name}-old-{secrets.token_hex(4)}")
        os.replace(target, retired)
        os.replace(complete, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(complete, target)
    fsync_folder(target.parent)


@contextmanager
def staged_folder(target: str | os.PathLike[str], *, into_existing: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; once the block succeeds, flush it to disk and move its content into place.

    By default the staging folder lies beside `target` and replaces it as a whole (`replace_folder`): readers see
    the old folder or the new one, never a mix, and when the block raises (a full disk, say) `target` is left as it
    was. With `into_existing`, `target` is a folder that keeps other files (a training run): the staging folder lies
    inside it and each staged file replaces its namesake with one rename.

    Example::

        with staged_folder(output_dir) as staging:
            model.save_pretrained(staging)
    """
    target = Path(target)
    home = target if into_existing else target.parent
    home.mkdir(parents=True, exist_ok=True)
    staging = home / f"{STAGING_PREFIX}{target.name}-{secrets.token_hex(4)}"
    staging.mkdir()  # mode from the umask, as the folder it becomes should have
    try:
        yield staging
        fsync_tree(staging)
        if into_existing:
            for path in staging.iterdir():
                destination = target / path.name
                if destination.is_dir() and not destination.is_symlink():
                    shutil.rmtree(destination)
                os.replace(path, destination)
            fsync_folder(target)
        else:
            replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json_file(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """The parsed content of a JSON file; a missing, unreadable or malformed file is one `ValueError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ValueError(f"{what} '{path}' cannot be read as JSON: {reason}.") from error


__all__ = [
    "STAGING_PREFIX",
    "atomic_write",
    "fsync_folder",
    "fsync_tree",
    "named_write_failures",
    "read_json_file",
    "replace_folder",
    "staged_folder",
]

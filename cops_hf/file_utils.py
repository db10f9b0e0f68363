"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from safetensors import SafetensorError

logger = logging.getLogger(__name__)


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


FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a CSV cell as a formula (CSV injection)."""


def formula_safe_cell(value: Any) -> Any:
    """`value` with a leading `'` when it is text a spreadsheet would run as a formula, else unchanged.

    Text of two or more characters starting with one of `FORMULA_TRIGGERS` is neutralised, unless it is a plain
    number (`-0.5`, `+1e-3`), which no spreadsheet runs; numbers and other types are kept as they are.
    """
    if not isinstance(value, str) or len(value) < 2 or not value.startswith(FORMULA_TRIGGERS):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


class _FormulaSafeRows:
    """A `csv.writer` whose every cell passes `formula_safe_cell` first."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def writerow(self, row: Iterable[Any]) -> Any:
        return self._writer.writerow([formula_safe_cell(value) for value in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def csv_writer(handle: IO[str]) -> Any:
    """`csv.writer(handle)` whose cells are neutralised by `formula_safe_cell`: every CSV cops-hf writes uses it."""
    return _FormulaSafeRows(csv.writer(handle))


def csv_dict_writer(handle: IO[str], fieldnames: Sequence[str]) -> csv.DictWriter:
    """`csv.DictWriter(handle, fieldnames)` whose cells (header included) are neutralised by `formula_safe_cell`."""
    writer = csv.DictWriter(handle, fieldnames=fieldnames)
    writer.writer = _FormulaSafeRows(writer.writer)
    return writer


MAX_FILENAME_BYTES = 255
"""The longest file name (in UTF-8 bytes) common file systems accept."""


def bounded_filename(stem: str, suffix: str, max_bytes: int = MAX_FILENAME_BYTES) -> str:
    """`stem + suffix`, or, when that is over `max_bytes` UTF-8 bytes, a shortened stem with a hash of the whole one.

    The shortened name is the stem's first characters, `-`, then 12 hex digits of the SHA-256 of `stem`, so two long
    names sharing a prefix stay apart.
    """
    name = stem + suffix
    if len(name.encode()) <= max_bytes:
        return name
    tag = "-" + hashlib.sha256(stem.encode()).hexdigest()[:12]
    budget = max_bytes - len((tag + suffix).encode())
    prefix = stem.encode()[:budget].decode(errors="ignore")  # no half of a multi-byte character
    return prefix + tag + suffix


_SHA1 = re.compile(r"[0-9a-fA-F]{40}")


def is_sha1(text: str) -> bool:
    """Whether `text` is a SHA-1 in hex: exactly 40 hex digits (it is safe as a path component then)."""
    return isinstance(text, str) and _SHA1.fullmatch(text) is not None


@contextmanager
def open_no_follow(path: str | os.PathLike[str], mode: str) -> Iterator[IO[bytes]]:
    """`open(path, mode)` for a binary `mode` (`"rb"`, `"ab"`, `"wb"`), refusing a `path` that is a symbolic link.

    Cache files are opened with it: a link planted in a cache folder must not get data written through it to the file
    it points to. A link is an `OSError` naming `path`.
    """
    flags = {
        "rb": os.O_RDONLY,
        "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    }
    try:
        descriptor = os.open(path, flags[mode] | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0), 0o644)
    except OSError as error:
        if os.path.islink(path):
            raise OSError(f"{path} is a symbolic link, which a cache file must not be; delete it") from error
        raise
    with os.fdopen(descriptor, mode) as handle:
        yield handle


LOCK_FILENAME = ".cops-hf.lock"
"""The file that marks a folder as being written by one process; it holds that process's PID."""


class FolderLockedError(ValueError):
    """Another live process holds a folder's `LOCK_FILENAME`."""


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def acquire_folder_lock(folder: str | os.PathLike[str], what: str = "run") -> Path:
    """Mark `folder` (created if needed) as written by this process: `LOCK_FILENAME` with this process's PID.

    A lock left by a process that no longer runs (killed, crashed) is taken over, with a warning.

    Args:
        what: what holds the lock, for the message (e.g. "cops-hf train").

    Returns:
        The lock file, for `release_folder_lock`.

    Raises:
        FolderLockedError: a live process holds the lock; the message names its PID and the lock file.
    """
    lock = Path(folder) / LOCK_FILENAME
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a stale lock is replaced once; losing that race to a live process is a refusal
        try:
            descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # fails on anything there
            with os.fdopen(descriptor, "w") as handle:
                handle.write(str(os.getpid()))
            return lock
        except FileExistsError:
            text = lock.read_text(errors="replace").strip() if lock.is_file() else ""
            if text.isdigit() and int(text) != os.getpid() and _process_is_alive(int(text)):
                raise FolderLockedError(
                    f"{folder} is being written by another {what} (PID {text}): wait for it to end, or choose another "
                    f"output folder; if no such process runs, delete {lock}."
                ) from None
            logger.warning("Taking over %s: the process that wrote it (%s) no longer runs.", lock, text or "no PID")
            lock.unlink(missing_ok=True)
    raise FolderLockedError(f"{folder} is being locked by another {what} at the same moment; try again.")


def release_folder_lock(lock: Path) -> None:
    """Remove a lock `acquire_folder_lock` took, if it still holds this process's PID."""
    try:
        if lock.read_text().strip() == str(os.getpid()):
            lock.unlink()
    except OSError:
        pass  # already gone


__all__ = [
    "FORMULA_TRIGGERS",
    "LOCK_FILENAME",
    "MAX_FILENAME_BYTES",
    "STAGING_PREFIX",
    "FolderLockedError",
    "acquire_folder_lock",
    "atomic_write",
    "bounded_filename",
    "csv_dict_writer",
    "csv_writer",
    "formula_safe_cell",
    "fsync_folder",
    "fsync_tree",
    "is_sha1",
    "named_write_failures",
    "open_no_follow",
    "read_json_file",
    "release_folder_lock",
    "replace_folder",
    "staged_folder",
]

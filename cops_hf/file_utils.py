"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import json
import os
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


def read_json_file(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """The parsed content of a JSON file; a missing, unreadable or malformed file is one `ValueError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError as error:
        raise ValueError(f"{what} '{path}' cannot be read as JSON: it is nested too deeply.") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ValueError(f"{what} '{path}' cannot be read as JSON: {reason}.") from error


__all__ = ["atomic_write", "read_json_file"]

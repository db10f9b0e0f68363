"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


__all__ = ["atomic_write"]

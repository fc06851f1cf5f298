"""Atomic files: a reader (or a run started again after a kill) sees the old file or the new one,
never half of one. Used by the engine's checkpoints, the store and run directories; imports
nothing of the project."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

# mkstemp makes 0600 files; what we write gets the mode any new file would (0666 less the umask).
_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file in the target's folder; on success fsync it and rename it over
    ``path``; on error remove it and leave ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def read_json(path: str | os.PathLike) -> Any:
    """The file's JSON, or None when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: str | os.PathLike, data: Mapping) -> None:
    """Atomically, as :func:`atomic_open`."""
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)

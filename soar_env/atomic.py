"""The one atomic file write of the library.

Run directories, checkpoints, job files and caches are rewritten while a run may be killed
at any moment; every writer goes through here so that a reader sees either the old file or
the new one, never half of either.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, BinaryIO


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(stream)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The temporary file lives in the same folder so that the rename stays on one file system
    (and is atomic); it is removed if ``write`` raises, leaving the old ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def atomic_torch_save(payload: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(payload)`` to ``path`` atomically: a crash mid-save leaves the previous checkpoint."""
    import torch  # the library imports torch lazily so that config and CLI parsing stay fast

    atomic_write(path, lambda stream: torch.save(payload, stream))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        handle = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)

"""Safe file output: checks made before any work starts, and writes that never leave a torn file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UsageError

__all__ = ["check_output_path", "atomic_write_text", "atomic_write_bytes"]


def check_output_path(path, *, overwrite: bool = False, what: str = "output") -> Path:
    """Refuse, with a one-line error, an output whose directory is missing or which would replace a file."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{what} directory does not exist: {parent}")
    if path.is_dir():
        raise UsageError(f"{what} path is a directory: {path}")
    if path.exists() and not overwrite:
        raise UsageError(f"{what} file already exists: {path} (pass --overwrite to replace it)")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what} directory is not writable: {parent}")
    return path


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))

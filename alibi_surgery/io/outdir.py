"""The rules of an output directory (``out`` of repair, generate and the demo): never the input, inside it or
holding it; new or empty unless the caller resumes or overwrites; not locked by another run; writable. Emptying it
keeps the lock this run holds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import UsageError
from .files import writing
from .lock import LOCK_NAME, lock_holder

__all__ = ["check_out_dir", "clear_dir"]


def check_out_dir(out, model_dir: Path, *, resume: bool, overwrite: bool, can_resume: bool = True) -> Path:
    """Refuse an OUT that is the input or inside it, exists non-empty (unless resume/overwrite), or is unwritable.
    The refusals name the caller's arguments (``out='/x' is not empty: pass resume=True ...``; the CLI words them
    as its flags); ``can_resume=False``: the caller has no ``resume``, so the advice leaves it out."""
    out = Path(out).resolve()
    name = f"out={str(out)!r}"
    model_dir = Path(model_dir).resolve()
    if out == model_dir or model_dir in out.parents or out in model_dir.parents:
        raise UsageError(f"{name} is the input model directory, inside it or holds it: the input is never "
                         f"written to")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{name} exists and is not a directory")
    holder = lock_holder(out)
    if holder is not None:
        raise UsageError(f"{name} is in use by another run ({holder}); wait for it to finish or choose another "
                         f"directory")
    if out.exists() and _contents(out) and not (resume or overwrite):
        advice = "pass resume=True to continue or overwrite=True to start again" if can_resume else \
            "pass overwrite=True to start again"
        raise UsageError(f"{name} is not empty: {advice}")
    parent = out if out.exists() else next(p for p in out.parents if p.exists())
    if not parent.is_dir():
        raise UsageError(f"{name} is not writable: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{name} is not writable: no write permission on {parent}")
    return out


def _contents(directory: Path) -> list[Path]:
    """What ``directory`` holds, less the lock file."""
    return [p for p in directory.iterdir() if p.name != LOCK_NAME]


def clear_dir(directory: Path) -> None:
    """Empty ``directory`` for a fresh start (``overwrite``), keeping the lock this run holds on it."""
    with writing(directory, "directory"):
        for p in _contents(directory):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

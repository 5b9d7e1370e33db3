"""Freed memory back to the operating system between the attention and the MLP of each block (CPU, glibc).

glibc serves a request of at least its mmap threshold with its own ``mmap`` and unmaps it when freed; but each
freed mapping raises the threshold to its size (up to 32 MiB on 64-bit), so later blocks come from the heap, and the
heap keeps what is freed. In a diagnosis forward the attention's temporaries (the fused QKV, the backend's
contiguous copies and score tiles, the context) are freed before the MLP allocates its own, larger ones, which
cannot reuse them: resident memory then holds both, about 30% over the live tensors at 16k tokens on a tiny BLOOM
(docs/scale.md), although no tensor is alive to need it. :func:`release_after` calls ``malloc_trim(0)`` after each
call of the given modules, which gives the free pages of the whole heap back (glibc >= 2.8), so the MLP's peak
stands on the live tensors only.

Limits: glibc on Linux only (elsewhere :func:`release_freed` does nothing and returns False); the pages given back
are faulted in again when reused (no measurable cost at 16k tokens: docs/scale.md). Fixing the mmap threshold
instead (``mallopt``) was measured and not adopted: at 128 KiB it saved as much and made a 16k diagnosis 2.3x
slower; at 4 MiB 10-30% slower.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys

__all__ = ["release_freed", "release_after"]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed() -> bool:
    """Give the C heap's free pages back to the operating system (``malloc_trim(0)``); True if any were."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


@contextlib.contextmanager
def release_after(modules, enabled: bool = True):
    """Within the block, :func:`release_freed` runs after every forward call of each of ``modules`` (nothing when
    not ``enabled``, or without glibc)."""
    if not enabled or _malloc_trim() is None:
        yield
        return

    def hook(*_):  # returns None: the module's output stays as it is
        release_freed()

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

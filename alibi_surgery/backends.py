"""Backend choice for ALiBi attention: ``auto``, ``triton``, ``torch`` or ``eager``.

* ``triton``: the fused kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
* ``torch``: the blocked plain-torch twin of the kernel; any device, O(T * block) memory.
* ``eager``: transformers' own ``BloomAttention.forward``, untouched.
* ``auto``: ``triton`` on CUDA, ``torch`` elsewhere.
"""

from __future__ import annotations

import torch

from .errors import UsageError
from .kernels import alibi_attention_blocked, alibi_attention_fwd
from .kernels.autograd import alibi_attention_train
from .kernels.attention_fwd import interpreting

BACKENDS = ("auto", "triton", "torch", "eager")

__all__ = ["BACKENDS", "check_backend", "resolve_backend", "alibi_attention"]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete backend for ``device`` and check that the choice can run there."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise UsageError(f"the triton backend needs a CUDA device (got {device.type}); use --backend torch on CPU")
    return backend


def alibi_attention(q, k, v, key_pos, slopes, backend: str, **stats_options):
    """Run fused ALiBi attention with a concrete backend (``triton`` or ``torch``); see ``alibi_attention_fwd``.

    Returns ``(out, lse, stats)``. When autograd records (q, k or v requires grad) the call goes through
    :class:`~alibi_surgery.kernels.autograd.AlibiAttention` and ``lse`` is None (it is kept for the backward).
    """
    if backend not in ("triton", "torch"):
        raise ValueError(f"alibi_attention needs the triton or torch backend, got {backend!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, stats = alibi_attention_train(q, k, v, key_pos, slopes, backend, **stats_options)
        return out, None, stats
    if backend == "triton":
        return alibi_attention_fwd(q, k, v, key_pos, slopes, **stats_options)
    return alibi_attention_blocked(q, k, v, key_pos, slopes, **stats_options)

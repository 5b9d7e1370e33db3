"""Backend choice for ALiBi attention: ``auto``, ``triton``, ``torch`` or ``eager``.

* ``triton``: the fused kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), for the head dims
  :func:`~alibi_surgery.kernels.attention_fwd.kernel_supports` accepts (a multiple of 16 from 16 to 128).
* ``torch``: the blocked plain-torch twin of the kernel; any device, any head dim, O(T * block) memory.
* ``eager``: transformers' own ``BloomAttention.forward``, untouched.
* ``auto``: ``triton`` on CUDA, ``torch`` elsewhere, and ``torch`` (with a warning) on CUDA for a head dim the
  kernel does not support.
"""

from __future__ import annotations

import warnings

import torch

from ..errors import UsageError
from ..kernels import alibi_attention_blocked, alibi_attention_fwd
from ..kernels.autograd import alibi_attention_train
from ..kernels.attention_fwd import SUPPORTED_HEAD_DIMS, interpreting, kernel_supports

BACKENDS = ("auto", "triton", "torch", "eager")
_needs = f"the triton backend needs head_dim to be {SUPPORTED_HEAD_DIMS}"

__all__ = ["BACKENDS", "check_backend", "check_triton_head_dim", "resolve_backend", "alibi_attention"]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def check_triton_head_dim(head_dim: int) -> None:
    """UsageError (one line) when the triton backend cannot run a model with this head_dim."""
    if kernel_supports(head_dim) is not None:
        raise UsageError(f"{_needs}; this model has head_dim {head_dim}; use --backend torch")


def resolve_backend(backend: str, device: torch.device, head_dim: int | None = None) -> str:
    """Turn ``auto`` into a concrete backend for ``device`` and check that the choice can run there.

    With ``head_dim`` given, the kernel's limit is checked first: ``triton`` refuses an unsupported head dim
    (UsageError), ``auto`` on CUDA falls back to ``torch`` with a UserWarning. Without it, no head-dim check.
    """
    check_backend(backend)
    if head_dim is not None and backend in ("auto", "triton") and kernel_supports(head_dim) is not None:
        if backend == "triton":
            check_triton_head_dim(head_dim)
        if device.type == "cuda":
            warnings.warn(f"{_needs}; this model has head_dim {head_dim}: falling back to the torch backend",
                          UserWarning, stacklevel=2)
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise UsageError(f"the triton backend needs a CUDA device (got {device.type}); use --backend torch on CPU")
    return backend


def alibi_attention(q, k, v, key_pos, slopes, backend: str, *, softmax_scale: float | None = None,
                    bias_scale: float = 1.0, alibi_bf16: bool = False, **stats_options):
    """Run fused ALiBi attention with a concrete backend (``triton`` or ``torch``); see ``alibi_attention_fwd``.

    The scores are ``softmax_scale * q.k + bias_scale * R(R(slope) * R(pos))`` (``softmax_scale`` None: 1/sqrt(d);
    R rounds to bfloat16 when ``alibi_bf16``, Falcon-RW's bias, else is the identity): BLOOM by default, MPT with its
    ``softmax_scale``, Falcon-RW with ``alibi_bf16=True, bias_scale=softmax_scale=1/sqrt(d)``.
    Returns ``(out, lse, stats)``. When autograd records (q, k or v requires grad) the call goes through
    :class:`~alibi_surgery.kernels.autograd.AlibiAttention` and ``lse`` is None (it is kept for the backward).
    """
    if backend not in ("triton", "torch"):
        raise ValueError(f"alibi_attention needs the triton or torch backend, got {backend!r}")
    score_options = dict(softmax_scale=softmax_scale, bias_scale=bias_scale, alibi_bf16=alibi_bf16)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, stats = alibi_attention_train(q, k, v, key_pos, slopes, backend, **score_options, **stats_options)
        return out, None, stats
    if backend == "triton":
        return alibi_attention_fwd(q, k, v, key_pos, slopes, **score_options, **stats_options)
    return alibi_attention_blocked(q, k, v, key_pos, slopes, **score_options, **stats_options)

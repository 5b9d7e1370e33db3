"""Backend choice for ALiBi attention: ``auto``, ``triton``, ``torch`` or ``eager``.

* ``triton``: the fused kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), for the head dims
  :func:`~alibi_surgery.kernels.attention_fwd.kernel_supports` accepts (a multiple of 16 from 16 to 128).
* ``torch``: the blocked plain-torch twin of the kernel; any device, any head dim, O(T * block) memory.
* ``eager``: transformers' own ``BloomAttention.forward``, untouched.
* ``auto``: ``triton`` on CUDA, ``torch`` elsewhere, and ``torch`` (with a warning) on CUDA for a head dim the
  kernel does not support.
"""

from __future__ import annotations

import sys
import warnings

import torch

from ..errors import UsageError
from ..kernels import ops
from ..kernels.alibi import AttentionOptions, resolve_window
from ..kernels.attention_fwd import SUPPORTED_HEAD_DIMS, interpreting, kernel_positions, kernel_supports

BACKENDS = ("auto", "triton", "torch", "eager")
_needs = f"the triton backend needs head_dim to be {SUPPORTED_HEAD_DIMS}"

__all__ = ["BACKENDS", "check_backend", "check_triton_head_dim", "resolve_backend", "run_attention",
           "run_attention_packed", "row_sums", "run_received"]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def check_triton_head_dim(head_dim: int) -> None:
    """UsageError (one line) when the triton backend cannot run a model with this head_dim."""
    if kernel_supports(head_dim) is not None:
        raise UsageError(f"{_needs}; this model has head_dim {head_dim}; use backend='torch'")


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
        raise UsageError(f"the triton backend needs a CUDA device (got {device.type}); use backend='torch' on CPU")
    return backend


def run_attention(q, k, v, key_pos, slopes, backend: str, *, kstart=None, **options):
    """Fused ALiBi attention with a concrete backend (``triton`` or ``torch``), differentiable in q, k, v.

    q ``[B, H, Tq, d]``, k and v ``[B, Hkv, Tk, d]`` (the kernels' convention; any strides with a unit stride on d;
    Hkv dividing H is grouped-query attention, query head h reading key/value head ``h // (H // Hkv)`` without any
    copy), ``key_pos`` int32 ``[B, Tk]``, ``kstart`` its first real keys (computed when None), ``options`` the
    :class:`~alibi_surgery.kernels.alibi.AttentionOptions`. The scores are ``softmax_scale * q.k + bias_scale *
    R(R(slope) * R(pos))`` (``softmax_scale`` None: 1/sqrt(d); R rounds to bfloat16 when ``alibi_bf16``,
    Falcon-RW's bias): BLOOM by default, MPT with its ``softmax_scale``, Falcon-RW with ``alibi_bf16=True,
    bias_scale=softmax_scale=1/sqrt(d)``; slopes of 0 give plain causal attention. ``window`` (an int >= 1) is a
    sliding window: the row at key index r sees keys r - window < j <= r. Returns ``(out [B, Tq, H, d], lse2
    [B, H, Tq], stats [B, H, 3] or None)``; with ``row_stats``, stats is each row's raw (first-token mass,
    entropy) ``[B, H, Tq, 2]``, differentiable in q, k, v like the output; gradients come back contiguous in ``[B, T, H, d]`` (as ``[B, H, T, d]``
    views), for Hkv = H and no window only: a call that needs them otherwise raises UsageError (forward only).
    """
    return _call(ops.attention, (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), key_pos, kstart, slopes,
                 backend, options)


def run_attention_packed(qkv, layout: str, key_pos, slopes, backend: str, *, kstart=None, **options):
    """:func:`run_attention` over one packed tensor (``layout`` ``"interleaved"``: ``[B, T, H, 3, d]``,
    ``"blocked"``: ``[B, T, 3, H, d]``); its gradient is one contiguous tensor of ``qkv``'s shape."""
    if layout not in ops.LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(ops.LAYOUTS)}, got {layout!r}")
    return _call(ops.attention_packed, (qkv, layout), key_pos, kstart, slopes, backend, options)


def _call(op, inputs, key_pos, kstart, slopes, backend, options):
    if backend not in ("triton", "torch"):
        raise ValueError(f"fused attention needs the triton or torch backend, got {backend!r}")
    o = AttentionOptions(**options)
    window = resolve_window(o.window, sys.maxsize)  # checked here; the operators take 0 for none
    flags = (bool(o.with_stats), bool(o.exclude_first_query), bool(o.normalize_entropy),
             None if o.softmax_scale is None else float(o.softmax_scale), float(o.bias_scale), bool(o.alibi_bf16),
             window, bool(o.row_stats))
    device = inputs[0].device
    key_pos, kstart = kernel_positions(key_pos, kstart, device)
    out, lse, stats = ops.call(op, *inputs, key_pos, kstart, slopes.to(device=device, dtype=torch.float32), backend,
                               *flags)
    return out, lse, (stats if o.with_stats or o.row_stats else None)


def row_sums(rows: torch.Tensor, key_pos: torch.Tensor, exclude_first_query: bool = False,
             normalize_entropy: bool = False) -> torch.Tensor:
    """The per-head sums ``[B, H, 3]`` (first-token mass, entropy, counted rows) that ``with_stats`` returns, from
    the per-row statistics of ``row_stats`` (``[B, H, Tq, 2]``, raw, 0 on padded rows) by torch ops, so that
    gradients flow back into the rows; the same counting and normalisation rules as the kernels
    (:class:`~alibi_surgery.kernels.alibi.AttentionOptions`). ``key_pos`` ``[B, Tk]``: the query rows are its last
    Tq columns."""
    q_len = rows.shape[2]
    qpos = key_pos[:, key_pos.shape[1] - q_len:].to(torch.int64)[:, None, :]  # [B, 1, Tq]
    counted = (qpos > 0) if exclude_first_query else (qpos >= 0)
    first, entropy = rows[..., 0], rows[..., 1]
    if normalize_entropy:
        entropy = torch.where(qpos > 0, entropy / torch.log((qpos + 1).to(torch.float32).clamp_min(2.0)), 0.0)
    weight = counted.to(rows.dtype)
    count = weight.sum(-1).expand(rows.shape[0], rows.shape[1])
    return torch.stack([(first * weight).sum(-1), (entropy * weight).sum(-1), count], -1)


def run_received(q, k, lse, key_pos, slopes, backend: str, *, kstart=None, **options) -> torch.Tensor:
    """The attention each key receives, ``[B, H, Tk]`` float32, summed over the query rows, from q ``[B, H, Tq, d]``,
    k ``[B, Hkv, Tk, d]`` and the forward's ``lse2`` (:mod:`~alibi_surgery.kernels.received`); the score options as
    the forward's (statistics options ignored). No gradient; no window."""
    from ..kernels.received import attention_received, attention_received_blocked

    if backend not in ("triton", "torch"):
        raise ValueError(f"the key-side pass needs the triton or torch backend, got {backend!r}")
    options = {k: v for k, v in options.items() if k in ("softmax_scale", "bias_scale", "alibi_bf16", "window")}
    run = attention_received if backend == "triton" else attention_received_blocked
    return run(q, k, lse, key_pos, slopes.to(device=q.device, dtype=torch.float32), kstart=kstart, **options)

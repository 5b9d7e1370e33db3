"""The drop-in functional API: ``alibi_attention`` and ``alibi_attention_qkvpacked``.

FlashAttention's layout and conventions, with ALiBi as BLOOM defines it::

    out = alibi_attention(q, k, v, slopes=s)                        # q [B, Tq, H, D], k, v [B, Tk, H, D]
    out = flash_attn_func(q, k, v, causal=True, alibi_slopes=s)     # the same attention, FlashAttention's way

``slopes`` is ``[H]`` or ``[B, H]`` (per batch row), as ``alibi_slopes`` takes ``(nheads,)`` or ``(batch, nheads)``,
forward and backward, on both backends (None: BLOOM's slopes for H heads; FlashAttention's default is no ALiBi).

Alignment against ``flash_attn_func`` (``Tq <= Tk``, no padding): the same attention, checked in
tests/attention/test_dropin_parity.py against a float64 reference written from FlashAttention's definition.

* Causal with the last query row aligned to the last key (FlashAttention's bottom-right corner): query row i sits
  at key index ``i + Tk - Tq`` and sees keys ``j <= i + Tk - Tq``. ``Tq < Tk`` is a chunk after a prefix, ``Tq = 1``
  a decode step; ``Tq > Tk`` is refused (FlashAttention would leave the first rows with no key).
* The bias: FlashAttention adds ``-slope * |i + Tk - Tq - j|`` (relative distance); here ``slope * pos_j`` with
  ``pos_j`` the key's position (BLOOM's ``build_alibi_tensor``). On the keys a causal row sees the two differ by
  ``slope * (i + Tk - Tq)``, a per-row constant, which softmax ignores: the outputs and gradients are the same.

Left padding against ``flash_attn_varlen_func``: ``flash_attn_func`` takes no padding mask; FlashAttention packs
sequences of different lengths instead (varlen, ``cu_seqlens``). Here ``attention_mask`` ``[B, Tk]`` marks real
tokens with 1, padding on the left: padded keys are never attended, key positions count real tokens only (the
first real token has position 0), and the query rows are the last Tq tokens of each row. Each row's real rows then
equal that sequence alone, unpadded, with its own ``Tk`` (real keys) and ``Tq`` (real queries) aligned as above,
which is what varlen computes for it. A padded query row outputs 0 and gets no gradient (FlashAttention-2's
convention in transformers; varlen has no such row). These conventions are stated and tested for left padding, the
layout of batched generation; whatever the mask, the query rows are the last Tq columns of it.

Both functions are torch custom operators underneath (:mod:`alibi_surgery.kernels.ops`), so
``torch.compile(fullgraph=True)`` traces them without a graph break, and they are differentiable in q, k, v (or
qkv), with gradients in the inputs' own layout.

``alibi_attention`` also takes grouped-query k and v (``[B, Tk, Hkv, D]`` with Hkv dividing H: query head h reads
key/value head ``h // (H // Hkv)`` in place, nothing is expanded) and ``window=`` (a sliding window of that many
keys, transformers' ``sliding_window``), forward only.

Limits: the backward of grouped-query and sliding-window attention is not implemented (a call that needs gradients
raises UsageError); no dropout, no ``window_size`` pairs, no ``softcap``, no gradient for the slopes; the triton
backend needs a head_dim that is a multiple of 16 up to 128 (``auto`` takes the torch backend otherwise); fp32,
fp16 and bf16. Refusals are one-line UsageErrors that name the Python argument (``slopes``, ``backend='torch'``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import UsageError
from ..kernels.alibi import alibi_slopes, first_real_key, key_positions
from .backends import resolve_backend, row_sums, run_attention, run_attention_packed

__all__ = ["alibi_attention", "alibi_attention_qkvpacked", "AttentionStats"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AttentionStats(NamedTuple):
    """Per-head sums over the valid query rows of each batch row, float32 ``[B, H]`` each: first-token mass (the
    attention on each row's first real key), entropy (natural log) and the number of rows summed. Divide by
    ``rows`` for means. With ``row_stats=True`` also each query row's values, ``[B, H, Tq]`` (0 on padded rows),
    else None.

    When q, k or v require gradients (and grad mode is on), the statistics carry gradients too, computed in the
    attention's own backward pass (no T x T matrix): a loss may use the first-token mass or the entropy, summed or
    per row. ``rows`` is a count and has none."""

    first_token_mass: torch.Tensor
    entropy: torch.Tensor
    rows: torch.Tensor
    first_token_rows: torch.Tensor | None = None
    entropy_rows: torch.Tensor | None = None


def alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                    slopes: torch.Tensor | None = None, softmax_scale: float | None = None,
                    return_stats: bool = False, backend: str = "auto", window: int | None = None,
                    row_stats: bool = False):
    """Causal ALiBi attention of q ``[B, Tq, H, D]`` over k, v ``[B, Tk, Hkv, D]`` (``Tq <= Tk``; Hkv = H, or Hkv
    dividing H: grouped-query attention, forward only).

    Args:
        attention_mask: ``[B, Tk]``, 1 (or True) for real tokens; None: every token is real.
        slopes: float ``[H]``, or ``[B, H]`` (per batch row, as FlashAttention's ``alibi_slopes``), on q's device;
            None: BLOOM's schedule for H heads.
        softmax_scale: the scores' scale; None: ``1 / sqrt(D)``.
        return_stats: also return :class:`AttentionStats`, differentiable when q, k or v require gradients.
        backend: ``auto`` (triton on CUDA, torch elsewhere), ``triton`` or ``torch``.
        window: None, or a sliding window: the query at key index r sees keys r - window < j <= r (forward only).
        row_stats: with ``return_stats``, also each query row's statistics (``first_token_rows``,
            ``entropy_rows``).
    Returns:
        ``out`` ``[B, Tq, H, D]`` in q's dtype, or ``(out, AttentionStats)``.
    """
    batch, _, n_head, head_dim = _check(q, "q")
    k_len, n_kv = _check(v, "v", (batch, None, None, head_dim))[1:3]
    _check(k, "k", (batch, k_len, n_kv, head_dim))  # k as v: [B, Tk, Hkv, D]
    if (n_kv == 0) != (n_head == 0) or (n_kv and n_head % n_kv):
        raise UsageError(f"k and v have {n_kv} heads, which does not divide q's {n_head} (grouped-query attention)")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise UsageError(f"window must be None or an int >= 1, got {window!r}")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise UsageError("q, k and v must share one dtype and one device")
    if q.shape[1] > k_len:
        raise UsageError(f"q has more rows ({q.shape[1]}) than k and v ({k_len}); causal attention needs Tq <= Tk")
    _check_row_stats(return_stats, row_stats)
    if q.numel() == 0:
        return _empty(q, k, v, attention_mask, (batch, k_len), return_stats, row_stats)
    key_pos, kstart, slopes, backend = _prepare(attention_mask, batch, k_len, n_head, head_dim, slopes, backend,
                                                q.device)
    per_row = _per_row(return_stats, row_stats, q, k, v)
    out, _, stats = run_attention(*(t.transpose(1, 2) for t in (q, k, v)), key_pos, slopes, backend, kstart=kstart,
                                  with_stats=return_stats, row_stats=per_row, softmax_scale=softmax_scale,
                                  window=window)
    if not return_stats:
        return out
    return out, (_stats_from_rows(stats, key_pos, row_stats) if per_row else _stats(stats))


def alibi_attention_qkvpacked(qkv: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                              slopes: torch.Tensor | None = None, softmax_scale: float | None = None,
                              return_stats: bool = False, backend: str = "auto", row_stats: bool = False):
    """:func:`alibi_attention` of one packed ``qkv`` ``[B, T, H, 3, D]`` (BLOOM's fused QKV, viewed); its gradient
    is one contiguous tensor of that shape."""
    if qkv.dim() != 5 or qkv.shape[3] != 3:
        raise UsageError(f"qkv must be [batch, seq, heads, 3, head_dim], got shape {list(qkv.shape)}")
    batch, seq, n_head, _, head_dim = qkv.shape
    _check(qkv[:, :, :, 0], "qkv")
    _check_row_stats(return_stats, row_stats)
    if qkv.numel() == 0:
        return _empty(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], attention_mask, (batch, seq), return_stats,
                      row_stats)
    key_pos, kstart, slopes, backend = _prepare(attention_mask, batch, seq, n_head, head_dim, slopes, backend,
                                                qkv.device)
    per_row = _per_row(return_stats, row_stats, qkv)
    out, _, stats = run_attention_packed(qkv, "interleaved", key_pos, slopes, backend, kstart=kstart,
                                         with_stats=return_stats, row_stats=per_row, softmax_scale=softmax_scale)
    if not return_stats:
        return out
    return out, (_stats_from_rows(stats, key_pos, row_stats) if per_row else _stats(stats))


def _check(t: torch.Tensor, name: str, shape: tuple | None = None) -> tuple:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise UsageError(f"{name} must be a 4D tensor [batch, seq, heads, head_dim], got "
                         f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise UsageError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if shape is not None and any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = [{1: "Tk", 2: "heads"}[i] if w is None else w for i, w in enumerate(shape)]
        raise UsageError(f"{name} must be [batch, Tk, heads, head_dim] = {want}, got {list(t.shape)}")
    if t.stride(-1) != 1:
        raise UsageError(f"{name} must have a unit stride on head_dim (call .contiguous())")
    return tuple(t.shape)


def _empty(q, k, v, mask, mask_shape, return_stats, row_stats=False):
    """An empty call (batch, Tq, heads or head_dim 0) returns an empty ``out`` shaped like q (zero statistics), as
    ``scaled_dot_product_attention`` does; its gradients are zeros of the inputs' shapes. The mask is still checked."""
    if mask is not None:
        _check_mask(mask, *mask_shape)
    out = q * 0 + (k.sum() + v.sum()) * 0  # empty, on the autograd graph of q, k and v
    if not return_stats:
        return out
    zeros = torch.zeros(q.shape[0], q.shape[2], dtype=torch.float32, device=q.device)
    per_row = (torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
               for _ in range(2 * row_stats))
    return out, AttentionStats(zeros, zeros.clone(), zeros.clone(), *per_row)


def _check_mask(mask, batch: int, k_len: int) -> None:
    """``attention_mask`` must be ``[batch, Tk]`` of 1/True (real) and 0/False (padding): an additive mask (0 and
    -inf, or large negatives) would otherwise read its -inf entries as real tokens."""
    if not isinstance(mask, torch.Tensor):
        raise UsageError(f"attention_mask must be a tensor [batch, Tk], got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, k_len):
        raise UsageError(f"attention_mask must be [batch, Tk] = {[batch, k_len]}, got {list(mask.shape)}")
    if mask.dtype != torch.bool and not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
        raise UsageError("attention_mask must hold 1 (or True) for real tokens and 0 for padding; it holds other "
                         "values (an additive 0 / -inf mask? pass (mask == 0) instead)")


def _prepare(mask, batch, k_len, n_head, head_dim, slopes, backend, device):
    """``(key_pos, kstart, slopes, concrete backend)`` of one call, after checking mask and slopes."""
    if backend == "eager":
        raise UsageError("alibi_attention takes backend auto, triton or torch")
    backend = resolve_backend(backend, device, head_dim)
    slopes = _default_slopes(n_head, device) if slopes is None else _check_slopes(slopes, batch, n_head, device)
    if mask is None:  # every key real: positions 0..Tk-1, first real key 0 (two ops instead of a mask's six)
        key_pos = torch.arange(k_len, dtype=torch.int32, device=device).expand(batch, k_len)
        return key_pos, torch.zeros(batch, dtype=torch.int32, device=device), slopes, backend
    _check_mask(mask, batch, k_len)
    key_pos = key_positions(mask.to(device=device) != 0)
    return key_pos, first_real_key(key_pos).to(torch.int32), slopes, backend


def _check_slopes(slopes, batch: int, n_head: int, device: torch.device) -> torch.Tensor:
    """``slopes`` as float32, after checking it is a floating-point ``[heads]`` or ``[batch, heads]`` tensor on the
    inputs' device (FlashAttention's ``alibi_slopes``: ``(nheads,)`` or ``(batch, nheads)``)."""
    if not isinstance(slopes, torch.Tensor):
        raise UsageError(f"slopes must be a tensor [heads] or [batch, heads], got {type(slopes).__name__}")
    if tuple(slopes.shape) not in ((n_head,), (batch, n_head)):
        raise UsageError(f"slopes must be [heads] = [{n_head}] or [batch, heads] = [{batch}, {n_head}], got "
                         f"{list(slopes.shape)}")
    if not slopes.dtype.is_floating_point:
        raise UsageError(f"slopes must be a floating-point tensor (float32 is exact), got {slopes.dtype}")
    if slopes.device != device:
        raise UsageError(f"slopes must be on the inputs' device ({device}), got {slopes.device}")
    return slopes.to(torch.float32)


_SLOPES: dict = {}


def _default_slopes(n_head: int, device: torch.device) -> torch.Tensor:
    """BLOOM's slopes for ``n_head`` heads on ``device``, made once per (heads, device) in eager mode: building
    them is a host-to-device copy, which on CUDA waits for the work queued before it."""
    if torch.compiler.is_compiling():
        return alibi_slopes(n_head, device)
    key = (n_head, str(device))
    if key not in _SLOPES:
        _SLOPES[key] = alibi_slopes(n_head, device)
    return _SLOPES[key]


def _stats(stats: torch.Tensor) -> AttentionStats:
    return AttentionStats(stats[..., 0], stats[..., 1], stats[..., 2])


def _check_row_stats(return_stats, row_stats) -> None:
    if row_stats and not return_stats:
        raise UsageError("row_stats=True needs return_stats=True")


def _per_row(return_stats: bool, row_stats: bool, *inputs: torch.Tensor) -> bool:
    """Whether the call takes the per-row statistics from the kernels: asked for, or needed for gradients (the
    kernels' per-head sums carry none)."""
    if not return_stats:
        return False
    return bool(row_stats) or (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))


def _stats_from_rows(rows: torch.Tensor, key_pos: torch.Tensor, keep_rows: bool) -> AttentionStats:
    """:class:`AttentionStats` from the kernels' per-row statistics ``[B, H, Tq, 2]`` (0 on padded rows): sums by
    torch ops (:func:`~.backends.row_sums`), so gradients flow back to the rows and into the attention's backward."""
    sums = row_sums(rows, key_pos)
    extra = (rows[..., 0], rows[..., 1]) if keep_rows else ()
    return AttentionStats(sums[..., 0], sums[..., 1], sums[..., 2], *extra)

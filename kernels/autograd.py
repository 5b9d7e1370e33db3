"""Autograd for fused ALiBi attention: one ``torch.autograd.Function`` over either implementation.

``impl="triton"`` pairs :func:`alibi_attention_fwd` with :func:`alibi_attention_bwd`; ``impl="torch"`` pairs the
blocked references. Only q, k, v, the output and the fp32 log-sum-exp are saved (O(T * H * d)); the backward
recomputes probabilities tile by tile, so no T x T matrix exists in either direction. Under non-reentrant gradient
checkpointing the forward simply runs again. Statistics, when asked for, are returned without a gradient. The score
options (``softmax_scale``, ``bias_scale``, ``alibi_bf16``; see :mod:`.alibi`) reach both directions.
"""

from __future__ import annotations

import torch

from .attention_bwd import alibi_attention_bwd
from .attention_fwd import alibi_attention_fwd
from .reference import alibi_attention_blocked, alibi_attention_blocked_bwd

__all__ = ["AlibiAttention", "alibi_attention_train"]

_IMPLS = {"triton": (alibi_attention_fwd, alibi_attention_bwd),
          "torch": (alibi_attention_blocked, alibi_attention_blocked_bwd)}


class AlibiAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_pos, slopes, impl, stats_options, score_options):
        fwd, _ = _IMPLS[impl]
        out, lse, stats = fwd(q, k, v, key_pos, slopes, **stats_options, **score_options)
        ctx.impl = impl
        ctx.score_options = score_options
        ctx.save_for_backward(q, k, v, out, lse, key_pos, slopes)
        if stats is not None:
            ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, d_out, _d_stats):
        q, k, v, out, lse, key_pos, slopes = ctx.saved_tensors
        _, bwd = _IMPLS[ctx.impl]
        dq, dk, dv = bwd(d_out, q, k, v, out, lse, key_pos, slopes, **ctx.score_options)
        return dq, dk, dv, None, None, None, None, None


def alibi_attention_train(q, k, v, key_pos, slopes, impl: str, *, softmax_scale: float | None = None,
                          bias_scale: float = 1.0, alibi_bf16: bool = False, **stats_options):
    """Differentiable fused attention: ``(out [B, q_len, H, d], stats or None)``; see ``alibi_attention_fwd``."""
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {sorted(_IMPLS)}, got {impl!r}")
    score_options = dict(softmax_scale=softmax_scale, bias_scale=bias_scale, alibi_bf16=alibi_bf16)
    return AlibiAttention.apply(q, k, v, key_pos, slopes, impl, stats_options, score_options)

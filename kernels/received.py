"""Attention received by each key, without a T x T matrix: ``received[b, h, j] = sum_i P[b, h, i, j]`` over the query
rows i, from q, k and the forward's log-sum-exp (a key-side pass like the backward's dK/dV loop, without dO).

The sink literature scores key positions by it (Gu et al.'s sink score is ``received_j`` over the number of query
rows that see key j; :func:`gu_scores`), and it finds the sinks that are not the first token (delimiters, newlines
in models without a BOS token). Two implementations with one contract:

* :func:`attention_received` (Triton): one program per (key block, batch * head), looping over the query blocks
  that can see the block (the causal mask on every tile; each probability tile is rebuilt as ``exp2(s2 - lse2)``
  exactly as the backward rebuilds it, ALiBi bias by the same origin rule);
* :func:`attention_received_blocked` (torch): the same sums over ``[block_q, block_k]`` tiles batched over
  (batch, head), on any device.

Both take q ``[B, H, Tq, d]``, k ``[B, Hkv, Tk, d]`` (Hkv dividing H: grouped-query attention, read in place),
``lse2`` ``[B, H, Tq]`` as the forward returned it (base 2, +inf on padded query rows, which therefore give
nothing), ``key_pos`` and the score options of the forward. Padded keys receive 0. Limits: no sliding window
(ValueError); float32 sums; memory O(T * H) beyond the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .alibi import AttentionOptions, first_real_key, kv_groups, resolve_softmax_scale
from .attention_tiles import _MASKED, _ORIGIN_ROWS, _dot, _key_block, _load_rows
from .configs import block_d, cdiv, check_head_dim, interpreting
from .reference import LOG2E, MASKED, _Bias

__all__ = ["attention_received", "attention_received_blocked", "gu_scores"]


def _check(q, k, lse, opts: AttentionOptions) -> int:
    if opts.window:
        raise ValueError("attention received: a sliding window is not supported")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q_len ({q.shape[2]}) must not exceed k_len ({k.shape[2]})")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must be [B, H, q_len] = {list(q.shape[:3])}, got {list(lse.shape)}")
    return kv_groups(q.shape, k.shape, k.shape)


def attention_received_blocked(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, key_pos: torch.Tensor,
                               slopes: torch.Tensor, *, kstart: torch.Tensor | None = None, block_q: int = 256,
                               block_k: int = 512, **options) -> torch.Tensor:
    """``[B, H, Tk]`` float32: the attention each key receives, summed over the query rows (torch twin)."""
    opts = AttentionOptions(**options)
    group = _check(q, k, lse, opts)
    batch, n_head, q_len, head_dim = q.shape
    n_kv, k_len = k.shape[1], k.shape[2]
    shift = k_len - q_len
    scale = resolve_softmax_scale(head_dim, opts.softmax_scale, opts.bias_scale) * LOG2E
    key_pos = key_pos.to(device=q.device, dtype=torch.int64)
    first_key = first_real_key(key_pos) if kstart is None else kstart.to(device=q.device, dtype=torch.int64)
    bias = _Bias(slopes, key_pos, first_key, shift, opts)
    q, k = q.to(torch.float32), k.to(torch.float32)
    lse = lse.to(torch.float32)
    received = torch.zeros(batch, n_head, k_len, device=q.device, dtype=torch.float32)
    for q0 in range(0, q_len, block_q):
        q1 = min(q0 + block_q, q_len)
        rows = torch.arange(q0, q1, device=q.device) + shift
        qb = (q[:, :, q0:q1] * scale).reshape(batch, n_kv, group * (q1 - q0), head_dim)
        lse_b = lse[:, :, q0:q1, None]
        for k0 in range(0, min(k_len, shift + q1), block_k):
            k1 = min(k0 + block_k, k_len)
            s = torch.matmul(qb, k[:, :, k0:k1].transpose(-1, -2)).view(batch, n_head, q1 - q0, k1 - k0)
            s = s + bias.tile(q0, q1, k0, k1)
            s = s.masked_fill(torch.arange(k0, k1, device=q.device)[None, :] > rows[:, None], MASKED)
            received[..., k0:k1] += torch.exp2(s - lse_b).sum(-2)  # lse +inf on padded rows: 0
    return received


@triton.jit
def _received_kernel(
    Q, K, LSE, KPOS, KSTART, SLOPES, OUT,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    n_head, q_len, k_len, qk_scale, n_group, slope_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr,
):
    """Attention received by one key block over every query block that can see it (grid: key blocks x B * H)."""
    tl.static_assert(_ORIGIN_ROWS % BLOCK_M == 0)
    pid_bh, b, h, start_n, offs_n, offs_d, n_ok, d_ok, slope2, kstart, key_bias = _key_block(
        KPOS, KSTART, SLOPES, n_head, k_len, slope_stride, HEAD_DIM, BLOCK_D, BLOCK_N, ALIBI_BF16)
    q_shift = k_len - q_len
    k = _load_rows(K + b * stride_kb + (h // n_group) * stride_kh, offs_n, offs_d, stride_kt, n_ok, d_ok, UPCAST)
    acc = tl.zeros([BLOCK_N], tl.float32)
    lo = (tl.maximum(start_n - q_shift, 0) // BLOCK_M) * BLOCK_M
    lo = tl.where(start_n >= k_len, q_len, lo)
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, q_len, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < q_len
        q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, m_ok, d_ok, UPCAST)
        lse2 = tl.load(LSE + pid_bh * q_len + offs_m, mask=m_ok, other=float("inf"))
        if ALIBI_BF16:
            bias_k = key_bias
        else:
            bias_k = key_bias - slope2 * ((start_m // _ORIGIN_ROWS) * _ORIGIN_ROWS + q_shift - start_n)
        s2t = _dot(k, tl.trans(q), IEEE) * qk_scale + bias_k[:, None]  # [BLOCK_N, BLOCK_M]
        s2t = tl.where(offs_n[:, None] <= (offs_m + q_shift)[None, :], s2t, _MASKED)
        acc += tl.sum(tl.math.exp2(s2t - lse2[None, :]), 1)
    tl.store(OUT + pid_bh * k_len + offs_n, acc, mask=n_ok)


def attention_received(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, key_pos: torch.Tensor,
                       slopes: torch.Tensor, *, kstart: torch.Tensor | None = None, **options) -> torch.Tensor:
    """``[B, H, Tk]`` float32: the attention each key receives, summed over the query rows (Triton; CUDA, or CPU
    under ``TRITON_INTERPRET=1``). Arguments as :func:`attention_received_blocked`."""
    from .attention_fwd import kernel_positions, score_args, slopes_batch_stride

    opts = AttentionOptions(**options)
    n_group = _check(q, k, lse, opts)
    batch, n_head, q_len, head_dim = q.shape
    k_len = k.shape[2]
    check_head_dim(head_dim)
    key_pos, kstart = kernel_positions(key_pos, kstart, q.device)
    slopes, qk_scale, _ = score_args(slopes, head_dim, q.device, opts)
    interp = interpreting()
    out = torch.empty(batch, n_head, k_len, device=q.device, dtype=torch.float32)
    block_m, block_n = (16, 32) if q.dtype == torch.float32 else (32, 64)
    _received_kernel[(cdiv(k_len, block_n), batch * n_head)](
        q, k, lse.contiguous(), key_pos, kstart, slopes, out, *q.stride()[:3], *k.stride()[:3],
        n_head, q_len, k_len, qk_scale, n_group, slopes_batch_stride(slopes),
        HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        UPCAST=interp and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32,
        ALIBI_BF16=bool(opts.alibi_bf16), num_warps=4, num_stages=2)
    return out


def gu_scores(received: torch.Tensor, key_pos: torch.Tensor, q_len: int | None = None) -> torch.Tensor:
    """Gu et al.'s sink score per key: the attention it receives averaged over the real query rows that see it
    (``T - j`` of them for an unpadded sequence), from ``received`` ``[B, H, Tk]``; 0 for padded keys.
    ``q_len``: the query rows are the last ``q_len`` keys (default: all)."""
    k_len = key_pos.shape[1]
    q_len = k_len if q_len is None else q_len
    real = (key_pos >= 0).to(torch.float32)
    real_rows = real.clone()
    real_rows[:, :k_len - q_len] = 0.0
    # real query rows at or after key j: the suffix sums of real_rows
    seeing = real_rows.flip(-1).cumsum(-1).flip(-1)  # [B, Tk]
    return torch.where(((real > 0) & (seeing > 0))[:, None], received / seeing.clamp_min(1.0)[:, None], 0.0)

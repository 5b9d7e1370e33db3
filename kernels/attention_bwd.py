"""Fused causal ALiBi attention backward (Triton): dq, dk, dv from o, lse and dO, without a T x T matrix.

Flash-attention-2 style recomputation. Each probability tile is rebuilt from q, k, the per-key ALiBi bias and the
forward's log-sum-exp, ``P = exp(s - lse)``; with ``delta_i = sum_d dO[i] * O[i]``:

    dV = P^T dO        dP = dO V^T        dS = P * (dP - delta)        dQ = c dS K        dK = c dS^T Q

with c the scores' scale (``softmax_scale``, 1/sqrt(d) by default); the ALiBi bias does not depend on q, k, v, so
``bias_scale`` and ``alibi_bf16`` only rebuild the same probabilities as the forward (the constexpr ``ALIBI_BF16``).

Two kernels, no atomics, so results are deterministic:
    * ``_alibi_bwd_dkdv_kernel``: one program per (key block, batch*head), looping over the query blocks that can see
      it (the causal mask only on the blocks that straddle the diagonal);
    * ``_alibi_bwd_dq_kernel``: one program per (query block, batch*head), looping over its visible key blocks.
``delta`` is one elementwise pass in torch. Everything the forward supports is supported: strided q/k/v views
(BLOOM's fused QKV), q_len <= k_len, left padding and holes, head_dim any multiple of 16 up to 128, fp32 (IEEE dots),
fp16 and bf16 with fp32 accumulation. Gradients come back in q's dtype as ``[B, H, T, d]`` views of ``[B, T, H, d]``
buffers (the layout BLOOM's ``_reshape`` produces).
A padded query row (position -1) outputs exactly 0 in the forward, a constant, so it gets no gradient and passes none
on: this is the exact derivative of the forward. Limits: no dropout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .alibi import first_real_key
from .attention_fwd import (_LOG2E, _MASKED, _arch, _dot, _key_bias, _load_tile, _query_block_keys, _slope_terms,
                            check_head_dim, interpreting, score_args)

__all__ = ["alibi_attention_bwd", "pick_bwd_config", "BwdConfig"]



@triton.jit
def _dkdv_block_range(
    dk, dv, k, v, bias_k, offs_n, q_base, do_base, lse_base, delta_base, pos_row, offs_d, offs_m0,
    stride_qt, stride_dot, q_len, q_shift, qk_scale, start, stop,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query blocks [start, stop)."""
    d_ok = offs_d < HEAD_DIM
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < q_len
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                    other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                     other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * _LOG2E
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        row_k = offs_m + q_shift
        row_ok = m_ok & (tl.load(pos_row + row_k, mask=m_ok, other=-1) >= 0)
        s2t = _dot(k, tl.trans(q), IEEE) * qk_scale + bias_k[:, None]  # [BLOCK_N, BLOCK_M]
        if CAUSAL:
            s2t = tl.where(offs_n[:, None] <= row_k[None, :], s2t, _MASKED)
        pt = tl.where(row_ok[None, :], tl.math.exp2(s2t - lse2[None, :]), 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def _alibi_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPOS, KSTART, SLOPES,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    n_head, q_len, k_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_head
    h = pid_bh % n_head
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    n_ok = offs_n < k_len
    d_ok = offs_d < HEAD_DIM
    q_shift = k_len - q_len

    pos_row = KPOS + b * k_len
    slope2, bias2 = _slope_terms(SLOPES, h, n_head, ALIBI_BF16)
    bias_k = _key_bias(pos_row, offs_n, n_ok, slope2, bias2, False, ALIBI_BF16)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask,
                other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query rows i see key n when i + q_shift >= n. Blocks whose first row sits at or past this block's last key
    # need no causal mask. A key block wholly before the first real key gets zero gradients.
    lo = (tl.maximum(start_n - q_shift, 0) // BLOCK_M) * BLOCK_M
    lo = tl.where(start_n + BLOCK_N <= tl.load(KSTART + b), q_len, lo)
    diag = tl.maximum(lo, tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_shift, 0), BLOCK_M) * BLOCK_M)
    diag = tl.minimum(diag, q_len)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh * q_len
    delta_base = DELTA + pid_bh * q_len
    dk, dv = _dkdv_block_range(
        dk, dv, k, v, bias_k, offs_n, q_base, do_base, lse_base, delta_base, pos_row, offs_d, offs_m0,
        stride_qt, stride_dot, q_len, q_shift, qk_scale, lo, diag, HEAD_DIM, BLOCK_M, True, UPCAST, IEEE)
    dk, dv = _dkdv_block_range(
        dk, dv, k, v, bias_k, offs_n, q_base, do_base, lse_base, delta_base, pos_row, offs_d, offs_m0,
        stride_qt, stride_dot, q_len, q_shift, qk_scale, diag, q_len, HEAD_DIM, BLOCK_M, False, UPCAST, IEEE)

    out_off = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_block_range(
    dq, q, do, lse2, delta, row_ok, row_k, k_base, v_base, pos_row, slope2, bias2, qk_scale, offs_d, offs_n0,
    stride_kt, stride_vt, k_len, start, stop,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [start, stop)."""
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM or IEEE  # as in the forward's _fwd_block_range
    MASK_N: tl.constexpr = CAUSAL or IEEE
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < k_len
        bias = _key_bias(pos_row, offs_n, n_ok, slope2, bias2, not MASK_N, ALIBI_BF16)
        kt = _load_tile(k_base + offs_d[:, None] + offs_n[None, :] * stride_kt, d_ok, n_ok, MASK_D, MASK_N)
        vt = _load_tile(v_base + offs_d[:, None] + offs_n[None, :] * stride_vt, d_ok, n_ok, MASK_D, MASK_N)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s2 = _dot(q, kt, IEEE) * qk_scale + bias[None, :]
        if CAUSAL:
            s2 = tl.where(offs_n[None, :] <= row_k[:, None], s2, _MASKED)
        p = tl.where(row_ok[:, None], tl.math.exp2(s2 - lse2[:, None]), 0.0)
        ds = p * (_dot(do, vt, IEEE) - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
    return dq


@triton.jit
def _alibi_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KPOS, KSTART, SLOPES,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    n_head, q_len, k_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_head
    h = pid_bh % n_head
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_shift = k_len - q_len
    row_k = offs_m + q_shift
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    md_mask = m_ok[:, None] & d_ok[None, :]

    pos_row = KPOS + b * k_len
    row_ok = m_ok & (tl.load(pos_row + row_k, mask=m_ok, other=-1) >= 0)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=md_mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=md_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + pid_bh * q_len + offs_m, mask=m_ok, other=0.0) * _LOG2E
    delta = tl.load(DELTA + pid_bh * q_len + offs_m, mask=m_ok, other=0.0)
    slope2, bias2 = _slope_terms(SLOPES, h, n_head, ALIBI_BF16)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    lo, diag, hi = _query_block_keys(tl.load(KSTART + b), q_shift, pid_m, k_len, BLOCK_M, BLOCK_N)
    dq = _dq_block_range(dq, q, do, lse2, delta, row_ok, row_k, k_base, v_base, pos_row, slope2, bias2, qk_scale,
                         offs_d, offs_n0, stride_kt, stride_vt, k_len, lo, diag, HEAD_DIM, BLOCK_D, BLOCK_N, False,
                         UPCAST, IEEE, ALIBI_BF16)
    dq = _dq_block_range(dq, q, do, lse2, delta, row_ok, row_k, k_base, v_base, pos_row, slope2, bias2, qk_scale,
                         offs_d, offs_n0, stride_kt, stride_vt, k_len, diag, hi, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                         UPCAST, IEEE, ALIBI_BF16)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=md_mask)


class BwdConfig(NamedTuple):
    """Tile sizes and launch options of the two backward kernels (chosen by :func:`pick_bwd_config`)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def pick_bwd_config(head_dim: int, dtype: torch.dtype, arch: int | None = None,
                    alibi_bf16: bool = False) -> tuple[BwdConfig, BwdConfig]:
    """(dkdv, dq) configurations for one launch; ``arch`` as 80/86/89/90, None for the interpreter; ``alibi_bf16``
    the kernels' ALIBI_BF16 (Falcon-RW's bias).

    fp16/bf16 on sm_90: the fastest spill-free tiles of a timed sweep on an H100 (``bench/tune_attention.py``:
    dK/dV first with dQ fixed, then dQ). Elsewhere 8-warp tiles, 2 stages on sm_86/sm_89 (99 KB of shared memory). fp32 runs IEEE dots and needs small
    tiles. Each returned configuration compiles with 0 spills on every architecture (re-checked by a unit test).
    """
    if arch is None:
        return BwdConfig(64, 64, 4, 1), BwdConfig(64, 64, 4, 1)  # big tiles: fewer interpreted steps
    wide = triton.next_power_of_2(head_dim) > 64
    if dtype == torch.float32:
        # Falcon's rounding made the 8-warp dQ tile spill 16 bytes on sm_86/89 at d = 80/96 (ptxas -v): 4 warps there.
        dq_warps = 4 if alibi_bf16 and arch in (86, 89) else 8
        return BwdConfig(16, 32, 8, 1), BwdConfig(16, 32, dq_warps, 1)
    if arch == 90:  # timed on an H100
        if wide:
            return BwdConfig(32, 128, 8, 3), BwdConfig(128, 64, 8, 3)
        return BwdConfig(32, 64, 4, 2), BwdConfig(64, 64, 4, 3)
    stages = 2 if arch in (86, 89) else 3  # untimed (no such GPU here): the spill-free 8-warp tiles
    if wide:
        return BwdConfig(32, 64, 8, stages), BwdConfig(64, 32, 8, stages)
    return BwdConfig(64, 64, 8, stages), BwdConfig(64, 32, 8, stages)


def alibi_attention_bwd(do, q, k, v, out, lse, key_pos, slopes, *, softmax_scale: float | None = None,
                        bias_scale: float = 1.0, alibi_bf16: bool = False):
    """Gradients ``(dq, dk, dv)`` of :func:`alibi_attention_fwd`.

    Args:
        do, out: ``[B, q_len, H, d]`` (``out`` and ``lse`` as the forward returned them); q, k, v, key_pos, slopes
            and the score options exactly as passed to the forward.
    Returns:
        dq ``[B, H, q_len, d]`` and dk, dv ``[B, H, k_len, d]`` in q's dtype.
    """
    batch, n_head, q_len, head_dim = q.shape
    k_len = k.shape[2]
    check_head_dim(head_dim)
    if do.shape != out.shape or out.shape != (batch, q_len, n_head, head_dim):
        raise ValueError(f"do and out must be [B, q_len, H, d] = {[batch, q_len, n_head, head_dim]}")
    do = do if do.stride(-1) == 1 else do.contiguous()
    key_pos = key_pos.to(device=q.device, dtype=torch.int32).contiguous()
    kstart = first_real_key(key_pos).to(torch.int32)
    slopes, qk_scale, sm_scale = score_args(slopes, head_dim, q.device, softmax_scale, bias_scale, alibi_bf16)
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, q_len]
    lse = lse.contiguous()

    interp = interpreting()
    # The interpreter truncates fp32 -> bf16 stores (a GPU rounds to nearest): there, store fp32 and round in torch.
    store_dtype = torch.float32 if interp and q.dtype == torch.bfloat16 else q.dtype
    dq = torch.empty(batch, q_len, n_head, head_dim, device=q.device, dtype=store_dtype).transpose(1, 2)
    dk = torch.empty(batch, k_len, n_head, head_dim, device=q.device, dtype=store_dtype).transpose(1, 2)
    dv = torch.empty_like(dk)
    cfg_kv, cfg_q = pick_bwd_config(head_dim, q.dtype, None if interp else _arch(q.device), bool(alibi_bf16))
    common = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                  UPCAST=interp and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32,
                  ALIBI_BF16=bool(alibi_bf16))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], do.stride(0), do.stride(2), do.stride(1))
    scales = (qk_scale, sm_scale)
    _alibi_bwd_dkdv_kernel[(triton.cdiv(k_len, cfg_kv.block_n), batch * n_head)](
        q, k, v, do, dk, dv, lse, delta, key_pos, kstart, slopes, *strides, *dk.stride()[:3],
        n_head, q_len, k_len, *scales, BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n,
        num_warps=cfg_kv.num_warps, num_stages=cfg_kv.num_stages, **common)
    _alibi_bwd_dq_kernel[(triton.cdiv(q_len, cfg_q.block_m), batch * n_head)](
        q, k, v, do, dq, lse, delta, key_pos, kstart, slopes, *strides, *dq.stride()[:3],
        n_head, q_len, k_len, *scales, BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n,
        num_warps=cfg_q.num_warps, num_stages=cfg_q.num_stages, **common)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)

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
``delta`` comes from a third, small kernel (``_bwd_delta_kernel``) reading O and dO in their own dtype.
The forward's log-sum-exp arrives in base 2 (``lse2``), +inf on padded query rows, so every probability tile is
``exp2(s2 - lse2)`` with no position gather or select: such rows get exactly 0. Everything the forward supports is supported: strided q/k/v views
(BLOOM's fused QKV), q_len <= k_len, left padding and holes, head_dim any multiple of 16 up to 128, fp32 (IEEE dots),
fp16 and bf16 with fp32 accumulation. Gradients come back in q's dtype as ``[B, H, T, d]`` views of ``[B, T, H, d]``
buffers, or are written into buffers the caller passes (``grads``: views of one packed dQKV, written once).
A padded query row (position -1) outputs exactly 0 in the forward, a constant, so it gets no gradient and passes none
on: this is the exact derivative of the forward. Limits: no dropout.

The statistics' gradients (``stats_grad``, constexpr ``STATS_GRAD``): with per-row gradients g_m of the first-token
mass m_i and g_H of the entropy H_i (the forward's ``row_stats``), ``dS = P * (dP' - delta')`` where dP' adds g_m on
the first real key's column and ``-g_H ln P``, and ``delta' = delta + g_m m + g_H H`` (computed once in torch). The
two passes do the same loops with one more term per tile; nothing T x T is built.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .alibi import AttentionOptions, refuse_backward, stats_grad_terms
from .configs import BwdConfig, arch_of, block_d, cdiv, pick_bwd_config
from .attention_fwd import check_head_dim, interpreting, kernel_positions, score_args, slopes_batch_stride
from .attention_tiles import (_MASKED, _ORIGIN_ROWS, _bias_origin, _dot, _key_block, _load_rows, _load_tile,
                              _query_block_keys, _query_rows, _scores, _slope_terms)

__all__ = ["alibi_attention_bwd", "pick_bwd_config", "BwdConfig", "DELTA_BLOCK"]

@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot, n_head, q_len,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """``delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]`` in fp32, from O and dO in their own dtype."""
    pid_bh, b, h, offs_m, offs_d, _, m_ok, d_ok = _query_rows(n_head, q_len, q_len, HEAD_DIM, BLOCK_D, BLOCK_M)
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ot, m_ok, d_ok, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dot, m_ok, d_ok, True)
    tl.store(DELTA + pid_bh * q_len + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _stats_dp(dp, p, s2, lse2, g_first, g_ent, is_first):
    """``dP`` with the statistics' gradients folded in (the operands broadcast to the score tile): ``g_first`` (the
    first-token mass's, per query row) on the first real key's column, and ``-g_ent * log2 P`` (``g_ent`` the
    entropy's gradient times ln 2, per row; 0 where P = 0: masked keys and padded rows, whose lse2 is +inf).
    With ``delta`` raised by ``g_first * m + g_ent_nats * H`` per row, ``P * (dP - delta)`` is then the exact
    derivative of loss + g_first * m + g_ent * H with respect to the scores."""
    log_p = tl.where(p > 0.0, s2 - lse2, 0.0)
    return dp - g_ent * log_p + tl.where(is_first, g_first, 0.0)


@triton.jit
def _dkdv_block_range(
    dk, dv, k, v, key_bias, slope2, start_n, offs_n, q_base, do_base, lse_base, delta_base, offs_d, offs_m0,
    stride_qt, stride_dot, q_len, q_shift, qk_scale, start, stop,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ALIBI_BF16: tl.constexpr, gstat_base=None, kstart=0, STATS_GRAD: tl.constexpr = False,
):
    """Accumulate dK, dV of one key block over query blocks [start, stop). ``key_bias`` is the keys' bias relative
    to the block's own origin (``start_n - kstart``, :func:`_dkdv_program`); the rows from ``start_m`` take it
    shifted by ``slope2 * (their origin - that origin)``, one scalar per query block (none under ALIBI_BF16)."""
    d_ok = offs_d < HEAD_DIM
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < q_len
        q = _load_rows(q_base, offs_m, offs_d, stride_qt, m_ok, d_ok, UPCAST)
        do = _load_rows(do_base, offs_m, offs_d, stride_dot, m_ok, d_ok, UPCAST)
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))  # +inf: rows past q_len weigh nothing
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        if ALIBI_BF16:
            bias_k = key_bias
        else:
            bias_k = key_bias - slope2 * ((start_m // _ORIGIN_ROWS) * _ORIGIN_ROWS + q_shift - start_n)
        s2t = _dot(k, tl.trans(q), IEEE) * qk_scale + bias_k[:, None]  # [BLOCK_N, BLOCK_M]
        if CAUSAL:
            s2t = tl.where(offs_n[:, None] <= (offs_m + q_shift)[None, :], s2t, _MASKED)
        pt = tl.math.exp2(s2t - lse2[None, :])
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        if STATS_GRAD:
            g_first = tl.load(gstat_base + offs_m * 2, mask=m_ok, other=0.0)
            g_ent = tl.load(gstat_base + offs_m * 2 + 1, mask=m_ok, other=0.0)
            dpt = _stats_dp(dpt, pt, s2t, lse2[None, :], g_first[None, :], g_ent[None, :],
                            (offs_n == kstart)[:, None])
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def _dkdv_program(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPOS, KSTART, SLOPES, GSTAT,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt,
    n_head, q_len, k_len, qk_scale, sm_scale, slope_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr, STATS_GRAD: tl.constexpr,
):
    """dK and dV of one key block (grid: key blocks x batch * head)."""
    pid_bh, b, h, start_n, offs_n, offs_d, n_ok, d_ok, slope2, kstart, key_bias = _key_block(
        KPOS, KSTART, SLOPES, n_head, k_len, slope_stride, HEAD_DIM, BLOCK_D, BLOCK_N, ALIBI_BF16)
    q_shift = k_len - q_len
    k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kt, n_ok, d_ok, UPCAST)
    v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vt, n_ok, d_ok, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query rows i see key n when i + q_shift >= n. Blocks whose first row sits at or past this block's last key
    # need no causal mask. A key block wholly before the first real key gets zero gradients.
    lo = (tl.maximum(start_n - q_shift, 0) // BLOCK_M) * BLOCK_M
    lo = tl.where(start_n + BLOCK_N <= kstart, q_len, lo)
    diag = tl.maximum(lo, tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_shift, 0), BLOCK_M) * BLOCK_M)
    diag = tl.minimum(diag, q_len)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    offs_m0 = tl.arange(0, BLOCK_M)
    dk, dv = _dkdv_block_range(
        dk, dv, k, v, key_bias, slope2, start_n, offs_n, q_base, do_base, LSE + pid_bh * q_len,
        DELTA + pid_bh * q_len, offs_d, offs_m0, stride_qt, stride_dot, q_len, q_shift, qk_scale, lo, diag, HEAD_DIM,
        BLOCK_M, True, UPCAST, IEEE, ALIBI_BF16, GSTAT + pid_bh * q_len * 2, kstart, STATS_GRAD)
    dk, dv = _dkdv_block_range(
        dk, dv, k, v, key_bias, slope2, start_n, offs_n, q_base, do_base, LSE + pid_bh * q_len,
        DELTA + pid_bh * q_len, offs_d, offs_m0, stride_qt, stride_dot, q_len, q_shift, qk_scale, diag, q_len, HEAD_DIM,
        BLOCK_M, False, UPCAST, IEEE, ALIBI_BF16, GSTAT + pid_bh * q_len * 2, kstart, STATS_GRAD)

    out_off = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    kv_mask = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_block_range(
    dq, q, do, lse2, delta, row_k, k_base, v_base, pos_row, slope2, bias2, origin, qk_scale, offs_d, offs_n0,
    stride_kt, stride_vt, k_len, start, stop,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr, g_first=None, g_ent=None, kstart=0,
    STATS_GRAD: tl.constexpr = False,
):
    """Accumulate dQ of one query block over key blocks [start, stop)."""
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM or IEEE  # as in the forward's _scores
    MASK_N: tl.constexpr = CAUSAL or IEEE
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_n0
        vt = _load_tile(v_base + offs_d[:, None] + offs_n[None, :] * stride_vt, d_ok, offs_n < k_len, MASK_D, MASK_N)
        if UPCAST:
            vt = vt.to(tl.float32)
        s2, kt, n_ok = _scores(q, k_base, pos_row, offs_n, offs_d, row_k, k_len, stride_kt, slope2, bias2, origin,
                               qk_scale, HEAD_DIM, BLOCK_D, CAUSAL, UPCAST, IEEE, ALIBI_BF16)
        p = tl.math.exp2(s2 - lse2[:, None])
        dp = _dot(do, vt, IEEE)
        if STATS_GRAD:
            dp = _stats_dp(dp, p, s2, lse2[:, None], g_first[:, None], g_ent[:, None], (offs_n == kstart)[None, :])
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
    return dq


@triton.jit
def _dq_program(
    Q, K, V, DO, DQ, LSE, DELTA, KPOS, KSTART, SLOPES, GSTAT,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    n_head, q_len, k_len, qk_scale, sm_scale, slope_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr, STATS_GRAD: tl.constexpr,
):
    """dQ of one query block (grid: query blocks x batch * head)."""
    pid_bh, b, h, offs_m, offs_d, row_k, m_ok, d_ok = _query_rows(n_head, q_len, k_len, HEAD_DIM, BLOCK_D, BLOCK_M)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, m_ok, d_ok, UPCAST)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dot, m_ok, d_ok, UPCAST)
    lse2 = tl.load(LSE + pid_bh * q_len + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * q_len + offs_m, mask=m_ok, other=0.0)
    slope2, bias2 = _slope_terms(SLOPES + b * slope_stride, h, n_head, ALIBI_BF16)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    pos_row = KPOS + b * k_len
    kstart = tl.load(KSTART + b)
    pid_m = tl.program_id(0)
    origin = _bias_origin(pid_m * BLOCK_M, k_len - q_len, kstart, ALIBI_BF16)
    lo, diag, hi = _query_block_keys(kstart, k_len - q_len, pid_m, k_len, BLOCK_M, BLOCK_N)
    g_first = tl.zeros([BLOCK_M], tl.float32)
    g_ent = tl.zeros([BLOCK_M], tl.float32)
    if STATS_GRAD:
        g_first = tl.load(GSTAT + (pid_bh * q_len + offs_m) * 2, mask=m_ok, other=0.0)
        g_ent = tl.load(GSTAT + (pid_bh * q_len + offs_m) * 2 + 1, mask=m_ok, other=0.0)
    dq = _dq_block_range(dq, q, do, lse2, delta, row_k, k_base, v_base, pos_row, slope2, bias2, origin, qk_scale,
                         offs_d, tl.arange(0, BLOCK_N), stride_kt, stride_vt, k_len, lo, diag, HEAD_DIM, BLOCK_D,
                         BLOCK_N, False, UPCAST, IEEE, ALIBI_BF16, g_first, g_ent, kstart, STATS_GRAD)
    dq = _dq_block_range(dq, q, do, lse2, delta, row_k, k_base, v_base, pos_row, slope2, bias2, origin, qk_scale,
                         offs_d, tl.arange(0, BLOCK_N), stride_kt, stride_vt, k_len, diag, hi, HEAD_DIM, BLOCK_D,
                         BLOCK_N, True, UPCAST, IEEE, ALIBI_BF16, g_first, g_ent, kstart, STATS_GRAD)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _alibi_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, KPOS, KSTART, SLOPES, GSTAT,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt, stride_dkb, stride_dkh, stride_dkt,
    n_head, q_len, k_len, qk_scale, sm_scale, slope_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DKDV: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr = False,
    STATS_GRAD: tl.constexpr = False,
):
    """Both backward passes behind one signature: DKDV selects the dK/dV pass (``DK``, ``DV`` share strides), else
    the dQ pass. Each compiles only its own pass. STATS_GRAD adds the statistics' gradients (``GSTAT``
    ``[B * H, q_len, 2]``: per row, the first-token mass's and ln 2 times the entropy's; see :func:`_stats_dp`)."""
    tl.static_assert(_ORIGIN_ROWS % BLOCK_M == 0)
    if DKDV:
        _dkdv_program(Q, K, V, DO, DK, DV, LSE, DELTA, KPOS, KSTART, SLOPES, GSTAT,
                      stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                      stride_vt, stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt,
                      n_head, q_len, k_len, qk_scale, sm_scale, slope_stride, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                      UPCAST, IEEE, ALIBI_BF16, STATS_GRAD)
    else:
        _dq_program(Q, K, V, DO, DQ, LSE, DELTA, KPOS, KSTART, SLOPES, GSTAT,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                    stride_vt, stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
                    n_head, q_len, k_len, qk_scale, sm_scale, slope_stride, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                    UPCAST, IEEE, ALIBI_BF16, STATS_GRAD)


DELTA_BLOCK = 64  # rows per program of the delta kernel (4 warps; it streams O and dO once)


def alibi_attention_bwd(do, q, k, v, out, lse, key_pos, slopes, *, kstart: torch.Tensor | None = None,
                        grads: tuple | None = None, stats_grad: tuple | None = None, **options):
    """Gradients ``(dq, dk, dv)`` of :func:`alibi_attention_fwd`.

    Args:
        do, out: ``[B, q_len, H, d]`` (``out`` and ``lse`` as the forward returned them); q, k, v, key_pos, kstart,
            slopes and the options exactly as passed to the forward (only the score options matter here). One
            key/value head per query head and no ``window``: the backward of grouped-query and sliding-window
            attention is not implemented (UsageError).
        grads: optional ``(dq, dk, dv)`` buffers of q's dtype and shapes, unit stride on d, dk and dv with equal
            strides (views of one packed dQKV, say), written in place instead of allocating.
        stats_grad: optional ``(d_rows, rows)``: the gradient of the loss with respect to the forward's
            ``row_stats`` output and that output, float32 ``[B, H, q_len, 2]``; the statistics' gradients are then
            added in the same two passes (:func:`~.alibi.stats_grad_terms`, constexpr ``STATS_GRAD``).
    Returns:
        dq ``[B, H, q_len, d]`` and dk, dv ``[B, H, k_len, d]`` in q's dtype (``grads`` when given).
    """
    opts = AttentionOptions(**options)
    batch, n_head, q_len, head_dim = q.shape
    k_len = k.shape[2]
    refuse_backward(n_head, k.shape[1], opts.window)
    check_head_dim(head_dim)
    if do.shape != out.shape or out.shape != (batch, q_len, n_head, head_dim):
        raise ValueError(f"do and out must be [B, q_len, H, d] = {[batch, q_len, n_head, head_dim]}")
    do = do if do.stride(-1) == 1 else do.contiguous()
    key_pos, kstart = kernel_positions(key_pos, kstart, q.device)
    slopes, qk_scale, sm_scale = score_args(slopes, head_dim, q.device, opts)
    lse = lse.contiguous()
    interp = interpreting()
    width = block_d(head_dim)
    delta = torch.empty(batch, n_head, q_len, device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(cdiv(q_len, DELTA_BLOCK), batch * n_head)](
        out, do, delta, out.stride(0), out.stride(2), out.stride(1), do.stride(0), do.stride(2), do.stride(1),
        n_head, q_len, HEAD_DIM=head_dim, BLOCK_D=width, BLOCK_M=DELTA_BLOCK, num_warps=4)
    gstat = delta  # unused unless STATS_GRAD
    if stats_grad is not None:
        gstat, delta = stats_grad_terms(stats_grad, delta)

    # The interpreter truncates fp32 -> bf16 stores (a GPU rounds to nearest): there, store fp32 and round in torch.
    store_dtype = torch.float32 if interp and q.dtype == torch.bfloat16 else q.dtype
    targets = grads
    if grads is None or store_dtype != q.dtype:
        dq = torch.empty(batch, q_len, n_head, head_dim, device=q.device, dtype=store_dtype).transpose(1, 2)
        dk = torch.empty(batch, k_len, n_head, head_dim, device=q.device, dtype=store_dtype).transpose(1, 2)
        targets = (dq, dk, torch.empty_like(dk))
    elif grads[1].stride() != grads[2].stride() or any(g.stride(-1) != 1 for g in grads):
        raise ValueError("grads: dk and dv must share strides, each with a unit stride on head_dim")
    dq, dk, dv = targets
    cfg_kv, cfg_q = pick_bwd_config(head_dim, q.dtype, None if interp else arch_of(q.device), bool(opts.alibi_bf16))
    args = (q, k, v, do, dq, dk, dv, lse, delta, key_pos, kstart, slopes, gstat, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], do.stride(0), do.stride(2), do.stride(1), *dq.stride()[:3], *dk.stride()[:3],
            n_head, q_len, k_len, qk_scale, sm_scale, slopes_batch_stride(slopes))
    common = dict(HEAD_DIM=head_dim, BLOCK_D=width, UPCAST=interp and q.dtype == torch.bfloat16,
                  IEEE=q.dtype == torch.float32, ALIBI_BF16=bool(opts.alibi_bf16), STATS_GRAD=stats_grad is not None)
    for cfg, dkdv, n_blocks in ((cfg_kv, True, cdiv(k_len, cfg_kv.block_n)),
                                (cfg_q, False, cdiv(q_len, cfg_q.block_m))):
        _alibi_bwd_kernel[(n_blocks, batch * n_head)](
            *args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DKDV=dkdv, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **common)
    if grads is None:
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)
    for target, got in zip(grads, targets):
        if target is not got:
            target.copy_(got)
    return grads

"""Fused causal ALiBi attention forward (Triton), with optional per-head statistics in the same pass.

Semantics are BLOOM's (``BloomAttention`` eager) by default, computed in one flash-style pass:

    s[i, j] = (q_i . k_j) / sqrt(d) + slope_h * pos_j        for valid keys j <= i (bottom-right causal)
    o_i     = softmax_j(s[i, :]) @ v

generalised by the score options of :mod:`.alibi` for MPT and Falcon-RW: ``softmax_scale`` replaces 1/sqrt(d) (a
runtime scalar, the same code), ``bias_scale`` multiplies the bias (folded into the slopes, the same code), and
``alibi_bf16`` rounds slope, position and their product to bfloat16 as Falcon's ``build_alibi_tensor`` does (the
constexpr ``ALIBI_BF16``, with ``bias_scale`` read from ``SLOPES[n_head]``: the default path compiles as before).

``pos_j`` comes from ``key_positions`` (cumsum of the attention mask, -1 for padded keys). The query row i of a
q_len-long block sits at key index ``k_len - q_len + i``, so the KV-cache decode step (q_len = 1) runs through it.

Two options make it plain causal attention of any causal LM (slopes 0):
    * grouped-query attention: k and v ``[batch, Hkv, time, head_dim]`` with Hkv dividing the query heads H; the
      program of query head h reads key/value head ``h // (H // Hkv)`` by pointer arithmetic (the runtime
      ``n_group``; nothing is copied or expanded; Hkv = 1 is multi-query attention);
    * a sliding window (``window``, transformers' ``sliding_window``): the row at key index r sees keys
      ``r - window < j <= r``. The constexpr ``HAS_WINDOW`` (off: the kernel compiles as before) skips key blocks
      wholly left of a query block's window and masks those some row's window has left (``_window_keys``). The
      first-token mass of a row whose window no longer reaches the first real key is 0, and ``normalize_entropy``
      divides by ln(min(pos + 1, window)).
    Their backward is not implemented (``attention_bwd`` and the operators refuse it).

Supported:
    * q, k, v as strided ``[batch, head, time, head_dim]`` views (no copies of BLOOM's fused QKV output);
    * head_dim any multiple of 16 up to 128 (non powers of two are padded with masked lanes: 80 -> 128), the limit
      :func:`kernel_supports` states for every caller;
    * any head count, any left padding or padding pattern; fp32, fp16, bf16 inputs, fp32 accumulation;
    * fp32 inputs use IEEE fp32 dot products (not tf32).
Limits:
    * the backward pass is ``attention_bwd.py``; no dropout (BLOOM's attention dropout is 0);
    * masking is additive with -1e30. A padded query row (its own position is -1: left padding or a hole in the
      mask) outputs exactly 0, FlashAttention-2's convention in transformers (eager BLOOM returns an average of
      values there instead); it is never counted in the statistics, and its lse is finite and meaningless. The
      backward gives such rows no gradient, the exact derivative of that constant.

Statistics (``WITH_STATS``, a constexpr: attention without statistics compiles without them) are, per query row,
    p0 = P[i, j0] with j0 the first real key (position 0), and the entropy H_i = -sum_j P[i, j] ln P[i, j],
accumulated with a centred running sum ``C = sum_j exp(s_j - m)(s_j - m)`` so that ``H = ln l - C / l`` never
cancels large numbers. Each program writes (sum p0, sum H, row count) over its valid rows; the launcher sums them.
Key blocks left of the diagonal skip the causal mask; padding is a per-key bias vector. No T x T matrix exists.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .alibi import AttentionOptions, first_real_key, kv_groups, resolve_softmax_scale, resolve_window, round_bf16
from .attention_tiles import (LOG2E, _LN2, _ORIGIN_ROWS, _bias_origin, _dot, _first_key_score, _load_rows,
                              _load_tile, _query_block_keys, _query_rows, _scores, _slope_terms, _window_keys)
from .configs import (SUPPORTED_HEAD_DIMS, FwdConfig, arch_of, block_d, cdiv, check_head_dim, interpreting,
                      kernel_supports, pick_config)

__all__ = ["alibi_attention_fwd", "pick_config", "FwdConfig", "kernel_supports", "SUPPORTED_HEAD_DIMS", "score_args",
           "slopes_batch_stride", "kernel_positions"]


@triton.jit
def _fwd_block_range(
    acc, l_i, m_i, c_i, q, k_base, v_base, pos_row, slope2, bias2, origin, qk_scale, row_k, offs_d, offs_n0,
    stride_kt, stride_vt, k_len, start, stop,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    WITH_STATS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr,
    window=0, WINDOW: tl.constexpr = False,
):
    """Online-softmax update over key blocks [start, stop). CAUSAL masks keys past each row (the diagonal blocks),
    WINDOW keys left of each row's sliding window."""
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM or IEEE  # as in _scores
    MASK_N: tl.constexpr = CAUSAL or IEEE
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_n0
        v = _load_tile(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], offs_n < k_len, d_ok, MASK_N, MASK_D)
        if UPCAST:
            v = v.to(tl.float32)
        s2, kt, n_ok = _scores(q, k_base, pos_row, offs_n, offs_d, row_k, k_len, stride_kt, slope2, bias2, origin,
                               qk_scale, HEAD_DIM, BLOCK_D, CAUSAL, UPCAST, IEEE, ALIBI_BF16, window, WINDOW)
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        alpha = tl.math.exp2(m_i - m_new)
        if WITH_STATS:
            s2 = s2 - m_new[:, None]  # centred in place: one live score tile, reused by the entropy sum
            p = tl.math.exp2(s2)
            c_i = alpha * (c_i + (m_i - m_new) * l_i) + tl.sum(p * s2, 1)
        else:
            p = tl.math.exp2(s2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc += _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i, c_i


@triton.jit
def _alibi_fwd_kernel(
    Q, K, V, O, LSE, KPOS, KSTART, SLOPES, STATS, ROWS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    n_head, q_len, k_len, n_qblocks, qk_scale, n_group, window, slope_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WITH_STATS: tl.constexpr, EXCLUDE_FIRST: tl.constexpr, NORMALIZE_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr = False, HAS_WINDOW: tl.constexpr = False,
    ROW_STATS: tl.constexpr = False,
):
    tl.static_assert(_ORIGIN_ROWS % BLOCK_M == 0)
    pid_m = tl.program_id(0)
    pid_bh, b, h, offs_m, offs_d, row_k, m_ok, d_ok = _query_rows(n_head, q_len, k_len, HEAD_DIM, BLOCK_D, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_shift = k_len - q_len
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, m_ok, d_ok, UPCAST)
    # base-2 units throughout: s2 = s * log2(e); slope_stride 0 for slopes shared by the batch, H for [B, H]
    slope2, bias2 = _slope_terms(SLOPES + b * slope_stride, h, n_head, ALIBI_BF16)
    kstart = tl.load(KSTART + b)
    origin = _bias_origin(pid_m * BLOCK_M, q_shift, kstart, ALIBI_BF16)
    pos_row = KPOS + b * k_len
    kv_h = h // n_group  # grouped-query attention: query heads share key/value head h // (Hq / Hkv), no copy
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    c_i = tl.zeros([BLOCK_M], tl.float32)  # centred sum of p * (s2 - m), statistics only
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Score of the first real key (position 0, no ALiBi bias). fp16/bf16 compute it before the key loop, so that no
    # register copy of q outlives the loop; fp32 (IEEE dots, small tiles) spills less computing it after.
    s_first = tl.zeros([BLOCK_M], tl.float32)
    if WITH_STATS and not IEEE:
        s_first = _first_key_score(q, k_base, kstart, k_len, stride_kt, offs_d, d_ok, qk_scale, slope2, origin)

    lo, diag, hi = _query_block_keys(kstart, q_shift, pid_m, k_len, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:  # skip key blocks wholly left of the window; mask those some row's window has left
        lo, wend, diag = _window_keys(kstart, q_shift, pid_m, window, BLOCK_M, BLOCK_N)
        acc, l_i, m_i, c_i = _fwd_block_range(
            acc, l_i, m_i, c_i, q, k_base, v_base, pos_row, slope2, bias2, origin, qk_scale, row_k, offs_d, offs_n0,
            stride_kt, stride_vt, k_len, lo, wend,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, WITH_STATS, UPCAST, IEEE, ALIBI_BF16, window, True)
        lo = wend
    acc, l_i, m_i, c_i = _fwd_block_range(
        acc, l_i, m_i, c_i, q, k_base, v_base, pos_row, slope2, bias2, origin, qk_scale, row_k, offs_d, offs_n0,
        stride_kt, stride_vt, k_len, lo, diag,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, WITH_STATS, UPCAST, IEEE, ALIBI_BF16)
    acc, l_i, m_i, c_i = _fwd_block_range(
        acc, l_i, m_i, c_i, q, k_base, v_base, pos_row, slope2, bias2, origin, qk_scale, row_k, offs_d, offs_n0,
        stride_kt, stride_vt, k_len, diag, hi,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, WITH_STATS, UPCAST, IEEE, ALIBI_BF16, window, HAS_WINDOW)

    qpos = tl.load(pos_row + row_k, mask=m_ok, other=-1)
    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # query blocks left of the first real key iterate nothing
    out = tl.where((qpos >= 0)[:, None], acc / l_i[:, None], 0.0)  # a padded query row outputs exactly 0
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    # base-2 log-sum-exp of the base-2 scores (no ln/log2 round trip), +inf on padded query rows: the backward's
    # exp2(s2 - lse2) is then exactly 0 there, with no position gather or select
    tl.store(LSE + pid_bh * q_len + offs_m, tl.where(qpos >= 0, m_i + tl.math.log2(l_i), float("inf")), mask=m_ok)

    if WITH_STATS:
        if IEEE:
            s_first = _first_key_score(q, k_base, kstart, k_len, stride_kt, offs_d, d_ok, qk_scale, slope2, origin)
        counted = m_ok & (qpos >= 0)
        if EXCLUDE_FIRST:
            counted = counted & (qpos > 0)
        p0 = tl.math.exp2(tl.minimum(s_first - m_i, 0.0)) / l_i
        if HAS_WINDOW:  # the first real key has left the window of later rows: no mass on it
            p0 = tl.where(kstart > row_k - window, p0, 0.0)
        ent = (tl.math.log2(l_i) - c_i / l_i) * _LN2
        if ROW_STATS:  # per row, raw (first-token mass, entropy in nats), 0 on padded rows: what the backward reads
            real = qpos >= 0
            row_base = ROWS + (pid_bh * q_len + offs_m) * 2
            tl.store(row_base, tl.where(real, p0, 0.0), mask=m_ok)
            tl.store(row_base + 1, tl.where(real, ent, 0.0), mask=m_ok)
        if NORMALIZE_ENTROPY:
            visible = qpos + 1
            if HAS_WINDOW:
                visible = tl.minimum(visible, window)
            ent = tl.where(qpos > 0, ent / tl.log(tl.maximum(visible.to(tl.float32), 2.0)), 0.0)
        base = STATS + (pid_bh * n_qblocks + pid_m) * 3
        tl.store(base + 0, tl.sum(tl.where(counted, p0, 0.0), 0))
        tl.store(base + 1, tl.sum(tl.where(counted, ent, 0.0), 0))
        tl.store(base + 2, tl.sum(counted.to(tl.float32), 0))


def score_args(slopes: torch.Tensor, head_dim: int, device, opts: AttentionOptions
               ) -> tuple[torch.Tensor, float, float]:
    """What the kernels take for the score options of :mod:`.alibi`: ``(SLOPES, qk_scale, sm_scale)``.

    SLOPES is float32 ``[H]``: the slopes times ``bias_scale`` (the default path's kernel is unchanged); with
    ``alibi_bf16`` it is ``[H + 1]``: the bf16-rounded slopes, then ``bias_scale`` (see ``_slope_terms``).
    ``sm_scale`` is the scores' scale, ``qk_scale`` the same in base-2 units. Per-batch slopes ``[B, H]`` give
    ``[B, H]`` (``[B, H + 1]``), each row laid out as above: see :func:`slopes_batch_stride`."""
    softmax_scale, bias_scale, alibi_bf16 = opts.softmax_scale, opts.bias_scale, opts.alibi_bf16
    sm_scale = resolve_softmax_scale(head_dim, softmax_scale, bias_scale)
    qk_scale = LOG2E / math.sqrt(head_dim) if softmax_scale is None else LOG2E * sm_scale
    slopes = slopes.to(device=device, dtype=torch.float32)
    if alibi_bf16:
        slopes = torch.cat([round_bf16(slopes), slopes.new_full((*slopes.shape[:-1], 1), float(bias_scale))], -1)
    elif bias_scale != 1.0:
        slopes = slopes * float(bias_scale)
    return slopes.contiguous(), qk_scale, sm_scale


def slopes_batch_stride(slopes: torch.Tensor) -> int:
    """The kernels' ``slope_stride`` for SLOPES from :func:`score_args`: a program of batch row b reads its slopes
    at ``SLOPES + b * slope_stride``, so one ``[H]`` vector shared by the batch has stride 0 and per-batch slopes
    ``[B, H]`` (FlashAttention's ``alibi_slopes`` of shape ``(batch, nheads)``) their row stride."""
    return slopes.stride(0) if slopes.dim() == 2 else 0


def alibi_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor,
                        slopes: torch.Tensor, *, kstart: torch.Tensor | None = None, **options):
    """Launch the fused kernel.

    Args:
        q: ``[B, H, q_len, d]``; k, v: ``[B, Hkv, k_len, d]`` with ``q_len <= k_len`` and Hkv dividing H (grouped-query
            attention, Hkv = 1 multi-query: query head h reads key/value head ``h // (H // Hkv)`` in place, k and v
            are never expanded). Any strides with a unit stride on d.
        key_pos: int32 ``[B, k_len]`` from :func:`key_positions` (-1 marks a padded key).
        slopes: float32 ``[H]``, one per query head (zeros: plain causal attention), or ``[B, H]``, per batch row.
        kstart: int32 ``[B]``, :func:`first_real_key` of ``key_pos`` when the caller already has it (one per model
            forward, shared by its layers); computed here when None.
        options: the :class:`~.alibi.AttentionOptions` (statistics, score options, ``window``; defaults: BLOOM's
            scores, no statistics, no window).
    Returns:
        ``(out [B, q_len, H, d] in q's dtype, lse2 [B, H, q_len] float32, stats)``: ``lse2`` is the base-2
        log-sum-exp of the base-2 scores (+inf on padded query rows), what the backward reads; stats is None or a
        float32 ``[B, H, 3]`` tensor of (sum of first-token mass, sum of entropy, row count) over the counted rows;
        with ``row_stats`` it is instead float32 ``[B, H, q_len, 2]``: each row's raw first-token mass and entropy
        (nats, before ``normalize_entropy``; every real row, whatever ``exclude_first_query``), 0 on padded rows,
        the values :func:`~.attention_bwd.alibi_attention_bwd` differentiates (``stats_grad``).
    """
    opts = AttentionOptions(**options)
    batch, n_head, q_len, head_dim = q.shape
    k_len = k.shape[2]
    n_group = kv_groups(q.shape, k.shape, v.shape)
    window = resolve_window(opts.window, k_len)
    check_head_dim(head_dim)
    if q_len > k_len:
        raise ValueError(f"q_len ({q_len}) must not exceed k_len ({k_len})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride on head_dim")
        if t.dtype != q.dtype or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"q, k, v must share one of float32/float16/bfloat16, got {name} {t.dtype}")
    if key_pos.shape != (batch, k_len):
        raise ValueError(f"key_pos must be [batch, k_len] = {[batch, k_len]}, got {list(key_pos.shape)}")
    key_pos, kstart = kernel_positions(key_pos, kstart, q.device)
    slopes, qk_scale, _ = score_args(slopes, head_dim, q.device, opts)

    interp = interpreting()
    arch = None if interp else arch_of(q.device)
    cfg = pick_config(head_dim, q.dtype, arch, opts.with_stats, window > 0)
    n_qblocks = cdiv(q_len, cfg.block_m)
    # The interpreter truncates fp32 -> bf16 stores (a GPU rounds to nearest): there, store fp32 and round in torch.
    store_dtype = torch.float32 if interp and q.dtype == torch.bfloat16 else q.dtype
    out = torch.empty(batch, q_len, n_head, head_dim, device=q.device, dtype=store_dtype)
    lse = torch.empty(batch, n_head, q_len, device=q.device, dtype=torch.float32)
    with_stats = opts.with_stats or opts.row_stats
    stats = torch.empty(batch, n_head, n_qblocks, 3, device=q.device, dtype=torch.float32) if with_stats else lse
    rows = torch.zeros(batch, n_head, q_len, 2, device=q.device, dtype=torch.float32) if opts.row_stats else lse

    grid = (n_qblocks, batch * n_head)
    _alibi_fwd_kernel[grid](
        q, k, v, out, lse, key_pos, kstart, slopes, stats, rows,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        n_head, q_len, k_len, n_qblocks, qk_scale, n_group, window, slopes_batch_stride(slopes),
        HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        WITH_STATS=with_stats, EXCLUDE_FIRST=opts.exclude_first_query,
        NORMALIZE_ENTROPY=opts.normalize_entropy, UPCAST=interp and q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32, ALIBI_BF16=bool(opts.alibi_bf16), HAS_WINDOW=window > 0,
        ROW_STATS=bool(opts.row_stats), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if opts.row_stats:
        return out.to(q.dtype), lse, rows
    return out.to(q.dtype), lse, (stats.sum(2) if opts.with_stats else None)


def kernel_positions(key_pos: torch.Tensor, kstart: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key_pos, kstart)`` as the kernels read them: contiguous int32 on ``device``; ``kstart`` (each row's first
    real key) is computed from ``key_pos`` when None."""
    key_pos = key_pos.to(device=device, dtype=torch.int32).contiguous()
    if kstart is None:
        kstart = first_real_key(key_pos)
    return key_pos, kstart.to(device=device, dtype=torch.int32).contiguous()

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
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .alibi import first_real_key, resolve_softmax_scale, round_bf16

__all__ = ["alibi_attention_fwd", "pick_config", "FwdConfig", "kernel_supports", "SUPPORTED_HEAD_DIMS", "score_args"]

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


_MASKED = tl.constexpr(-1.0e30)  # additive mask: finite, so 0 * (s - m) never makes a NaN


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """tl.dot, with IEEE fp32 products when IEEE (fp32 inputs), else the default (tensor cores, tf32 for fp32)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _round_bf16(x):
    """fp32 rounded to the nearest bfloat16 (ties to even), kept in fp32. Integer arithmetic on the bits, so that
    the GPU and the interpreter round alike; exact for every finite x (the int32 sum never overflows)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _slope_terms(SLOPES, h, n_head, ALIBI_BF16: tl.constexpr):
    """(slope, bias scale) for :func:`_key_bias`: ``(slope * log2 e, unused)`` by default; with ALIBI_BF16 the
    launcher stored bf16-rounded slopes and then ``bias_scale`` at ``SLOPES[n_head]``:
    ``(slope, bias_scale * log2 e)``."""
    if ALIBI_BF16:
        return tl.load(SLOPES + h), tl.load(SLOPES + n_head) * _LOG2E
    else:
        return tl.load(SLOPES + h) * _LOG2E, 0.0


@triton.jit
def _key_bias(pos_row, offs_n, n_ok, slope2, bias2, IN_RANGE: tl.constexpr = False, ALIBI_BF16: tl.constexpr = False):
    """Per-key ALiBi bias in base-2 units: slope * position, or the mask value for padding and out-of-range keys.
    IN_RANGE: every key of the block is known to be < k_len (no bounds mask). ALIBI_BF16: Falcon's rounding,
    ``bias2 * R(slope2 * R(position))`` (see :func:`_slope_terms`)."""
    if IN_RANGE:
        kpos = tl.load(pos_row + offs_n)
    else:
        kpos = tl.load(pos_row + offs_n, mask=n_ok, other=-1)
    if ALIBI_BF16:
        return tl.where(kpos >= 0, _round_bf16(slope2 * _round_bf16(kpos.to(tl.float32))) * bias2, _MASKED)
    return tl.where(kpos >= 0, slope2 * kpos.to(tl.float32), _MASKED)


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Load a 2-D tile, bounds-masked only on the axes whose flag is set (unmasked loads pipeline and vectorise
    best): ROWS masks with ``row_ok[:, None]``, COLS with ``col_ok[None, :]``; masked-off lanes read 0."""
    if ROWS and COLS:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif ROWS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif COLS:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _first_key_score(q, k_base, kstart, k_len, stride_kt, offs_d, d_ok, qk_scale):
    """Each query row's score against the first real key, in base-2 units (its ALiBi bias is 0)."""
    k0 = tl.load(k_base + tl.minimum(kstart, k_len - 1) * stride_kt + offs_d, mask=d_ok, other=0.0)
    return tl.sum(q.to(tl.float32) * k0.to(tl.float32)[None, :], 1) * qk_scale


@triton.jit
def _query_block_keys(kstart, q_shift, pid_m, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks a query block visits: [lo, diag) need no causal mask, [diag, hi) do. Leading key blocks of pure
    padding (before the first real key ``kstart``) are skipped."""
    lo = (kstart // BLOCK_N) * BLOCK_N
    hi = tl.minimum(k_len, q_shift + (pid_m + 1) * BLOCK_M)
    diag = tl.maximum(lo, ((q_shift + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N)
    return lo, diag, hi


@triton.jit
def _fwd_block_range(
    acc, l_i, m_i, c_i, q, k_base, v_base, pos_row, slope2, bias2, qk_scale, row_k, offs_d, offs_n0,
    stride_kt, stride_vt, k_len, start, stop,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    WITH_STATS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr,
):
    """Online-softmax update over key blocks [start, stop). CAUSAL masks keys past each row (the diagonal blocks)."""
    d_ok = offs_d < HEAD_DIM
    # Left of the diagonal every key is < k_len, so those blocks load without a bounds mask, and head dims that
    # fill BLOCK_D need no lane mask. fp32 (IEEE) keeps both masks: its FMA dots' register budget was set with them.
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM or IEEE
    MASK_N: tl.constexpr = CAUSAL or IEEE
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < k_len
        bias = _key_bias(pos_row, offs_n, n_ok, slope2, bias2, not MASK_N, ALIBI_BF16)
        kt = _load_tile(k_base + offs_d[:, None] + offs_n[None, :] * stride_kt, d_ok, n_ok, MASK_D, MASK_N)
        v = _load_tile(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], n_ok, d_ok, MASK_N, MASK_D)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s2 = _dot(q, kt, IEEE) * qk_scale + bias[None, :]
        if CAUSAL:
            s2 = tl.where(offs_n[None, :] <= row_k[:, None], s2, _MASKED)
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
    Q, K, V, O, LSE, KPOS, KSTART, SLOPES, STATS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    n_head, q_len, k_len, n_qblocks, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WITH_STATS: tl.constexpr, EXCLUDE_FIRST: tl.constexpr, NORMALIZE_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_head
    h = pid_bh % n_head

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_shift = k_len - q_len  # query row i sits at key index i + q_shift
    row_k = offs_m + q_shift
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    slope2, bias2 = _slope_terms(SLOPES, h, n_head, ALIBI_BF16)  # base-2 units throughout: s2 = s * log2(e)
    kstart = tl.load(KSTART + b)
    pos_row = KPOS + b * k_len
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    c_i = tl.zeros([BLOCK_M], tl.float32)  # centred sum of p * (s2 - m), statistics only
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Score of the first real key (position 0, no ALiBi bias). fp16/bf16 compute it before the key loop, so that no
    # register copy of q outlives the loop; fp32 (IEEE dots, small tiles) spills less computing it after.
    s_first = tl.zeros([BLOCK_M], tl.float32)
    if WITH_STATS and not IEEE:
        s_first = _first_key_score(q, k_base, kstart, k_len, stride_kt, offs_d, d_ok, qk_scale)

    lo, diag, hi = _query_block_keys(kstart, q_shift, pid_m, k_len, BLOCK_M, BLOCK_N)
    acc, l_i, m_i, c_i = _fwd_block_range(
        acc, l_i, m_i, c_i, q, k_base, v_base, pos_row, slope2, bias2, qk_scale, row_k, offs_d, offs_n0,
        stride_kt, stride_vt, k_len, lo, diag,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, WITH_STATS, UPCAST, IEEE, ALIBI_BF16)
    acc, l_i, m_i, c_i = _fwd_block_range(
        acc, l_i, m_i, c_i, q, k_base, v_base, pos_row, slope2, bias2, qk_scale, row_k, offs_d, offs_n0,
        stride_kt, stride_vt, k_len, diag, hi,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, WITH_STATS, UPCAST, IEEE, ALIBI_BF16)

    qpos = tl.load(pos_row + row_k, mask=m_ok, other=-1)
    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # query blocks left of the first real key iterate nothing
    out = tl.where((qpos >= 0)[:, None], acc / l_i[:, None], 0.0)  # a padded query row outputs exactly 0
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * q_len + offs_m, (m_i + tl.math.log2(l_i)) * _LN2, mask=m_ok)

    if WITH_STATS:
        if IEEE:
            s_first = _first_key_score(q, k_base, kstart, k_len, stride_kt, offs_d, d_ok, qk_scale)
        counted = m_ok & (qpos >= 0)
        if EXCLUDE_FIRST:
            counted = counted & (qpos > 0)
        p0 = tl.math.exp2(tl.minimum(s_first - m_i, 0.0)) / l_i
        ent = (tl.math.log2(l_i) - c_i / l_i) * _LN2
        if NORMALIZE_ENTROPY:
            ent = tl.where(qpos > 0, ent / tl.log(tl.maximum((qpos + 1).to(tl.float32), 2.0)), 0.0)
        base = STATS + (pid_bh * n_qblocks + pid_m) * 3
        tl.store(base + 0, tl.sum(tl.where(counted, p0, 0.0), 0))
        tl.store(base + 1, tl.sum(tl.where(counted, ent, 0.0), 0))
        tl.store(base + 2, tl.sum(counted.to(tl.float32), 0))


class FwdConfig(NamedTuple):
    """Tile sizes and launch options chosen by :func:`pick_config`."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_config(head_dim: int, dtype: torch.dtype, arch: int | None = None, with_stats: bool = False) -> FwdConfig:
    """Tile sizes for one launch. ``arch`` is the compute capability as 80/86/89/90 (None: the interpreter).

    fp16/bf16 on sm_90: the fastest spill-free tiles of a timed sweep on an H100 (``bench/tune_attention.py``,
    bf16, T = 2048, 8,192 tokens; docs/benchmarks.md). Elsewhere untimed spill-free tiles, with 2 pipeline stages
    on sm_86/sm_89 for their 99 KB of shared memory. fp32 uses IEEE (FMA) dot products, whose register appetite forces small tiles. Every
    configuration returned here compiles with 0 spills on sm_80/86/89/90 (``ptxas -v``, re-checked by a unit test).
    """
    wide = triton.next_power_of_2(head_dim) > 64
    if arch is None:
        return FwdConfig(64, 64, 4, 1)
    if dtype == torch.float32:
        return FwdConfig(32, 16, 8, 2) if wide else FwdConfig(32, 32, 8, 2)
    if arch == 90:  # timed on an H100; at d = 64 the plain kernel's best tile spills 16 bytes with statistics
        if wide:
            return FwdConfig(64, 64, 4, 3)
        return FwdConfig(128, 64, 8, 3) if with_stats else FwdConfig(64, 128, 4, 2)
    if arch in (86, 89):  # untimed (no such GPU here): spill-free tiles within 99 KB of shared memory
        # At d > 64, 4 warps sat at 255 registers and spilled 12 bytes once padded rows were zeroed: 8 warps.
        return FwdConfig(64, 64, 8, 2) if wide else FwdConfig(128, 64, 8, 2)
    return FwdConfig(64, 64, 8, 3) if wide else FwdConfig(128, 64, 8, 3)  # sm_80, untimed


SUPPORTED_HEAD_DIMS = "a multiple of 16 from 16 to 128"


def kernel_supports(head_dim: int) -> str | None:
    """None when the Triton attention kernels (forward and backward) run ``head_dim``, else why not, in one line.
    The one statement of the kernels' head-dim limit: backend choice and the launchers all ask it."""
    if head_dim % 16 == 0 and 16 <= head_dim <= 128:
        return None
    return f"the triton kernels need head_dim to be {SUPPORTED_HEAD_DIMS}, got {head_dim}"


def check_head_dim(head_dim: int) -> None:
    """Raise ValueError unless :func:`kernel_supports` ``head_dim``."""
    reason = kernel_supports(head_dim)
    if reason is not None:
        raise ValueError(reason)


def score_args(slopes: torch.Tensor, head_dim: int, device, softmax_scale: float | None, bias_scale: float,
               alibi_bf16: bool) -> tuple[torch.Tensor, float, float]:
    """What the kernels take for the score options of :mod:`.alibi`: ``(SLOPES, qk_scale, sm_scale)``.

    SLOPES is float32 ``[H]``: the slopes times ``bias_scale`` (the default path's kernel is unchanged); with
    ``alibi_bf16`` it is ``[H + 1]``: the bf16-rounded slopes, then ``bias_scale`` (see ``_slope_terms``).
    ``sm_scale`` is the scores' scale, ``qk_scale`` the same in base-2 units."""
    sm_scale = resolve_softmax_scale(head_dim, softmax_scale, bias_scale)
    qk_scale = LOG2E / math.sqrt(head_dim) if softmax_scale is None else LOG2E * sm_scale
    slopes = slopes.to(device=device, dtype=torch.float32)
    if alibi_bf16:
        slopes = torch.cat([round_bf16(slopes), slopes.new_tensor([float(bias_scale)])])
    elif bias_scale != 1.0:
        slopes = slopes * float(bias_scale)
    return slopes.contiguous(), qk_scale, sm_scale


def alibi_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_pos: torch.Tensor,
    slopes: torch.Tensor,
    *,
    with_stats: bool = False,
    exclude_first_query: bool = False,
    normalize_entropy: bool = False,
    softmax_scale: float | None = None,
    bias_scale: float = 1.0,
    alibi_bf16: bool = False,
):
    """Launch the fused kernel.

    Args:
        q: ``[B, H, q_len, d]``; k, v: ``[B, H, k_len, d]`` with ``q_len <= k_len``. Any strides with a unit stride
            on d.
        key_pos: int32 ``[B, k_len]`` from :func:`key_positions` (-1 marks a padded key).
        slopes: float32 ``[H]``.
        softmax_scale, bias_scale, alibi_bf16: the score options of :mod:`.alibi` (defaults: BLOOM's scores).
    Returns:
        ``(out [B, q_len, H, d] in q's dtype, lse [B, H, q_len] float32, stats)`` where stats is None or a float32
        ``[B, H, 3]`` tensor of (sum of first-token mass, sum of entropy, row count) over the counted rows.
    """
    batch, n_head, q_len, head_dim = q.shape
    k_len = k.shape[2]
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
    key_pos = key_pos.to(device=q.device, dtype=torch.int32).contiguous()
    kstart = first_real_key(key_pos).to(torch.int32)
    slopes, qk_scale, _ = score_args(slopes, head_dim, q.device, softmax_scale, bias_scale, alibi_bf16)

    interp = interpreting()
    arch = None if interp else _arch(q.device)
    cfg = pick_config(head_dim, q.dtype, arch, with_stats)
    n_qblocks = triton.cdiv(q_len, cfg.block_m)
    # The interpreter truncates fp32 -> bf16 stores (a GPU rounds to nearest): there, store fp32 and round in torch.
    store_dtype = torch.float32 if interp and q.dtype == torch.bfloat16 else q.dtype
    out = torch.empty(batch, q_len, n_head, head_dim, device=q.device, dtype=store_dtype)
    lse = torch.empty(batch, n_head, q_len, device=q.device, dtype=torch.float32)
    stats = torch.empty(batch, n_head, n_qblocks, 3, device=q.device, dtype=torch.float32) if with_stats else lse

    grid = (n_qblocks, batch * n_head)
    _alibi_fwd_kernel[grid](
        q, k, v, out, lse, key_pos, kstart, slopes, stats,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        n_head, q_len, k_len, n_qblocks, qk_scale,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        WITH_STATS=with_stats, EXCLUDE_FIRST=exclude_first_query, NORMALIZE_ENTROPY=normalize_entropy,
        UPCAST=interp and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32, ALIBI_BF16=bool(alibi_bf16),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.to(q.dtype), lse, (stats.sum(2) if with_stats else None)


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor

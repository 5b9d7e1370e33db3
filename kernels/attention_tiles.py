"""Triton building blocks shared by the attention kernels (forward and backward): dots, ALiBi bias tiles with their
bias origin, masked tile loads, the query rows of a program, the key blocks it visits, and the score tile.

Every function is ``@triton.jit`` and inlined into the kernels that call it; the constexpr flags select code at
compile time, so a flag left at its default compiles to nothing. The semantics are those stated in
:mod:`.attention_fwd` (scores, bottom-right causal alignment, padding) and :mod:`.alibi` (score options).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["LOG2E", "ORIGIN_ROWS"]

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


ORIGIN_ROWS = 128  # query rows that share one bias origin (every BLOCK_M divides it)
_ORIGIN_ROWS = tl.constexpr(ORIGIN_ROWS)


@triton.jit
def _bias_origin(start_m, q_shift, kstart, ALIBI_BF16: tl.constexpr):
    """The bias origin of query rows [start_m, start_m + BLOCK_M): a position near theirs, the same for every row
    of a group of ORIGIN_ROWS query rows, whatever the tile. Softmax is unchanged by a per-row constant, so the
    kernels add ``slope * (pos - origin)`` instead of ``slope * pos``: scores and the log-sum-exp stay small at long
    T, where absolute ALiBi biases of ~1e3 would cost their fp32 rounding (the fp32 2x-eager gap). Falcon's
    bf16-rounded bias (ALIBI_BF16) is defined on absolute positions and keeps origin 0."""
    if ALIBI_BF16:
        return start_m * 0
    return (start_m // _ORIGIN_ROWS) * _ORIGIN_ROWS + q_shift - kstart


@triton.jit
def _pos_bias(kpos, slope2, bias2, origin, ALIBI_BF16: tl.constexpr):
    """ALiBi bias of keys at positions ``kpos`` in base-2 units, relative to ``origin`` (:func:`_bias_origin`), or
    the mask value for padded keys (position -1). ALIBI_BF16: Falcon's rounding,
    ``bias2 * R(slope2 * R(position))`` (see :func:`_slope_terms`)."""
    if ALIBI_BF16:
        return tl.where(kpos >= 0, _round_bf16(slope2 * _round_bf16(kpos.to(tl.float32))) * bias2, _MASKED)
    return tl.where(kpos >= 0, slope2 * (kpos.to(tl.float32) - origin.to(tl.float32)), _MASKED)


@triton.jit
def _key_bias(pos_row, offs_n, n_ok, slope2, bias2, origin, IN_RANGE: tl.constexpr = False,
              ALIBI_BF16: tl.constexpr = False):
    """:func:`_pos_bias` of the keys ``offs_n`` (positions read from ``pos_row``; keys past k_len are masked).
    IN_RANGE: every key of the block is known to be < k_len (no bounds mask)."""
    if IN_RANGE:
        kpos = tl.load(pos_row + offs_n)
    else:
        kpos = tl.load(pos_row + offs_n, mask=n_ok, other=-1)
    return _pos_bias(kpos, slope2, bias2, origin, ALIBI_BF16)


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
def _query_rows(n_head, q_len, k_len, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query block of a program on a (query block, batch * head) grid:
    ``(pid_bh, b, h, offs_m, offs_d, row_k, m_ok, d_ok)``, with ``row_k`` each row's key index (bottom-right
    causal: query row i sits at key ``i + k_len - q_len``)."""
    pid_bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return (pid_bh, pid_bh // n_head, pid_bh % n_head, offs_m, offs_d, offs_m + (k_len - q_len), offs_m < q_len,
            offs_d < HEAD_DIM)


@triton.jit
def _key_block(KPOS, KSTART, SLOPES, n_head, k_len, slope_stride, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, ALIBI_BF16: tl.constexpr):
    """The key block of a program on a (key block, batch * head) grid (the dK/dV pass, the key-side pass):
    ``(pid_bh, b, h, start_n, offs_n, offs_d, n_ok, d_ok, slope2, kstart, key_bias)``. ``key_bias`` is the keys'
    bias relative to the block's own origin (``start_n - kstart``), hoisted out of the query loop: small and exact;
    each query block shifts it by one scalar (``slope2`` times the difference of origins). The shift rounds at the
    size of slope * distance, where the probabilities are exponentially small (Falcon's bf16 bias is absolute:
    origin 0, no shift)."""
    pid_bh = tl.program_id(1)
    b = pid_bh // n_head
    h = pid_bh % n_head
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_len
    slope2, bias2 = _slope_terms(SLOPES + b * slope_stride, h, n_head, ALIBI_BF16)
    kpos = tl.load(KPOS + b * k_len + offs_n, mask=n_ok, other=-1)
    kstart = tl.load(KSTART + b)
    key_bias = _pos_bias(kpos, slope2, bias2, start_n - kstart, ALIBI_BF16)  # (the origin is unused under ALIBI_BF16)
    return pid_bh, b, h, start_n, offs_n, offs_d, n_ok, offs_d < HEAD_DIM, slope2, kstart, key_bias


@triton.jit
def _load_rows(base, offs_m, offs_d, stride_t, m_ok, d_ok, UPCAST: tl.constexpr):
    """A ``[rows, BLOCK_D]`` tile at ``base + row * stride_t + d`` (masked-off lanes read 0), in fp32 when UPCAST."""
    x = tl.load(base + offs_m[:, None] * stride_t + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _first_key_score(q, k_base, kstart, k_len, stride_kt, offs_d, d_ok, qk_scale, slope2, origin):
    """Each query row's score against the first real key, in base-2 units (its position is 0: bias
    ``slope2 * -origin``, 0 under ALIBI_BF16, whose origin is 0)."""
    k0 = tl.load(k_base + tl.minimum(kstart, k_len - 1) * stride_kt + offs_d, mask=d_ok, other=0.0)
    return tl.sum(q.to(tl.float32) * k0.to(tl.float32)[None, :], 1) * qk_scale - slope2 * origin.to(tl.float32)


@triton.jit
def _query_block_keys(kstart, q_shift, pid_m, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks a query block visits: [lo, diag) need no causal mask, [diag, hi) do. Leading key blocks of pure
    padding (before the first real key ``kstart``) are skipped."""
    lo = (kstart // BLOCK_N) * BLOCK_N
    hi = tl.minimum(k_len, q_shift + (pid_m + 1) * BLOCK_M)
    diag = tl.maximum(lo, ((q_shift + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N)
    return lo, diag, hi


@triton.jit
def _window_keys(kstart, q_shift, pid_m, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks a query block visits under a sliding window of ``window`` keys: ``(lo, wend, diag)``. Blocks
    wholly left of the first row's window (or of the first real key) are skipped: the visit starts at ``lo``;
    [lo, wend) hold keys that some row's window has already left (window mask), [wend, diag) keys every row sees
    (no mask), and [diag, hi) of :func:`_query_block_keys` the diagonal (causal and window masks)."""
    first_row = q_shift + pid_m * BLOCK_M
    lo = (tl.maximum(kstart, first_row - window + 1) // BLOCK_N) * BLOCK_N
    diag = tl.maximum(lo, (first_row // BLOCK_N) * BLOCK_N)
    # keys >= first_row + BLOCK_M - window are inside every row's window; round up to a whole block
    wend = tl.minimum(diag, tl.maximum(lo, ((first_row + BLOCK_M - window + BLOCK_N - 1) // BLOCK_N) * BLOCK_N))
    return lo, wend, diag


@triton.jit
def _scores(q, k_base, pos_row, offs_n, offs_d, row_k, k_len, stride_kt, slope2, bias2, origin, qk_scale,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
            IEEE: tl.constexpr, ALIBI_BF16: tl.constexpr, window=0, WINDOW: tl.constexpr = False):
    """``(s2, kt, n_ok)``: the base-2 scores of a query tile against the keys ``offs_n`` (bias, padding and, when
    CAUSAL, the causal mask applied; with WINDOW the sliding window's left edge, key j visible to the row at key
    index r iff ``j > r - window``), the transposed key tile ``[BLOCK_D, BLOCK_N]``, and which keys are < k_len.

    Left of the diagonal every key is < k_len, so those blocks load without a bounds mask, and head dims that fill
    BLOCK_D need no lane mask. fp32 (IEEE) keeps both masks: its FMA dots' register budget was set with them."""
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM or IEEE
    MASK_N: tl.constexpr = CAUSAL or IEEE
    n_ok = offs_n < k_len
    bias = _key_bias(pos_row, offs_n, n_ok, slope2, bias2, origin, not MASK_N, ALIBI_BF16)
    kt = _load_tile(k_base + offs_d[:, None] + offs_n[None, :] * stride_kt, offs_d < HEAD_DIM, n_ok, MASK_D, MASK_N)
    if UPCAST:
        kt = kt.to(tl.float32)
    s2 = _dot(q, kt, IEEE) * qk_scale + bias[None, :]
    if CAUSAL:
        s2 = tl.where(offs_n[None, :] <= row_k[:, None], s2, _MASKED)
    if WINDOW:
        s2 = tl.where(offs_n[None, :] > row_k[:, None] - window, s2, _MASKED)
    return s2, kt, n_ok

"""Blocked ALiBi attention in plain torch: the CPU backend, and the readable twin of ``attention_fwd``.

It runs the kernel's algorithm (online softmax over key blocks, padding as a per-key bias, the causal mask only on
diagonal tiles, centred entropy accumulator, first-token score recomputed from q and the position-0 key) with
torch ops, in base-2 units as the kernel (``s2 = s * log2 e``, ``exp2``), on ``[block_q, block_k]`` tiles batched
over (batch, head). The log-sum-exp it returns is the kernel's ``lse2``: base 2, +inf on padded query rows, so the
two implementations' forward and backward halves can be paired either way. Memory is
O(block_q * block_k * B * H): no T x T matrix is built; the forward also holds float32 contiguous copies of q, k and
v (O(T * H * d), made once per call), the backward upcasts per tile; accumulation is fp32.

Speed on a CPU: every torch op on a tile is one parallel region, and on a machine whose cores are shared with other
processes each region waits for its slowest (descheduled) thread, so the time follows the number of ops more than the
work. The forward therefore uses large tiles (``BLOCK_Q`` x ``BLOCK_K``, 256 x 512: at T = 2048 24 tiles per call
instead of 136 at 128 x 128), the key tiles of a query tile end with one square diagonal tile (only its upper
triangle is masked work, about 1/8 more than the causal half at T = 2048), the scale is folded into the query tile,
the bias is added per run of rows sharing an origin (a ``[B, H, 1, cols]`` broadcast) and the scores are updated in
place (bias, masks, centring, the entropy product). Limits: it is still about ten full passes over each score tile
(eager attention makes fewer, larger ones), so on a heavily shared CPU it can stay slower than eager; the tiles are
not the GPU kernel's, so the two agree to rounding, not bit for bit.
Masking is additive with -1e30, as in the kernel, so rows with no visible key stay finite.
A padded query row (position -1) outputs exactly 0, as in the kernel, and its backward gives it no gradient.
The score options (``softmax_scale``, ``bias_scale``, ``alibi_bf16``) are those of :mod:`.alibi`; the bias is built
once per call by :func:`.alibi.alibi_bias` ([B, H, k_len], small).
"""

from __future__ import annotations

import torch

import math

from .alibi import (AttentionOptions, alibi_bias, first_real_key, kv_groups, refuse_backward, resolve_softmax_scale,
                    resolve_window, stats_grad_terms)

__all__ = ["alibi_attention_blocked", "alibi_attention_blocked_bwd"]

MASKED = -1.0e30  # additive mask, as in the kernel: finite, so 0 * (s - m) never makes a NaN
LOG2E = 1.4426950408889634


ORIGIN_ROWS = 128  # as the kernels' ``_bias_origin``
BLOCK_Q, BLOCK_K = 256, 512  # the forward's tiles: few large ops (see alibi_attention_blocked)


class _Bias:
    """Base-2 ALiBi bias tiles as the kernels build them: ``slope * (pos_j - origin_i)`` with each query row's
    origin (a position near its own, shared by groups of ORIGIN_ROWS rows: softmax ignores a per-row constant, and
    small scores keep fp32 precise at long T), the mask value on padded keys. Falcon's bf16-rounded bias
    (``alibi_bf16``) is absolute (origin 0)."""

    def __init__(self, slopes, key_pos, first_key, shift, opts: AttentionOptions):
        self.key_pos, self.first_key, self.shift, self.bf16 = key_pos, first_key, shift, opts.alibi_bf16
        slopes = slopes.to(device=key_pos.device, dtype=torch.float32)
        if self.bf16:
            self.absolute = alibi_bias(slopes, key_pos, opts.bias_scale, True)[:, :, None, :] * LOG2E
        else:
            slope2 = slopes * float(opts.bias_scale) * LOG2E  # [H] or per batch row [B, H]
            self.slope2 = slope2.reshape(-1, slopes.shape[-1], 1, 1)  # [1 or B, H, 1, 1]

    def origin(self, q0: int, q1: int) -> torch.Tensor:
        """``[B, 1, q1 - q0, 1]`` int64 origins of query rows [q0, q1)."""
        rows = torch.arange(q0, q1, device=self.key_pos.device)
        origin = (rows // ORIGIN_ROWS * ORIGIN_ROWS + self.shift)[None, :] - self.first_key[:, None]
        return (origin * (not self.bf16))[:, None, :, None]

    def offsets(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """``[B, 1, q1 - q0, k1 - k0]`` float32 key positions relative to each query row's origin."""
        return (self.key_pos[:, None, None, k0:k1] - self.origin(q0, q1)).float()

    def tile(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """``[B, H, q1 - q0, k1 - k0]`` (or broadcastable) bias of query rows [q0, q1) against keys [k0, k1)."""
        pos = self.key_pos[:, None, None, k0:k1]
        bias = self.absolute[..., k0:k1] if self.bf16 else self.slope2 * self.offsets(q0, q1, k0, k1)
        return torch.where(pos >= 0, bias, MASKED)

    def add_(self, s: torch.Tensor, q0: int, q1: int, k0: int, k1: int, padded: bool) -> torch.Tensor:
        """``s += tile(q0, q1, k0, k1)`` in place on the scores ``s [B, H, q1 - q0, k1 - k0]``, one broadcast add per
        run of rows that share an origin (``[B, H, 1, k1 - k0]`` each: the same values as the tile, none of its
        size); ``padded``: some key of [k0, k1) is padding (masked)."""
        if self.bf16:
            s.add_(self.absolute[..., k0:k1])
        else:
            r0 = q0
            while r0 < q1:
                r1 = min(q1, (r0 // ORIGIN_ROWS + 1) * ORIGIN_ROWS)  # rows [r0, r1) share one origin
                s[:, :, r0 - q0:r1 - q0].add_(self.slope2 * self.offsets(r0, r0 + 1, k0, k1))
                r0 = r1
        if padded:
            s.masked_fill_(self.key_pos[:, None, None, k0:k1] < 0, MASKED)
        return s

    def first_key_bias(self, q0: int, q1: int) -> torch.Tensor:
        """``[B, H, q1 - q0]`` bias of position 0 (0 under ``alibi_bf16``)."""
        if self.bf16:
            return torch.zeros(1, 1, 1, device=self.key_pos.device)
        return (self.slope2 * -self.origin(q0, q1).float())[..., 0]


def _key_tiles(k_start: int, diagonal: int, end: int, block_k: int) -> list[tuple[int, int]]:
    """Key tiles ``(k0, k1)`` of one query tile whose first row sits at key index ``diagonal``: ``block_k`` wide
    from ``k_start`` up to ``diagonal``, then the diagonal tile ``[diagonal, end)`` (as wide as the query tile, so
    only its upper triangle is masked work)."""
    diagonal = max(k_start, diagonal)
    tiles = [(k0, min(k0 + block_k, diagonal)) for k0 in range(k_start, diagonal, block_k)]
    return tiles + ([(diagonal, end)] if diagonal < end else [])


def alibi_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor,
                            slopes: torch.Tensor, *, kstart: torch.Tensor | None = None, block_q: int = BLOCK_Q,
                            block_k: int = BLOCK_K, **options):
    """Same contract as :func:`alibi_surgery.kernels.attention_fwd.alibi_attention_fwd`; ``block_q``/``block_k``
    are the tile sizes.

    Grouped-query attention (k, v ``[B, Hkv, Tk, d]``, G = H // Hkv query heads per key/value head) expands no key
    or value: each query tile is viewed as ``[B, Hkv, G * rows, d]`` (head h = g + G * kv head, the kernel's
    ``h // G``), so one matmul against the key/value tiles as they are serves the whole group; the scores are then
    viewed per query head for the bias, the masks and the softmax. A ``window`` skips the key tiles left of a query
    tile's window and masks the partially covered ones, as the kernel does.

    Speed (why the tiles are large and the tile loop works in place): on a CPU each torch op is a parallel region,
    and on a shared machine every region waits for its slowest thread, so the time follows the number of ops more
    than their size; see the module docstring. q, k and v of any strides (views of a packed QKV) are made
    contiguous float32 once per call, an extra O(T * H * d) beside the O(block_q * block_k * B * H) of the tiles."""
    opts = AttentionOptions(**options)
    batch, n_head, q_len, head_dim = q.shape
    n_kv, k_len = k.shape[1], k.shape[2]
    group = kv_groups(q.shape, k.shape, v.shape)
    window = resolve_window(opts.window, k_len)
    if q_len > k_len:
        raise ValueError(f"q_len ({q_len}) must not exceed k_len ({k_len})")
    f32 = torch.float32
    scale = resolve_softmax_scale(head_dim, opts.softmax_scale, opts.bias_scale) * LOG2E  # base-2 units
    key_pos = key_pos.to(device=q.device, dtype=torch.int64)
    key_ok = key_pos >= 0  # [B, Tk]
    first_key = first_real_key(key_pos) if kstart is None else kstart.to(device=q.device, dtype=torch.int64)
    shift = k_len - q_len
    # one host read: key tiles from last_pad + 1 on hold no padded key and skip the padding mask
    last_pad = int(torch.where(key_ok.all(0), -1, torch.arange(k_len, device=q.device)).max()) if k_len else -1
    out_dtype = q.dtype
    q, k, v = (t.to(f32).contiguous() for t in (q, k, v))  # strided views of a packed QKV: one copy each, here

    out = torch.empty(batch, q_len, n_head, head_dim, device=q.device, dtype=out_dtype)
    lse = torch.empty(batch, n_head, q_len, device=q.device, dtype=f32)
    with_stats = opts.with_stats or opts.row_stats
    stats = torch.zeros(batch, n_head, 3, device=q.device, dtype=f32) if with_stats else None
    rows_out = torch.zeros(batch, n_head, q_len, 2, device=q.device, dtype=f32) if opts.row_stats else None
    k_lo = (int(first_key.min()) // block_k) * block_k
    bias = _Bias(slopes, key_pos, first_key, shift, opts)
    # Key of position 0 per batch row, for the first-token score (as the kernel does: one dot per row).
    k_first = k[torch.arange(batch, device=q.device), :, first_key.clamp(max=k_len - 1)]  # [B, Hkv, d]

    for q0 in range(0, q_len, block_q):
        q1 = min(q0 + block_q, q_len)
        rows = torch.arange(q0, q1, device=q.device) + shift  # key index of each query row
        qb = (q[:, :, q0:q1] * scale).reshape(batch, n_kv, group * (q1 - q0), head_dim)  # group folded into rows
        per_head = (batch, n_head, q1 - q0)  # a [B, Hkv, G * rows, ...] result viewed per query head
        m = torch.full((batch, n_head, q1 - q0), -1.0e30, device=q.device, dtype=f32)
        l = torch.zeros_like(m)
        acc = torch.zeros(batch, n_head, q1 - q0, head_dim, device=q.device, dtype=f32)
        centred = torch.zeros_like(m)
        # a window hides every key tile wholly left of the first row's window
        k_start = max(k_lo, (shift + q0 - window + 1) // block_k * block_k) if window else k_lo
        for k0, k1 in _key_tiles(k_start, shift + q0, min(k_len, shift + q1), block_k):
            s = torch.matmul(qb, k[:, :, k0:k1].transpose(-1, -2)).view(*per_head, k1 - k0)
            s = bias.add_(s, q0, q1, k0, k1, padded=k0 <= last_pad)
            cols = torch.arange(k0, k1, device=q.device)[None, :]
            if k1 - 1 > shift + q0:  # a diagonal tile: some key lies after some query row
                s.masked_fill_(cols > rows[:, None], MASKED)
            if window and k0 <= shift + q1 - 1 - window:  # some row's window has left key k0
                s.masked_fill_(cols <= rows[:, None] - window, MASKED)
            m_new = torch.maximum(m, s.amax(-1))
            alpha = torch.exp2(m - m_new)
            s_centred = s.sub_(m_new[..., None])
            p = torch.exp2(s_centred)
            if with_stats:  # sum_j p_j * s_centred_j, in s's own storage (s is not read again)
                centred = alpha * (centred + (m - m_new) * l) + s_centred.mul_(p).sum(-1)
            l = l * alpha + p.sum(-1)
            pv = torch.matmul(p.view(batch, n_kv, -1, k1 - k0), v[:, :, k0:k1])
            acc.mul_(alpha[..., None]).add_(pv.view(*per_head, head_dim))
            m = m_new

        l = torch.where(l > 0, l, 1.0)  # query blocks left of every real key iterate nothing
        row_ok = key_ok[:, rows][:, None, :, None]  # [B, 1, bq, 1]: a padded query row outputs exactly 0
        out[:, q0:q1] = torch.where(row_ok, acc / l[..., None], 0.0).transpose(1, 2).to(out_dtype)
        lse[:, :, q0:q1] = torch.where(row_ok[..., 0], m + torch.log2(l), math.inf)

        if with_stats:
            qpos = key_pos[:, rows][:, None, :]  # [B, 1, bq]
            counted = qpos >= 0
            if opts.exclude_first_query:
                counted = counted & (qpos > 0)
            s_first = torch.matmul(qb, k_first[..., None]).view(per_head) + bias.first_key_bias(q0, q1)
            p0 = torch.exp2((s_first - m).clamp_max(0.0)) / l
            if window:  # the first real key has left the window of later rows: no mass on it
                p0 = torch.where(first_key[:, None, None] > rows[None, None, :] - window, p0, 0.0)
            ent = (torch.log2(l) - centred / l) * math.log(2.0)
            if opts.row_stats:  # raw, every real row; 0 on padded rows
                rows_out[:, :, q0:q1] = torch.where((qpos >= 0)[..., None], torch.stack([p0, ent], -1), 0.0)
            if opts.normalize_entropy:
                n_visible = ((qpos + 1).clamp_max(window) if window else qpos + 1).to(f32).clamp_min(2.0)
                ent = torch.where(qpos > 0, ent / torch.log(n_visible), 0.0)
            stats[..., 0] += torch.where(counted, p0, 0.0).sum(-1)
            stats[..., 1] += torch.where(counted, ent, 0.0).sum(-1)
            stats[..., 2] += counted.to(f32).sum(-1)
    return out, lse, (rows_out if opts.row_stats else stats)


def alibi_attention_blocked_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, key_pos: torch.Tensor, slopes: torch.Tensor, *,
                                kstart: torch.Tensor | None = None, grads: tuple | None = None,
                                stats_grad: tuple | None = None, block_q: int = 128, block_k: int = 128, **options):
    """Gradients (dq, dk, dv) of :func:`alibi_attention_blocked`, recomputing each probability tile from ``lse``.

    ``do`` and ``out`` are ``[B, q_len, H, d]``; q, k, v, ``lse`` (base 2) and the options as in the forward;
    ``grads`` and ``stats_grad`` as in :func:`~.attention_bwd.alibi_attention_bwd`. Padded query rows (position -1, ``lse`` +inf) get
    no gradient and pass none on: the forward outputs the constant 0 there, so this is its exact derivative.
    Memory is O(block_q * block_k * B * H) plus the three gradients, accumulated in fp32 and returned in q's dtype.
    One key/value head per query head and no ``window`` (UsageError otherwise: not implemented).
    """
    batch, n_head, q_len, head_dim = q.shape
    k_len = k.shape[2]
    opts = AttentionOptions(**options)
    refuse_backward(n_head, k.shape[1], opts.window)
    f32 = torch.float32
    scale = resolve_softmax_scale(head_dim, opts.softmax_scale, opts.bias_scale)
    key_pos = key_pos.to(device=q.device, dtype=torch.int64)
    shift = k_len - q_len
    first_key = first_real_key(key_pos) if kstart is None else kstart.to(device=q.device, dtype=torch.int64)
    bias = _Bias(slopes, key_pos, first_key, shift, opts)
    do = do.to(f32).transpose(1, 2)  # [B, H, q_len, d]
    delta = (do * out.to(f32).transpose(1, 2)).sum(-1)  # rowsum(dO * O) = sum_j P_ij dP_ij
    if stats_grad is not None:
        gstat, delta = stats_grad_terms(stats_grad, delta)
    dq = torch.zeros(batch, n_head, q_len, head_dim, device=q.device, dtype=f32)
    dk = torch.zeros(batch, n_head, k_len, head_dim, device=q.device, dtype=f32)
    dv = torch.zeros_like(dk)
    k_lo = (int(first_key.min()) // block_k) * block_k

    for q0 in range(0, q_len, block_q):
        q1 = min(q0 + block_q, q_len)
        rows = torch.arange(q0, q1, device=q.device) + shift
        qb, dob = q[:, :, q0:q1].to(f32), do[:, :, q0:q1]
        lse_b, delta_b = lse[:, :, q0:q1, None], delta[:, :, q0:q1, None]
        for k0 in range(k_lo, min(k_len, shift + q1), block_k):
            k1 = min(k0 + block_k, k_len)
            kb, vb = k[:, :, k0:k1].to(f32), v[:, :, k0:k1].to(f32)
            s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale * LOG2E).add_(bias.tile(q0, q1, k0, k1))
            if k1 - 1 > shift + q0:
                s = s.masked_fill(torch.arange(k0, k1, device=q.device)[None, :] > rows[:, None], MASKED)
            p = torch.exp2(s - lse_b)  # lse +inf on padded rows: exactly 0
            dv[:, :, k0:k1] += torch.matmul(p.transpose(-1, -2), dob)
            dp = torch.matmul(dob, vb.transpose(-1, -2))
            if stats_grad is not None:  # as the kernels' _stats_dp
                g_first, g_ent = gstat[:, :, q0:q1, 0:1], gstat[:, :, q0:q1, 1:2]
                dp -= g_ent * torch.where(p > 0, s - lse_b, 0.0)
                is_first = torch.arange(k0, k1, device=q.device)[None, :] == first_key[:, None]  # [B, cols]
                dp += torch.where(is_first[:, None, None, :], g_first, 0.0)
            ds = p * (dp - delta_b)
            dq[:, :, q0:q1] += torch.matmul(ds, kb)
            dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb)
    result = (dq * scale).to(q.dtype), (dk * scale).to(q.dtype), dv.to(q.dtype)
    if grads is None:
        return result
    for target, got in zip(grads, result):
        target.copy_(got)
    return grads

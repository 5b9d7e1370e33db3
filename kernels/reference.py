"""Blocked ALiBi attention in plain torch: the CPU backend, and the readable twin of ``attention_fwd``.

It runs the kernel's algorithm (online softmax over key blocks, padding as a per-key bias, the causal mask only on
diagonal tiles, centred entropy accumulator, first-token score recomputed from q and the position-0 key) with
torch ops, in base-2 units as the kernel (``s2 = s * log2 e``, ``exp2``), on ``[block_q, block_k]`` tiles batched
over (batch, head). The log-sum-exp it returns is the kernel's ``lse2``: base 2, +inf on padded query rows, so the
two implementations' forward and backward halves can be paired either way. Memory is
O(block_q * block_k * B * H): no T x T matrix is built. Low-precision inputs are upcast per tile; accumulation is fp32.
Masking is additive with -1e30, as in the kernel, so rows with no visible key stay finite.
A padded query row (position -1) outputs exactly 0, as in the kernel, and its backward gives it no gradient.
The score options (``softmax_scale``, ``bias_scale``, ``alibi_bf16``) are those of :mod:`.alibi`; the bias is built
once per call by :func:`.alibi.alibi_bias` ([B, H, k_len], small).
"""

from __future__ import annotations

import torch

import math

from .alibi import (AttentionOptions, alibi_bias, first_real_key, kv_groups, refuse_backward, resolve_softmax_scale,
                    resolve_window)

__all__ = ["alibi_attention_blocked", "alibi_attention_blocked_bwd"]

MASKED = -1.0e30  # additive mask, as in the kernel: finite, so 0 * (s - m) never makes a NaN
LOG2E = 1.4426950408889634


ORIGIN_ROWS = 128  # as the kernels' ``_bias_origin``


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

    def tile(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """``[B, H, q1 - q0, k1 - k0]`` (or broadcastable) bias of query rows [q0, q1) against keys [k0, k1)."""
        pos = self.key_pos[:, None, None, k0:k1]
        bias = self.absolute[..., k0:k1] if self.bf16 else self.slope2 * (pos - self.origin(q0, q1)).float()
        return torch.where(pos >= 0, bias, MASKED)

    def first_key_bias(self, q0: int, q1: int) -> torch.Tensor:
        """``[B, H, q1 - q0]`` bias of position 0 (0 under ``alibi_bf16``)."""
        if self.bf16:
            return torch.zeros(1, 1, 1, device=self.key_pos.device)
        return (self.slope2 * -self.origin(q0, q1).float())[..., 0]


def alibi_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor,
                            slopes: torch.Tensor, *, kstart: torch.Tensor | None = None, block_q: int = 128,
                            block_k: int = 128, **options):
    """Same contract as :func:`alibi_surgery.kernels.attention_fwd.alibi_attention_fwd`; ``block_q``/``block_k``
    are the tile sizes.

    Grouped-query attention (k, v ``[B, Hkv, Tk, d]``, G = H // Hkv query heads per key/value head) copies no key
    or value: each query tile is viewed as ``[B, Hkv, G * rows, d]`` (head h = g + G * kv head, the kernel's
    ``h // G``), so one matmul against the key/value tiles as they are serves the whole group; the scores are then
    viewed per query head for the bias, the masks and the softmax. A ``window`` skips the key tiles left of a query
    tile's window and masks the partially covered ones, as the kernel does."""
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

    out = torch.empty(batch, q_len, n_head, head_dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, n_head, q_len, device=q.device, dtype=f32)
    stats = torch.zeros(batch, n_head, 3, device=q.device, dtype=f32) if opts.with_stats else None
    k_lo = (int(first_key.min()) // block_k) * block_k
    bias = _Bias(slopes, key_pos, first_key, shift, opts)
    # Key of position 0 per batch row, for the first-token score (as the kernel does: one dot per row).
    k_first = k[torch.arange(batch, device=q.device), :, first_key.clamp(max=k_len - 1)].to(f32)  # [B, Hkv, d]

    for q0 in range(0, q_len, block_q):
        q1 = min(q0 + block_q, q_len)
        rows = torch.arange(q0, q1, device=q.device) + shift  # key index of each query row
        qb = q[:, :, q0:q1].to(f32).reshape(batch, n_kv, group * (q1 - q0), head_dim)  # group folded into rows
        per_head = (batch, n_head, q1 - q0)  # a [B, Hkv, G * rows, ...] result viewed per query head
        m = torch.full((batch, n_head, q1 - q0), -1.0e30, device=q.device, dtype=f32)
        l = torch.zeros_like(m)
        acc = torch.zeros(batch, n_head, q1 - q0, head_dim, device=q.device, dtype=f32)
        centred = torch.zeros_like(m)
        # a window hides every key tile wholly left of the first row's window
        k_start = max(k_lo, (shift + q0 - window + 1) // block_k * block_k) if window else k_lo
        for k0 in range(k_start, min(k_len, shift + q1), block_k):
            k1 = min(k0 + block_k, k_len)
            s = torch.matmul(qb, k[:, :, k0:k1].to(f32).transpose(-1, -2)).view(*per_head, k1 - k0)
            s = s.mul_(scale).add_(bias.tile(q0, q1, k0, k1))
            cols = torch.arange(k0, k1, device=q.device)[None, :]
            if k1 - 1 > shift + q0:  # a diagonal tile: some key lies after some query row
                s = s.masked_fill(cols > rows[:, None], MASKED)
            if window and k0 <= shift + q1 - 1 - window:  # some row's window has left key k0
                s = s.masked_fill(cols <= rows[:, None] - window, MASKED)
            m_new = torch.maximum(m, s.amax(-1))
            alpha = torch.exp2(m - m_new)
            s_centred = s - m_new[..., None]
            p = torch.exp2(s_centred)
            if opts.with_stats:
                centred = alpha * (centred + (m - m_new) * l) + (p * s_centred).sum(-1)
            l = l * alpha + p.sum(-1)
            pv = torch.matmul(p.view(batch, n_kv, -1, k1 - k0), v[:, :, k0:k1].to(f32))
            acc = acc * alpha[..., None] + pv.view(*per_head, head_dim)
            m = m_new

        l = torch.where(l > 0, l, 1.0)  # query blocks left of every real key iterate nothing
        row_ok = key_ok[:, rows][:, None, :, None]  # [B, 1, bq, 1]: a padded query row outputs exactly 0
        out[:, q0:q1] = torch.where(row_ok, acc / l[..., None], 0.0).transpose(1, 2).to(q.dtype)
        lse[:, :, q0:q1] = torch.where(row_ok[..., 0], m + torch.log2(l), math.inf)

        if opts.with_stats:
            qpos = key_pos[:, rows][:, None, :]  # [B, 1, bq]
            counted = qpos >= 0
            if opts.exclude_first_query:
                counted = counted & (qpos > 0)
            s_first = torch.matmul(qb, k_first[..., None]).view(per_head) * scale + bias.first_key_bias(q0, q1)
            p0 = torch.exp2((s_first - m).clamp_max(0.0)) / l
            if window:  # the first real key has left the window of later rows: no mass on it
                p0 = torch.where(first_key[:, None, None] > rows[None, None, :] - window, p0, 0.0)
            ent = (torch.log2(l) - centred / l) * math.log(2.0)
            if opts.normalize_entropy:
                n_visible = ((qpos + 1).clamp_max(window) if window else qpos + 1).to(f32).clamp_min(2.0)
                ent = torch.where(qpos > 0, ent / torch.log(n_visible), 0.0)
            stats[..., 0] += torch.where(counted, p0, 0.0).sum(-1)
            stats[..., 1] += torch.where(counted, ent, 0.0).sum(-1)
            stats[..., 2] += counted.to(f32).sum(-1)
    return out, lse, stats


def alibi_attention_blocked_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, key_pos: torch.Tensor, slopes: torch.Tensor, *,
                                kstart: torch.Tensor | None = None, grads: tuple | None = None, block_q: int = 128,
                                block_k: int = 128, **options):
    """Gradients (dq, dk, dv) of :func:`alibi_attention_blocked`, recomputing each probability tile from ``lse``.

    ``do`` and ``out`` are ``[B, q_len, H, d]``; q, k, v, ``lse`` (base 2) and the options as in the forward;
    ``grads`` as in :func:`~.attention_bwd.alibi_attention_bwd`. Padded query rows (position -1, ``lse`` +inf) get
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
            ds = p * (torch.matmul(dob, vb.transpose(-1, -2)) - delta_b)
            dq[:, :, q0:q1] += torch.matmul(ds, kb)
            dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb)
    result = (dq * scale).to(q.dtype), (dk * scale).to(q.dtype), dv.to(q.dtype)
    if grads is None:
        return result
    for target, got in zip(grads, result):
        target.copy_(got)
    return grads

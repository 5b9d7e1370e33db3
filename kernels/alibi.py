"""ALiBi facts shared by every backend: BLOOM's slopes and key positions.

Both functions reproduce ``transformers.models.bloom.modeling_bloom`` exactly:

* ``alibi_slopes(n_head)`` is ``_get_alibi_slopes``: for n the largest power of two <= n_head, the first n slopes are
  ``(2^(-8/n))^k`` for k = 1..n; the remaining heads take the odd powers k = 1, 3, 5, ... of ``2^(-8/(2n))``, appended.
  Slopes therefore fall with the head index for powers of two, and are not monotone otherwise.
* ``key_positions(valid)`` is the ``(cumsum - 1) * mask`` of ``build_alibi_tensor``: the first real token of every row
  has position 0, left padding does not count. Padded keys get position -1, which the kernels read as "masked".

The score options every implementation takes (forward, backward, statistics, both backends):

    s_ij = softmax_scale * (q_i . k_j) + bias_scale * R(R(slope_h) * R(pos_j))

``softmax_scale`` None means 1/sqrt(d) (BLOOM, Falcon; MPT reads it from its config). R is round-to-nearest-even to
bfloat16 when ``alibi_bf16`` (Falcon's ``build_alibi_tensor`` multiplies bf16 slopes by the int64 positions, which
promotes them to bf16, and rounds the product to bf16), the identity otherwise. ``bias_scale`` (1/sqrt(d) for
Falcon, whose alibi is divided by sqrt(d) with the scores) scales the rounded bias. The bias never depends on q, k, v:
only ``softmax_scale`` enters the gradients. Position 0 has bias 0 under every option.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["alibi_slopes", "key_positions", "first_real_key", "resolve_softmax_scale", "round_bf16", "alibi_bias",
           "AttentionOptions", "resolve_window", "kv_groups", "refuse_backward"]


class AttentionOptions(NamedTuple):
    """The keyword options every attention implementation takes (the Triton launchers and their torch twins).

    ``with_stats`` adds per-head (sum of first-token mass, sum of entropy, row count) over the counted query rows;
    ``exclude_first_query`` does not count the row at position 0; ``normalize_entropy`` divides each row's entropy
    by ln(visible keys). ``softmax_scale``, ``bias_scale`` and ``alibi_bf16`` are the score options above.
    ``window`` (an int >= 1; None or 0: none) is a sliding window, transformers' ``sliding_window_causal_mask_function``:
    the query row at key index r sees key j iff ``r - window < j <= r``; see :func:`resolve_window`. Forward only.
    ``row_stats`` returns each query row's raw (first-token mass, entropy) instead of the per-head sums, the form
    whose gradients the backward takes (``stats_grad``); it implies the statistics.
    An unknown name is a TypeError, as for any keyword argument."""

    with_stats: bool = False
    exclude_first_query: bool = False
    normalize_entropy: bool = False
    softmax_scale: float | None = None
    bias_scale: float = 1.0
    alibi_bf16: bool = False
    window: int | None = None
    row_stats: bool = False


def alibi_slopes(n_head: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Return BLOOM's ALiBi slopes as a float32 tensor of shape ``[n_head]``."""
    if n_head < 1:
        raise ValueError(f"n_head must be >= 1, got {n_head}")
    closest = 2 ** math.floor(math.log2(n_head))
    # float32 pow, as transformers computes it, so the slopes are bit-identical to eager BLOOM's.
    base = torch.tensor(2.0 ** (-(2.0 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, closest + 1, dtype=torch.int32))
    if closest != n_head:
        extra_base = torch.tensor(2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        n_extra = min(closest, n_head - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 2 * n_extra, 2, dtype=torch.int32))])
    return slopes.to(device)


def key_positions(valid: torch.Tensor) -> torch.Tensor:
    """Map a ``[batch, k_len]`` key-validity mask (bool or 0/1) to int32 ALiBi positions, -1 for padded keys."""
    valid = valid.to(torch.int32)
    return ((valid.cumsum(-1, dtype=torch.int32) - 1) * valid - (1 - valid)).to(torch.int32)


def first_real_key(key_pos: torch.Tensor) -> torch.Tensor:
    """Index of each row's first real key (position 0) in ``[batch, k_len]`` positions; k_len if all padding."""
    real = key_pos >= 0
    first = real.to(torch.int32).argmax(-1)
    return torch.where(real.any(-1), first, torch.full_like(first, key_pos.shape[-1]))


def resolve_softmax_scale(head_dim: int, softmax_scale: float | None, bias_scale: float = 1.0) -> float:
    """The scores' scale (``softmax_scale``, or 1/sqrt(head_dim) when None), after checking both scales are finite
    and the scores' scale positive; ValueError otherwise."""
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale!r}")
    if not math.isfinite(float(bias_scale)):
        raise ValueError(f"bias_scale must be finite, got {bias_scale!r}")
    return scale


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest bfloat16 (ties to even), returned as float32."""
    return x.to(torch.bfloat16).to(torch.float32)


def alibi_bias(slopes: torch.Tensor, key_pos: torch.Tensor, bias_scale: float = 1.0,
               alibi_bf16: bool = False) -> torch.Tensor:
    """float32 ALiBi bias ``[B, H, k_len]`` of the module docstring from slopes ``[H]`` (or per batch row, ``[B, H]``)
    and positions ``[B, k_len]`` (padded keys, position -1, get an arbitrary finite value: every caller masks them)."""
    slope = slopes.to(device=key_pos.device, dtype=torch.float32)
    slope = slope.reshape(-1, slope.shape[-1], 1)  # [1 or B, H, 1]
    pos = key_pos.to(torch.float32)[:, None, :]
    if alibi_bf16:
        bias = round_bf16(round_bf16(slope) * round_bf16(pos))
    else:
        bias = slope * pos
    return bias if bias_scale == 1.0 else bias * float(bias_scale)


def resolve_window(window, k_len: int) -> int:
    """The sliding window as the implementations run it: 0 for none (None, 0, or a window of at least ``k_len`` keys,
    which hides no key: the row at key index r <= k_len - 1 then sees every j > r - window, j >= 0), else
    ``window``; ValueError unless None or an int >= 0."""
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be None or an int >= 1 (0: no window), got {window!r}")
    return 0 if window >= k_len else window


def kv_groups(q_shape, k_shape, v_shape) -> int:
    """Query heads per key/value head for q ``[B, Hq, Tq, d]`` and k, v ``[B, Hkv, Tk, d]`` (grouped-query attention:
    query head h reads key/value head ``h // (Hq // Hkv)``); ValueError unless the shapes agree and Hkv divides Hq."""
    if len(q_shape) != 4 or len(k_shape) != 4 or tuple(v_shape) != tuple(k_shape):
        raise ValueError(f"q [B, Hq, Tq, d] and k, v [B, Hkv, Tk, d] of one shape expected, got q {list(q_shape)}, "
                         f"k {list(k_shape)}, v {list(v_shape)}")
    (batch, n_head, _, head_dim), (k_batch, n_kv, _, k_dim) = q_shape, k_shape
    if k_batch != batch or k_dim != head_dim or n_kv < 1 or n_head % n_kv:
        raise ValueError(f"k and v must be [B, Hkv, Tk, d] with Hkv dividing q's {n_head} heads, got q "
                         f"{list(q_shape)}, k {list(k_shape)}")
    return n_head // n_kv


def refuse_backward(n_head: int, n_kv: int, window) -> None:
    """The backward is that of one key/value head per query head and no window: UsageError (one line) otherwise."""
    if n_kv != n_head or window:
        from alibi_surgery.errors import UsageError  # a leaf module: no import cycle

        what = "grouped-query" if n_kv != n_head else "sliding-window"
        raise UsageError(f"the backward of {what} attention is not implemented (forward only, e.g. for diagnosis): "
                         "run it under torch.no_grad() or with inputs that do not require grad")


def stats_grad_terms(stats_grad, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics' share of the backward, for both backends: ``(gstat, delta)``.

    ``stats_grad`` is ``(d_rows, rows)``, both float32 ``[B, H, q_len, 2]``: the loss's gradient with respect to the
    forward's ``row_stats`` output and that output (per row: first-token mass m, entropy H in nats). With
    ``dH/ds_ij = -p_ij (ln p_ij + H_i)`` and ``dm/ds_ij = p_ij ([j = first key] - m_i)``, the score gradient is
    ``P * (dP - delta)`` once dP gains ``g_m`` on the first key's column and ``-g_H ln p``, and
    ``delta_i += g_m m_i + g_H H_i``. Returns ``gstat`` contiguous ``[B, H, q_len, 2]`` of ``(g_m, g_H ln 2)``
    (ln 2: the kernels hold base-2 log-probabilities) and the raised ``delta`` ``[B, H, q_len]``."""
    d_rows, rows = stats_grad
    d_rows = d_rows.to(device=delta.device, dtype=torch.float32)
    delta = delta + (d_rows * rows.to(torch.float32)).sum(-1)
    gstat = d_rows * torch.tensor([1.0, math.log(2.0)], device=delta.device, dtype=torch.float32)
    return gstat.contiguous(), delta

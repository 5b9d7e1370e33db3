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
           "AttentionOptions"]


class AttentionOptions(NamedTuple):
    """The keyword options every attention implementation takes (the Triton launchers and their torch twins).

    ``with_stats`` adds per-head (sum of first-token mass, sum of entropy, row count) over the counted query rows;
    ``exclude_first_query`` does not count the row at position 0; ``normalize_entropy`` divides each row's entropy
    by ln(visible keys). ``softmax_scale``, ``bias_scale`` and ``alibi_bf16`` are the score options above.
    An unknown name is a TypeError, as for any keyword argument."""

    with_stats: bool = False
    exclude_first_query: bool = False
    normalize_entropy: bool = False
    softmax_scale: float | None = None
    bias_scale: float = 1.0
    alibi_bf16: bool = False


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
    """float32 ALiBi bias ``[B, H, k_len]`` of the module docstring from slopes ``[H]`` and positions ``[B, k_len]``
    (padded keys, position -1, get an arbitrary finite value: every caller masks them)."""
    slope = slopes.to(device=key_pos.device, dtype=torch.float32)[None, :, None]
    pos = key_pos.to(torch.float32)[:, None, :]
    if alibi_bf16:
        bias = round_bf16(round_bf16(slope) * round_bf16(pos))
    else:
        bias = slope * pos
    return bias if bias_scale == 1.0 else bias * float(bias_scale)

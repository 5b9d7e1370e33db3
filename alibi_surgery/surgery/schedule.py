"""The one learning-rate schedule: linear warm-up, then half a cosine from the peak down to a floor.

:func:`warmup_cosine` is the rule; :func:`lr_at` is surgery's use of it (warm-up given as a fraction of the run,
decay to 0 at the last step) and :func:`pretrain_lr` the pre-training tool's (warm-up in steps, one more step at the
peak, decay towards 10% of the peak, reached one step after the last). Both give exactly the numbers they gave
before this module existed, so resumed runs and the demo model's recipe reproduce bit for bit.
"""

from __future__ import annotations

import math

__all__ = ["warmup_cosine", "warmup_steps", "lr_at", "pretrain_lr"]


def warmup_cosine(step: int, total: int, base: float, n_warm: int, *, floor: float = 0.0, hold: int = 0) -> float:
    """Learning rate at 1-based ``step``: ``base * step / n_warm`` for the first ``n_warm`` steps, then ``hold`` more
    steps at ``base``, then a cosine from ``base`` down to ``floor * base``, reached at step ``total`` and kept
    after it."""
    if step <= n_warm:
        return base * step / n_warm
    progress = min(1.0, (step - n_warm - hold) / max(1, total - n_warm - hold))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    if floor == 0.0:
        return base * cosine
    return base * (floor + (1.0 - floor) * cosine)


def warmup_steps(fraction: float, total: int) -> int:
    """Steps of warm-up for a ``fraction`` of ``total`` steps: rounded up, and at least one unless ``fraction`` is 0."""
    return max(1, math.ceil(fraction * total)) if fraction > 0 else 0


def lr_at(step: int, total: int, base: float, warmup: float) -> float:
    """Surgery: learning rate for 1-based optimizer ``step`` of ``total``; linear warm-up over the fraction
    ``warmup`` of the steps, then cosine decay to 0 at ``total``."""
    return warmup_cosine(step, total, base, warmup_steps(warmup, total))


def pretrain_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Pre-training: learning rate for 0-based ``step`` of a ``total``-step run; ``warmup`` steps of linear
    warm-up, one more at the peak, then cosine decay towards 10% of ``base`` (reached at step ``total``)."""
    return warmup_cosine(step + 1, total + 1, base, warmup, floor=0.1, hold=1)

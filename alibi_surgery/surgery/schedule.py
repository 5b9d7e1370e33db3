"""The one learning-rate schedule: linear warm-up, then half a cosine from the peak down to a floor.

:func:`warmup_cosine` is the rule; :func:`lr_at` is surgery's use of it (warm-up given as a fraction of the run,
decay to 0 at the last step) and :func:`pretrain_lr` the pre-training tool's (warm-up in steps, one more step at the
peak, decay towards 10% of the peak, reached one step after the last). Both give exactly the numbers they gave
before this module existed, so resumed runs and the demo model's recipe reproduce bit for bit.

:func:`paper_lr` is the paper's ``LambdaLR`` (``repair --schedule paper``): warm-up ``W = min(100, total // 4)``
scheduler steps with factor ``k / W`` for 0-based scheduler step ``k`` (so the first optimizer step runs at lr 0),
then ``0.5 (1 + cos(pi (k - W) / (total - W)))``. :func:`surgery_lr` picks between the two surgery schedules.
"""

from __future__ import annotations

import math

__all__ = ["warmup_cosine", "warmup_steps", "lr_at", "pretrain_lr", "paper_lr", "surgery_lr", "SCHEDULES"]

SCHEDULES = ("default", "paper")


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


def paper_lr(k: int, total: int, base: float) -> float:
    """The paper's schedule: learning rate at 0-based scheduler step ``k`` of a ``total``-step run (optimizer step
    ``k + 1`` uses it). ``W = min(100, total // 4)``; ``base * k / W`` while ``k < W``, then
    ``base * 0.5 * (1 + cos(pi * (k - W) / (total - W)))``. With ``total < 4`` there is no warm-up."""
    n_warm = min(100, total // 4)
    if k < n_warm:
        return base * (k / n_warm)
    return base * (0.5 * (1.0 + math.cos(math.pi * (k - n_warm) / max(1, total - n_warm))))


def surgery_lr(schedule: str, step: int, total: int, base: float, warmup: float) -> float:
    """Learning rate of 1-based optimizer ``step`` under ``schedule``: ``"default"`` is :func:`lr_at` (``warmup``
    a fraction of the run), ``"paper"`` is :func:`paper_lr` at scheduler step ``step - 1`` (``warmup`` unused)."""
    if schedule == "paper":
        return paper_lr(step - 1, total, base)
    if schedule == "default":
        return lr_at(step, total, base, warmup)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")

"""The one learning-rate schedule (surgery/schedule.py), against closed-form values and the two formulas it replaced
(surgery's and the pre-training tool's), which must come out bit for bit."""

from __future__ import annotations

import math
import random

import pytest

from alibi_surgery.surgery.schedule import lr_at, pretrain_lr, warmup_steps


def _surgery_formula(step, total, base, warmup):
    n_warm = max(1, math.ceil(warmup * total)) if warmup > 0 else 0
    if step <= n_warm:
        return base * step / n_warm
    progress = (step - n_warm) / max(1, total - n_warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _pretrain_formula(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def test_closed_form_points():
    assert warmup_steps(0.1, 100) == 10 and warmup_steps(0.001, 100) == 1 and warmup_steps(0.0, 100) == 0
    assert lr_at(5, 100, 2.0, 0.1) == 1.0  # half-way up the warm-up
    assert lr_at(10, 100, 2.0, 0.1) == 2.0  # the peak
    assert lr_at(55, 100, 2.0, 0.1) == pytest.approx(1.0, abs=1e-15)  # half-way down the cosine
    assert lr_at(100, 100, 2.0, 0.1) == 0.0 and lr_at(120, 100, 2.0, 0.1) == 0.0
    assert lr_at(1, 4, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # no warm-up
    assert pretrain_lr(0, 6000, 1.0, 200) == 1 / 200
    assert pretrain_lr(199, 6000, 1.0, 200) == 1.0 and pretrain_lr(200, 6000, 1.0, 200) == 1.0  # two steps at peak
    assert pretrain_lr(3100, 6000, 1.0, 200) == pytest.approx(0.55, abs=1e-15)  # half-way: 0.1 + 0.9 / 2
    assert 0.1 < pretrain_lr(5999, 6000, 1.0, 200) < 0.1 + 1e-6 and pretrain_lr(6000, 6000, 1.0, 200) == 0.1


def test_same_numbers_as_the_formulas_it_replaced():
    rng = random.Random(0)
    for _ in range(300):
        total, base = rng.randint(1, 300), rng.choice([5e-3, 1e-3, 5e-5, rng.random()])
        frac, n_warm = rng.choice([0.0, 0.1, rng.random() * 0.99]), rng.randint(0, total)
        for step in range(total + 2):
            if step:
                assert lr_at(step, total, base, frac) == _surgery_formula(step, total, base, frac)
            assert pretrain_lr(step, total, base, n_warm) == _pretrain_formula(step, total, base, n_warm)


def test_paper_schedule_closed_form():
    from alibi_surgery.surgery.schedule import paper_lr, surgery_lr

    assert paper_lr(0, 40, 1.0) == 0.0  # the first optimizer step runs at lr 0
    assert paper_lr(5, 40, 1.0) == 0.5 and paper_lr(10, 40, 1.0) == 1.0  # W = 40 // 4 = 10
    assert paper_lr(25, 40, 1.0) == pytest.approx(0.5, abs=1e-15)  # half-way down the cosine
    assert paper_lr(50, 1000, 2.0) == 1.0  # W = min(100, 250) = 100
    assert paper_lr(0, 3, 1.0) == 1.0  # fewer than 4 steps: no warm-up
    assert surgery_lr("paper", 1, 40, 1.0, 0.3) == 0.0 and surgery_lr("default", 1, 40, 1.0, 0.0) == lr_at(1, 40, 1.0, 0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        surgery_lr("linear", 1, 40, 1.0, 0.1)

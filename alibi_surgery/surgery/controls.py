"""The control arms of a surgery pass (docs/surgery.md, "Control arms"): what each arm does to the model before
training, and the random-healthy arm's choice of heads.

* ``treatment`` (the default): re-initialise the targets (:func:`~alibi_surgery.surgery.reinit.reinit_heads`), then
  train them;
* ``gradient-only`` (``reinit=False``, the paper's control): nothing is written before training;
* ``reinit-only``: re-initialise the targets; no training;
* ``random-healthy``: :func:`random_healthy_plan` puts as many randomly chosen healthy heads of the same layers in
  place of the targets; they are re-initialised and trained as the treatment's targets would be;
* ``ablate``: zero the targets' output columns (:func:`~alibi_surgery.surgery.reinit.ablate_heads`); no training.

Healthy, for ``random-healthy``, means not collapsed (neither dead nor bos-sink in the baseline diagnosis: the
healthy and low-entropy classes), not a target and not frozen. In each layer that holds targets it draws exactly as
many heads as the layer has targets, uniformly without replacement, from a generator seeded with ``(seed, layer)``:
the same seed gives the same heads. A layer with fewer such heads than targets is a one-line
:class:`~alibi_surgery.errors.UsageError`.
"""

from __future__ import annotations

import random

from ..diagnosis.report import HeadReport
from ..diagnosis.selection import from_pairs, pairs
from ..errors import UsageError
from .plan import Plan
from .reinit import ablate_heads, reinit_heads

__all__ = ["random_healthy_plan", "apply_arm"]


def random_healthy_plan(plan: Plan, report: HeadReport, seed: int) -> Plan:
    """``plan`` with its selection replaced by random healthy heads, per layer as many as it has targets (see the
    module docstring); the targets they stand in for are the new plan's ``replaces``, and the zone grows to hold the
    new selection (the untouched targets then count as in-band frozen heads)."""
    sick = pairs(report.sick_heads())
    taken = sick | pairs(plan.selection) | pairs(plan.frozen)
    chosen = set()
    for layer, heads in plan.selection.items():
        healthy = [h for h in range(plan.n_head) if (layer, h) not in taken]
        if len(healthy) < len(heads):
            raise UsageError(f"control='random-healthy': layer {layer} has {len(healthy)} healthy heads outside the "
                             f"targets and --freeze, fewer than its {len(heads)} targets")
        rng = random.Random(int(seed) * 1_000_003 + layer)
        chosen |= {(layer, h) for h in rng.sample(healthy, len(heads))}
    return Plan(selection=from_pairs(chosen), zone=from_pairs(pairs(plan.zone) | chosen), frozen=plan.frozen,
                included={}, source=plan.source, n_layer=plan.n_layer, n_head=plan.n_head, head_dim=plan.head_dim,
                hidden=plan.hidden, qkv_bias=plan.qkv_bias, replaces=plan.selection).validate()


def apply_arm(model, plan: Plan, settings) -> None:
    """What ``settings.arm`` does to ``model``'s selected heads before training (in place; nothing for
    ``gradient-only``, ``sparsify`` or an empty selection)."""
    if not plan.selection:
        return
    if settings.arm == "ablate":
        ablate_heads(model, plan.selection)
    elif settings.arm not in ("gradient-only", "sparsify"):  # both train the heads from their current values
        reinit_heads(model, plan.selection, seed=settings.seed, init=settings.init)

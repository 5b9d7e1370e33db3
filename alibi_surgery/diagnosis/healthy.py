"""Which heads count as healthy in a headline count: two named definitions over the same four classes
(:mod:`~alibi_surgery.diagnosis.report`), neither of which changes a class.

* ``ours`` (the default): not collapsed, i.e. neither ``dead`` nor ``bos-sink``; ``low-entropy`` heads count as
  healthy. This is what "recovered" means throughout (a target sick before and not sick after; the paper's training
  scripts count a target as "woken" the same way) and what the reproduction's claim 2 counted.
* ``paper``: the ``healthy`` class only (not dead, not bos-sink, not low-entropy), as the paper's
  ``evaluation/evaluate_epoch3.py`` counts the 242 / 341 / 379 healthy heads of 384 it reports.

Limits: a definition of which heads count, not of how they are measured: the paper measures one diagnostic text in
bfloat16 (docs/surgery.md, "Where our defaults differ from the paper's").
"""

from __future__ import annotations

from ..errors import UsageError

__all__ = ["SICK", "HEALTHY_DEFINITIONS", "check_healthy_definition", "is_healthy", "healthy_text"]

SICK = ("dead", "bos-sink")
HEALTHY_DEFINITIONS = {
    "ours": "not collapsed: neither dead nor bos-sink, low-entropy heads count",
    "paper": "the healthy class: not dead, not bos-sink, not low-entropy, as the paper's evaluate_epoch3.py",
}


def check_healthy_definition(healthy, name: str = "healthy") -> str:
    """``healthy`` if it names one of :data:`HEALTHY_DEFINITIONS`; a one-line UsageError naming ``name`` otherwise."""
    if not isinstance(healthy, str) or healthy not in HEALTHY_DEFINITIONS:
        raise UsageError(f"{name}={healthy!r}: must be one of {', '.join(HEALTHY_DEFINITIONS)}")
    return healthy


def is_healthy(head_class: str, healthy: str = "ours") -> bool:
    """Whether a head of class ``head_class`` counts as healthy under the definition ``healthy``."""
    if check_healthy_definition(healthy) == "paper":
        return head_class == "healthy"
    return head_class not in SICK


def healthy_text(healthy: str) -> str:
    """How output names a definition: ``healthy heads (paper: the healthy class: ...)``."""
    return f"healthy heads ({check_healthy_definition(healthy)}: {HEALTHY_DEFINITIONS[healthy]})"

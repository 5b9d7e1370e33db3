"""Functional recovery in every repair report: did the surgery revive its targets, or only move their attention?

A first-token mass below 0.5 is met by re-initialisation alone (a random Q/K block does not look at the first
token, and surgery zeroes the output columns). So a pass also measures, for each target head, before surgery (on
the input model, before its heads are touched) and after (on ``OUT/final``), the head's output norm and its
zero- and mean-ablation effects with their noise floors and intervals
(:func:`~alibi_surgery.analysis.ablation.ablate_heads`; the rule in docs/metrics.md). The report gives two numbers
over the targets collapsed before surgery: ``not_collapsed`` (first-token mass now below the bos-sink line) and
``revived`` (not collapsed *and* doing work: :func:`~alibi_surgery.analysis.ablation_report.recovery`).

Targets: the plan's selection; for the ``random-healthy`` control, the collapsed heads it stands in for
(``plan.replaces``), so every arm is counted on the same heads. Texts: the held-out prompts (``eval_prompts``),
else the rows of the packed held-out text (``eval_text``), else the diagnosis prompts at ``diag_max_length``; at
most ``ablation_texts`` of them, in order. ``ablation_draws=0`` skips the measurement (the report then says so).
The measurement before surgery is written to ``OUT/ablation_before.json`` when the pass starts, so a resumed pass
reads it back rather than measuring a model it no longer has.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..analysis.ablation import ablate_heads
from ..analysis.ablation_report import Ablation, recovery
from ..diagnosis.report import HeadReport
from ..io.files import atomic_write_text, read_text

__all__ = ["target_heads", "held_out_ids", "measure", "save_before", "load_before", "functional_report", "format_recovery",
           "BEFORE_FILE"]

BEFORE_FILE = "ablation_before.json"
ROW_TOKENS = 32768  # tokens per batch of ablation rows (rows_per_pass = this // the longest text, 2 to 512)


def target_heads(plan) -> list[tuple[int, int]]:
    """The heads whose recovery a pass reports (module docstring), in (layer, head) order."""
    selection = getattr(plan, "replaces", None) or plan.selection
    return sorted((int(layer), int(h)) for layer, heads in selection.items() for h in heads)


def held_out_ids(tokenizer, options, data, prompts: list[str], max_length: int | None) -> list[list[int]]:
    """Token-id lists of the texts the ablation is measured on (module docstring)."""
    if data.eval_prompts:
        ids = [list(map(int, x)) for x in data.eval_prompts]
    elif data.eval_chunks is not None:
        ids = [row.tolist() for row in data.eval_chunks]
    else:
        ids = [tokenizer(p, truncation=max_length is not None, max_length=max_length)["input_ids"] for p in prompts]
    ids = [x for x in ids if len(x) >= 2]
    return ids[:options.ablation_texts] if options.ablation_texts else ids


def measure(model, ids: list[list[int]], heads, options, seed: int) -> Ablation | None:
    """The ablation of ``heads`` on ``ids``, or None when ``options.ablation_draws`` is 0 or nothing is targeted."""
    if not options.ablation_draws or not heads or not ids:
        return None
    longest = max(len(x) for x in ids)
    return ablate_heads(model, ids, heads, mode="both", floor_draws=options.ablation_draws, seed=seed,
                        bootstrap=options.ablation_bootstrap, backend=_fused(options.backend),
                        rows_per_pass=max(2, min(512, ROW_TOKENS // longest)), progress=options.progress)


def _fused(backend: str) -> str:
    return "auto" if backend == "eager" else backend  # ablation runs blocks one at a time: a fused backend


def save_before(out: Path, ablation: Ablation | None) -> None:
    atomic_write_text(out / BEFORE_FILE, json.dumps(None if ablation is None else ablation.to_dict(), indent=1)
                      + "\n")


def load_before(out: Path) -> Ablation | None:
    path = out / BEFORE_FILE
    if not path.is_file():
        return None
    data = json.loads(read_text(path, what="ablation before surgery"))
    return None if data is None else Ablation.from_dict(data)


def _head_row(report: HeadReport, ablation: Ablation | None, layer: int, head: int) -> dict:
    row = {"bos_mass": float(report.bos_mass[layer, head]), "entropy": float(report.entropy[layer, head]),
           "class": report.classes[layer][head]}
    if ablation is not None:
        record = ablation.head(layer, head).to_dict()
        row.update({k: record[k] for k in ("output_norm", "zero", "mean", "does_work")})
    return row


def functional_report(heads, before: HeadReport, after: HeadReport, ablation_before: Ablation | None,
                      ablation_after: Ablation | None) -> dict:
    """report.json's ``functional`` entry: the counts (``recovery``: targets, collapsed_before, not_collapsed,
    revived; None without a measurement after surgery), how it was measured, and a row per target, before and
    after."""
    counts = None if ablation_after is None else recovery(before, after, ablation_after).to_dict()
    measured = ablation_after or ablation_before
    return {"recovery": counts,
            "measured": None if measured is None else {
                k: v for k, v in measured.to_dict().items() if k in ("texts", "tokens", "floor_draws",
                                                                      "floor_quantile", "seed", "bootstrap", "rule")},
            "base_loss": {"before": None if ablation_before is None else ablation_before.base_loss,
                          "after": None if ablation_after is None else ablation_after.base_loss},
            "heads": [{"layer": layer, "head": head,
                       "before": _head_row(before, ablation_before, layer, head),
                       "after": _head_row(after, ablation_after, layer, head)} for layer, head in heads]}


def format_recovery(functional: dict | None) -> str:
    """One line for the printed summary and report.md."""
    counts = (functional or {}).get("recovery")
    if counts is None:
        return "functional recovery: not measured (ablation_draws=0, or no target)"
    n = counts["collapsed_before"]
    return (f"targets collapsed before surgery: {n}; collapsed -> not collapsed {counts['not_collapsed']}/{n}; "
            f"revived (does work) {counts['revived']}/{n}")

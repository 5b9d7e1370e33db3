"""Cross-scale diagnosis: checkpoints of one ALiBi family (BLOOM, MPT, Falcon-RW), one table, one multi-panel
heatmap, one JSON.

The paper's Table 1 and Figure 2 in one command (``alibi-surgery family DIR...``). Each model is diagnosed with
:func:`~alibi_surgery.diagnosis.stream.diagnose_path`: loaded whole, or streamed block by block when it would not fit.
Per model the table gives the parameter count (base model, tied LM head not counted again), layers × heads, the share of
collapsed heads (dead or bos-sink), the collapse band (``report.collapse_band``) and the per-index collapse rate: for
each head index, the fraction of layers in which it is collapsed (the JSON holds the whole vector; the table names the
peak index).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.files import atomic_write_text
from ..diagnosis.report import HeadReport

__all__ = ["FamilyEntry", "family_entry", "family_table", "family_json", "save_family_heatmap"]


class FamilyEntry:
    """One model of a family run: its name, parameter count and head report."""

    def __init__(self, name: str, params: int, report: HeadReport):
        self.name, self.params, self.report = name, params, report

    def index_rates(self) -> list[float]:
        sick = self.report.sick_mask()
        return [sum(row[h] for row in sick) / len(sick) for h in range(self.report.n_head)]

    def collapsed(self) -> int:
        return sum(map(sum, self.report.sick_mask()))


def family_entry(model: str, report: HeadReport) -> FamilyEntry:
    """The entry of ``model`` (a checkpoint directory), its parameter count from its family's adapter."""
    from ..diagnosis.stream import CheckpointIndex
    from ..families import family_for

    config = CheckpointIndex(model).config
    return FamilyEntry(Path(model).name or str(model), family_for(config).params(config), report)


def _band(report: HeadReport) -> str:
    band = report.band()
    return "none" if band is None else f"H{band[0]}–H{band[1]}"


def family_table(entries: list[FamilyEntry]) -> str:
    """Markdown table, one row per model."""
    lines = ["| model | params | layers × heads | collapsed | band | peak per-index rate |",
             "|---|---|---|---|---|---|"]
    for e in entries:
        r = e.report
        rates = e.index_rates()
        peak = max(range(len(rates)), key=rates.__getitem__)
        total = r.n_layer * r.n_head
        params = f"{e.params / 1e9:.2f} B" if e.params >= 1e9 else f"{e.params / 1e6:.1f} M"
        lines.append(f"| {e.name} | {params} | {r.n_layer} × {r.n_head} | {e.collapsed()}/{total} "
                     f"({100 * e.collapsed() / total:.1f}%) | {_band(r)} | H{peak}: {rates[peak]:.2f} |")
    return "\n".join(lines)


def family_json(entries: list[FamilyEntry]) -> dict:
    return {"models": [{"name": e.name, "params": e.params, "n_layer": e.report.n_layer, "n_head": e.report.n_head,
                        "collapsed": e.collapsed(), "collapsed_share": e.collapsed() / (e.report.n_layer *
                                                                                       e.report.n_head),
                        "band": e.report.band(), "per_index_collapse_rate": e.index_rates(),
                        "report": e.report.to_dict()} for e in entries]}


def save_family_json(entries: list[FamilyEntry], path) -> None:
    atomic_write_text(path, json.dumps(family_json(entries), indent=2) + "\n")


def save_family_heatmap(entries: list[FamilyEntry], path) -> None:
    """One first-token-mass heatmap panel per model, side by side (two rows beyond three models)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..viz.heatmap import plot_heatmap, save_figure

    cols = min(3, len(entries))
    rows = -(-len(entries) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.8 * rows), layout="constrained", squeeze=False)
    for ax, e in zip(axes.flat, entries):
        total = e.report.n_layer * e.report.n_head
        plot_heatmap(e.report, ax=ax, title=f"{e.name}: {e.collapsed()}/{total} collapsed, band {_band(e.report)}")
    for ax in list(axes.flat)[len(entries):]:
        ax.axis("off")
    fig.suptitle("first-token mass per layer × head", fontsize=11)
    save_figure(fig, path)

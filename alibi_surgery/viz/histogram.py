"""The distribution of first-token mass over every head of one diagnosis (``diagnose --histogram``): 50 equal bins
on [0, 1], the report's dead and sink thresholds as solid lines, the other sink thresholds whose class counts the
diagnosis JSON gives (:data:`~alibi_surgery.diagnosis.report.SINK_SWEEP`) dotted, and those counts in a box. The file
is written atomically (:func:`~alibi_surgery.io.files.atomic_savefig`)."""

from __future__ import annotations

from ..diagnosis.report import HeadReport
from ..io.files import atomic_savefig

__all__ = ["plot_histogram", "save_histogram", "BINS"]

BINS = 50


def plot_histogram(report: HeadReport):
    """Draw the histogram of ``report.bos_mass``; returns the Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    values = report.bos_mass.flatten().tolist()
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.hist(values, bins=BINS, range=(0.0, 1.0), color="0.45", edgecolor="white", linewidth=0.4)
    t = report.thresholds
    ax.axvline(t.sink, color="tab:orange", linewidth=1.6, label=f"sink threshold {t.sink:g}")
    ax.axvline(t.dead, color="tab:red", linewidth=1.6, label=f"dead threshold {t.dead:g}")
    counts = report.class_counts_by_sink_threshold()
    for key in counts:
        if float(key) != t.sink and counts[key] is not None:
            ax.axvline(float(key), color="tab:orange", linewidth=1.0, linestyle=":", label=f"sink {key}")
    lines = ["sink   dead  bos-sink  low-ent  healthy"]
    for key, c in counts.items():
        if c is not None:
            lines.append(f"{key:<5} {c['dead']:>5} {c['bos_sink']:>9} {c['low_entropy']:>8} {c['healthy']:>8}")
    ax.text(0.5, 0.97, "\n".join(lines), transform=ax.transAxes, ha="center", va="top", fontsize=7,
            family="monospace", bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9, "edgecolor": "0.6"})
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("first-token mass (bos_mass)")
    ax.set_ylabel("heads")
    ax.set_title(f"{report.metadata.get('model', 'model')}: first-token mass of {len(values)} heads", fontsize=9)
    ax.legend(fontsize=7, loc="center right")
    return fig


def save_histogram(report: HeadReport, path) -> None:
    atomic_savefig(plot_histogram(report), path)

"""Layer x head heatmap of first-token mass, coloured around the 0.5 sink threshold, with classes marked. Every
figure file is written by :func:`~alibi_surgery.io.files.atomic_savefig` (``save_figure`` here is that function)."""

from __future__ import annotations

from ..io.files import atomic_savefig
from ..diagnosis.report import HeadReport

__all__ = ["plot_heatmap", "save_heatmap"]

MARKS = {"dead": "D", "bos-sink": "S", "low-entropy": "L", "healthy": ""}


def plot_heatmap(report: HeadReport, ax=None, title: str | None = None):
    """Draw ``report`` on ``ax`` (a new figure when None); returns the matplotlib Axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    if ax is None:
        width = min(max(5.5, 2.0 + 0.42 * report.n_head), 40.0)
        height = min(max(3.0, 1.5 + 0.32 * report.n_layer), 40.0)
        _, ax = plt.subplots(figsize=(width, height), layout="constrained")
    centre = report.thresholds.sink
    image = ax.imshow(report.bos_mass.numpy(), cmap="RdBu_r", aspect="auto", interpolation="nearest",
                      norm=TwoSlopeNorm(vmin=0.0, vcenter=centre, vmax=1.0))
    classes = report.classes
    small = report.n_head * report.n_layer <= 2048
    for layer, row in enumerate(classes):
        for head, cls in enumerate(row):
            if MARKS[cls] and small:
                ax.text(head, layer, MARKS[cls], ha="center", va="center", fontsize=7,
                        color="white" if cls == "dead" else "black")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    step = max(1, report.n_head // 16)
    ax.set_xticks(range(0, report.n_head, step))
    ax.set_yticks(range(0, report.n_layer, max(1, report.n_layer // 24)))
    s = report.summary()
    ax.set_title(title or f"{report.metadata.get('model', 'model')}: first-token mass\n"
                          f"D dead {s['dead']}, S bos-sink {s['bos_sink']}, L low-entropy {s['low_entropy']}, "
                          f"healthy {s['healthy']}", fontsize=9)
    ax.figure.colorbar(image, ax=ax, label=f"bos_mass (centre = {centre:g})")
    return ax


save_figure = atomic_savefig  # the name the figure modules import


def save_heatmap(report: HeadReport, path) -> None:
    """Render the heatmap to ``path`` (written atomically; the format from the suffix, see
    :func:`~alibi_surgery.io.files.atomic_savefig`)."""
    atomic_savefig(plot_heatmap(report).figure, path)

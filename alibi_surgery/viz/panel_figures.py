"""Δ panels: one layer x head map of delta first-token mass (condition minus stock) per condition, on one fixed,
shared colour scale (default +-0.4; larger |delta| saturate and the colour bar shows an arrow), heads over the
annotation threshold labelled with their delta, and a statistics box under each panel
(:func:`~alibi_surgery.analysis.panels.panel_stats`). Labels are drawn only for grids of at most 2048 heads. The file
is written atomically (:func:`~alibi_surgery.io.files.atomic_savefig`)."""

from __future__ import annotations

from ..io.files import atomic_savefig

__all__ = ["plot_panels", "save_panels"]


def plot_panels(data: dict):
    """Draw :func:`~alibi_surgery.analysis.panels.panels_dict`'s result; returns the Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import Normalize

    conds, scale, t = data["conditions"], data["scale"], data["annotate_threshold"]
    n_layer, n_head = data["n_layer"], data["n_head"]
    ncols = min(len(conds), 3)
    nrows = -(-len(conds) // ncols)
    w = min(max(4.0, 1.5 + 0.3 * n_head), 14.0)
    h = min(max(3.2, 1.8 + 0.24 * n_layer), 14.0) + 1.0  # + the statistics box
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols + 1.2, h * nrows), layout="constrained",
                             squeeze=False)
    norm = Normalize(vmin=-scale, vmax=scale)
    image = None
    for ax, cond in zip(axes.flat, conds):
        delta = np.array(cond["delta"], dtype=float)
        image = ax.imshow(delta, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        if n_layer * n_head <= 2048:
            for layer, h_ in zip(*np.nonzero(np.abs(delta) > t)):
                d = delta[layer, h_]
                ax.text(h_, layer, f"{d:+.2f}".replace("0.", "."), ha="center", va="center", fontsize=6,
                        color="white" if abs(d) > 0.6 * scale else "black")
        s, worst = cond["stats"], cond["stats"]["worst"]
        ax.annotate(f"mean |Δ| {s['mean_abs']:.3f}\nmax |Δ| {s['max_abs']:.3f} "
                            f"(L{worst['layer']} H{worst['head']})\n|Δ| > {t:g}: {s['over_annotate']}/{s['n']}\n"
                            f"|Δ| > {data['drift_threshold']:g}: {s['over_drift']}/{s['n']}\n"
                            f"collapsed {s['collapsed_before']} → {s['collapsed_after']}",
                xy=(0, 0), xycoords="axes fraction", xytext=(0, -30), textcoords="offset points", fontsize=7,
                va="top", ha="left", linespacing=1.3,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.5"})
        ax.set_title(cond["label"], fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(0, n_head, max(1, n_head // 16)))
        ax.set_yticks(range(0, n_layer, max(1, n_layer // 24)))
    for ax in list(axes.flat)[len(conds):]:
        ax.set_visible(False)
    fig.suptitle(f"Δ first-token mass against {data['stock']} (fixed scale ±{scale:g}; labelled: |Δ| > {t:g})",
                 fontsize=10)
    fig.colorbar(image, ax=axes, extend="both", label="bos_mass condition - stock")
    return fig


def save_panels(data: dict, path) -> None:
    atomic_savefig(plot_panels(data), path)

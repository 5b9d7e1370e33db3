"""Figures of a before/after :class:`~alibi_surgery.analysis.comparison.Comparison`: the layer x head map of the
change in first-token mass, with targets and zone outlined and each head's repair outcome marked. Files are written
atomically (:func:`alibi_surgery.viz.heatmap.save_figure`)."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from ..diagnosis.report import model_name
from ..diagnosis.selection import ZONES, n_selected
from .heatmap import save_figure

if TYPE_CHECKING:  # the type only: viz sits below analysis
    from ..analysis.comparison import Comparison

__all__ = ["plot_delta_heatmap", "save_delta_heatmap", "OUTCOME_MARKS"]


def _outline(ax, cells: set[tuple[int, int]], **style) -> None:
    """Draw the boundary of a set of ``(layer, head)`` cells (head on x, layer on y, cells 1 x 1 centred)."""
    from matplotlib.collections import LineCollection

    segments = []
    for layer, h in cells:
        x0, x1, y0, y1 = h - 0.5, h + 0.5, layer - 0.5, layer + 0.5
        if (layer - 1, h) not in cells:
            segments.append([(x0, y0), (x1, y0)])
        if (layer + 1, h) not in cells:
            segments.append([(x0, y1), (x1, y1)])
        if (layer, h - 1) not in cells:
            segments.append([(x0, y0), (x0, y1)])
        if (layer, h + 1) not in cells:
            segments.append([(x1, y0), (x1, y1)])
    if segments:
        ax.add_collection(LineCollection(segments, **style))


OUTCOME_MARKS = {"recovered": "R", "still-sick": "X", "newly-sick-target": "!", "iatrogenic": "!"}


def plot_delta_heatmap(comparison: Comparison, ax=None, title: str | None = None):
    """Draw the layer x head map of ``delta`` bos_mass on ``ax`` (a new figure when None); returns the Axes.

    Diverging colours centred on 0 (red: more first-token mass after, blue: less), scaled to the largest |delta|
    (at least the drift threshold); targets outlined solid, the band zone dashed; marks: R recovered, X still sick,
    ! newly sick (iatrogenic)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    c = comparison
    if ax is None:
        width = min(max(6.0, 2.0 + 0.42 * c.n_head), 40.0)
        height = min(max(3.2, 2.0 + 0.32 * c.n_layer), 40.0)
        _, ax = plt.subplots(figsize=(width, height), layout="constrained")
    delta = c.delta
    scale = max(float(delta.abs().max()), c.drift_threshold, 1e-3)
    image = ax.imshow(delta.numpy(), cmap="RdBu_r", aspect="auto", interpolation="nearest",
                      norm=Normalize(vmin=-scale, vmax=scale))
    if c.n_head * c.n_layer <= 2048:
        for layer, row in enumerate(c.outcomes()):
            for h, outcome in enumerate(row):
                if outcome:
                    dark = abs(float(delta[layer, h])) > 0.6 * scale
                    ax.text(h, layer, OUTCOME_MARKS[outcome], ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    if c.zone:
        _outline(ax, {(layer, h) for layer, heads in c.zone.items() for h in heads}, colors="0.25",
                 linewidths=1.2, linestyles="dashed")
    if c.targets:
        _outline(ax, {(layer, h) for layer, heads in c.targets.items() for h in heads}, colors="black",
                 linewidths=1.8)
    ax.set_xlim(-0.5, c.n_head - 0.5)
    ax.set_ylim(c.n_layer - 0.5, -0.5)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, c.n_head, max(1, c.n_head // 16)))
    ax.set_yticks(range(0, c.n_layer, max(1, c.n_layer // 24)))
    if title is None:
        rec, still = n_selected(c.recovered()), n_selected(c.still_sick())
        new = n_selected(c.iatrogenic()) + n_selected(c.newly_sick_targets())
        drift = [c.drift(z) for z in ZONES]
        who = "all heads" if c.targets is None else f"{n_selected(c.targets)} targets"
        names = [Path(model_name(r, fallback)).name or fallback for r, fallback in ((c.before, "before"),
                                                                                    (c.after, "after"))]
        title = (f"{names[0]} -> {names[1]}: delta first-token mass\n"
                 f"{who}: R recovered {rec}, X still sick {still}, ! newly sick {new}\n"
                 f"drifting (|delta| > {c.drift_threshold:g}): "
                 + ", ".join(f"{d['zone']} {d['count']}/{d['n']}" for d in drift if d["n"] or d["zone"] == "outside")
                 + ("" if not (c.targets or c.zone) else
                    "\n" + ", ".join(p for p, on in (("targets: solid outline", c.targets),
                                                      ("zone: dashed outline", c.zone)) if on)))
    ax.set_title(title, fontsize=9)
    bar = ax.figure.colorbar(image, ax=ax, label="bos_mass after - before")
    for y in (-c.drift_threshold, c.drift_threshold):
        if c.drift_threshold > 0:
            bar.ax.axhline(y, color="black", linewidth=0.8, linestyle=":")
    return ax


def save_delta_heatmap(comparison: Comparison, path) -> None:
    """Render :func:`plot_delta_heatmap` to ``path`` (written atomically; the format from the suffix, PNG when none)."""
    save_figure(plot_delta_heatmap(comparison).figure, path)

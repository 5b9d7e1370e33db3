"""Figures of :func:`~alibi_surgery.analysis.drift.drift_over_training`'s result: the frozen heads' drift per
head-index column over checkpoints as a heatmap, and the columns' trajectories. Both read the result dict only;
files are written atomically (:func:`~alibi_surgery.io.files.atomic_savefig`)."""

from __future__ import annotations

from ..io.files import atomic_savefig

__all__ = ["plot_drift_heatmap", "plot_trajectories", "save_drift_heatmap", "save_trajectories"]


def _labels(result: dict) -> list[str]:
    several = any(r["pass"] > 1 for r in result["checkpoints"])
    return [f"p{r['pass']}:{r['step']}" if several else str(r["step"]) for r in result["checkpoints"]]


def plot_drift_heatmap(result: dict):
    """Head-index column (y) x checkpoint (x): the mean |delta first-token mass| of the column's frozen heads; grey
    for a column without frozen heads; columns judged spreading are marked with * on the axis. Returns the Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    cols, labels = result["columns"], _labels(result)
    grid = np.array([[np.nan] * len(labels) if c["mean_abs"] is None else c["mean_abs"] for c in cols], dtype=float)
    fig, ax = plt.subplots(figsize=(min(max(5.0, 2.5 + 0.35 * len(labels)), 30.0),
                                    min(max(3.0, 1.5 + 0.28 * len(cols)), 30.0)), layout="constrained")
    cmap = plt.get_cmap("magma_r").copy()
    cmap.set_bad("0.8")
    top = float(np.nanmax(grid)) if np.isfinite(grid).any() else 0.0
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0.0,
                      vmax=max(top, result["drift_threshold"], 1e-3))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90 if len(labels) > 12 else 0, fontsize=7)
    ax.set_yticks(range(len(cols)))
    ax.set_yticklabels([f"H{c['head']}{' *' if c['trend'] == 'spreading' else ''}" for c in cols], fontsize=7)
    ax.set_xlabel("checkpoint (optimizer step)")
    ax.set_ylabel("head-index column")
    ax.set_title(f"frozen-head drift against the original ({result['n_frozen']} frozen heads)\n"
                 f"* spreading: fitted rise > {result['trend_threshold']:g} over the run", fontsize=9)
    fig.colorbar(image, ax=ax, label="frozen heads' mean |delta|")
    return fig


def plot_trajectories(result: dict):
    """One line per head-index column: its frozen heads' mean |delta| against the optimizer step; spreading
    columns in colour and named in the legend, the others grey. Cascade counts (heads newly over the drift threshold)
    as bars on a second axis. Returns the Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r["global_step"] for r in result["checkpoints"]]
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    bars = ax.twinx()
    width = max(0.4, (max(steps) - min(steps)) / max(1, len(steps)) * 0.5) if len(steps) > 1 else 0.4
    bars.bar(steps, result["cascade"]["new_frozen"], width=width, color="tab:blue", alpha=0.2,
             label=f"frozen heads newly > {result['drift_threshold']:g}")
    bars.set_ylim(0, max(1, *result["cascade"]["new_frozen"]) * 1.15)
    bars.set_ylabel("heads newly drifting (cascade)")
    bars.yaxis.get_major_locator().set_params(integer=True)
    palette = plt.get_cmap("tab10")
    k = 0
    for c in result["columns"]:
        if c["mean_abs"] is None:
            continue
        if c["trend"] == "spreading":
            ax.plot(steps, c["mean_abs"], marker="o", color=palette(k % 10), linewidth=1.8, label=f"H{c['head']}")
            k += 1
        else:
            ax.plot(steps, c["mean_abs"], marker=".", color="0.6", linewidth=0.8)
    ax.set_zorder(bars.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean |delta first-token mass| (frozen heads)")
    counts = ", ".join(f"{t} {n}" for t, n in result["trend_counts"].items())
    ax.set_title(f"head-index columns over training ({counts})", fontsize=9)
    handles = ax.get_legend_handles_labels()[0] + bars.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="upper left")
    return fig


def save_drift_heatmap(result: dict, path) -> None:
    atomic_savefig(plot_drift_heatmap(result), path)


def save_trajectories(result: dict, path) -> None:
    atomic_savefig(plot_trajectories(result), path)

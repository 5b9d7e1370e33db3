"""The extreme-token figure: layer x head heatmaps of ``value_ratio`` (centred on 1: a value-state drain is blue)
and ``output_norm`` (dormant heads marked ``d``), and ``residual_peak`` as one bar per layer. ``diagnose --heatmap
OUT.png`` writes it beside the first-token-mass heatmap as ``OUT.extremes.png`` (:func:`companion_path`). Panels for
metrics the report does not hold are left out; NaN cells stay blank."""

from __future__ import annotations

from pathlib import Path

from ..diagnosis.report import HeadReport
from ..io.files import atomic_savefig

__all__ = ["plot_extremes", "save_extremes", "companion_path"]


def companion_path(heatmap_path) -> Path:
    """``OUT.png`` -> ``OUT.extremes.png`` (a path without a suffix gets ``.extremes.png``: PNG, as the heatmap)."""
    path = Path(heatmap_path)
    return path.with_name(f"{path.stem if path.suffix else path.name}.extremes{path.suffix or '.png'}")


def plot_extremes(report: HeadReport):
    """A figure with one panel per measured extreme-token metric; returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    panels = [name for name in ("value_ratio", "output_norm", "residual_peak") if getattr(report, name) is not None]
    if not panels:
        raise ValueError("the report holds no extreme-token metric")
    grid_width = min(max(4.0, 1.5 + 0.3 * report.n_head), 20.0)
    widths = [grid_width if name != "residual_peak" else 3.0 for name in panels]
    height = min(max(3.0, 1.5 + 0.32 * report.n_layer), 40.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 1.5 * len(panels), height), layout="constrained",
                             width_ratios=widths, squeeze=False)
    model = report.metadata.get("model", "model")
    for ax, name in zip(axes[0], panels):
        values = getattr(report, name).numpy()
        if name == "residual_peak":
            ax.barh(range(report.n_layer), values, color="tab:purple")
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_ylim(report.n_layer - 0.5, -0.5)
            ax.set_xlabel("||h_first|| / mean ||h_other||")
            ax.set_title("residual_peak per layer", fontsize=9)
        elif name == "value_ratio":
            top = max(2.0, float(report.value_ratio.nan_to_num(0).max()))
            image = ax.imshow(values, cmap="RdBu_r", aspect="auto", interpolation="nearest",
                              norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top))
            fig.colorbar(image, ax=ax, label="value_ratio (1 = no drain)")
            ax.set_title(f"{model}: value_ratio (||v_first|| / mean ||v_other||)", fontsize=9)
        else:
            image = ax.imshow(values, cmap="viridis", aspect="auto", interpolation="nearest")
            fig.colorbar(image, ax=ax, label="output_norm")
            dormant = report.dormant
            if report.n_head * report.n_layer <= 2048:
                for layer, row in enumerate(dormant):
                    for head, flag in enumerate(row):
                        if flag:
                            ax.text(head, layer, "d", ha="center", va="center", fontsize=7, color="white")
            count = sum(map(sum, dormant))
            ax.set_title(f"output_norm (d: dormant, < {report.dormant_fraction:g} x layer median: {count})",
                         fontsize=9)
        ax.set_ylabel("layer")
        ax.set_yticks(range(0, report.n_layer, max(1, report.n_layer // 24)))
        if name != "residual_peak":
            ax.set_xlabel("head")
            ax.set_xticks(range(0, report.n_head, max(1, report.n_head // 16)))
    return fig


def save_extremes(report: HeadReport, path) -> None:
    """Render :func:`plot_extremes` to ``path`` (written atomically, the format from the suffix)."""
    atomic_savefig(plot_extremes(report), path)

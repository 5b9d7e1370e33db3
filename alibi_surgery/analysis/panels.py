"""Several conditions against one stock model: :func:`compare_many` and the numbers of each Δ panel.

``compare STOCK A B ... --panels OUT.png`` draws one layer x head panel of delta first-token mass (condition minus
stock) per condition, all on one fixed colour scale (:mod:`alibi_surgery.viz.panel_figures`). :func:`panel_stats`
gives the statistics box of a panel, from the comparison's float64 deltas:

* ``mean_abs``: mean |delta| over all heads; ``max_abs`` and ``worst`` (its head, ties: layer-major order);
* ``over_annotate``: heads with |delta| > ``annotate_threshold`` (0.15: those annotated on the panel);
* ``over_drift``: heads with |delta| > the comparison's drift threshold (0.05);
* ``clipped``: heads with |delta| > ``scale`` (drawn at the end of the colour scale);
* ``collapsed_before`` / ``collapsed_after``: dead or bos-sink heads in the stock and in the condition.

Each condition is compared with :func:`~alibi_surgery.analysis.compare.compare` (so measurement checks, targets and
zones are as for two models); a stock given as a model directory is diagnosed once.
"""

from __future__ import annotations

import json
import math

from ..errors import UsageError
from ..io.files import atomic_write_text
from ..diagnosis.report import model_name
from .comparison import Comparison

__all__ = ["compare_many", "panel_stats", "panels_dict", "check_panel_options", "KIND"]

KIND = "alibi-surgery panels"


def check_panel_options(scale: float, annotate_threshold: float) -> None:
    if not math.isfinite(scale) or scale <= 0:
        raise UsageError(f"scale={scale}: must be a finite number > 0")
    if not math.isfinite(annotate_threshold) or annotate_threshold < 0:
        raise UsageError(f"annotate_threshold={annotate_threshold}: must be a finite number >= 0")


def compare_many(stock, conditions: list, *, targets=None, zone=None, drift_threshold: float = 0.05,
                 force: bool = False, **diagnose_kwargs) -> list[Comparison]:
    """One :class:`Comparison` (stock -> condition) per condition. Inputs as for
    :func:`~alibi_surgery.analysis.compare.compare`; every input is resolved and the shapes checked before anything
    is diagnosed; a stock model directory is diagnosed once, with the thresholds and metric options of the first
    condition given as a report."""
    from . import compare as cmp

    labels = [chr(ord("A") + i) if i < 26 else f"input {i + 1}" for i in range(len(conditions) + 1)]
    sources = [cmp._resolve_source(x, label) for x, label in zip([stock, *conditions], labels)]
    shapes = {s.shape for s in sources if s.shape}
    if len(shapes) > 1:
        described = ", ".join(f"{s.label} is {s.shape[0]} layers x {s.shape[1]} heads" for s in sources if s.shape)
        raise UsageError(f"the inputs have different shapes: {described}")
    stock_source = sources[0]
    if stock_source.report is None:
        options = dict(diagnose_kwargs)
        for s in sources[1:]:
            if s.report is not None:
                options = cmp._check_measurement(s.report, s.label, options)
        from ..attention.backends import check_backend

        check_backend(options.get("backend") or "auto")
        stock_report = cmp._diagnose_source(stock_source, options)
    else:
        stock_report = stock_source.report
    out = []
    for s in sources[1:]:
        given = s.report if s.report is not None else s.model
        out.append(cmp.compare(stock_report, given, targets=targets, zone=zone, drift_threshold=drift_threshold,
                               force=force, **diagnose_kwargs))
    return out


def panel_stats(comparison: Comparison, *, annotate_threshold: float = 0.15, scale: float = 0.4) -> dict:
    """The statistics box of one panel (see the module docstring)."""
    delta = comparison.delta.tolist()
    values = [(abs(d), layer, h, d) for layer, row in enumerate(delta) for h, d in enumerate(row)]
    top = max(values, key=lambda v: (v[0], -v[1], -v[2]))
    before, after = comparison.before.summary(), comparison.after.summary()
    return {"n": len(values), "mean_abs": sum(v[0] for v in values) / len(values), "max_abs": top[0],
            "worst": {"layer": top[1], "head": top[2], "delta": top[3]},
            "over_annotate": sum(v[0] > annotate_threshold for v in values),
            "over_drift": sum(v[0] > comparison.drift_threshold for v in values),
            "clipped": sum(v[0] > scale for v in values),
            "collapsed_before": before["dead"] + before["bos_sink"],
            "collapsed_after": after["dead"] + after["bos_sink"]}


def panels_dict(comparisons: list[Comparison], labels: list[str], *, scale: float = 0.4,
                annotate_threshold: float = 0.15) -> dict:
    """What ``compare STOCK A B ... --json`` writes with several conditions: per condition its statistics and its
    layer x head delta grid."""
    stock = comparisons[0].before
    return {"kind": KIND, "version": 1, "stock": model_name(stock, "stock"), "n_layer": stock.n_layer,
            "n_head": stock.n_head, "scale": scale, "annotate_threshold": annotate_threshold,
            "drift_threshold": comparisons[0].drift_threshold,
            "conditions": [{"label": label, "model": model_name(c.after, label),
                            "stats": panel_stats(c, annotate_threshold=annotate_threshold, scale=scale),
                            "delta": c.delta.tolist()} for c, label in zip(comparisons, labels)]}


def write_panels_json(data: dict, path) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def format_panels(data: dict) -> str:
    """One line per condition: its statistics."""
    t = data["annotate_threshold"]
    lines = [f"{len(data['conditions'])} conditions against {data['stock']} "
             f"({data['n_layer']} layers x {data['n_head']} heads):"]
    for c in data["conditions"]:
        s, w = c["stats"], c["stats"]["worst"]
        lines.append(f"  {c['label']}: mean |delta| {s['mean_abs']:.4f}, max |delta| {s['max_abs']:.4f} "
                     f"(L{w['layer']} H{w['head']} {w['delta']:+.4f}), {s['over_annotate']} heads > {t:g}, "
                     f"{s['over_drift']} > {data['drift_threshold']:g}, collapsed {s['collapsed_before']} -> "
                     f"{s['collapsed_after']}")
    return "\n".join(lines)

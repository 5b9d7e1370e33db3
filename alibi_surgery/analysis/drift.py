"""Drift over training: how the heads surgery did not touch move, checkpoint by checkpoint, in a repair run.

:func:`read_run` reads a repair output directory (one pass, or ``pass-1``, ``pass-2``... of a multi-pass run): the
original model's diagnosis (``baseline.json``; for several passes, pass 1's), every pass's ``plan.json`` and the
diagnosis made at every checkpoint, which repair keeps in the run's history (``report.json``'s ``checkpoints``, or
while a run is unfinished, the newest checkpoint's ``trainer_state.json``). A checkpoint directory with no diagnosis
in that history is listed in ``undiagnosed`` and left out (its weights are there: ``diagnose`` it by hand); nothing
is re-measured here. :func:`drift_over_training` then computes, against the original model (never against the
previous pass):

* ``delta``: per checkpoint, per head, ``bos_mass(checkpoint) - bos_mass(original)`` (float64);
* frozen heads: every head no pass selected for surgery. Per head-index column ``h`` (head ``h`` of every layer), the
  mean |delta| of its frozen heads at each checkpoint (None for a column every head of which was selected);
* trend per column, by the ``fitted`` rule (the default): a least-squares line of the column's mean |delta| against the optimizer step (steps of
  later passes continue after the previous pass's last checkpoint); its fitted change over the run,
  ``slope * (last step - first step)``, above ``trend_threshold`` (default 0.01 first-token mass) is ``spreading``,
  below ``-trend_threshold`` ``receding``, otherwise ``stable``; with fewer than 2 checkpoints ``undetermined``. The
  ratio last / first mean |delta| is reported beside it (None when the first is 0), not used by the rule;
* the same per column by the ``paper`` rule, as the paper's ``figures_scripts/analyze_frozen_drift.py`` computes
  it: over the *in-band* frozen heads only (heads in a pass's zone that no pass selected: the paper's ``freeze``
  lists), at the *epoch checkpoints* only (those whose ``epoch`` is a whole number; the paper's ``epoch_NNN``
  directories, neither the stock model nor ``final``), the column's mean |delta| at the last epoch checkpoint minus
  that at the first, above ``0.02`` ``spreading``, below ``-0.02`` ``receding`` (the paper's "recovering"), otherwise
  ``stable``; fewer than 2 epoch checkpoints ``undetermined``; a column without in-band frozen heads ``no frozen
  heads``. Beside it, per epoch checkpoint, the in-band frozen heads over ``drift_threshold`` (the paper's "drift
  propagation" count: every head over it, not only new ones). Both rules are always computed (``column_rules``);
  ``column_rule`` names the one whose ``spreading`` and ``trend_counts`` stand at the top level. ``columns`` and
  ``trend_threshold`` at the top level are always the fitted rule's (the figures draw them);
* healthy heads: at each checkpoint (and in the original) the heads healthy under ``healthy`` (``ours`` or
  ``paper``, :mod:`~alibi_surgery.diagnosis.healthy`);
* cascade: at each checkpoint, the heads whose |delta| exceeds ``drift_threshold`` (0.05) for the first time (at no
  earlier checkpoint), for frozen heads and for all heads, and the running total;
* correlation: Pearson's r between every two columns' trajectories over the checkpoints; None when a trajectory is
  constant (no variance), a column has no frozen head, or there are fewer than 3 checkpoints (2 points always give
  +-1).

Limits: every diagnosis in a run must have the original's shape; the original diagnosis is the one repair made (or was
given with ``--from-report``). An epoch checkpoint is told by its recorded ``epoch`` (rounded to 4 decimals by the
trainer), so a periodic checkpoint within 0.00005 epoch of an epoch's end would count as one (more than 20,000 steps
per epoch).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..diagnosis.healthy import HEALTHY_DEFINITIONS, check_healthy_definition
from ..diagnosis.report import HeadReport
from ..errors import UsageError
from ..io.files import atomic_write_text, read_text
from ..diagnosis.selection import from_pairs

__all__ = ["RunDiagnoses", "read_run", "drift_over_training", "pearson", "fitted_change", "paper_columns", "KIND",
           "COLUMN_RULES"]

KIND = "alibi-surgery drift"
CKPT_PREFIX = "step-"
COLUMN_RULES = {  # name: (default threshold, what it computes)
    "fitted": (0.01, "least-squares fitted change of the mean |delta| of every frozen head of the column over every "
                     "checkpoint"),
    "paper": (0.02, "mean |delta| of the column's in-band frozen heads at the last epoch checkpoint minus at the "
                    "first (the paper's analyze_frozen_drift.py)"),
}


class RunDiagnoses:
    """What :func:`read_run` finds: ``original`` (HeadReport), ``selected`` ({layer: [heads]}, the union over
    passes), ``checkpoints`` (dicts: pass, checkpoint, step, global_step, epoch, report), ``undiagnosed`` and
    ``zone`` ({layer: [heads]}, the union of the passes' zones; empty when no plan records one)."""

    def __init__(self, run_dir: Path, original: HeadReport, selected: dict, checkpoints: list, undiagnosed: list,
                 zone: dict | None = None):
        self.run_dir, self.original, self.selected = run_dir, original, selected
        self.checkpoints, self.undiagnosed, self.zone = checkpoints, undiagnosed, zone or {}


def _json(path: Path, what: str):
    try:
        return json.loads(read_text(path, what=what))
    except ValueError as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{what} {path} is not valid JSON: {exc}") from None


def _pass_dirs(run_dir: Path) -> list[Path]:
    passes = [p for p in run_dir.glob("pass-*") if p.is_dir() and p.name[5:].isdigit()]
    if passes:
        return sorted(passes, key=lambda p: int(p.name[5:]))
    return [run_dir]


def _history(pass_dir: Path) -> list[dict]:
    """The checkpoints' entries of one pass: report.json's, else the newest complete checkpoint's history."""
    if (pass_dir / "report.json").is_file():
        return _json(pass_dir / "report.json", "run report").get("checkpoints") or []
    states = sorted((pass_dir / "checkpoints").glob(f"{CKPT_PREFIX}*/trainer_state.json"))
    return _json(states[-1], "checkpoint state").get("history") or [] if states else []


def read_run(run_dir) -> RunDiagnoses:
    """Read a repair output directory (see the module docstring); a one-line UsageError for one that is not."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {run_dir} is not a directory (expected the out directory of a repair)")
    passes = _pass_dirs(run_dir)
    if not (passes[0] / "baseline.json").is_file() or not (passes[0] / "plan.json").is_file():
        raise UsageError(f"RUN_DIR {run_dir} is not a repair output: no baseline.json and plan.json (expected the "
                         f"out directory of a repair)")
    from ..diagnosis.report import read_report

    original = read_report(passes[0] / "baseline.json", "original diagnosis")
    shape = (original.n_layer, original.n_head)
    selected: set = set()
    zone: set = set()
    checkpoints, undiagnosed, offset = [], [], 0
    for k, pass_dir in enumerate(passes, 1):
        plan = _json(pass_dir / "plan.json", "plan") if (pass_dir / "plan.json").is_file() else {}
        selected |= {(int(layer), h) for layer, heads in (plan.get("selection") or {}).items() for h in heads}
        zone |= {(int(layer), h) for layer, heads in (plan.get("zone") or {}).items() for h in heads}
        seen, last = set(), offset
        for entry in _history(pass_dir):
            name = entry.get("checkpoint")
            after = (entry.get("comparison") or {}).get("after")
            if name is None or after is None or name in seen:
                continue
            report = HeadReport.from_dict(after)
            if (report.n_layer, report.n_head) != shape:
                raise UsageError(f"{pass_dir.name}/{name}: its diagnosis is {report.n_layer} x {report.n_head}, the "
                                 f"original's {shape[0]} x {shape[1]}")
            seen.add(name)
            last = offset + int(entry["step"])
            checkpoints.append({"pass": k, "checkpoint": name, "step": int(entry["step"]), "global_step": last,
                                "epoch": entry.get("epoch"), "report": report})
        ckpt_dir = pass_dir / "checkpoints"
        on_disk = sorted(p.name for p in ckpt_dir.glob(f"{CKPT_PREFIX}*") if p.is_dir()) if ckpt_dir.is_dir() else []
        undiagnosed += [f"{pass_dir.name}/{n}" if len(passes) > 1 else n for n in on_disk if n not in seen]
        offset = last
    if not checkpoints:
        raise UsageError(f"RUN_DIR {run_dir} has no diagnosed checkpoint (no training step was checkpointed)")
    return RunDiagnoses(run_dir, original, from_pairs(selected), checkpoints, undiagnosed, from_pairs(zone))


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's r of two equal-length series; None for fewer than 3 points or a constant series."""
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx <= 1e-24 or syy <= 1e-24:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def fitted_change(steps: list[float], values: list[float]) -> tuple[float, float] | None:
    """The least-squares line of ``values`` against ``steps``: ``(slope per step, slope * (last - first step))``;
    None for fewer than 2 points or all steps equal."""
    n = len(steps)
    if n < 2:
        return None
    ms, mv = sum(steps) / n, sum(values) / n
    sss = sum((s - ms) ** 2 for s in steps)
    if sss == 0:
        return None
    slope = sum((s - ms) * (v - mv) for s, v in zip(steps, values)) / sss
    return slope, slope * (steps[-1] - steps[0])


def _trend(change: float | None, threshold: float) -> str:
    if change is None:
        return "undetermined"
    return "spreading" if change > threshold else "receding" if change < -threshold else "stable"


def _is_epoch_end(epoch) -> bool:
    return epoch is not None and float(epoch) >= 1 and abs(float(epoch) - round(float(epoch))) < 1e-9


def paper_columns(run: RunDiagnoses, *, threshold: float = 0.02, drift_threshold: float = 0.05) -> dict:
    """The ``paper`` column rule (module docstring): in-band frozen heads, epoch checkpoints, last minus first."""
    base = run.original.bos_mass.double()
    n_layer, n_head = base.shape
    in_band = torch.zeros(n_layer, n_head, dtype=torch.bool)
    for layer, heads in run.zone.items():
        in_band[layer, heads] = True
    for layer, heads in run.selected.items():
        in_band[layer, heads] = False
    epochs = [c for c in run.checkpoints if _is_epoch_end(c["epoch"])]
    deltas = [(c["report"].bos_mass.double() - base).abs() for c in epochs]
    columns = []
    for h in range(n_head):
        mask = in_band[:, h]
        series = [float(d[mask, h].mean()) for d in deltas] if mask.any() else None
        change = series[-1] - series[0] if series and len(series) >= 2 else None
        columns.append({"head": h, "n_frozen": int(mask.sum()), "mean_abs": series,
                        "first": series[0] if series else None, "last": series[-1] if series else None,
                        "change": change, "trend": _trend(change, threshold) if mask.any() else "no frozen heads"})
    return {"rule": COLUMN_RULES["paper"][1], "threshold": threshold,
            "heads": [[int(layer), int(h)] for layer, h in in_band.nonzero().tolist()],
            "checkpoints": [c["checkpoint"] if c["pass"] == 1 else f"pass-{c['pass']}/{c['checkpoint']}"
                            for c in epochs],
            "epochs": [c["epoch"] for c in epochs],
            "over_threshold": [int((d[in_band] > drift_threshold).sum()) for d in deltas],
            "columns": columns, **_verdict(columns)}


def _verdict(columns: list[dict]) -> dict:
    trends = [c["trend"] for c in columns]
    return {"spreading": [c["head"] for c in columns if c["trend"] == "spreading"],
            "trend_counts": {t: trends.count(t) for t in ("spreading", "stable", "receding", "undetermined",
                                                          "no frozen heads") if t in trends}}


def drift_over_training(run: RunDiagnoses, *, drift_threshold: float = 0.05, trend_threshold: float | None = None,
                        column_rule: str = "fitted", healthy: str = "ours") -> dict:
    """The drift analysis of a run (see the module docstring), as the JSON-ready dict ``drift --json`` writes.
    ``trend_threshold`` applies to ``column_rule`` (None: that rule's default, 0.01 fitted, 0.02 paper); the other
    rule is computed with its default."""
    if column_rule not in COLUMN_RULES:
        raise UsageError(f"column_rule={column_rule!r}: must be one of {', '.join(COLUMN_RULES)}")
    check_healthy_definition(healthy)
    thresholds = {name: default for name, (default, _) in COLUMN_RULES.items()}
    if trend_threshold is not None:
        thresholds[column_rule] = trend_threshold
    for name, value in (("drift_threshold", drift_threshold), ("trend_threshold", thresholds[column_rule])):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UsageError(f"{name}={value}: must be a finite number >= 0")
    trend_threshold = thresholds["fitted"]
    base = run.original.bos_mass.double()
    n_layer, n_head = base.shape
    frozen = torch.ones(n_layer, n_head, dtype=torch.bool)
    for layer, heads in run.selected.items():
        frozen[layer, heads] = False
    deltas = [c["report"].bos_mass.double() - base for c in run.checkpoints]
    steps = [float(c["global_step"]) for c in run.checkpoints]
    ever_all = torch.zeros(n_layer, n_head, dtype=torch.bool)
    rows = []
    for c, d in zip(run.checkpoints, deltas):
        over = d.abs() > drift_threshold
        new = over & ~ever_all
        ever_all |= over
        rows.append({"pass": c["pass"], "checkpoint": c["checkpoint"], "step": c["step"],
                     "global_step": c["global_step"], "epoch": c["epoch"],
                     "frozen_mean_abs": float(d.abs()[frozen].mean()) if frozen.any() else None,
                     "over_threshold_frozen": int((over & frozen).sum()), "over_threshold_all": int(over.sum()),
                     "new_frozen": int((new & frozen).sum()), "new_all": int(new.sum()),
                     "new_frozen_heads": [[int(layer), int(h)] for layer, h in (new & frozen).nonzero().tolist()],
                     "healthy": c["report"].n_healthy(healthy), "delta": d.tolist()})
    columns = []
    for h in range(n_head):
        mask = frozen[:, h]
        series = [float(d[mask, h].abs().mean()) for d in deltas] if mask.any() else None
        fit = fitted_change(steps, series) if series else None
        change = None if fit is None else fit[1]
        columns.append({"head": h, "n_frozen": int(mask.sum()), "mean_abs": series,
                        "slope_per_step": None if fit is None else fit[0], "fitted_change": change,
                        "last_over_first": None if not series or series[0] == 0 else series[-1] / series[0],
                        "trend": _trend(change, trend_threshold) if series else "no frozen heads"})
    matrix = [[None if a["mean_abs"] is None or b["mean_abs"] is None else pearson(a["mean_abs"], b["mean_abs"])
               for b in columns] for a in columns]
    rules = {"fitted": {"rule": COLUMN_RULES["fitted"][1], "threshold": trend_threshold, **_verdict(columns)},
             "paper": paper_columns(run, threshold=thresholds["paper"], drift_threshold=drift_threshold)}
    return {"kind": KIND, "version": 1, "run_dir": str(run.run_dir),
            "original": run.original.metadata.get("model"), "n_layer": n_layer, "n_head": n_head,
            "drift_threshold": drift_threshold, "trend_threshold": trend_threshold,
            "selected": {str(k): v for k, v in run.selected.items()}, "n_frozen": int(frozen.sum()),
            "undiagnosed": list(run.undiagnosed), "checkpoints": rows, "columns": columns,
            "column_rule": column_rule, "spreading": rules[column_rule]["spreading"],
            "trend_counts": rules[column_rule]["trend_counts"], "column_rules": rules,
            "healthy_definition": healthy, "original_healthy": run.original.n_healthy(healthy),
            "cascade": {"new_frozen": [r["new_frozen"] for r in rows], "new_all": [r["new_all"] for r in rows],
                        "cumulative_frozen": _cumsum(r["new_frozen"] for r in rows),
                        "cumulative_all": _cumsum(r["new_all"] for r in rows)},
            "correlation": {"heads": list(range(n_head)), "pearson": matrix}}


def _cumsum(values) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def format_drift(result: dict) -> str:
    """The terminal summary: one row per checkpoint, the columns' trends, undiagnosed checkpoints."""
    total = result["n_layer"] * result["n_head"]
    lines = [f"drift of {result['run_dir']} against {result['original']}: {result['n_frozen']} frozen heads of "
             f"{total}, {len(result['checkpoints'])} diagnosed checkpoints; healthy heads "
             f"({result['healthy_definition']}: {HEALTHY_DEFINITIONS[result['healthy_definition']]}) "
             f"{result['original_healthy']}/{total} in the original",
             f"{'checkpoint':<24} {'step':>6} {'frozen mean |d|':>16} "
             f"{'> ' + format(result['drift_threshold'], 'g'):>7} {'new (frozen)':>13} {'new (all)':>10} "
             f"{'healthy':>8}"]
    for r in result["checkpoints"]:
        name = r["checkpoint"] if r["pass"] == 1 and not any(c["pass"] > 1 for c in result["checkpoints"]) \
            else f"pass-{r['pass']}/{r['checkpoint']}"
        mean = "-" if r["frozen_mean_abs"] is None else f"{r['frozen_mean_abs']:.4f}"
        lines.append(f"{name:<24} {r['global_step']:>6} {mean:>16} {r['over_threshold_frozen']:>7} "
                     f"{r['new_frozen']:>13} {r['new_all']:>10} {r['healthy']:>8}")
    chosen = result["column_rule"]
    for name in (chosen, *(n for n in result["column_rules"] if n != chosen)):
        rule = result["column_rules"][name]
        scope = "" if name == "fitted" else (f"; {len(rule['heads'])} in-band frozen heads, "
                                             f"{len(rule['checkpoints'])} epoch checkpoints")
        lines.append(f"columns by the {name} rule{' (used)' if name == chosen else ''}: "
                     + ", ".join(f"{t} {n}" for t, n in rule["trend_counts"].items())
                     + (f" (spreading: {', '.join(f'H{h}' for h in rule['spreading'])})" if rule["spreading"] else "")
                     + f"\n  {rule['rule']}, threshold {rule['threshold']:g}{scope}")
    if result["undiagnosed"]:
        lines.append(f"warning: {len(result['undiagnosed'])} checkpoint(s) have no diagnosis in the run's history and "
                     f"are left out: {', '.join(result['undiagnosed'])}")
    return "\n".join(lines)


def write_drift_json(result: dict, path) -> None:
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")

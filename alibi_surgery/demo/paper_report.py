"""The paper's tables with its numbers beside ours: ``OUT/paper.md`` and ``OUT/paper.json`` of ``alibi-surgery paper``.

:data:`PAPER` holds the published figures of Schallon (2026) for bloom-1b7, typed in as facts, each with the table or
section it comes from (no text of the paper is reproduced). :func:`summarise_run` reduces one repair report to what
the tables need; :func:`write_report` writes the tables, one cell ``ours (paper)``, and names the differences: the
fixed ones between the paper's code and this protocol (:data:`DIFFERENCES`) and those a run measures (a number
more than 10% away from the paper's, a class count that differs). Ours are "-" where an experiment did not run.

Definitions: head classes are the paper's four (healthy excludes low-entropy, as its ``evaluate_epoch3.py``
counts); "woken" is a target collapsed before and not after; drift is ``|delta first-token mass| > 0.05`` against the
stock diagnosis, split into the plan's zones (outside: not a target and outside the band; in-band: frozen inside
it); a column's figure is the mean |delta| of its in-band frozen heads at the end of epoch ``min(3, last)`` and at
the last checkpoint (the paper's "E3" and "E15"). Perplexities use the paper's convention and texts.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PAPER", "DIFFERENCES", "summarise_run", "tables", "write_report"]

# Published figures (bloom-1b7), by where they are printed.
PAPER = {
    "recovery": {  # section 4.1, head recovery table
        "stock": {"healthy": 242, "bos_sink": 136, "dead": 3, "low_entropy": 3, "train_ppl": 16.99,
                  "held_out_ppl": 21.45},
        "pass1": {"healthy": 341, "bos_sink": 39, "dead": 0, "low_entropy": 4, "train_ppl": 15.13,
                  "held_out_ppl": 27.52, "trainable_params": 302e6, "woken": 108, "targets": 108},
        "pass2": {"healthy": 379, "bos_sink": 1, "dead": 0, "low_entropy": 4, "train_ppl": 15.10,
                  "held_out_ppl": 28.76, "trainable_params": 40e6, "woken": 39, "targets": 39},
    },
    "gradient_only": {"woken": 0, "targets": 108, "epochs": 15},  # section 3.2 (no table: "zero head recovery")
    "corpus": {  # section 4.2 table; drift: section 4.3 tables (outside of ~200, in-band frozen of 18)
        "curated_early": {"woken": 108, "train_ppl": 15.4, "outside_count": 76, "outside_mean": 0.0426,
                          "inband_count": 9, "inband_mean": 0.0990},
        "c4_early": {"woken": 108, "train_ppl": 20.80, "outside_count": 56, "outside_mean": 0.0310,
                     "inband_count": 5, "inband_mean": 0.0399},
        "c4_last": {"woken": 108, "train_ppl": 36.31, "outside_count": 59, "outside_mean": 0.0398,
                    "inband_count": 10, "inband_mean": 0.0641},
    },
    "columns": {15: (4, 0.083, 0.154), 13: (2, 0.046, 0.070), 9: (4, 0.034, 0.051), 10: (3, 0.046, 0.046),
                12: (3, 0.007, 0.019)},  # section 4.5: column -> (frozen heads, C4 E3 mean, C4 E15 mean)
    "column": {"targets": 126, "train_ppl_epoch1": 13.90, "train_ppl_best": 12.70, "best_step": 42,
               "steps_per_epoch": 140},  # section 4.6, the band + H5 table and text
}

DIFFERENCES = [
    "pass 1 freezes the map's in-band healthy heads: the paper's code lists 18 (its drift table counts 18), its "
    "text (section 3.4) says five",
    "trainable parameters: the paper counts whole QKV and output matrices of the 18 surgical layers (302M, gradient "
    "masks); this project trains only the selected heads' slices (the plan's count)",
    "pass 2: the paper re-initialised its own list of 39 heads (pass-2 map); here pass 2 targets every head our "
    "diagnosis of pass 1's final model finds collapsed",
    "checkpoints: every epoch here (the paper: every 3 epochs in pass 1 and the C4 run, every epoch in pass 2); "
    "final/ is the best by the paper's training perplexity; the paper's early stop (6 checkpoints) is not applied",
    "seeds: every run here uses the seed of the paper's C4 run; its pass 1 and pass 2 were unseeded (appendix C)",
    "the corpus: the paper's curated corpus is not part of its code; ours is the --corpus given",
    "the band + column run checkpoints every few steps (the paper's sub-epoch sweep) from the start",
]


def _entry(report: dict, name: str | None) -> dict | None:
    history = report.get("checkpoints") or []
    return next((c for c in history if c["checkpoint"] == name), history[-1] if history else None)


def _column_means(entry: dict, heads: list) -> dict:
    """Mean |delta| of ``heads`` ((layer, head) pairs) per head-index column, at one checkpoint."""
    delta = {(h["layer"], h["head"]): abs(h["delta"]) for h in entry["comparison"]["heads"]}
    out = {}
    for layer, head in heads:
        out.setdefault(head, []).append(delta[(layer, head)])
    return {str(c): sum(v) / len(v) for c, v in sorted(out.items())}


def summarise_run(report: dict, run) -> dict:
    """What the tables need of one repair report (single pass)."""
    plan = report["plan"]
    best = _entry(report, report.get("final_checkpoint"))
    history = report.get("checkpoints") or []
    frozen = sorted({(int(layer), h) for layer, hs in plan["zone"].items() for h in hs}
                    - {(int(layer), h) for layer, hs in plan["selection"].items() for h in hs})
    epoch_ends = [c for c in history if float(c["epoch"]).is_integer() and c["epoch"] > 0]
    last = history[-1] if history else None
    early = next((c for c in epoch_ends if c["epoch"] == min(3, epoch_ends[-1]["epoch"])), None) if epoch_ends \
        else None

    def drift_of(entry):
        if entry is None:
            return None
        d = entry["comparison"]["summary"]["drift"]
        return {z: {k: d[z][k] for k in ("n", "count", "mean_abs")} for z in ("outside", "in-band", "all")}

    def at(entry):
        if entry is None:
            return None
        s = entry["comparison"]["summary"]
        return {"step": entry["step"], "epoch": entry["epoch"], "train_ppl": entry.get("eval_prompts_ppl"),
                "woken": s["recovered"], "classes": s["classes_after"], "drift": drift_of(entry),
                "inband_columns": _column_means(entry, frozen) if frozen else {}}

    ppls = [(c["eval_prompts_ppl"], c["step"]) for c in history if c.get("eval_prompts_ppl") is not None]
    included = sorted((int(layer), h) for layer, hs in plan.get("included", {}).items() for h in hs)
    heads_after = {(h["layer"], h["head"]): h for h in best["comparison"]["heads"]} if best else {}
    return {"experiment": run.experiment, "arm": run.arm, "targets": plan["n_heads"],
            "trainable_params": plan["trainable_params"], "inband_frozen": len(frozen),
            "collapsed_targets_before": (best["comparison"]["summary"]["recovered"]
                                         + best["comparison"]["summary"]["still_sick"]) if best else None,
            "train_ppl_before": report.get("eval_prompts_ppl_before"), "final_checkpoint": report.get("final_checkpoint"),
            "best": at(best), "early": at(early), "last": at(last),
            "functional": (report.get("functional") or {}).get("recovery"),
            "best_step": min(ppls)[1] if ppls else None, "best_train_ppl": min(ppls)[0] if ppls else None,
            "included_heads": [{"layer": layer, "head": h, "bos_before": heads_after[(layer, h)]["bos_mass_before"],
                                "bos_after": heads_after[(layer, h)]["bos_mass_after"]}
                               for layer, h in included if (layer, h) in heads_after]}


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return f"{x:,}" if isinstance(x, int) and abs(x) >= 1e5 else str(x)


def _cell(ours, paper, digits: int = 2) -> str:
    return f"{_fmt(ours, digits)} ({_fmt(paper, digits)})"


def _done(data: dict, name: str) -> dict | None:
    run = data["runs"].get(name)
    return run if run and run.get("status") == "done" else None


def tables(data: dict) -> tuple[list[str], list[str]]:
    """The markdown lines of the tables, and the measured differences (see the module docstring)."""
    lines, diffs = [], []
    base, stock = data["baseline"], data["stock"]
    p1, p2 = _done(data, "pass1-treatment"), _done(data, "pass2-treatment")
    cols = [("stock", base, stock.get("train_ppl"), stock.get("held_out_ppl"), None)]
    for key, run in (("pass1", p1), ("pass2", p2)):
        best = run and run["best"]
        cols.append((key, best and best["classes"], run and best["train_ppl"], run and run["held_out_ppl"],
                     run and run["trainable_params"]))
    lines += ["## Head recovery (paper: section 4.1)", "", "ours (paper); classes as the paper counts them", "",
              "| | stock | pass 1 | pass 2 |", "|---|---:|---:|---:|"]
    for label, key in (("healthy", "healthy"), ("bos-sink", "bos_sink"), ("dead", "dead"),
                       ("low-entropy", "low_entropy"), ("training ppl", "train_ppl"), ("held-out ppl", "held_out_ppl"),
                       ("params trained", "trainable_params")):
        row = []
        for name, classes, train, held, params in cols:
            ours = {"train_ppl": train, "held_out_ppl": held, "trainable_params": params}.get(
                key, classes and classes.get(key))
            paper = PAPER["recovery"][name].get(key)
            row.append(_cell(ours, paper))
            if isinstance(ours, (int, float)) and isinstance(paper, (int, float)) and paper and \
                    abs(ours - paper) > 0.1 * abs(paper) and key != "trainable_params":
                diffs.append(f"{label}, {name}: ours {_fmt(ours)} against the paper's {_fmt(paper)}")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", "## Arms (paper: section 3.2 reports the gradient-only control: 0 of 108 woken after 15 epochs)",
              "", "| experiment | arm | targets | woken (of collapsed) | revived (does work) | training ppl | "
                  "held-out ppl | status |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, run in data["runs"].items():
        exp, arm = name.split("-", 1)
        if run.get("status") != "done":
            note = run.get("note", "")
            why = note if note.startswith(run["status"]) else f"{run['status']}: {note}"
            lines.append(f"| {exp} | {arm} | - | - | - | - | - | {why} |")
            continue
        functional = run.get("functional")
        revived = "-" if functional is None else f"{functional['revived']} of {functional['collapsed_before']}"
        lines.append(f"| {exp} | {arm} | {run['targets']} | {run['best']['woken']} of "
                     f"{run['collapsed_targets_before']} | {revived} | {_fmt(run['best']['train_ppl'])} | "
                     f"{_fmt(run['held_out_ppl'])} | done |")
    go = _done(data, "pass1-gradient-only")
    if go and go["best"]["woken"] != PAPER["gradient_only"]["woken"]:
        diffs.append(f"gradient-only control: {go['best']['woken']} heads woken, the paper's none")
    c4 = _done(data, "c4-treatment")
    lines += ["", "## Corpus comparison (paper: sections 4.2, 4.3)", "",
              "| | curated, early | C4, early | C4, last |", "|---|---:|---:|---:|"]
    picks = [(p1, "early", "curated_early"), (c4, "early", "c4_early"), (c4, "last", "c4_last")]
    for label, key in (("woken", "woken"), ("training ppl", "train_ppl"), ("outside drifting", "outside_count"),
                       ("outside mean abs delta", "outside_mean"), ("in-band frozen drifting", "inband_count"),
                       ("in-band frozen mean abs delta", "inband_mean")):
        row = []
        for run, when, pk in picks:
            at = run and run.get(when)
            ours = None
            if at:
                zone = "outside" if key.startswith("outside") else "in-band"
                ours = at.get(key) if key in ("woken", "train_ppl") else \
                    at["drift"][zone]["count" if key.endswith("count") else "mean_abs"]
            row.append(_cell(ours, PAPER["corpus"][pk][key], 4 if key.endswith("mean") else 2))
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", "## In-band frozen drift by column, C4 run (paper: section 4.5)", "",
              "| column | frozen heads | early mean abs delta | last mean abs delta |", "|---|---:|---:|---:|"]
    ours_cols = (c4 and c4.get("early") and c4["early"]["inband_columns"]) or {}
    last_cols = (c4 and c4.get("last") and c4["last"]["inband_columns"]) or {}
    for col in sorted(set(map(int, ours_cols)) | set(PAPER["columns"])):
        n, e3, e15 = PAPER["columns"].get(col, (None, None, None))
        mine = sum(1 for e in data["pass1_map"].values() if col in e.get("freeze", []))
        lines.append(f"| H{col} | {_cell(mine, n)} | {_cell(ours_cols.get(str(col)), e3, 3)} | "
                     f"{_cell(last_cols.get(str(col)), e15, 3)} |")
    col = _done(data, "column-treatment")
    pc = PAPER["column"]
    lines += ["", "## Band + healthy column (paper: section 4.6)", "", "| | ours | paper |", "|---|---:|---:|",
              f"| targets | {_fmt(col and col['targets'])} | {pc['targets']} |",
              f"| training ppl, stock | {_fmt(stock.get('train_ppl'))} | {PAPER['recovery']['stock']['train_ppl']} |",
              f"| training ppl, band only (pass 1) | {_fmt(p1 and p1['best']['train_ppl'])} | "
              f"{PAPER['recovery']['pass1']['train_ppl']} |",
              f"| training ppl, band + column, epoch 1 | "
              f"{_fmt(col and col['early'] and col['early']['train_ppl'])} | {pc['train_ppl_epoch1']} |",
              f"| best training ppl (at step) | {_fmt(col and col['best_train_ppl'])} "
              f"({_fmt(col and col['best_step'])}) | {pc['train_ppl_best']} ({pc['best_step']} of "
              f"{pc['steps_per_epoch']}) |"]
    if col and stock.get("train_ppl") and col["best_train_ppl"] is not None:
        beats = col["best_train_ppl"] < stock["train_ppl"]
        if not beats:
            diffs.append(f"band + column: best training ppl {_fmt(col['best_train_ppl'])} does not beat stock "
                         f"({_fmt(stock['train_ppl'])}); the paper's did (12.70 against 16.99)")
    return lines, diffs


def write_report(data: dict, out: Path) -> None:
    """``OUT/paper.json`` (``data`` plus the differences) and ``OUT/paper.md``."""
    from ..io.files import atomic_write_text

    lines, measured = tables(data)
    data["differences"] = {"protocol": DIFFERENCES, "measured": measured}
    head = [f"# The paper's protocol on {data['model']}", "",
            f"Paper repository: {data['paper_repo']['source']}; pass 1 from "
            f"{'the paper' + chr(39) + 's map' if data['pass1_source'] == 'paper' else 'this model' + chr(39) + 's band'}"
            f"; {data['wall_seconds']} s. Every cell: ours (the paper's, bloom-1b7).", ""]
    tail = ["", "## Differences", "", "Between the paper's code and this protocol:", ""] + \
        [f"- {d}" for d in DIFFERENCES] + ["", "Measured (more than 10% from the paper's figure, or another "
                                           "outcome):", ""] + ([f"- {d}" for d in measured] or ["- none"])
    atomic_write_text(out / "paper.md", "\n".join(head + lines + tail) + "\n")
    atomic_write_text(out / "paper.json", json.dumps(data, indent=1, default=str) + "\n")

"""The numbers of one reproduction unit (a testbed and a seed), read from its runs' ``report.json`` files and its
functional measurements (:mod:`alibi_surgery.demo.reproduce`). :mod:`.reproduction_report` pools the units.

What each number is (``run`` = ``OUT/runs/<testbed>-<kind>-<seed>``, "pass 1" = ``treatment``'s ``pass-1``):

* ``targets``: pass 1's targets (the baseline's collapsed band heads);
* ``functional[arm]``: over those targets, how many were collapsed before, are not collapsed on the arm's final
  model, and are revived there (:func:`~alibi_surgery.analysis.ablation_report.recovery`); ``treatment`` is pass 1;
* ``healthy``: the paper's healthy heads (not dead, not bos-sink, not low-entropy) in the baseline and on each
  pass's final model (pass 2 absent: the model after pass 1 stands); ``iatrogenic``: pass 1's, at its final model;
* ``eval[kind]``: held-out perplexity at the ``last`` checkpoint, the ``best`` one and the ``final`` model's, and
  ``stock``: the input model's, all on the same held-out documents;
* ``extended``: the curve, the added column's mean first-token mass before and at the last checkpoint;
* ``drift[corpus]`` (pass 1 = structured, ``noisy``): frozen heads outside the zone and in-band at the first epoch
  checkpoint (``early``) and the last (``late``), and the paper's column rule (``paper_columns``) per column.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["unit", "pass_report"]


def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def pass_report(run: Path, k: int = 1) -> dict | None:
    """``report.json`` of pass ``k`` of ``run`` (a single-pass run is its own pass 1); None when absent."""
    path = run / f"pass-{k}" / "report.json" if (run / "pass-1").is_dir() else run / "report.json"
    return _read(path) if path.is_file() else None


def _entry(report: dict, which: str) -> dict:
    if which == "last":
        return report["checkpoints"][-1]
    name = report.get("final_checkpoint")
    return next((c for c in report["checkpoints"] if c["checkpoint"] == name), report["checkpoints"][-1])


def _comparison(entry: dict):
    from ..analysis.comparison import Comparison

    return Comparison.from_dict(entry["comparison"])


def _n(selection) -> int:
    return sum(len(h) for h in selection.values())


def _eval(report: dict) -> dict:
    points = [c["eval_ppl"] for c in report["checkpoints"]]
    return {"last": points[-1], "best": min(points), "final": _entry(report, "final")["eval_ppl"],
            "stock": report["eval_ppl_before"]}


def _drift_at(entry: dict) -> dict:
    cmp = _comparison(entry)
    outside, band = cmp.drift("outside"), cmp.drift("in-band")
    return {"step": entry["step"], "outside_count": outside["count"], "outside_n": outside["n"],
            "outside_mean_abs": outside["mean_abs"], "in_band_count": band["count"], "in_band_n": band["n"],
            "in_band_mean_abs": band["mean_abs"]}


def _drift(pass_dir: Path, report: dict) -> dict:
    from ..analysis.drift import paper_columns, read_run

    epochs = [c for c in report["checkpoints"] if float(c["epoch"]).is_integer() and c["step"] > 0]
    early = epochs[0] if epochs else report["checkpoints"][0]
    columns = paper_columns(read_run(pass_dir))
    return {"early": _drift_at(early), "late": _drift_at(report["checkpoints"][-1]),
            "paper_columns": [{"head": c["head"], "n_frozen": c["n_frozen"], "change": c["change"],
                               "trend": c["trend"]} for c in columns["columns"]],
            "paper_spreading": columns["spreading"]}


def _functional(out: Path, name: str, baseline) -> dict | None:
    from ..analysis.ablation_report import Ablation, recovery
    from ..diagnosis.report import HeadReport

    path = out / "functional" / f"{name}.json"
    if not path.is_file():
        return None
    data = _read(path)
    ablation = Ablation.from_dict(data["ablation"])
    after = HeadReport.from_dict(data["diagnosis"])
    counts = recovery(baseline, after, ablation).to_dict()
    counts["does_work"] = sum(bool(h.does_work) for h in ablation.heads)
    counts["base_loss"] = ablation.base_loss
    return counts


def unit(out: Path, bed: dict, seed: int) -> dict | None:
    """The numbers of testbed ``bed`` (:class:`~alibi_surgery.demo.reproduce.Testbed` as a dict) and ``seed``
    (module docstring); None while its treatment run is unfinished."""
    from ..diagnosis.report import HeadReport

    out = Path(out)
    runs = out / "runs"

    def run(kind: str) -> Path:
        return runs / f"{bed['name']}-{kind}-{seed}"

    p1 = pass_report(run("treatment"), 1)
    if p1 is None:
        return None
    p2 = pass_report(run("treatment"), 2)
    baseline = HeadReport.from_json(bed["baseline"])
    band = bed["band"]
    targets = sum(1 for layer, heads in baseline.sick_heads().items() for h in heads if band[0] <= h <= band[1])
    first = _comparison(_entry(p1, "final"))
    healthy = {"baseline": first.before.n_healthy("paper"), "pass1": first.after.n_healthy("paper")}
    healthy["pass2"] = (_comparison(_entry(p2, "final")).after.n_healthy("paper") if p2 is not None
                        else healthy["pass1"])
    row = {"testbed": bed["name"], "seed": seed, "n_heads": baseline.n_layer * baseline.n_head, "targets": targets,
           "healthy": healthy, "iatrogenic": _n(first.iatrogenic()),
           "pass2_targets": _n(p2["plan"]["selection"]) if p2 is not None else 0,
           "eval": {"treatment": _eval(p1)}, "functional": {}, "drift": {}}
    for kind in ("gradient-only", "reinit-only", "random-healthy", "ablate", "extended", "noisy", "paper", "ours"):
        report = pass_report(run(kind))
        if report is not None:
            row["eval"][kind] = _eval(report)
    row["functional"]["stock"] = _functional(out, f"{bed['name']}-stock", baseline)
    for arm in ("treatment", "gradient-only", "reinit-only", "random-healthy", "ablate"):
        row["functional"][arm] = _functional(out, f"{bed['name']}-{arm}-{seed}", baseline)
    ext = pass_report(run("extended"))
    if ext is not None and bed.get("column") is not None:
        column = bed["column"]
        cmp = _comparison(_entry(ext, "last"))
        row["extended"] = {"column": column, "mass_before": float(cmp.before.bos_mass[:, column].mean()),
                           "mass_after": float(cmp.after.bos_mass[:, column].mean()),
                           "curve": [[c["step"], c["eval_ppl"]] for c in ext["checkpoints"]],
                           "band_only": [[c["step"], c["eval_ppl"]] for c in p1["checkpoints"]]}
    row["drift"]["structured"] = _drift(run("treatment") / "pass-1", p1)
    noisy = pass_report(run("noisy"))
    if noisy is not None:
        row["drift"]["noisy"] = _drift(run("noisy"), noisy)
    return row

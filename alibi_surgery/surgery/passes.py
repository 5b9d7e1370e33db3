"""Several surgery passes (``repair(..., passes=N)``), as the paper ran them.

Pass 1 follows the plan options. Every later pass runs in ``OUT/pass-k`` from the previous pass's best checkpoint
(as trained: its dtype, not ``final/``'s), with a fresh diagnosis that targets every head still collapsed, anywhere
(``heads="auto"``; ``band``, ``layers``, a ``heads`` list, ``include`` and ``report`` apply to pass 1 only; ``freeze``
to every pass). Each pass's report gains ``drift_vs_previous`` (its best checkpoint against the model it started
from) and ``drift_vs_original`` (against pass 1's baseline, the input model). The run stops early when a later pass
finds nothing left to repair. ``OUT/final`` is the last pass's final model; ``OUT/report.json`` (with
``learning_rates``: one list per pass) and ``OUT/report.md`` summarise the passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..analysis.comparison import Comparison
from ..diagnosis.report import HeadReport
from ..io.files import atomic_write_text, read_text, staged_dir
from .plan import NothingToRepair
from ..io.outdir import clear_dir
from .repair_report import write_passes_markdown

__all__ = ["run_passes"]


def run_passes(repair_pass, model_path: Path, out: Path, passes: int, flags: tuple[bool, bool], options: dict) -> dict:
    """The passes of one run into the locked ``out`` (see the module docstring), each run by ``repair_pass``
    (:func:`~alibi_surgery.surgery.repair.repair_pass`, handed down so that this module does not import its caller)
    with ``options``; ``flags`` is ``(resume, overwrite)``. Returns the summary also written to
    ``OUT/report.json``."""
    resume, overwrite = flags
    if overwrite and not resume:
        clear_dir(out)
    source, reports, stopped = model_path, [], None
    later = dict(options, report=None, include=None, heads="auto", band=None, layers=None)  # minus --freeze only
    for k in range(1, passes + 1):
        pass_out = out / f"pass-{k}"
        if (pass_out / "report.json").is_file():
            reports.append(json.loads(read_text(pass_out / "report.json", what="report")))
        else:
            try:
                reports.append(repair_pass(source, pass_out, resume=resume and pass_out.exists(),
                                           **(options if k == 1 else later)))
            except NothingToRepair as exc:
                if k == 1:
                    raise
                stopped = f"pass {k} found nothing left to repair: {exc}"
                break
        _drift_vs_original(reports[-1], out / "pass-1" / "baseline.json")
        best = reports[-1]["final_checkpoint"]  # the next pass starts from this pass's best checkpoint, as trained
        source = pass_out / "checkpoints" / best if best else pass_out / "final"
        last_final = pass_out / "final"
    final = out / "final"
    with staged_dir(final, "final model") as tmp:
        shutil.copytree(last_final, tmp)
    summary = {"input": str(model_path), "arm": reports[0].get("arm"), "final": str(final), "passes_asked": passes,
               "stopped": stopped,
               "eval_ppl_before": reports[0].get("eval_ppl_before"),
               "eval_prompts_ppl_before": reports[0].get("eval_prompts_ppl_before"),
               "learning_rates": [r.get("learning_rates", []) for r in reports], "passes": reports}
    atomic_write_text(out / "report.json", json.dumps(summary, indent=1) + "\n")
    write_passes_markdown(out, summary)
    return summary


def _drift_vs_original(report: dict, original_json: Path) -> None:
    """Add to a pass's ``report`` the drift of its final model against the original model (pass 1's baseline), as
    ``drift_vs_original``, beside ``drift_vs_previous`` (against the model the pass started from)."""
    entry = next((c for c in report["checkpoints"] if c["checkpoint"] == report["final_checkpoint"]),
                 report["checkpoints"][-1] if report["checkpoints"] else None)
    if entry is None:
        return
    after = Comparison.from_dict(entry["comparison"])
    plan = report["plan"]
    original = Comparison(HeadReport.from_json(original_json), after.after,
                          targets={int(k): v for k, v in plan["selection"].items()},
                          zone={int(k): v for k, v in plan["zone"].items()})
    report["drift_vs_previous"] = after.summary()["drift"]
    report["drift_vs_original"] = original.summary()["drift"]

"""The claims of a reproduction (:mod:`alibi_surgery.demo.reproduce`), each with its statistic, interval, line and
verdict, as docs/reproduction.md's "Rules for the next run" fixed them before the run; and the markdown page.

The units are (testbed, seed) pairs (:func:`~alibi_surgery.demo.reproduction_runs.unit`). Intervals
(:mod:`alibi_surgery.analysis.intervals`, 95%):

* a **proportion** pools counts over the units: Clopper-Pearson on ``sum k / sum n``, and beside it the run-level
  percentile bootstrap (the units resampled, ``sum k / sum n`` of each resample); its verdict needs both intervals
  to clear the line (:func:`both`);
* a **continuous** claim takes the mean over units of a per-unit value (a ratio of perplexities or a paired
  difference) with the percentile bootstrap over units;
* 1,000 resamples, seed 0. A claim with several parts holds when every part holds, does not hold when any part
  does not hold, and is inconclusive otherwise (:func:`conjunction`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..analysis.intervals import bootstrap_ci, clopper_pearson, verdict

__all__ = ["summarise", "claims", "write_report", "NOTES", "both", "conjunction", "pooled", "mean_ci"]

RESAMPLES, SEED = 1000, 0
NOTES = "<!-- notes: the text below this line is kept when the script rewrites the page -->"
ARMS = ("treatment", "gradient-only", "reinit-only", "random-healthy", "ablate")


def both(a: str, b: str) -> str:
    """A proportion's verdict from its two intervals' verdicts: each must clear the line."""
    return a if a == b else "inconclusive"


def conjunction(verdicts: list[str]) -> str:
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "does not hold" if "does not hold" in verdicts else "inconclusive"


def pooled(k: list[int], n: list[int], line: float | None = None, side: str = "below") -> dict:
    """Pooled proportion ``sum k / sum n`` with both intervals (module docstring) and, given ``line``, the verdict."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    cp = clopper_pearson(int(k.sum()), int(n.sum()))
    idx = np.arange(len(k))
    boot = bootstrap_ci(idx, lambda i: k[i.astype(int)].sum() / n[i.astype(int)].sum(), resamples=RESAMPLES,
                        seed=SEED)
    out = {"k": int(k.sum()), "n": int(n.sum()), "p": float(k.sum() / n.sum()), "cp": list(cp), "boot": list(boot)}
    if line is not None:
        out.update(line=line, side=side, verdict=both(verdict(cp, line, side), verdict(boot, line, side)))
    return out


def mean_ci(values: list[float], line: float | None = None, side: str = "below") -> dict:
    """Mean over units with its bootstrap interval and, given ``line``, the verdict."""
    v = [float(x) for x in values]
    out = {"mean": float(np.mean(v)), "ci": list(bootstrap_ci(v, resamples=RESAMPLES, seed=SEED)), "n": len(v),
           "min": min(v), "max": max(v)}
    if line is not None:
        out.update(line=line, side=side, verdict=verdict(tuple(out["ci"]), line, side))
    return out


def _f(units: list[dict], arm: str, key: str) -> list:
    return [u["functional"][arm][key] for u in units if u["functional"].get(arm)]


def _ratio(units, a: str, b: str, which: str = "last", which_b: str | None = None) -> list[float]:
    """Per unit ``eval[a][which] / eval[b][which_b]`` (``b`` ``stock``: the input model's)."""
    rows = []
    for u in units:
        if a not in u["eval"] or (b != "stock" and b not in u["eval"]):
            continue
        den = u["eval"][a]["stock"] if b == "stock" else u["eval"][b][which_b or which]
        rows.append(u["eval"][a][which] / den)
    return rows


def claims(units: list[dict], small_column: int) -> dict:
    """Every claim's statistics and verdict (the table of docs/reproduction.md's rules)."""
    c: dict = {}
    targets = {arm: (_f(units, arm, "revived"), _f(units, arm, "collapsed_before")) for arm in ARMS}
    c["1a"] = pooled(*targets["gradient-only"], line=0.10, side="below")
    c["1b"] = pooled(*targets["treatment"], line=0.90, side="above")
    c["1c"] = pooled(*targets["reinit-only"], line=0.10, side="below")
    c["1d"] = mean_ci(_ratio(units, "treatment", "random-healthy"), line=1.0, side="below")
    n_heads = [u["n_heads"] for u in units]
    final = pooled([u["healthy"]["pass2"] for u in units], n_heads, line=0.95, side="above")
    rise1 = mean_ci([u["healthy"]["pass1"] - u["healthy"]["baseline"] for u in units], line=0, side="above")
    rise2 = mean_ci([u["healthy"]["pass2"] - u["healthy"]["pass1"] for u in units], line=0, side="above")
    c["2"] = {"final": final, "rise1": rise1, "rise2": rise2,
              "healthy": {k: mean_ci([u["healthy"][k] for u in units]) for k in ("baseline", "pass1", "pass2")},
              "verdict": conjunction([final["verdict"], rise1["verdict"], rise2["verdict"]])}
    c["2b"] = pooled([u["iatrogenic"] for u in units], n_heads, line=0.02, side="below")
    ext = [u for u in units if "extended" in u]
    if ext:
        best = mean_ci([min(p for _, p in u["extended"]["curve"]) / u["eval"]["extended"]["stock"] for u in ext],
                       line=1.0, side="below")
        rebound = mean_ci([u["extended"]["curve"][-1][1] / min(p for _, p in u["extended"]["curve"]) for u in ext],
                          line=1.0, side="above")
        vs_band = mean_ci([min(p for _, p in u["extended"]["curve"]) / min(p for _, p in u["extended"]["band_only"])
                           for u in ext], line=1.0, side="below")
        c["3"] = {"best": best, "last_over_best": rebound, "vs_band_only": vs_band,
                  "mass_before": mean_ci([u["extended"]["mass_before"] for u in ext]),
                  "mass_after": mean_ci([u["extended"]["mass_after"] for u in ext]),
                  "verdict": conjunction([best["verdict"], rebound["verdict"], vs_band["verdict"]])}
    paired = [u for u in units if "noisy" in u["drift"]]
    d = lambda u, corpus, when, key: u["drift"][corpus][when][key]  # noqa: E731
    c["4a"] = mean_ci([d(u, "structured", "early", "outside_count") - d(u, "noisy", "early", "outside_count")
                       for u in paired], line=0, side="above")
    c["4a"].update(structured=mean_ci([d(u, "structured", "early", "outside_count") for u in paired]),
                   noisy=mean_ci([d(u, "noisy", "early", "outside_count") for u in paired]),
                   step=paired[0]["drift"]["structured"]["early"]["step"] if paired else None)
    late = mean_ci([d(u, "noisy", "late", "outside_mean_abs") - d(u, "structured", "late", "outside_mean_abs")
                    for u in paired], line=0, side="above")
    flagged = {corpus: sum(small_column in u["drift"][corpus]["paper_spreading"] for u in paired)
               for corpus in ("structured", "noisy")}
    frozen = sum(u["drift"]["structured"]["paper_columns"][small_column]["n_frozen"] > 0 for u in paired)
    column_verdict = "holds" if flagged["noisy"] > flagged["structured"] else "does not hold"
    c["4b"] = {"late_difference": late, "flagged": flagged, "units_with_frozen_heads_in_column": frozen,
               "column": small_column, "column_verdict": column_verdict,
               "structured": mean_ci([d(u, "structured", "late", "outside_mean_abs") for u in paired]),
               "noisy": mean_ci([d(u, "noisy", "late", "outside_mean_abs") for u in paired]),
               "verdict": conjunction([late["verdict"], column_verdict])}
    parts = {"stock": mean_ci(_ratio(units, "treatment", "stock"), line=1.0, side="below"),
             "reinit-only": mean_ci(_ratio(units, "treatment", "reinit-only"), line=1.0, side="below"),
             "ablate": mean_ci(_ratio(units, "treatment", "ablate"), line=1.0, side="below")}
    c["5"] = {"parts": parts, "verdict": conjunction([p["verdict"] for p in parts.values()])}
    bf16 = _ratio(units, "paper", "ours", "best")
    c["6"] = mean_ci(bf16) if bf16 else None  # None: the bf16 pair was not run
    c["arms"] = {arm: {"not_collapsed": pooled(_f(units, arm, "not_collapsed"), targets[arm][1]),
                       "revived": pooled(*targets[arm]),
                       "ppl_last_over_stock": mean_ci(_ratio(units, arm, "stock")),
                       "ppl_best_over_stock": mean_ci(_ratio(units, arm, "stock", "best"))}
                 for arm in ARMS if targets[arm][1]}
    stock = [u["functional"]["stock"] for u in units if u["functional"].get("stock")]
    c["stock_does_work"] = {"k": sum(s["does_work"] for s in stock), "n": sum(s["targets"] for s in stock)}
    return c


def _special_targets(out: Path, seq_len: int, model: str) -> dict:
    """How many held-out targets (every position but a row's first) are special tokens: 0 means the perplexity
    without special tokens is the perplexity."""
    from ..io.corpus import load_corpus
    from ..io.loading import load_tokenizer
    from . import corpus_spec

    tokenizer = load_tokenizer(model)
    chunks = load_corpus(corpus_spec(out / "corpus" / "held-out" / "eval.jsonl"), tokenizer, seq_len)[0]
    special = set(tokenizer.all_special_ids)
    targets = chunks[:, 1:].reshape(-1).tolist()
    return {"special": sum(t in special for t in targets), "targets": len(targets)}


def summarise(out: Path, testbeds: list, seeds: int, seq_len: int) -> dict:
    """results.json's dict: every unit's numbers, the claims, the special-token check."""
    from dataclasses import asdict

    from .reproduction_runs import unit

    beds = [b if isinstance(b, dict) else asdict(b) for b in testbeds]
    units = [u for s in range(seeds) for b in beds if (u := unit(Path(out), b, s)) is not None]
    n_head = units[0]["n_heads"] // beds[0]["n_layer"] if units else 0
    return {"units": units, "seeds": seeds, "claims": claims(units, n_head - 1) if units else None,
            "held_out": _special_targets(Path(out), seq_len, beds[0]["model"])}


def write_report(r: dict, out: Path, *, docs_dir=None) -> None:
    """``OUT/results.json``, ``OUT/reproduction.md`` and ``OUT/img/repro-*.png`` (also into ``docs_dir``). A page
    being rewritten keeps whatever follows its :data:`NOTES` line (the commentary written by hand)."""
    from ..io.files import atomic_write_text
    from .reproduction_figures import save_figures
    from .reproduction_page import markdown

    atomic_write_text(Path(out) / "results.json", json.dumps(r, indent=1) + "\n")
    for target in [Path(out)] + ([Path(docs_dir)] if docs_dir else []):
        (target / "img").mkdir(parents=True, exist_ok=True)
        figures = save_figures(r, target / "img")
        page = target / "reproduction.md"
        old = page.read_text() if page.is_file() else ""
        notes = old.split(NOTES, 1)[1].lstrip("\n") if NOTES in old else ""
        atomic_write_text(page, markdown(r, figures) + "\n" + NOTES + "\n\n" + notes)

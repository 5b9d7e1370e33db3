"""docs/reproduction.md's generated half: the claim table with intervals and verdicts, the arms side by side, the
testbeds and the settings, from ``results.json``'s dict (:mod:`.reproduction_report`)."""

from __future__ import annotations

__all__ = ["markdown", "claim_rows"]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.1 or x == 0 else f"{100 * x:.1f}%"


def _prop(p: dict) -> str:
    """``k/n = p% (CP a–b%; runs a–b%)``."""
    return (f"{p['k']}/{p['n']} = {_pct(p['p'])} (CP {_pct(p['cp'][0])}–{_pct(p['cp'][1])}; runs "
            f"{_pct(p['boot'][0])}–{_pct(p['boot'][1])})")


def _mean(m: dict, digits: int = 3) -> str:
    return f"{m['mean']:.{digits}f} ({m['ci'][0]:.{digits}f}–{m['ci'][1]:.{digits}f})"


def claim_rows(r: dict) -> list[tuple[str, str, str, str, str]]:
    """(claim, the paper's figure, statistic and line, ours with its 95% interval, verdict) rows."""
    c = r["claims"]
    rows = [
        ("1a. Gradient-only training recovers (almost) no target", "0 of 108 recovered (bloom-1b7, 15 epochs)",
         "revived / targets, `gradient-only`; upper < 10%", _prop(c["1a"]), c["1a"]["verdict"]),
        ("1b. Re-initialisation and training revive the targets", "all 108 recovered",
         "revived / targets, `treatment`; lower > 90%", _prop(c["1b"]), c["1b"]["verdict"]),
        ("1c. Re-initialisation alone does not revive them", "—",
         "revived / targets, `reinit-only`; upper < 10%", _prop(c["1c"]), c["1c"]["verdict"]),
        ("1d. Training the targets beats training as many healthy heads", "—",
         "held-out ppl `treatment` / `random-healthy` (last checkpoints); upper < 1", _mean(c["1d"], 4),
         c["1d"]["verdict"]),
        ("2. Two passes heal nearly every head (paper's healthy)", "242 → 341 → 379 of 384 (63% → 89% → 99%)",
         "healthy after pass 2 / heads, lower > 95%; both rises' lower > 0",
         f"{_mean(c['2']['healthy']['baseline'], 1)} → {_mean(c['2']['healthy']['pass1'], 1)} → "
         f"{_mean(c['2']['healthy']['pass2'], 1)} of {r['units'][0]['n_heads']}; after pass 2 "
         f"{_prop(c['2']['final'])}; rises {_mean(c['2']['rise1'], 1)}, {_mean(c['2']['rise2'], 1)}",
         c["2"]["verdict"]),
        ("2b. Pass 1 makes few iatrogenic heads", "2 of 384 (0.5%)", "iatrogenic / heads; upper < 2%",
         _prop(c["2b"]), c["2b"]["verdict"]),
    ]
    if "3" in c:
        x = c["3"]
        rows.append(("3. A healthy column re-initialised with the band gives a transient gain",
                     "training ppl 12.70 against 16.99 at 30% of epoch 1, then overfitting",
                     "best `extended` / stock, upper < 1; last / best, lower > 1; best `extended` / best "
                     "band-only, upper < 1",
                     f"{_mean(x['best'], 4)}; {_mean(x['last_over_best'], 4)}; {_mean(x['vs_band_only'], 4)} "
                     f"(column mass {x['mass_before']['mean']:.2f} → {x['mass_after']['mean']:.2f})",
                     x["verdict"]))
    a, b = c["4a"], c["4b"]
    rows += [
        ("4a. A structured corpus moves more frozen heads outside the zone early", "more, global redistribution "
         "early", f"structured − noisy outside heads over 0.05 at step {a['step']}; lower > 0",
         f"{_mean(a, 2)} (structured {a['structured']['mean']:.1f}, noisy {a['noisy']['mean']:.1f})",
         a["verdict"]),
        ("4b. A noisy corpus degrades late along the small-slope column", "local degradation late, along the "
         "small-slope column", f"noisy − structured late outside mean \\|Δ\\|, lower > 0; the paper's rule flags "
         f"H{b['column']} in more noisy runs",
         f"{_mean(b['late_difference'])}; H{b['column']} flagged in {b['flagged']['noisy']} noisy, "
         f"{b['flagged']['structured']} structured runs ({b['units_with_frozen_heads_in_column']} runs have "
         f"in-band frozen heads there)", b["verdict"]),
        ("5. Surgery lowers held-out perplexity, beyond the controls", "21.45 → 28.76 held-out (rose)",
         "ppl `treatment` / stock, / `reinit-only`, / `ablate` (last checkpoint); every upper < 1",
         "; ".join(f"/ {k}: {_mean(v, 4)}" for k, v in c["5"]["parts"].items()), c["5"]["verdict"]),
        ("6. The paper's recipe (pure-bf16 AdamW, its schedule) against ours", "—",
         "best held-out ppl paper / ours; no verdict", _mean(c["6"], 4) if c["6"] else "not run", "—"),
    ]
    return rows


def _arms(r: dict) -> list[str]:
    lines = ["| arm | not collapsed / targets | revived / targets | held-out ppl / stock, last | best |",
             "|---|---|---|---|---|"]
    for arm, a in r["claims"]["arms"].items():
        lines.append(f"| `{arm}` | {_prop(a['not_collapsed'])} | {_prop(a['revived'])} | "
                     f"{_mean(a['ppl_last_over_stock'], 4)} | {_mean(a['ppl_best_over_stock'], 4)} |")
    return lines


def _per_testbed(r: dict) -> list[str]:
    lines = ["| testbed | seed | targets | revived: treatment / gradient-only / reinit-only / random-healthy | "
             "paper's healthy: base → pass 1 → pass 2 | ppl last / stock: treatment, reinit-only |",
             "|---|---|---|---|---|---|"]
    for u in r["units"]:
        rev = " / ".join(str((u["functional"].get(a) or {}).get("revived", "–"))
                         for a in ("treatment", "gradient-only", "reinit-only", "random-healthy"))
        h = u["healthy"]
        ppl = ", ".join(f"{u['eval'][k]['last'] / u['eval'][k]['stock']:.4f}" if k in u["eval"] else "–"
                        for k in ("treatment", "reinit-only"))
        lines.append(f"| {u['testbed']} | {u['seed']} | {u['targets']} | {rev} | {h['baseline']} → {h['pass1']} → "
                     f"{h['pass2']} | {ppl} |")
    return lines


def _short(path: str) -> str:
    marker = "alibi_surgery/demo/model"
    return marker if path.rstrip("/").endswith(marker) else path


def markdown(r: dict, figures: list[str]) -> str:
    rows = ["| claim | the paper (bloom-1b7) | statistic; the line | ours, 95% interval | verdict |",
            "|---|---|---|---|---|"]
    rows += [f"| {' | '.join(row)} |" for row in claim_rows(r)]
    beds = "; ".join(f"{b['name']}: `{_short(b['model'])}`, band H{b['band'][0]}–H{b['band'][1]}, healthy column "
                     f"{'none' if b['column'] is None else 'H' + str(b['column'])}" for b in r["testbeds"])
    s = r["settings"]
    held = r["held_out"]
    stock = r["claims"]["stock_does_work"]
    reused = sum(1 for v in r["seconds"].values() if not v)  # finished by an earlier invocation: 0 s here
    ran = f" ({reused} finished by an earlier invocation of the same command)" if reused else ""
    head = (f"Testbeds {beds}. {r['seeds']} seeds each: {len(r['units'])} units, {len(r['seconds'])} jobs{ran}, "
            f"{r['wall_seconds'] / 60:.0f} min on {r['workers']} workers in this invocation. Surgery: {s['docs'][0]} documents per "
            f"seed, batch {s['batch_size']}, lr {s['lr']}, {s['epochs']} epochs, a checkpoint every "
            f"{s['save_every_steps']} steps. Functional measurement: {r['ablation']['texts']} held-out documents, "
            f"{r['ablation']['draws']} floor draws, {r['ablation']['bootstrap']} bootstrap resamples; on the stock "
            f"models {stock['k']} of {stock['n']} pass-1 targets do work. Held-out: {s['docs'][1]} documents, "
            f"{held['special']} of {held['targets']} predicted tokens special (so every perplexity here is also "
            f"the figure without special tokens). Intervals: 95%; a proportion gives Clopper-Pearson (CP) and the "
            f"run-level bootstrap (runs), and its verdict needs both.")
    figs = "\n\n".join(f"![{f}](img/{f})" for f in figures)
    how = ("Each claim of Schallon (2026) rerun on two pre-trained testbeds by `python -m "
           "alibi_surgery.demo.reproduce OUT`, judged by the rules fixed before the run (below the notes line, "
           "\"Rules for the next run\"). Which run gives which number: `alibi_surgery/demo/reproduction_runs.py`; "
           "the statistics: `reproduction_report.py`; every unit's numbers: `OUT/results.json`.")
    return "\n\n".join(["# The paper, reproduced on the testbeds", "<!-- written by python -m "
                        "alibi_surgery.demo.reproduce: edit below the notes line only -->", how, head,
                        "\n".join(rows), "## The arms side by side (pass-1 targets, pooled over all runs)",
                        "\n".join(_arms(r)), "## Every run", "\n".join(_per_testbed(r)), figs]) + "\n"

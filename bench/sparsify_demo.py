"""``sparsify`` on the demo model (issue 33, item 2): how far the heads' mean attention entropy falls while the
language-model loss is held within the slack.

    python bench/sparsify_demo.py --out /tmp/sparsify-demo [--slack 0.05] [--epochs 4]

Every head of the demo model, the demo's surgery corpus and optimiser settings (``DEMO_SETTINGS``), objective
``sparsify``. Rule (docs/analysis.md, written before the run): the entropy reduction counts when ``final/``'s
held-out loss, each of the 64 held-out documents' mean token loss against the stock model's, rises by less than
the slack with the whole 95% paired-bootstrap interval (10,000 resamples) below it. Writes ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alibi_surgery.analysis.intervals import paired_bootstrap_ci
from alibi_surgery.demo import DEMO_SETTINGS, corpus_spec, model_dir, recipe, write_corpus
from alibi_surgery.surgery.repair import RepairSettings, repair_pass

from sink_penalty_demo import document_losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--slack", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=DEMO_SETTINGS["epochs"])
    args = parser.parse_args(argv)
    r = recipe()
    train, held_out = write_corpus(args.out / "corpus", seed=1)
    settings = RepairSettings(diag_max_length=r["diag_max_length"], seed=0, reinit=False, objective="sparsify",
                              loss_slack=args.slack, **dict(DEMO_SETTINGS, epochs=args.epochs))
    out = args.out / "run"
    report = repair_pass(model_dir(), out, corpus=corpus_spec(train), eval_text=corpus_spec(held_out), heads="all",
                         settings=settings, resume=(out / "checkpoints").is_dir(), progress=True, ablation_draws=0)
    s = report["sparsity"]
    stock = document_losses(model_dir(), held_out, DEMO_SETTINGS["seq_len"])
    final = document_losses(out / "final", held_out, DEMO_SETTINGS["seq_len"])
    lo, hi = paired_bootstrap_ci([final, stock], lambda x: float(np.mean(x[0] - x[1])), resamples=10000, seed=0)
    final_step = report["final_checkpoint"]
    final_entropy = next((c["entropy"] for c in s["curve"] if f"{c['step']:08d}" in (final_step or "")), None)
    summary = {"slack": args.slack, "heads": len(s["heads"]), "entropy_before": s["entropy_before"],
               "entropy_final": final_entropy, "final_checkpoint": final_step,
               "entropy_last": s["entropy_after"], "base_loss": s["base_loss"], "target_loss": s["target_loss"],
               "lambda_last": s["lambda"], "held_out_stock": float(stock.mean()), "held_out_final": float(final.mean()),
               "held_out_difference": float((final - stock).mean()), "difference_ci95": [lo, hi],
               "within_slack": hi < args.slack, "curve": s["curve"]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``repair --sink-penalty`` on the demo model (issue 33, item 3): do repaired heads fall back onto the first token
over a run 4x the demo's length, with and without the penalty, and what does the penalty cost in held-out loss?

    python bench/sink_penalty_demo.py --out /tmp/sink-penalty --penalty 1.0 --epochs 16 [--seeds 0 1]

Each arm is the demo's surgery (``DEMO_SETTINGS``: its corpus, optimiser, a checkpoint and re-diagnosis every 16
steps) with ``epochs`` (the demo's 4, times 4) and ``sink_penalty`` 0 or ``--penalty``; the same seeds, data order
and re-initialisation in both arms. Rules (docs/surgery.md, written before the run):

* a target *falls back* when its first-token mass on the diagnosis prompts is <= 0.5 at one checkpoint and > 0.5
  at a later one; per arm, the count over the targets with a Clopper-Pearson 95% interval;
* the held-out cost: each held-out document's mean token loss under the last checkpoint of each arm, the paired
  difference (penalty - none) with a 95% bootstrap interval (10,000 resamples of documents).

Writes ``OUT/summary.json`` and prints a table. An interrupted run resumes (each arm resumes from its newest
checkpoint). CPU: about 2 x (epochs / 4) x the demo's surgery time.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from alibi_surgery.analysis.intervals import clopper_pearson, paired_bootstrap_ci
from alibi_surgery.demo import DEMO_SETTINGS, corpus_spec, load_model, model_dir, recipe, write_corpus
from alibi_surgery.diagnosis.diagnose import diagnose
from alibi_surgery.diagnosis.prompts import DEFAULT_PROMPTS
from alibi_surgery.surgery.repair import RepairSettings, repair_pass

FALL_BACK = 0.5


def fall_backs(history: list[dict], targets: dict) -> list[tuple[int, int]]:
    """Targets whose first-token mass is <= FALL_BACK at one checkpoint and > FALL_BACK at a later one."""
    found = []
    for layer, heads in targets.items():
        for h in heads:
            series = [next(x["bos_mass_after"] for x in entry["comparison"]["heads"]
                           if x["layer"] == int(layer) and x["head"] == h) for entry in history if entry["step"] > 0]
            low = [i for i, m in enumerate(series) if m <= FALL_BACK]
            if low and any(m > FALL_BACK for m in series[low[0] + 1:]):
                found.append((int(layer), h))
    return found


def document_losses(checkpoint: Path, eval_file: Path, seq_len: int) -> np.ndarray:
    """Mean token loss of each held-out document (one ``<s>`` + bytes chunk each, as the demo packs them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    losses = []
    with torch.no_grad():
        for line in eval_file.read_text().splitlines():
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"][:seq_len - 1]
            ids = torch.tensor([[tokenizer.bos_token_id, *ids]])
            losses.append(float(model(ids, labels=ids).loss))
    return np.array(losses)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--penalty", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=4 * DEMO_SETTINGS["epochs"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    r = recipe()
    model, tokenizer = load_model()
    before = diagnose(model, tokenizer, DEFAULT_PROMPTS, max_length=r["diag_max_length"])
    del model
    train, held_out = write_corpus(args.out / "corpus", seed=1)
    summary = {"penalty": args.penalty, "epochs": args.epochs, "seeds": args.seeds, "arms": {}}
    losses = {}
    for lam in (0.0, args.penalty):
        arm = f"penalty-{lam:g}"
        for seed in args.seeds:
            out = args.out / f"{arm}-seed{seed}"
            settings = RepairSettings(diag_max_length=r["diag_max_length"], seed=seed,
                                      **dict(DEMO_SETTINGS, epochs=args.epochs), sink_penalty=lam)
            resume = (out / "checkpoints").is_dir()
            report = repair_pass(model_dir(), out, corpus=corpus_spec(train), eval_text=corpus_spec(held_out),
                                 report=before, settings=settings, resume=resume, progress=True,
                                 ablation_texts=4, ablation_draws=2)
            targets = report["plan"]["selection"]
            history = report["checkpoints"]
            back = fall_backs(history, targets)
            n = sum(len(h) for h in targets.values())
            last = history[-1]
            losses[(lam, seed)] = document_losses(out / "checkpoints" / last["checkpoint"], held_out,
                                                  DEMO_SETTINGS["seq_len"])
            final_mass = [x["bos_mass_after"] for x in last["comparison"]["heads"]
                          if str(x["layer"]) in targets and x["head"] in targets[str(x["layer"])]]
            summary["arms"][f"{arm}-seed{seed}"] = {
                "targets": n, "fall_backs": len(back), "fall_back_heads": back,
                "fall_back_ci": clopper_pearson(len(back), n),
                "collapsed_at_end": sum(m > FALL_BACK for m in final_mass),
                "mean_target_mass_at_end": float(np.mean(final_mass)),
                "last_eval_ppl": last["eval_ppl"], "last_step": last["step"],
                "held_out_loss": float(losses[(lam, seed)].mean())}
    for seed in args.seeds:
        a, b = losses[(args.penalty, seed)], losses[(0.0, seed)]
        lo, hi = paired_bootstrap_ci([a, b], lambda s: float(np.mean(s[0] - s[1])), resamples=10000, seed=0)
        summary[f"loss_difference-seed{seed}"] = {"mean": float(np.mean(a - b)), "ci95": [lo, hi]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``alibi-surgery paper`` end to end on a random bloom-1b7-shaped model cut to 2 layers, with the stand-in paper
repository (tests/fixtures/paper_repo): the runs follow the fixture's maps, texts and settings, and the stock
figures match the paper's formula computed here with transformers' own eager model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alibi_surgery.demo.paper_protocol import PaperOptions, PlannedRun, repair_settings
from alibi_surgery.demo.paper_repo import read_paper_repo

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "paper_repo"


def test_arms_reach_repair_as_settings():
    facts = read_paper_repo(FIXTURE)
    options = PaperOptions(dtype="float32")
    treat = repair_settings(facts, options, PlannedRun("pass1", "treatment"))
    grad = repair_settings(facts, options, PlannedRun("pass1", "gradient-only"))
    assert treat.reinit is True and grad.reinit is False  # the paper's gradient-only control
    assert (treat.lr, treat.epochs, treat.batch_size, treat.grad_accum, treat.seq_len, treat.seed) == \
        (1e-3, 1, 2, 1, 32, 7)  # the fixture's main() defaults and SEED
    assert (treat.schedule, treat.eval_convention, treat.optimizer_precision) == ("paper", "paper", "master")
    assert repair_settings(facts, PaperOptions(), PlannedRun("pass1", "treatment")).optimizer_precision == "bf16"
    assert repair_settings(facts, PaperOptions(epochs=3, lr=0.5), PlannedRun("pass1", "treatment")).epochs == 3


def _paper_ppl(model, tok, texts, max_length):
    """The paper's held-out formula, written out: sum of (mean loss x tokens) over texts / tokens, exponentiated."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
            total += model(input_ids=ids, labels=ids).loss.item() * ids.shape[1]
            count += ids.shape[1]
    return math.exp(total / count)


@pytest.mark.slow
def test_paper_end_to_end_on_a_two_layer_bloom_1b7(tmp_path, capsys):
    from transformers import AutoTokenizer, BloomForCausalLM

    from alibi_surgery.cli.main import main
    from alibi_surgery.io.random_model import write_random_model

    model = write_random_model(tmp_path / "model", "bloom-1b7", n_layer=2, vocab_size=260)  # the shape
    corpus, c4 = tmp_path / "corpus.txt", tmp_path / "c4.txt"
    corpus.write_text("the mill turns when the river runs high and the lantern hangs by the door\n" * 2)
    c4.write_text("a tin roof and rain all night while geese cross the pond by the shop\n" * 2)
    out = tmp_path / "out"
    assert main(["paper", str(model), "--paper-repo", str(FIXTURE), "--out", str(out), "--corpus", str(corpus),
                 "--c4", str(c4), "--arms", "treatment", "--experiments", "pass1,pass2,c4",
                 "--dtype", "float32", "--backend", "torch", "--ablation-draws", "0", "--quiet",
                 "--epochs", "1"]) == 0  # the paper's 15 epochs wrote 15 checkpoints of 400 MB per run
    assert "wrote" in capsys.readouterr().out
    data = json.loads((out / "paper.json").read_text())
    runs = data["runs"]
    assert {k: v["status"] for k, v in runs.items() if k != "pass2-treatment"} == \
        {"pass1-treatment": "done", "c4-treatment": "done"}  # the column run's plan: test_paper_dry_run.py
    assert runs["pass2-treatment"]["status"] in ("done", "nothing to repair")  # random weights: likely nothing
    plan = json.loads((out / "runs" / "pass1-treatment" / "plan.json").read_text())
    assert plan["selection"] == {"0": [12, 13, 14, 15], "1": [9, 10, 11, 12]}  # the fixture's map
    assert plan["zone"] == {"0": list(range(9, 16)), "1": list(range(9, 16))}  # its frozen heads stay in-band
    assert json.loads((out / "runs" / "c4-treatment" / "run.json").read_text())["corpus"] == [str(c4)]
    facts = read_paper_repo(FIXTURE)
    tok = AutoTokenizer.from_pretrained(model)
    baseline = json.loads((out / "baseline.json").read_text())
    assert baseline["n_tokens"] == len(tok(facts.diag_text).input_ids)  # diagnosed on the paper's one text
    net = BloomForCausalLM.from_pretrained(model, attn_implementation="eager").eval()
    assert data["stock"]["held_out_ppl"] == pytest.approx(_paper_ppl(net, tok, facts.held_out, 32), rel=1e-4)
    assert data["stock"]["train_ppl"] == pytest.approx(_paper_ppl(net, tok, facts.train_texts, 32), rel=1e-4)
    final = BloomForCausalLM.from_pretrained(runs["pass1-treatment"]["final"], attn_implementation="eager").eval()
    assert runs["pass1-treatment"]["held_out_ppl"] == pytest.approx(_paper_ppl(final, tok, facts.held_out, 32),
                                                                    rel=1e-4)
    report = (out / "paper.md").read_text()
    assert f"| healthy | {data['baseline']['healthy']} (242) |" in report  # ours beside the paper's (section 4.1)
    assert "(15.13)" in report and "## Differences" in report

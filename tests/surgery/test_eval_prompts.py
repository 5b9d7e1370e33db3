"""``repair --eval-prompts``: held-out texts scored alone at every checkpoint, as the paper reports its perplexity.

The figure of every checkpoint (and of the input, before surgery) is recomputed here from the saved weights with
transformers' eager BLOOM in fp32 and the paper's formula written out by hand; with no ``--eval-text`` it picks
``final/``.
"""

from __future__ import annotations

import json
import math

import torch
from transformers import AutoTokenizer, BloomForCausalLM

from alibi_surgery import repair
from alibi_surgery.surgery.repair import RepairSettings
from surgery_runs import make_inputs

TEXTS = ["the cat sat on the mat", "dogs ran past the old red barn while birds sang", "a mat"]  # 22, 47, 5 bytes


def paper_ppl(model_dir, max_length: int = 16) -> float:
    """exp(sum_i loss_i T_i / sum_i T_i), each text alone (truncated at ``max_length``, repair's --seq-len) through
    eager fp32 BLOOM, losses by hand."""
    model = BloomForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    num = den = 0.0
    for text in TEXTS:
        ids = torch.tensor([tokenizer(text)["input_ids"][:max_length]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        loss = -logp.gather(-1, ids[0, 1:, None]).mean().item()
        num, den = num + loss * ids.shape[1], den + ids.shape[1]
    return math.exp(num / den)


def test_eval_prompts_are_scored_at_every_checkpoint_and_pick_final(tmp_path):
    root = make_inputs(tmp_path)
    settings = RepairSettings(seq_len=16, batch_size=2, grad_accum=1, epochs=1, save_every_steps=2, lr=3e-2,
                              eval_convention="paper")
    report = repair(root / "model", tmp_path / "out", corpus=[str(root / "corpus.txt")], eval_prompts=TEXTS,
                    heads="0:1;1:2", settings=settings, device="cpu", backend="torch")
    entries = report["checkpoints"]
    assert len(entries) == 3 and report["eval_ppl_before"] is None
    assert math.isclose(report["eval_prompts_ppl_before"], paper_ppl(root / "model"), rel_tol=1e-5)
    for entry in entries:
        expected = paper_ppl(tmp_path / "out" / "checkpoints" / entry["checkpoint"])
        assert math.isclose(entry["eval_prompts_ppl"], expected, rel_tol=1e-5), (entry["checkpoint"], expected)
    figures = [e["eval_prompts_ppl"] for e in entries]
    assert len(set(figures)) == 3  # training moved the figure, so the choice of final/ means something
    assert report["final_checkpoint"] == entries[figures.index(min(figures))]["checkpoint"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["checkpoints"][0]["eval_prompts_ppl"] == figures[0]
    assert "prompts ppl" in (tmp_path / "out" / "report.md").read_text()


def test_a_run_recorded_before_newer_options_still_resumes_with_the_same_settings():
    """Checkpoints written before --optimizer-precision, --schedule, --no-reinit and --eval-convention existed hold
    no such keys: they take their defaults, and the old stochastic_rounding flag means stochastic precision."""
    import dataclasses

    from alibi_surgery.surgery.repair import same_settings

    new_keys = ("optimizer_precision", "schedule", "reinit", "eval_convention")
    old = {k: v for k, v in dataclasses.asdict(RepairSettings(seq_len=16)).items() if k not in new_keys}
    assert same_settings(old, RepairSettings(seq_len=16))
    assert not same_settings(old, RepairSettings(seq_len=32))
    assert not same_settings(old, RepairSettings(seq_len=16, schedule="paper"))
    assert same_settings(dict(old, stochastic_rounding=True), RepairSettings(seq_len=16, optimizer_precision="stochastic"))
    assert not same_settings(dict(old, stochastic_rounding=True), RepairSettings(seq_len=16))

"""repair's paper recipe, controls and passes on a tiny random BLOOM: the learning rates a --schedule paper run
records (and uses), lr 0 with and without re-initialisation, --recipe paper's presets and warning, and a two-pass
run whose second pass targets every head still collapsed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alibi_surgery.cli import main
from alibi_surgery.cli.main import build_parser
from alibi_surgery.cli.repair import _training_options
from alibi_surgery.surgery import trainer
from alibi_surgery.surgery.reinit import reinit_heads
from alibi_surgery.surgery.repair import repair
import test_repair
from test_repair import PROMPTS, SELECTED, run, settings

tiny_dir, corpus = test_repair.tiny_dir, test_repair.corpus  # the same module-scoped fixtures

SICK = ("dead", "bos-sink")


def _state(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _bits_equal(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_paper_schedule_records_and_uses_the_formula_at_every_step(tiny_dir, corpus, tmp_path, monkeypatch):
    used = []
    real = trainer.HeadSlicedAdamW.step

    def spy(self, lr=None):
        used.append(lr)
        return real(self, lr=lr)

    monkeypatch.setattr(trainer.HeadSlicedAdamW, "step", spy)
    base = 2e-3
    report = run(tiny_dir, tmp_path / "out", corpus, settings=settings(schedule="paper", lr=base, epochs=1))
    lrs = report["learning_rates"]
    total = report["checkpoints"][-1]["step"]
    assert total >= 4 and len(lrs) == total and lrs == used
    warm = min(100, total // 4)  # the paper's LambdaLR, by hand: scheduler step k is optimizer step k + 1
    expected = [base * k / warm if k < warm else base * 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm)))
                for k in range(total)]
    assert lrs[0] == 0.0 and lrs == pytest.approx(expected, rel=1e-12, abs=0)


def test_no_reinit_with_lr_0_gives_the_input_model_bit_for_bit(tiny_dir, corpus, tmp_path):
    report = run(tiny_dir, tmp_path / "out", corpus, settings=settings(lr=0.0, reinit=False, epochs=1))
    assert report["final_checkpoint"] is not None and all(x == 0.0 for x in report["learning_rates"])
    before, after = _state(tiny_dir), _state(tmp_path / "out" / "final")
    assert before.keys() == after.keys() and all(_bits_equal(before[k], after[k]) for k in before)


def test_reinit_with_lr_0_keeps_the_dense_columns_at_zero(tiny_dir, corpus, tmp_path):
    run(tiny_dir, tmp_path / "out", corpus, settings=settings(lr=0.0, epochs=1))
    after = _state(tmp_path / "out" / "final")
    d = 32
    for layer, heads in SELECTED.items():
        dense = after[f"transformer.h.{layer}.self_attention.dense.weight"]
        for h in heads:
            assert torch.equal(dense[:, h * d:(h + 1) * d], torch.zeros(dense.shape[0], d))
    expected = AutoModelForCausalLM.from_pretrained(tiny_dir)
    reinit_heads(expected, SELECTED, seed=0)  # lr 0 trains nothing: the re-initialised model, exactly
    assert all(_bits_equal(v, after[k]) for k, v in expected.state_dict().items())


def _args(*extra):
    return build_parser().parse_args(["repair", "m", "--out", "o", "--device", "cpu", *extra])


def test_recipe_paper_presets_and_explicit_options_win():
    assert _training_options(_args()) == {}
    chosen = _training_options(_args("--recipe", "paper", "--dtype", "bfloat16", "--epochs", "2", "--lr", "1e-4"))
    assert chosen == {"optimizer_precision": "bf16", "schedule": "paper", "epochs": 2, "lr": 1e-4, "batch_size": 1,
                      "grad_accum": 8, "max_grad_norm": 1.0, "seq_len": 512}
    fp32_args = _args("--recipe", "paper")
    fp32 = _training_options(fp32_args)
    assert fp32["optimizer_precision"] == "master" and fp32["schedule"] == "paper" and fp32["epochs"] == 15
    assert fp32_args.recipe_warning.startswith("warning: --recipe paper on float32 weights")


def test_recipe_paper_on_a_cpu_fp32_run_is_allowed_and_says_what_it_changes(tiny_dir, tmp_path, capsys):
    assert main(["repair", str(tiny_dir), "--out", str(tmp_path / "o"), "--heads", "0:1", "--recipe", "paper",
                 "--dry-run", "--device", "cpu", "--backend", "torch", "--quiet"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: --recipe paper on float32 weights") \
        and "bfloat16" in lines[0]
    assert "L0" in captured.out and not (tmp_path / "o").exists()


def _collapse(model, layer: int, heads, token_id: int, scale: float = 100.0) -> None:
    """Make ``heads`` of ``layer`` attend to every occurrence of token ``token_id`` (the first token of each prompt
    below): a constant query and a key that measures the layer input's alignment with that token's."""
    attn = model.transformer.h[layer].self_attention
    d = attn.head_dim
    with torch.no_grad():
        x = model.transformer.word_embeddings_layernorm(model.transformer.word_embeddings.weight[token_id])
        x = model.transformer.h[layer].input_layernorm(x)
        w, b = attn.query_key_value.weight, attn.query_key_value.bias
        for h in heads:
            q, k = h * 3 * d, h * 3 * d + d  # BLOOM's fused rows per head: q, k, v
            w[q:q + 2 * d] = 0
            b[q:q + 2 * d] = 0
            b[q] = scale
            w[k] = x / x.norm()


def _sick(diagnosis: dict) -> set:
    return {(row["layer"], row["head"]) for row in diagnosis["heads"] if row["class"] in SICK}


def test_pass_two_targets_every_head_still_collapsed(tiny_dir, corpus, tmp_path):
    prompts = ["~" + p for p in PROMPTS]  # "~" occurs nowhere else
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    _collapse(model, 0, (0, 3), tokenizer("~")["input_ids"][0])
    sick_dir = tmp_path / "sick"
    model.save_pretrained(sick_dir)
    tokenizer.save_pretrained(sick_dir)
    out = tmp_path / "out"
    summary = repair(sick_dir, out, corpus=[str(corpus / "doc*.txt")], eval_text=str(corpus / "held-out.md"),
                     heads="auto", band="0-1", passes=2, device="cpu", backend="torch", prompts=prompts,
                     progress=False, settings=settings(epochs=1))
    first, second = summary["passes"]
    baseline = json.loads((out / "pass-1" / "baseline.json").read_text())
    assert {(0, 0), (0, 3)} <= _sick(baseline)
    assert first["plan"]["selection"] == {"0": [0]}  # the band holds H0 only; H3 lies outside it
    best = next(c for c in first["checkpoints"] if c["checkpoint"] == first["final_checkpoint"])
    still = {}
    for layer, h in sorted(_sick(best["comparison"]["after"])):  # pass 1's own diagnosis of its best checkpoint
        still.setdefault(str(layer), []).append(h)
    assert "0" in still and 3 in still["0"]
    assert second["plan"]["selection"] == still  # every head still collapsed, wherever it lies
    started = json.loads((out / "pass-2" / "run.json").read_text())["input"]
    assert started == str(out / "pass-1" / "checkpoints" / first["final_checkpoint"])
    for rep in (first, second):
        assert set(rep["drift_vs_original"]) == set(rep["drift_vs_previous"]) >= {"in-band", "outside", "all"}
    assert first["drift_vs_original"] == first["drift_vs_previous"]
    assert len(summary["learning_rates"]) == 2 and all(summary["learning_rates"])


def test_planned_optimizer_memory_of_bf16_precision_is_the_real_state(tiny_dir):
    from alibi_surgery import HeadSlicedAdamW, HeadSlices
    from alibi_surgery.surgery.repair import RepairSettings, plan_surgery

    plan = plan_surgery(tiny_dir, heads="0:1;1:2,3", device="cpu", dtype="bfloat16", backend="torch",
                        prompts=PROMPTS, progress=False, settings=RepairSettings(optimizer_precision="bf16"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    opt = HeadSlicedAdamW(HeadSlices(model, SELECTED), lr=5e-5, precision="bf16")
    assert plan.memory["master"] == 0 and plan.memory["optimizer"] == opt.state_bytes

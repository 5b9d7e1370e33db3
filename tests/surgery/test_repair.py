"""Surgery end to end on a tiny random BLOOM: invariants, resume, round trip, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import importlib

import pytest
import torch
from helpers import selected_mask
from surgery_runs import SMALL_ABLATION
from transformers import AutoModelForCausalLM

from alibi_surgery.cli import main
from alibi_surgery.io.random_model import write_random_bloom
from alibi_surgery.surgery.repair import RepairSettings, repair
from alibi_surgery.surgery.reinit import reinit_heads

from alibi_surgery.surgery import objective as objective_module
repair_module = importlib.import_module("alibi_surgery.surgery.repair")  # the module: alibi_surgery.surgery.repair is the function
HEADS = "0:1;1:2,3"
SELECTED = {0: [1], 1: [2, 3]}
PROMPTS = ["The cat sat on the mat.", "def f(x):\n    return x + 1", "Paris is the capital of France."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_bloom(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for i in range(3):
        text = " ".join(words[(i * 7 + j * 5) % len(words)] for j in range(60))
        (root / f"doc{i}.txt").write_text(text)
    (root / "held-out.md").write_text(" ".join(reversed(words)) * 20)
    return root


def settings(**kw):
    base = dict(seq_len=32, batch_size=2, grad_accum=2, lr=1e-3, epochs=2, diag_max_length=24, warmup=0.2)
    return RepairSettings(**{**base, **kw})


def run(tiny_dir, out, corpus, **kw):
    kw.setdefault("settings", settings())
    kw = {**SMALL_ABLATION, **kw}
    return repair(tiny_dir, out, corpus=[str(corpus / "doc*.txt")], eval_text=str(corpus / "held-out.md"),
                  heads=kw.pop("heads", HEADS), device="cpu", backend="torch", prompts=PROMPTS, progress=False, **kw)


def file_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_surgery_invariants(tiny_dir, corpus, tmp_path):
    before_files = file_hashes(tiny_dir)
    report = run(tiny_dir, tmp_path / "out", corpus)
    assert file_hashes(tiny_dir) == before_files, "the input directory was written to"
    a = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")  # stock transformers loads it
    assert final.lm_head.weight.data_ptr() == final.transformer.word_embeddings.weight.data_ptr()  # still tied
    b = final.state_dict()
    changed = 0
    for name, before in a.items():
        mask = selected_mask(name, before.shape, SELECTED, 32)
        assert torch.equal(b[name][~mask], before[~mask]), f"{name} changed outside the selected slices"
        if mask.any():
            assert not torch.equal(b[name][mask], before[mask]), f"{name}: a selected slice did not change"
            changed += 1
    assert changed == 3 * len(SELECTED)  # per layer: qkv weight, qkv bias, dense weight
    out = tmp_path / "out"
    for name in ("report.json", "report.md", "before.png", "after.png", "delta.png", "trajectory.png",
                 "baseline.json", "plan.json"):
        assert (out / name).is_file(), name
    assert len(report["checkpoints"]) == 2 and all(c["eval_ppl"] > 1 for c in report["checkpoints"])


def test_reinit_zeroes_output_columns_and_bias_and_redraws_rows(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinit_heads(model, SELECTED, seed=5)
    attn = model.transformer.h[1].self_attention
    d = attn.head_dim
    assert torch.equal(attn.dense.weight[:, 2 * d:4 * d], torch.zeros(attn.dense.weight.shape[0], 2 * d))
    assert torch.equal(attn.query_key_value.bias[2 * 3 * d:4 * 3 * d], torch.zeros(2 * 3 * d))
    rows = attn.query_key_value.weight[2 * 3 * d:3 * 3 * d]
    bound = (6 / (rows.shape[0] + rows.shape[1])) ** 0.5  # Xavier uniform for the [3d, hidden] block
    assert rows.abs().max() <= bound and rows.abs().max() > 0.9 * bound
    assert not torch.equal(rows, before["transformer.h.1.self_attention.query_key_value.weight"][2 * 3 * d:3 * 3 * d])
    assert torch.equal(attn.query_key_value.weight[:2 * 3 * d],
                       before["transformer.h.1.self_attention.query_key_value.weight"][:2 * 3 * d])
    other = AutoModelForCausalLM.from_pretrained(tiny_dir)
    reinit_heads(other, {1: [2]}, seed=5)  # a head's draw does not depend on the other selected heads
    assert torch.equal(other.transformer.h[1].self_attention.query_key_value.weight[2 * 3 * d:3 * 3 * d], rows)


@pytest.mark.parametrize("kill", ["after-epoch-1", "mid-epoch"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_dir, corpus, tmp_path, kill, monkeypatch):
    real, trained = objective_module.chunked_lm_loss, []

    def counting(hidden, *args, **kwargs):  # counts training micro-batches (held-out perplexity has no grad)
        trained.append(hidden.requires_grad)
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(objective_module, "chunked_lm_loss", counting)
    s = settings(save_every_steps=1) if kill == "mid-epoch" else settings()
    run(tiny_dir, tmp_path / "a", corpus, settings=s)
    full = sum(trained)
    steps_per_epoch = json.loads((tmp_path / "a" / "report.json").read_text())["checkpoints"][0]["step"] \
        if kill == "after-epoch-1" else 1
    trained.clear()
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, tmp_path / "b", corpus, settings=s, _stop_after_steps=steps_per_epoch + (kill == "mid-epoch"))
    before_kill = sum(trained)
    trained.clear()
    run(tiny_dir, tmp_path / "b", corpus, settings=s, resume=True)
    assert 0 < before_kill and sum(trained) == full - before_kill  # it resumed rather than starting again
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "a" / "report.json").read_text())["checkpoints"]
    rb = json.loads((tmp_path / "b" / "report.json").read_text())["checkpoints"]
    assert [c["eval_ppl"] for c in ra] == [c["eval_ppl"] for c in rb]


def test_noop_surgery_round_trips_through_stock_transformers(tiny_dir, corpus, tmp_path):
    run(tiny_dir, tmp_path / "out", corpus, heads="auto", allow_empty=True, settings=settings(epochs=0))
    ids = torch.randint(0, 500, (2, 17))
    a = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_api_plan_matches_the_dry_run(tiny_dir):
    import alibi_surgery

    plan = alibi_surgery.plan(tiny_dir, heads=HEADS, device="cpu", backend="torch", prompts=PROMPTS, progress=False)
    assert plan.selection == SELECTED and plan.memory["total"] > plan.memory["weights"]


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_dir, tmp_path, capsys):
    assert main(["repair", str(tiny_dir), "--out", str(tmp_path / "o"), "--heads", HEADS, "--dry-run",
                 "--device", "cpu", "--backend", "torch", "--quiet"]) == 0
    assert "L1" in capsys.readouterr().out and not (tmp_path / "o").exists()


def test_budget_is_checked_against_the_planner(tiny_dir):
    plan = repair_module.plan_surgery(tiny_dir, heads=HEADS, device="cpu", backend="torch", prompts=PROMPTS,
                                      progress=False)
    total = plan.memory["total"]
    repair_module.check_budget(plan.memory, total, torch.device("cpu"))  # exactly enough: fine
    with pytest.raises(repair_module.UsageError, match=r"needs .* \(weights .*, slice gradients .*\), more than"):
        repair_module.check_budget(plan.memory, total - 1, torch.device("cpu"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, corpus, tmp_path, monkeypatch):
    real = objective_module.chunked_lm_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        loss = real(*args, **kwargs)
        if not args[0].requires_grad:  # held-out perplexity
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] > 8 else loss  # micro-batches 9+ (step 5+) go NaN

    monkeypatch.setattr(objective_module, "chunked_lm_loss", flaky)
    with pytest.raises(repair_module.UsageError, match="last good checkpoint is .*step-00000004"):
        run(tiny_dir, tmp_path / "out", corpus, settings=settings(save_every_steps=2, epochs=3))
    assert (tmp_path / "out" / "checkpoints" / "step-00000004" / "model.safetensors").is_file()


def test_compare_command_is_wired(tiny_dir, corpus, tmp_path, capsys):
    run(tiny_dir, tmp_path / "out", corpus, settings=settings(epochs=1))
    base = tmp_path / "out" / "baseline.json"
    assert main(["compare", str(base), str(base), "--json", str(tmp_path / "c.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "c.json").read_text())
    assert main(["compare", str(base), str(tmp_path / "missing.json")]) == 2


def test_sink_penalty_enters_the_training_loss(tiny_dir):
    """The trainer's micro-batch block (``objective.objective``) adds ``sink_penalty`` times the targets' mean
    first-token mass, with gradients: against that mean from eager BLOOM's attention maps (real query rows past
    position 0), scaled by the same factor."""
    from types import SimpleNamespace

    from alibi_surgery import patched

    ids = torch.randint(4, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for ours in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").float()
        if ours:
            fake_run = SimpleNamespace(s=RepairSettings(sink_penalty=2.5), model=model,
                                       plan=SimpleNamespace(selection=SELECTED))
            with patched(model, "torch"), objective_module.objective(fake_run) as objective:
                model(ids)
                objective(torch.zeros(())).backward()  # a zero language-model loss: the penalty alone
        else:
            maps = model(ids, output_attentions=True).attentions
            mass = sum(maps[layer][:, heads, 1:, 0].double().sum() for layer, heads in SELECTED.items())
            rows = sum(len(heads) for heads in SELECTED.values()) * ids.shape[0] * (ids.shape[1] - 1)
            (2.5 * mass / rows).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, want in grads[1].items():
        assert (grads[0][name] - want).abs().max() <= 1e-4 * max(want.abs().max().item(), 1e-3), name
    plain = SimpleNamespace(s=RepairSettings(), model=None, plan=None)
    with objective_module.objective(plain) as objective:  # no penalty: nothing is collected, the loss as it is
        assert objective(1.25) == 1.25

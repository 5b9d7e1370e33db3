"""``alibi-surgery sparsify`` (issue 33, item 2): lower the heads' attention entropy under a loss constraint, end to
end on a tiny model, resumable bit for bit, with the entropies checked against eager attention maps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alibi_surgery.cli.main import main
from alibi_surgery.errors import UsageError
from alibi_surgery.io.random_model import write_random_bloom
from alibi_surgery.surgery.repair import RepairSettings, repair_pass
from alibi_surgery.surgery.trainer import Geco

PROMPTS = ["The cat sat on the mat.", "def f(x):\n    return x + 1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsify")
    model = write_random_bloom(root / "tiny", "tiny", seed=4)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    (root / "corpus.txt").write_text(" ".join(words[(j * 5) % 12] for j in range(80)))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "held-out.txt").write_text(" ".join(reversed(words)) * 10)
    return model, root


def eager_entropy(path, prompts) -> float:
    """Mean row entropy (nats) over every head, query row and prompt, from eager BLOOM's attention maps."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    total, rows = 0.0, 0
    with torch.no_grad():
        for prompt in prompts:
            for p in model(**tok(prompt, return_tensors="pt"), output_attentions=True).attentions:
                p = p.double()
                total += float(-(p * torch.log(torch.where(p > 0, p, 1.0))).sum(-1).sum())
                rows += p.shape[1] * p.shape[2]
    return total / rows


def test_sparsify_end_to_end(files, tmp_path, capsys):
    model, root = files
    out = tmp_path / "out"
    assert main(["sparsify", str(model), "--out", str(out), "--corpus", str(root / "corpus.txt"), "--eval-text",
                 str(root / "held-out.txt"), "--seq-len", "32", "--batch-size", "2", "--grad-accum", "1",
                 "--epochs", "3", "--lr", "3e-3", "--ablation-draws", "0", "--quiet", "--backend", "torch",
                 "--prompts-file", str(root / "prompts.txt")]) == 0
    assert "arm: sparsify" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    s = report["sparsity"]
    assert report["settings"]["objective"] == "sparsify" and report["arm"] == "sparsify"
    assert len(s["heads"]) == 8 and report["plan"]["selection"] == {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}
    assert s["entropy_after"] < s["entropy_before"] - 0.2
    assert s["target_loss"] == pytest.approx(s["base_loss"] + 0.05)
    assert all(c["lambda"] is not None and c["lambda"] > 0 for c in s["curve"])
    # independent: eager BLOOM's maps of the input and of final/ on other prompts
    before, after = eager_entropy(model, PROMPTS), eager_entropy(out / "final", PROMPTS)
    assert after < before - 0.1, (before, after)
    md = (out / "report.md").read_text()
    assert "## Sparsity" in md and "Trained: the selected heads' slices." in md
    assert (out / "sparsity.png").stat().st_size > 0
    a = AutoModelForCausalLM.from_pretrained(model).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    for name in a:  # head slices only: the attention projections move, nothing else does
        changed = not torch.equal(a[name], b[name])
        assert changed == ("query_key_value" in name or "self_attention.dense.weight" in name), name


def test_sparsify_resumes_bit_for_bit_with_its_multiplier(files, tmp_path):
    model, root = files
    settings = RepairSettings(seq_len=32, batch_size=2, grad_accum=1, lr=3e-3, epochs=1, save_every_steps=2,
                              objective="sparsify", reinit=False, diag_max_length=24)
    options = dict(corpus=[str(root / "corpus.txt")], heads="all", device="cpu", backend="torch", prompts=PROMPTS,
                   progress=False, ablation_draws=0)
    repair_pass(model, tmp_path / "a", settings=settings, **options)
    with pytest.raises(KeyboardInterrupt):
        repair_pass(model, tmp_path / "b", settings=settings, _stop_after_steps=3, **options)
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["position"]["geco"]["lam"] > 0 and math.isfinite(state["position"]["geco"]["target"])
    repair_pass(model, tmp_path / "b", settings=settings, resume=True, **options)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ga = json.loads((tmp_path / "a" / "report.json").read_text())["sparsity"]["lambda"]
    gb = json.loads((tmp_path / "b" / "report.json").read_text())["sparsity"]["lambda"]
    assert ga == gb


def test_geco_multiplier_moves_with_the_constraint():
    geco = Geco(target=2.0, base=1.95, rate=0.5)
    geco.observe(2.4, 3.0)  # loss above the target: the multiplier grows
    geco.step()
    assert geco.lam == pytest.approx(math.exp(0.5 * 0.4))
    for _ in range(50):
        geco.observe(1.0, 3.0)  # far below: it shrinks, never under 1e-4
        geco.step()
    assert 1e-4 <= geco.lam < 1e-2
    assert Geco.from_dict(geco.to_dict()) == geco


def test_train_full_moves_every_parameter_and_its_gradients_are_the_slices_gradients(files, tmp_path):
    """--train full: every parameter trains (the MLPs and embeddings too). After one step (no clipping) the first
    moment, 0.1 x the gradient, of every attention weight equals the head-sliced run's: the whole-model path feeds
    the optimizer the same derivatives (scale and GECO multiplier included) on the weights both train."""
    from safetensors.torch import load_file

    from alibi_surgery.surgery.full import AllParameters
    from alibi_surgery.surgery.slices import HeadSlices
    from alibi_surgery.surgery.trainer import OPT_FILE

    model, root = files
    common = dict(seq_len=32, batch_size=2, grad_accum=1, lr=3e-3, epochs=1, save_every_steps=1,
                  objective="sparsify", reinit=False, diag_max_length=24, max_grad_norm=1e9)
    options = dict(corpus=[str(root / "corpus.txt")], heads="all", device="cpu", backend="torch", prompts=PROMPTS,
                   progress=False, ablation_draws=0)
    runs, moments = {}, {}
    for train in ("slices", "full"):
        with pytest.raises(KeyboardInterrupt):
            repair_pass(model, tmp_path / train, settings=RepairSettings(train=train, **common),
                        _stop_after_steps=1, **options)
        ckpt = tmp_path / train / "checkpoints" / "step-00000001"
        runs[train] = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
        moments[train] = load_file(str(ckpt / OPT_FILE))["exp_avg"]
    stock = AutoModelForCausalLM.from_pretrained(model)
    d = stock.config.hidden_size // stock.config.n_head
    full = AllParameters(stock)
    where = {spec.kind: (off, t.shape) for spec, off, t in zip(full.specs, full.offsets, full.tensors)}
    full.remove()
    sliced = HeadSlices(stock, {layer: list(range(stock.config.n_head)) for layer in range(stock.config.n_layer)})
    compared = 0
    for spec, off, t in zip(sliced.specs, sliced.offsets, sliced.tensors):
        if spec.kind == "qkv_bias":  # the key biases' true gradient is 0 (softmax ignores a shift): noise only
            continue
        name = f"transformer.h.{spec.layer}.self_attention." + (
            "query_key_value.weight" if spec.kind == "qkv_weight" else "dense.weight")
        start, shape = where[name]
        whole = moments["full"][start:start + shape.numel()].view(shape)
        h = spec.head
        part = whole[3 * d * h:3 * d * (h + 1)] if spec.kind == "qkv_weight" else whole[:, d * h:d * (h + 1)]
        ours = moments["slices"][off:off + t.numel()].view(t.shape)
        torch.testing.assert_close(part, ours, rtol=0, atol=1e-4 * float(ours.abs().max()))
        compared += 1
    sliced.remove()
    assert compared == 2 * stock.config.n_layer * stock.config.n_head
    for name, a in stock.state_dict().items():
        if "query_key_value" not in name and "self_attention.dense.weight" not in name:
            assert torch.equal(runs["slices"][name], a), name
        if name.endswith("weight") and "layernorm" not in name:  # (layer norms start at exactly 1)
            assert not torch.equal(runs["full"][name], a), f"{name} did not train under --train full"
    assert all(p.requires_grad for p in stock.parameters())  # AllParameters.remove() restored the flags
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-00000001" / "trainer_state.json").read_text())
    assert state["settings"]["train"] == "full"
    with pytest.raises(UsageError, match="train='full' is sparsify's"):
        RepairSettings(train="full").check()

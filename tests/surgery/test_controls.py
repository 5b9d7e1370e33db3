"""The control arms of ``repair`` (docs/surgery.md, "Control arms") and ``save_every_epochs``.

Each arm is checked on the weights it wrote, against the input checkpoint: which heads' slices changed, were zeroed
or stayed bit-identical is read off the tensors here, head by head, not taken from the plan the code made. A crafted
baseline diagnosis (a random model has no collapsed heads) fixes which heads are collapsed.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from alibi_surgery.cli import main
from alibi_surgery.diagnosis.report import HeadReport
from alibi_surgery.errors import UsageError
from alibi_surgery.surgery import trainer
from alibi_surgery.surgery.repair import RepairSettings, plan_surgery, repair
from surgery_runs import SMALL_ABLATION, make_inputs

D = 32  # head_dim of the tiny shape: 2 layers x 4 heads, hidden 128
SICK = {0: [1], 1: [2, 3]}  # the crafted report's collapsed heads (and so the targets of heads="auto")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("controls"))  # 2-layer random BLOOM; 12 chunks of 16 tokens


def crafted_report(sick=SICK) -> HeadReport:
    """A diagnosis of the tiny shape in which exactly ``sick`` heads are bos-sinks and the rest are healthy."""
    bos = torch.full((2, 4), 0.1)
    for layer, heads in sick.items():
        bos[layer, heads] = 0.8
    return HeadReport(bos, torch.full((2, 4), 2.0), n_tokens=64, metadata={"model": "crafted"})


def settings(**kw) -> RepairSettings:
    return RepairSettings(**{**dict(seq_len=16, batch_size=2, grad_accum=1, epochs=1, lr=3e-2, warmup=0.0,
                                    diag_max_length=16), **kw})


def run(inputs, out, **kw):
    kw.setdefault("settings", settings())
    kw.setdefault("report", crafted_report())
    kw = {**SMALL_ABLATION, **kw}
    return repair(inputs / "model", out, corpus=[str(inputs / "corpus.txt")], device="cpu", backend="torch",
                  prompts=["the cat sat on the mat", "dogs ran past the old red barn"], **kw)


def weights(directory) -> dict:
    return load_file(str(directory / "model.safetensors"))


def head_parts(state: dict, layer: int, h: int) -> dict:
    """Head ``h``'s slices in layer ``layer`` of a BLOOM state dict, cut by hand: its interleaved q/k/v rows (and
    bias) and its dense input columns."""
    pre = f"transformer.h.{layer}.self_attention."
    rows = slice(3 * D * h, 3 * D * (h + 1))
    return {"qkv": state[pre + "query_key_value.weight"][rows], "qkv_bias": state[pre + "query_key_value.bias"][rows],
            "dense": state[pre + "dense.weight"][:, D * h:D * (h + 1)]}


def rest(state: dict) -> dict:
    """Every tensor of a state dict but the attention's fused QKV weight and bias and its output (dense) weight,
    which hold the heads' slices: no arm may touch these (the dense bias, shared by all heads, included)."""
    return {k: v for k, v in state.items() if "query_key_value" not in k and "self_attention.dense.weight" not in k}


def changed_heads(before: dict, after: dict, part: str = "qkv") -> dict:
    out = {}
    for layer in range(2):
        for h in range(4):
            if not torch.equal(head_parts(before, layer, h)[part], head_parts(after, layer, h)[part]):
                out.setdefault(layer, []).append(h)
    return out


def assert_rest_identical(before: dict, after: dict):
    for name, tensor in rest(before).items():
        assert torch.equal(tensor, after[name]), f"{name} changed"


def test_reinit_only_reinitialises_the_targets_and_never_trains(inputs, tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(trainer.HeadSlicedAdamW, "step", lambda *a, **k: steps.append(1))
    monkeypatch.setattr("alibi_surgery.surgery.repair.train",
                        lambda *a, **k: pytest.fail("reinit-only entered the training loop"))
    report = run(inputs, tmp_path / "out", settings=settings(control="reinit-only"))
    before, after = weights(inputs / "model"), weights(tmp_path / "out" / "final")
    assert steps == [] and report["learning_rates"] == [] and report["final_checkpoint"] is None
    assert changed_heads(before, after, "qkv") == SICK
    assert changed_heads(before, after, "dense") == SICK
    assert all(h in SICK[layer] for layer, heads in changed_heads(before, after, "qkv_bias").items() for h in heads)
    for layer, heads in SICK.items():
        for h in heads:
            parts = head_parts(after, layer, h)
            assert not parts["dense"].any() and not parts["qkv_bias"].any()
    assert_rest_identical(before, after)
    assert report["arm"] == "reinit-only" and report["checkpoints"]  # re-diagnosed once
    assert "- arm: reinit-only" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["arm"] == "reinit-only"


def test_ablate_zeroes_only_the_targets_output_columns(inputs, tmp_path):
    report = run(inputs, tmp_path / "out", settings=settings(control="ablate"))
    before, after = weights(inputs / "model"), weights(tmp_path / "out" / "final")
    assert changed_heads(before, after, "qkv") == {} and changed_heads(before, after, "qkv_bias") == {}
    assert changed_heads(before, after, "dense") == SICK
    for layer in range(2):
        for h in range(4):
            dense = head_parts(after, layer, h)["dense"]
            assert (not dense.any()) == (h in SICK.get(layer, [])), (layer, h)
    assert_rest_identical(before, after)
    assert report["arm"] == "ablate" and report["learning_rates"] == []


def test_random_healthy_trains_as_many_healthy_heads_per_layer(inputs, tmp_path):
    treated = run(inputs, tmp_path / "treatment")
    report = run(inputs, tmp_path / "out", settings=settings(control="random-healthy"))
    before, after = weights(inputs / "model"), weights(tmp_path / "out" / "final")
    moved = changed_heads(before, after, "qkv")
    assert changed_heads(before, after, "dense") == moved
    assert {layer: len(h) for layer, h in moved.items()} == {layer: len(h) for layer, h in SICK.items()}
    for layer, heads in moved.items():
        assert not set(heads) & set(SICK[layer]), "a collapsed head was chosen"
    assert_rest_identical(before, after)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert {int(k): v for k, v in plan["selection"].items()} == moved
    assert {int(k): v for k, v in plan["replaces"].items()} == SICK
    assert report["arm"] == "random-healthy"
    assert len(report["learning_rates"]) == len(treated["learning_rates"]) == 6  # trained as the treatment is


def test_random_healthy_is_reproducible_for_a_seed_and_varies_with_it(inputs):
    def chosen(seed):
        plan = plan_surgery(inputs / "model", report=crafted_report(), device="cpu", backend="torch",
                            settings=settings(control="random-healthy", seed=seed))
        return plan.selection

    first = chosen(0)
    assert chosen(0) == first
    assert len({json.dumps(chosen(seed)) for seed in range(1, 8)} | {json.dumps(first)}) > 1
    with pytest.raises(UsageError, match="layer 1 has 1 healthy heads outside the targets and --freeze, fewer than its "
                                         "3 targets"):
        plan_surgery(inputs / "model", report=crafted_report({1: [0, 1, 2]}), device="cpu", backend="torch",
                     settings=settings(control="random-healthy"))


def test_dry_run_shows_the_random_healthy_heads(inputs, tmp_path, capsys):
    report = tmp_path / "sick.json"
    crafted_report().to_json(report)
    assert main(["repair", str(inputs / "model"), "--out", str(tmp_path / "out"), "--from-report", str(report),
                 "--control", "random-healthy", "--dry-run", "--device", "cpu", "--backend", "torch",
                 "--seq-len", "16", "--batch-size", "2"]) in (0, None)
    text = capsys.readouterr().out
    assert "random-healthy control" in text and "in place of the targets" in text


def test_gradient_only_and_treatment_are_named(inputs, tmp_path):
    assert run(inputs, tmp_path / "g", settings=settings(reinit=False, epochs=0))["arm"] == "gradient-only"
    assert run(inputs, tmp_path / "t", settings=settings(epochs=0))["arm"] == "treatment"
    with pytest.raises(UsageError, match="control='ablate' contradicts reinit=False"):
        RepairSettings(control="ablate", reinit=False).check()
    with pytest.raises(UsageError, match="unknown control='prune'; choose one of reinit-only, random-healthy, ablate"):
        RepairSettings(control="prune").check()


def test_resume_refuses_another_arm(inputs, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(inputs, tmp_path / "out", settings=settings(save_every_steps=2), _stop_after_steps=2)
    with pytest.raises(UsageError, match="different settings.*control"):
        run(inputs, tmp_path / "out", settings=settings(save_every_steps=2, control="random-healthy"), resume=True)
    done = tmp_path / "done"
    run(inputs, done, settings=settings(control="ablate"))  # no checkpoint: the run record is what must match
    with pytest.raises(UsageError, match="different settings.*control"):
        run(inputs, done, settings=settings(control="reinit-only"), resume=True)


def test_compare_shows_the_arm(inputs, tmp_path, capsys):
    run(inputs, tmp_path / "out", settings=settings(control="ablate"))
    assert main(["compare", str(inputs / "model"), str(tmp_path / "out" / "final"), "--device", "cpu",
                 "--backend", "torch", "--max-length", "16", "--quiet"]) in (0, None)
    assert "[arm ablate]" in capsys.readouterr().out.splitlines()[0]


def test_save_every_epochs_checkpoints_every_n_epochs_and_at_the_end(inputs, tmp_path):
    report = run(inputs, tmp_path / "out", settings=settings(epochs=3, save_every_epochs=2, lr=1e-3))
    per_epoch = len(report["learning_rates"]) // 3  # 12 chunks / (batch 2 x accumulation 1) = 6 steps
    assert per_epoch == 6
    assert [c["step"] for c in report["checkpoints"]] == [2 * per_epoch, 3 * per_epoch]
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == [f"step-{2 * per_epoch:08d}", f"step-{3 * per_epoch:08d}"]
    with pytest.raises(UsageError, match=r"^save_every_epochs=0: must be >= 1$"):
        RepairSettings(save_every_epochs=0).check()


def test_the_cli_refuses_bad_arm_options_in_its_own_words(inputs, tmp_path, capsys):
    base = ["repair", str(inputs / "model"), "--out", str(tmp_path / "out"), "--corpus", str(inputs / "corpus.txt")]
    for extra, message in ((["--save-every-epochs", "0"], "error: --save-every-epochs 0: must be >= 1"),
                           (["--control", "prune"], "error: unknown --control prune; choose one of reinit-only, "
                                                    "random-healthy, ablate"),
                           (["--control", "ablate", "--no-reinit"], "error: --control ablate contradicts reinit=False")):
        assert main(base + extra) == 2
        assert capsys.readouterr().err.startswith(message), extra
    assert not (tmp_path / "out").exists()

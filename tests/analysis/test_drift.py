"""``drift RUN_DIR`` on a real repair run with several checkpoints: every figure recomputed here, with numpy, from
the checkpoints' diagnoses as the run wrote them (baseline.json, plan.json, report.json), not from the code under
test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from surgery_runs import make_inputs

from alibi_surgery.analysis.drift import pearson
from alibi_surgery.cli.main import main
from alibi_surgery.surgery.repair import RepairSettings, repair

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def drift_run(tmp_path_factory):
    """A finished repair of a 2-layer random BLOOM: 6 optimizer steps, a checkpoint (and diagnosis) after each."""
    root = make_inputs(tmp_path_factory.mktemp("drift-run"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)  # the optimizer's torch path on CPU, as a user runs it
        repair(root / "model", root / "run", corpus=[str(root / "corpus.txt")], heads="0:1;1:2", device="cpu",
               backend="torch", progress=False,
               settings=RepairSettings(seq_len=16, batch_size=2, grad_accum=1, epochs=1, lr=2e-2, warmup=0.0,
                                       save_every_steps=1, diag_max_length=16))
    return root / "run"


def _expected(run_dir):
    """Everything drift reports, from the run's own files."""
    baseline = json.loads((run_dir / "baseline.json").read_text())
    base = {(h["layer"], h["head"]): h["bos_mass"] for h in baseline["heads"]}
    plan = json.loads((run_dir / "plan.json").read_text())
    selected = {(int(layer), h) for layer, heads in plan["selection"].items() for h in heads}
    entries = [e for e in json.loads((run_dir / "report.json").read_text())["checkpoints"] if e["checkpoint"]]
    n_layer, n_head = max(base)[0] + 1, max(h for _, h in base) + 1
    deltas = []
    for e in entries:
        after = {(h["layer"], h["head"]): h["bos_mass"] for h in e["comparison"]["after"]["heads"]}
        deltas.append(np.array([[after[(layer, h)] - base[(layer, h)] for h in range(n_head)]
                                for layer in range(n_layer)]))
    frozen = np.array([[(layer, h) not in selected for h in range(n_head)] for layer in range(n_layer)])
    steps = np.array([e["step"] for e in entries], dtype=float)
    columns = np.array([[np.abs(d[frozen[:, h], h]).mean() for d in deltas] for h in range(n_head)])
    seen = np.zeros_like(frozen)
    new_frozen, new_all = [], []
    for d in deltas:
        over = np.abs(d) > 0.05
        new_frozen.append(int((over & ~seen & frozen).sum()))
        new_all.append(int((over & ~seen).sum()))
        seen |= over
    return entries, deltas, frozen, steps, columns, new_frozen, new_all


def test_drift_on_a_multi_checkpoint_run(drift_run, tmp_path, capsys):
    out = tmp_path / "drift.json"
    assert main(["drift", str(drift_run), "--json", str(out), "--heatmap", str(tmp_path / "heat.png"),
                 "--trajectories", str(tmp_path / "traj.png")]) == 0
    result = json.loads(out.read_text())
    entries, deltas, frozen, steps, columns, new_frozen, new_all = _expected(drift_run)
    assert len(entries) == 6 and [r["step"] for r in result["checkpoints"]] == [1, 2, 3, 4, 5, 6]
    assert result["undiagnosed"] == [] and result["n_frozen"] == int(frozen.sum()) == 2 * 4 - 2
    for row, d in zip(result["checkpoints"], deltas):
        np.testing.assert_allclose(row["delta"], d, rtol=0, atol=1e-7)
        np.testing.assert_allclose(row["frozen_mean_abs"], np.abs(d[frozen]).mean(), rtol=1e-9, atol=1e-9)
    assert max(np.abs(d[frozen]).max() for d in deltas) > 0, "the run moved no frozen head: the test shows nothing"
    for col, expected in zip(result["columns"], columns):
        np.testing.assert_allclose(col["mean_abs"], expected, rtol=1e-9, atol=1e-9)
        slope = np.polyfit(steps, expected, 1)[0]
        rise = slope * (steps[-1] - steps[0])
        np.testing.assert_allclose(col["fitted_change"], rise, rtol=1e-6, atol=1e-12)
        assert col["trend"] == ("spreading" if rise > 0.01 else "receding" if rise < -0.01 else "stable")
    assert result["cascade"]["new_frozen"] == new_frozen and result["cascade"]["new_all"] == new_all
    assert result["cascade"]["cumulative_all"][-1] == sum(new_all)
    for a in range(len(columns)):
        for b in range(len(columns)):
            got = result["correlation"]["pearson"][a][b]
            if np.ptp(columns[a]) == 0 or np.ptp(columns[b]) == 0:
                assert got is None
            else:
                np.testing.assert_allclose(got, np.corrcoef(columns[a], columns[b])[0, 1], atol=1e-9)
    for name in ("heat.png", "traj.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
    text = capsys.readouterr().out
    assert "6 diagnosed checkpoints" in text and "columns by the fitted rule (used):" in text


def test_pearson_edges():
    assert pearson([1.0, 2.0], [2.0, 4.0]) is None  # two points say nothing
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # constant trajectory
    assert pearson([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_undiagnosed_checkpoint_and_unfinished_run(drift_run, tmp_path, capsys):
    """A checkpoint the history has no diagnosis of is named and left out; a run without report.json (stopped)
    reads the newest checkpoint's history."""
    copy = tmp_path / "run"
    shutil.copytree(drift_run, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    (copy / "report.json").unlink()
    shutil.rmtree(copy / "checkpoints" / "step-00000006")  # the newest: step 5's history stops at step 5
    (copy / "checkpoints" / "step-00000009").mkdir()  # a checkpoint directory no history mentions
    assert main(["drift", str(copy), "--json", str(tmp_path / "d.json")]) == 0
    result = json.loads((tmp_path / "d.json").read_text())
    assert [r["step"] for r in result["checkpoints"]] == [1, 2, 3, 4, 5]
    assert result["undiagnosed"] == ["step-00000009"]
    assert "have no diagnosis" in capsys.readouterr().out


def test_passes_are_read_in_order_against_pass_one(drift_run, tmp_path):
    """pass-1, pass-2 (here the same run twice, pass 2 selecting one more head): steps continue, every delta is
    against pass 1's baseline, and a head selected in any pass is not frozen."""
    run = tmp_path / "two-pass"
    for k in (1, 2):
        shutil.copytree(drift_run, run / f"pass-{k}", ignore=shutil.ignore_patterns("*.safetensors"))
    plan = json.loads((run / "pass-2" / "plan.json").read_text())
    plan["selection"] = {"0": [3]}
    (run / "pass-2" / "plan.json").write_text(json.dumps(plan))
    # pass 2's own baseline differs from the original: it must not be used
    text = (run / "pass-2" / "baseline.json").read_text()
    (run / "pass-2" / "baseline.json").write_text(text.replace('"bos_mass": 0', '"bos_mass": 1'))
    assert main(["drift", str(run), "--json", str(tmp_path / "d.json")]) == 0
    result = json.loads((tmp_path / "d.json").read_text())
    _, deltas, frozen, _, _, _, _ = _expected(drift_run)
    assert [r["global_step"] for r in result["checkpoints"]] == list(range(1, 13))
    assert [r["pass"] for r in result["checkpoints"]] == [1] * 6 + [2] * 6
    for row, d in zip(result["checkpoints"], deltas + deltas):
        np.testing.assert_allclose(row["delta"], d, rtol=0, atol=1e-7)
    assert result["selected"] == {"0": [1, 3], "1": [2]} and result["n_frozen"] == int(frozen.sum()) - 1
    assert result["cascade"]["new_all"][6:] == [0] * 6  # nothing crosses for the first time twice


# ---- the two column rules ---------------------------------------------------------------------------------------------

def _synthetic_run():
    """3 layers x 2 heads, original bos 0.5 everywhere; L0 H0 selected; zone L0-L1 x H0-H1, so the in-band frozen
    heads are L0 H1, L1 H0, L1 H1 and the out-of-band frozen ones L2 H0, L2 H1. Four checkpoints at epochs 0.5, 1,
    1.5, 2: the epoch checkpoints are steps 2 and 4. |delta| per step (signs mixed on purpose):

        head    step 1  step 2  step 3  step 4
        L1 H0   0.10    0.10    0.10    0.11      column 0, in-band
        L2 H0   0.00    0.10    0.20    0.30      column 0, out of band
        L0 H1   0.30    0.00    0.30    0.04      column 1, in-band
        L1 H1   0.30    0.02    0.30    0.06      column 1, in-band (negative deltas)
        L2 H1   0.30    0.00    0.30    0.00      column 1, out of band
    """
    from alibi_surgery.analysis.drift import RunDiagnoses
    from alibi_surgery.diagnosis.report import HeadReport

    table = {(1, 0): [0.10, 0.10, 0.10, 0.11], (2, 0): [0.0, 0.10, 0.20, 0.30],
             (0, 1): [0.30, 0.0, 0.30, 0.04], (1, 1): [-0.30, -0.02, -0.30, -0.06], (2, 1): [0.30, 0.0, 0.30, 0.0]}
    entropy = torch.tensor([[2.0, 2.0], [2.0, 0.2], [2.0, 2.0]])  # L1 H1 is low-entropy while not collapsed
    original = HeadReport(torch.full((3, 2), 0.5), entropy, 100, metadata={"model": "toy"})
    checkpoints = []
    for i, epoch in enumerate((0.5, 1.0, 1.5, 2.0)):
        bos = torch.full((3, 2), 0.5)
        for at, values in table.items():
            bos[at] = 0.5 + values[i]
        checkpoints.append({"pass": 1, "checkpoint": f"step-{i + 1:08d}", "step": i + 1, "global_step": i + 1,
                            "epoch": epoch, "report": HeadReport(bos, entropy, 100, metadata={"model": "toy"})})
    return RunDiagnoses(Path("synthetic"), original, {0: [0]}, checkpoints, [], zone={0: [0, 1], 1: [0, 1]})


def test_column_rules_disagree_on_a_constructed_history():
    from alibi_surgery.analysis.drift import drift_over_training

    run = _synthetic_run()
    paper = drift_over_training(run, column_rule="paper", healthy="paper")
    rules = paper["column_rules"]
    p = rules["paper"]
    # by hand: column 0 in-band = L1 H0 only: 0.11 - 0.10 = 0.01 (stable); column 1 = mean(L0 H1, L1 H1):
    # epoch 1 (0.00 + 0.02) / 2 = 0.01, epoch 2 (0.04 + 0.06) / 2 = 0.05: +0.04 (spreading)
    assert p["heads"] == [[0, 1], [1, 0], [1, 1]] and p["checkpoints"] == ["step-00000002", "step-00000004"]
    assert [c["n_frozen"] for c in p["columns"]] == [1, 2]
    near = {"rel": 0, "abs": 1e-6}  # the reports hold float32
    assert p["columns"][0]["mean_abs"] == pytest.approx([0.10, 0.11], **near)
    assert p["columns"][0]["change"] == pytest.approx(0.01, **near)
    assert p["columns"][1]["mean_abs"] == pytest.approx([0.01, 0.05], **near)
    assert p["columns"][1]["change"] == pytest.approx(0.04, **near)
    assert [c["trend"] for c in p["columns"]] == ["stable", "spreading"]
    assert p["over_threshold"] == [1, 2]  # > 0.05: L1 H0 at epoch 1; L1 H0 and L1 H1 (0.06) at epoch 2
    # the fitted rule, by hand: column 0 over L1 H0 and L2 H0 at steps 1..4: means 0.05, 0.10, 0.15, 0.205;
    # slope = sum((s - 2.5)(m - 0.12625)) / 5 = 0.2575 / 5 = 0.0515, change over 3 steps 0.1545 (spreading).
    # column 1 over L0 H1, L1 H1, L2 H1: means 0.3, 0.02/3, 0.3, 0.1/3; slope = -0.76/15, change -0.152 (receding)
    cols = paper["columns"]
    assert cols[0]["fitted_change"] == pytest.approx(0.1545, **near)
    assert cols[1]["fitted_change"] == pytest.approx(-0.152, **near)
    assert [c["trend"] for c in cols] == ["spreading", "receding"]
    assert rules["fitted"]["spreading"] == [0] and p["spreading"] == [1]
    assert paper["column_rule"] == "paper" and paper["spreading"] == [1]
    assert paper["trend_counts"] == {"spreading": 1, "stable": 1}
    fitted = drift_over_training(run)
    assert fitted["column_rule"] == "fitted" and fitted["spreading"] == [0]
    assert fitted["trend_counts"] == {"spreading": 1, "receding": 1}
    # the threshold moves with the rule chosen: 0.05 makes column 1's +0.04 stable
    assert drift_over_training(run, column_rule="paper", trend_threshold=0.05)["spreading"] == []
    # healthy heads, by hand: bos-sinks (> 0.5) per step: 1: L1 H0, L0 H1, L2 H1; 2: L1 H0, L2 H0;
    # 3: L1 H0, L2 H0, L0 H1, L2 H1; 4: L1 H0, L2 H0, L0 H1. L1 H1 (entropy 0.2) is never collapsed: it counts for
    # ours, not for the paper, at every step and in the original (bos 0.5 everywhere: nothing collapsed)
    assert fitted["original_healthy"] == 6 and paper["original_healthy"] == 5
    assert [r["healthy"] for r in fitted["checkpoints"]] == [3, 4, 2, 3]
    assert [r["healthy"] for r in paper["checkpoints"]] == [2, 3, 1, 2]
    from alibi_surgery.analysis.drift import format_drift

    text = format_drift(paper)
    assert text.index("columns by the paper rule (used)") < text.index("columns by the fitted rule:")
    assert "3 in-band frozen heads, 2 epoch checkpoints" in text


def test_column_rule_and_healthy_are_checked():
    from alibi_surgery.analysis.drift import drift_over_training
    from alibi_surgery.errors import UsageError

    with pytest.raises(UsageError, match=r"^column_rule='last': must be one of fitted, paper$"):
        drift_over_training(_synthetic_run(), column_rule="last")
    with pytest.raises(UsageError, match=r"^healthy='x': must be one of ours, paper$"):
        drift_over_training(_synthetic_run(), healthy="x")


def test_cli_paper_rule_on_a_run_with_epoch_checkpoints(drift_run, tmp_path, capsys):
    """The repair run with its history relabelled as 3 epochs of 2 steps: the paper rule reads the in-band frozen
    heads (zone minus selection) at steps 2, 4, 6 from the run's own files."""
    copy = tmp_path / "run"
    shutil.copytree(drift_run, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    report = json.loads((copy / "report.json").read_text())
    for e in report["checkpoints"]:
        e["epoch"] = e["step"] / 2
    (copy / "report.json").write_text(json.dumps(report))
    out = tmp_path / "d.json"
    assert main(["drift", str(copy), "--column-rule", "paper", "--healthy", "paper", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    baseline = json.loads((copy / "baseline.json").read_text())
    base = {(h["layer"], h["head"]): h["bos_mass"] for h in baseline["heads"]}
    plan = json.loads((copy / "plan.json").read_text())
    pairs = lambda sel: {(int(layer), h) for layer, heads in sel.items() for h in heads}  # noqa: E731
    in_band = sorted(pairs(plan["zone"]) - pairs(plan["selection"]))
    assert in_band and result["column_rules"]["paper"]["heads"] == [list(p) for p in in_band]
    epochs = [e for e in report["checkpoints"] if e["checkpoint"] and e["step"] % 2 == 0]
    for col in result["column_rules"]["paper"]["columns"]:
        heads = [p for p in in_band if p[1] == col["head"]]
        if not heads:
            assert col["trend"] == "no frozen heads"
            continue
        series = []
        for e in epochs:
            after = {(h["layer"], h["head"]): h["bos_mass"] for h in e["comparison"]["after"]["heads"]}
            series.append(np.mean([abs(after[p] - base[p]) for p in heads]))
        np.testing.assert_allclose(col["mean_abs"], series, rtol=1e-9, atol=1e-12)
        change = series[-1] - series[0]
        assert col["trend"] == ("spreading" if change > 0.02 else "receding" if change < -0.02 else "stable")
    for row, e in zip(result["checkpoints"], [e for e in report["checkpoints"] if e["checkpoint"]]):
        classes = [h["class"] for h in e["comparison"]["after"]["heads"]]
        assert row["healthy"] == classes.count("healthy")
    assert result["healthy_definition"] == "paper" and result["column_rule"] == "paper"
    assert "columns by the paper rule (used)" in capsys.readouterr().out
    assert main(["drift", str(copy), "--column-rule", "last"]) == 2
    assert "--column-rule last: must be one of fitted, paper" in capsys.readouterr().err

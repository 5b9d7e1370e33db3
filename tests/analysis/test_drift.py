"""``drift RUN_DIR`` on a real repair run with several checkpoints: every figure recomputed here, with numpy, from
the checkpoints' diagnoses as the run wrote them (baseline.json, plan.json, report.json), not from the code under
test."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
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
    assert "6 diagnosed checkpoints" in text and "columns:" in text


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

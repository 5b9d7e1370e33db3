"""``compare``: before/after diagnoses. Hand-built reports whose deltas are exact binary fractions, so every expected
count, mean and worst head below is worked out by hand (see the grid in ``_scenario``), not by the code under test."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from alibi_surgery.analysis.compare import compare, parse_selection_spec, run_compare
from alibi_surgery.analysis.comparison import Comparison
from alibi_surgery.cli.main import build_parser
from alibi_surgery.viz.comparison_figures import plot_delta_heatmap, save_delta_heatmap
from alibi_surgery.errors import UsageError
from alibi_surgery.diagnosis.report import HeadReport, Thresholds, measurement_differences

# hand-built reports have no prompt fingerprint: compare() warns about it (tested in test_different_measurements)
pytestmark = pytest.mark.filterwarnings("ignore:.*no prompt fingerprint")

compare_mod = importlib.import_module("alibi_surgery.analysis.compare")  # alibi_surgery.analysis.compare is the function

PNG = b"\x89PNG\r\n\x1a\n"

# 4 layers x 4 heads. bos_mass before -> after (all values exact in float32); entropy 2.0 except (0, 1) after.
#   targets: (1,2) (1,3) (2,2) (2,3) (3,3); zone: heads 1-3 of layers 1-3 -> in-band (1,1) (2,1) (3,1) (3,2)
BEFORE = [[0.5, 0.25, 0.75, 0.0625],
          [0.75, 0.25, 0.96875, 0.75],
          [0.125, 0.5, 0.75, 0.96875],
          [0.125, 0.125, 0.375, 0.25]]
AFTER = [[0.5, 0.25, 0.25, 0.96875],        # (0,2) sick->healthy but no target; (0,3) iatrogenic, +0.90625
         [0.75, 0.3125, 0.125, 0.25],       # (1,1) +0.0625; (1,2) recovered -0.84375; (1,3) recovered -0.5
         [0.09375, 0.5625, 0.625, 0.96875],  # (2,0) -0.03125; (2,1) iatrogenic +0.0625; (2,2) still sick -0.125
         [0.125, 0.171875, 0.3125, 0.5625]]  # (3,1) +0.046875; (3,2) -0.0625; (3,3) newly sick target +0.3125
TARGETS = {1: [2, 3], 2: [2, 3], 3: [3]}
ZONE = {1: [1, 2, 3], 2: [1, 2, 3], 3: [1, 2, 3]}


def _report(bos, entropy=None, n_tokens=100, **metadata) -> HeadReport:
    bos = torch.tensor(bos, dtype=torch.float32)
    ent = torch.full_like(bos, 2.0) if entropy is None else torch.tensor(entropy, dtype=torch.float32)
    return HeadReport(bos, ent, n_tokens, metadata=dict(metadata))


def _scenario(**kwargs) -> Comparison:
    after_entropy = [[2.0] * 4 for _ in range(4)]
    after_entropy[0][1] = 0.25  # healthy -> low-entropy: not sick, so not iatrogenic
    kwargs = {"targets": TARGETS, "zone": ZONE, **kwargs}
    return Comparison(_report(BEFORE, model="base"), _report(AFTER, after_entropy, model="repaired"), **kwargs)


def _run(argv: list[str]) -> None:
    args = build_parser().parse_args(["compare", *argv])
    run_compare(args)


# ---- outcomes, zones, drift ------------------------------------------------------------------------------------------


def test_outcomes_with_targets():
    c = _scenario()
    assert c.recovered() == {1: [2, 3]}
    assert c.still_sick() == {2: [2, 3]}
    assert c.newly_sick_targets() == {3: [3]}
    assert c.iatrogenic() == {0: [3], 2: [1]}
    s = c.summary()
    assert (s["recovered"], s["still_sick"], s["newly_sick_targets"], s["iatrogenic"], s["n_targets"]) == \
        (2, 2, 1, 2, 5)


def test_outcomes_without_targets_count_over_all_heads():
    c = _scenario(targets=None)
    assert c.recovered() == {0: [2], 1: [2, 3]}
    assert c.still_sick() == {1: [0], 2: [2, 3]}
    assert c.iatrogenic() == {0: [3], 2: [1], 3: [3]}
    assert c.newly_sick_targets() == {}


def test_zone_of_and_delta():
    c = _scenario()
    assert c.zone_of(1, 2) == "target" and c.zone_of(3, 3) == "target"
    assert c.zone_of(1, 1) == "in-band" and c.zone_of(3, 2) == "in-band"
    assert c.zone_of(0, 2) == "outside" and c.zone_of(3, 0) == "outside"
    assert [len(c.zone_heads(z)) for z in ("target", "in-band", "outside", "all")] == [5, 4, 7, 16]
    assert c.delta.dtype == torch.float64 and c.delta.shape == (4, 4)
    assert c.delta[1, 2].item() == -0.84375 and c.delta[0, 3].item() == 0.90625 and c.delta[2, 3].item() == 0.0
    with pytest.raises(IndexError):
        c.zone_of(4, 0)
    with pytest.raises(ValueError, match="unknown zone"):
        c.drift("band")
    # without a zone nothing is in-band; without targets nothing is a target
    bare = _scenario(targets=None, zone=None)
    assert {bare.zone_of(layer, h) for layer in range(4) for h in range(4)} == {"outside"}


def test_drift_per_zone():
    c = _scenario()
    target, band, outside, every = (c.drift(z) for z in ("target", "in-band", "outside", "all"))
    # targets: |delta| 0.84375, 0.5, 0.125, 0, 0.3125
    assert (target["n"], target["count"]) == (5, 4)
    assert target["mean_abs"] == pytest.approx(1.78125 / 5)
    assert target["worst"] == {"layer": 1, "head": 2, "delta": -0.84375}
    # in-band: 0.0625 (1,1), 0.0625 (2,1), 0.046875 (3,1, under 0.05), 0.0625 (3,2); worst tie -> first, (1,1)
    assert (band["n"], band["count"]) == (4, 3)
    assert band["mean_abs"] == pytest.approx(0.234375 / 4)
    assert band["worst"] == {"layer": 1, "head": 1, "delta": 0.0625}
    # outside: 0.5 (0,2), 0.90625 (0,3), 0.03125 (2,0), four zeros
    assert (outside["n"], outside["count"]) == (7, 2)
    assert outside["mean_abs"] == pytest.approx(1.4375 / 7)
    assert outside["worst"] == {"layer": 0, "head": 3, "delta": 0.90625}
    assert (every["n"], every["count"]) == (16, 9)


def test_drift_threshold_edges():
    before = _report([[0.25, 0.25, 0.25, 0.25, 0.25]])
    after = _report([[0.3125, 0.25 + 0.0625 + 2**-10, 0.1875, 0.125, 0.25]])  # +t, +t+eps, -t, -2t, 0
    c = Comparison(before, after, drift_threshold=0.0625)
    assert c.drift()["count"] == 2  # strictly greater: exactly +-0.0625 does not drift
    assert c.drift()["worst"] == {"layer": 0, "head": 3, "delta": -0.125}
    assert Comparison(before, after, drift_threshold=0.0).drift()["count"] == 4  # a zero delta never drifts
    assert Comparison(before, after, drift_threshold=0.125).drift()["count"] == 0
    assert Comparison(before, after, drift_threshold=1).drift_threshold == 1.0
    for bad in (-0.01, float("nan"), float("inf"), "0.05", True):
        with pytest.raises(UsageError, match="drift threshold"):
            Comparison(before, after, drift_threshold=bad)


def test_empty_zone_drift_and_identical_reports():
    r = _report(BEFORE)
    c = Comparison(r, _report(BEFORE), targets={}, zone={2: [1]})
    assert c.drift("target") == {"zone": "target", "n": 0, "count": 0, "mean_abs": None, "worst": None}
    assert c.drift("in-band")["n"] == 1 and c.drift("all")["count"] == 0 and c.drift("all")["mean_abs"] == 0.0
    assert c.recovered() == {} and c.iatrogenic() == {}


def test_selections_validated_and_normalised():
    c = _scenario(targets={"3": [3], 1: [3, 2, 2]}, zone={1: 1})
    assert c.targets == {1: [2, 3], 3: [3]} and c.zone == {1: [1]}
    with pytest.raises(UsageError, match="^targets: selection layer 4 is out of range"):
        _scenario(targets={4: [0]})
    with pytest.raises(UsageError, match="^zone: .*head 7 is out of range"):
        _scenario(zone={0: [7]})
    with pytest.raises(UsageError, match="targets: layer 'x' is not an integer"):
        _scenario(targets={"x": [0]})


# ---- mismatches -----------------------------------------------------------------------------------------------------


def test_shape_mismatch():
    with pytest.raises(UsageError, match="different shapes: before is 4 layers x 4 heads, after is 4 layers x 3"):
        Comparison(_report(BEFORE), _report([row[:3] for row in AFTER]))


def test_threshold_and_metric_mismatch():
    a, b = _report(BEFORE), _report(AFTER)
    b.thresholds = Thresholds(dead=0.9)
    with pytest.raises(UsageError, match="different class thresholds"):
        Comparison(a, b)
    a, b = _report(BEFORE, metric={"exclude_first_query": False}), _report(AFTER, metric={"exclude_first_query": True})
    with pytest.raises(UsageError, match="exclude_first_query is False before and True after"):
        Comparison(a, b)


def test_notes_on_different_prompts_and_dtype():
    c = Comparison(_report(BEFORE, n_tokens=100, dtype="float32"), _report(AFTER, n_tokens=90, dtype="bfloat16"))
    notes = c.notes()
    assert "the prompts differ: 100 tokens before, 90 tokens after" in notes
    assert any("dtype differs: float32 before, bfloat16 after" in n for n in notes)
    assert "note: dtype differs" in c.format_summary()
    assert _scenario().notes() == []


FP = {"prompt_set_fingerprint": "00aa", "n_prompts": 2, "max_length": None}


def test_measurement_differences():
    a = _report(BEFORE, **FP)
    assert measurement_differences(a, _report(AFTER, **FP)) == []
    # another max_length that truncated nothing (the same token ids, so the same fingerprint): the same measurement
    assert measurement_differences(a, _report(AFTER, **dict(FP, max_length=512))) == []
    other = _report(AFTER, n_tokens=90, **dict(FP, prompt_set_fingerprint="00bb", max_length=16))
    expected = ["max_length differs: None before, 16 after",
                "the prompt sets differ: before has 2 prompts, 100 tokens (fingerprint 00aa), after 2 prompts, "
                "90 tokens (fingerprint 00bb)"]
    assert measurement_differences(a, other) == expected
    assert Comparison(a, other).notes() == expected
    assert "note: the prompt sets differ: before has 2 prompts" in Comparison(a, other).format_summary()
    efq = _report(AFTER, metric={"exclude_first_query": True}, **FP)
    assert measurement_differences(_report(BEFORE, metric={"exclude_first_query": False}, **FP), efq) == \
        ["exclude_first_query is False before and True after"]
    # reports without fingerprints: only token counts and max_length can tell
    old = _report(AFTER, prompt_tokens=[60, 40], max_length=None)
    assert measurement_differences(_report(BEFORE, prompt_tokens=[40, 60], max_length=None), old) == []
    assert measurement_differences(_report(BEFORE, prompt_tokens=[50, 50], max_length=None), old) == \
        ["the prompts differ: the same 100 tokens in all, but not the same token count per prompt"]
    assert measurement_differences(_report(BEFORE, max_length=8), old, ("A", "B")) == \
        ["max_length differs: 8 A, None B"]


def test_compare_refuses_different_measurements_unless_forced():
    a, b = _report(BEFORE, **FP), _report(AFTER, **dict(FP, prompt_set_fingerprint="00bb"))
    with pytest.raises(UsageError, match=r"^A and B were measured differently: the prompt sets differ: A has 2 "
                                         r"prompts, 100 tokens \(fingerprint 00aa\), B 2 prompts, 100 tokens "
                                         r"\(fingerprint 00bb\); pass force=True to compare them anyway$"):
        compare(a, b)
    with pytest.warns(UserWarning) as caught:
        c = compare(a, b, force=True)
    assert [str(w.message) for w in caught] == [
        "comparing anyway (force=True), although A and B were measured differently: the prompt sets differ: A has 2 "
        "prompts, 100 tokens (fingerprint 00aa), B 2 prompts, 100 tokens (fingerprint 00bb)"]
    assert c.recovered() == {0: [2], 1: [2, 3]} and c.notes()[0].startswith("the prompt sets differ")
    for force in (False, True):  # an older report: nothing to check the prompt set with
        with pytest.warns(UserWarning) as caught:
            compare(a, _report(AFTER), force=force)
        assert [str(w.message) for w in caught] == [
            "B has no prompt fingerprint (written by an older version): the prompt sets cannot be checked"]


# ---- JSON, text, heatmap ---------------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    c = _scenario(drift_threshold=0.03125)
    path = tmp_path / "c.json"
    c.to_json(path)
    data = json.loads(path.read_text())
    assert data["kind"] == "alibi-surgery comparison" and data["drift_threshold"] == 0.03125
    assert data["targets"] == {"1": [2, 3], "2": [2, 3], "3": [3]}
    assert data["recovered"] == {"1": [2, 3]} and data["iatrogenic"] == {"0": [3], "2": [1]}
    assert data["summary"]["drift"]["outside"]["count"] == 2  # 0.03125 is not > 0.03125
    assert data["summary"]["drift"]["in-band"]["count"] == 4
    head = next(h for h in data["heads"] if (h["layer"], h["head"]) == (1, 2))
    assert head == {"layer": 1, "head": 2, "zone": "target", "bos_mass_before": 0.96875, "bos_mass_after": 0.125,
                    "delta": -0.84375, "entropy_before": 2.0, "entropy_after": 2.0, "class_before": "dead",
                    "class_after": "healthy", "drifting": True, "outcome": "recovered"}
    back = Comparison.from_json(path)
    assert torch.equal(back.before.bos_mass, c.before.bos_mass) and torch.equal(back.after.entropy, c.after.entropy)
    assert back.targets == c.targets and back.zone == c.zone and back.drift_threshold == 0.03125
    assert back.to_dict() == c.to_dict()
    none = _scenario(targets=None, zone=None)
    assert Comparison.from_dict(json.loads(json.dumps(none.to_dict()))).targets is None
    with pytest.raises(UsageError, match="not a comparison JSON"):
        Comparison.from_dict({"before": {}})


def test_format_table():
    c = _scenario()
    lines = c.format_table(max_rows=3).splitlines()
    assert lines[0].split()[:6] == ["layer", "head", "zone", "before", "after", "delta"]
    row = lines[1].split()
    assert row[:6] == ["0", "3", "outside", "0.0625", "0.9688", "+0.9062*"]
    assert "healthy -> dead" in lines[1] and lines[1].endswith("iatrogenic")
    assert lines[2].split()[:3] == ["1", "2", "target"] and "dead -> healthy" in lines[2]
    assert lines[2].endswith("recovered")
    assert lines[3].split()[:2] == ["0", "2"]  # |delta| 0.5 tie with (1,3): layer-major order
    assert lines[3].endswith("bos-sink -> healthy")  # not a target: no outcome
    assert lines[4] == "... 13 more heads with |delta| <= 0.5000"
    assert lines[5] == "* |delta| > 0.05 (drifting)"
    full = c.format_table(max_rows=None).splitlines()
    assert len(full) == 1 + 16 + 1
    assert any("healthy -> low-entropy" in line for line in full)
    assert any("still sick" in line and line.split()[:2] == ["2", "2"] for line in full)
    assert any("newly sick target" in line and line.split()[:2] == ["3", "3"] for line in full)
    zero = next(line for line in full if line.split()[:2] == ["2", "3"])
    assert "+0.0000 " in zero and "*" not in zero


def test_format_summary():
    text = _scenario().format_summary()
    assert text.splitlines()[0] == "base -> repaired: 4 layers x 4 heads"
    # before: healthy 10, bos-sink 4, dead 2; after: healthy 9, bos-sink 4, dead 2, low-entropy 1 (head 0,1)
    assert "healthy 10 -> 9  bos-sink 4 -> 4  dead 2 -> 2  low-entropy 0 -> 1  (collapsed 6 -> 6 of 16)" in text
    assert "targets 5: recovered 2, still sick 2, newly sick 1; iatrogenic (non-targets newly collapsed) 2" in text
    assert "target      4/5    drifting  mean |delta| 0.3563  worst L1 H2 -0.8438" in text
    assert "in-band     3/4    drifting" in text and "outside     2/7    drifting" in text
    bare = _scenario(targets=None, zone=None).format_summary()
    assert "no targets given: of 6 heads collapsed before, recovered 3, still sick 3; newly collapsed 3" in bare
    assert "target " not in bare and "in-band" not in bare


def test_heatmap_png(tmp_path):
    path = tmp_path / "delta.png"
    save_delta_heatmap(_scenario(), path)
    assert path.read_bytes()[:8] == PNG
    flat = tmp_path / "flat.png"  # all deltas zero, no targets, no zone
    save_delta_heatmap(Comparison(_report(BEFORE), _report(BEFORE)), flat)
    assert flat.read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_title_counts():
    import matplotlib.pyplot as plt

    ax = plot_delta_heatmap(_scenario())
    title = ax.get_title()
    plt.close(ax.figure)
    assert "5 targets: R recovered 2, X still sick 2, ! newly sick 3" in title
    assert "target 4/5, in-band 3/4, outside 2/7" in title


# ---- inputs ---------------------------------------------------------------------------------------------------------


def test_compare_reports_and_json_files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _report(BEFORE, model="base").to_json(a)
    _report(AFTER, model="repaired").to_json(b)
    c = compare(a, str(b), targets=TARGETS, zone=ZONE, device="cuda")  # diagnose options ignored for reports
    assert c.recovered() == {1: [2, 3]} and c.drift("outside")["count"] == 2
    # the file reader matches HeadReport.from_json
    ref = HeadReport.from_json(a)
    assert torch.equal(c.before.bos_mass, ref.bos_mass) and c.before.metadata == ref.metadata
    c2 = compare(_report(BEFORE), ref)
    assert c2.drift()["count"] == 0
    with pytest.raises(TypeError, match="unexpected keyword"):
        compare(a, b, devcie="cpu")


def test_compare_shape_mismatch_files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _report(BEFORE).to_json(a)
    _report([row[:3] for row in AFTER]).to_json(b)
    with pytest.raises(UsageError, match="^A and B have different shapes: A is 4 layers x 4 heads, B is 4 layers x 3"):
        compare(a, b)


def test_bad_inputs(tmp_path):
    good = tmp_path / "good.json"
    _report(BEFORE).to_json(good)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    partial = tmp_path / "partial.json"
    data = json.loads(good.read_text())
    data["heads"] = data["heads"][:-1]
    partial.write_text(json.dumps(data))
    comparison = tmp_path / "cmp.json"
    _scenario().to_json(comparison)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases = [
        ((tmp_path / "missing.json", good), "^A does not exist: "),
        ((good, tmp_path / "nope"), "^B does not exist: "),
        ((text, good), "^A is neither a diagnosis .json file nor a model directory"),
        ((good, broken), "^B: .*broken.json is not valid JSON"),
        ((other, good), "^A: .*other.json is not a diagnosis report"),
        ((good, partial), "^B: .*partial.json is not a diagnosis report"),
        ((comparison, good), "^A: .*is a comparison, not a diagnosis report"),
        ((good, empty_dir), "^B: no config.json in "),
    ]
    for (a, b), pattern in cases:
        with pytest.raises(UsageError, match=pattern) as info:
            compare(a, b)
        assert "\n" not in str(info.value)


def test_selection_spec():
    assert parse_selection_spec(None) is None
    assert parse_selection_spec(["5-7:1,3;0:2", "1:0"]).resolve(8, 4) == {5: [1, 3], 6: [1, 3], 7: [1, 3], 0: [2],
                                                                           1: [0]}
    assert parse_selection_spec("*:2-3").resolve(2, 4) == {0: [2, 3], 1: [2, 3]}
    assert parse_selection_spec("1:*").resolve(2, 3) == {1: [0, 1, 2]}
    assert parse_selection_spec("L5-L6:H9, h11; 7 : 1\u20132;").resolve(8, 12) == {5: [9, 11], 6: [9, 11],
                                                                                   7: [1, 2]}
    for bad, pattern in (("5", "bad selection"), ("a:1", "bad selection"), ("3-1:0", "reversed range"),
                         ("1:2:3", "bad selection"), (" ", "empty selection")):
        with pytest.raises(UsageError, match=f"^--targets: {pattern}"):
            parse_selection_spec(bad)


def test_selection_spec_json(tmp_path):
    plain, wrapped, bad = tmp_path / "t.json", tmp_path / "plan.json", tmp_path / "bad.json"
    plain.write_text(json.dumps({"1": [2, 3], "3": 3}))
    wrapped.write_text(json.dumps({"targets": {"2": [0]}, "zone": {"0": [1]}}))
    bad.write_text(json.dumps({"1": ["x"]}))
    assert parse_selection_spec(str(plain)).resolve(4, 4) == {1: [2, 3], 3: [3]}
    assert parse_selection_spec([str(wrapped), "0:0"]).resolve(4, 4) == {2: [0], 0: [0]}
    assert parse_selection_spec(str(wrapped), "--zone").resolve(4, 4) == {0: [1]}
    plan = tmp_path / "plan.json"  # the fields compare reads from a surgery plan
    plan.write_text(json.dumps({"format": "alibi-surgery-plan", "version": 1, "selection": {"5": [9, 10]},
                                "zone": {"5": [9, 10, 11], "6": [9, 10, 11]}}))
    assert parse_selection_spec(str(plan)).resolve(8, 12) == {5: [9, 10]}
    assert parse_selection_spec(str(plan), "--zone").resolve(8, 12) == {5: [9, 10, 11], 6: [9, 10, 11]}
    with pytest.raises(UsageError, match="does not hold a selection"):
        parse_selection_spec(str(bad))
    with pytest.raises(UsageError, match="--targets file does not exist"):
        parse_selection_spec(str(tmp_path / "none.json"))


# ---- the command ----------------------------------------------------------------------------------------------------


def test_run_compare_json_files(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _report(BEFORE, model="base").to_json(a)
    _report(AFTER, model="repaired").to_json(b)
    out_json, out_png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    _run([str(a), str(b), "--targets", "1:2,3", "--targets", "2:2-3;3:3", "--zone", "1-3:1-3", "--table",
          "--table-rows", "2", "--json", str(out_json), "--heatmap", str(out_png)])
    text = capsys.readouterr().out
    assert "targets 5: recovered 2, still sick 2, newly sick 1; iatrogenic (non-targets newly collapsed) 2" in text
    assert "... 14 more heads" in text and f"wrote {out_json}" in text and f"wrote {out_png}" in text
    data = json.loads(out_json.read_text())
    assert data["targets"] == {"1": [2, 3], "2": [2, 3], "3": [3]} and data["summary"]["drift"]["in-band"]["n"] == 4
    assert out_png.read_bytes()[:8] == PNG
    # existing outputs are refused before anything runs, and kept
    before = out_json.read_bytes()
    with pytest.raises(UsageError, match="--json file already exists"):
        _run([str(a), str(b), "--json", str(out_json)])
    assert out_json.read_bytes() == before
    _run([str(a), str(b), "--json", str(out_json), "--overwrite", "--drift-threshold", "0.5"])
    assert json.loads(out_json.read_text())["drift_threshold"] == 0.5
    # targets and zone from a surgery plan (its zone includes the targets)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "alibi-surgery-plan", "version": 1, "selection": TARGETS,
                                "zone": ZONE}))
    _run([str(a), str(b), "--plan", str(plan), "--json", str(out_json), "--overwrite"])
    data = json.loads(out_json.read_text())
    assert data["targets"] == {"1": [2, 3], "2": [2, 3], "3": [3]} and data["zone"]["3"] == [1, 2, 3]
    assert data["summary"]["drift"]["in-band"]["n"] == 4 and data["summary"]["recovered"] == 2
    with pytest.raises(UsageError, match="is not a surgery plan"):
        _run([str(a), str(b), "--plan", str(a)])


@pytest.mark.parametrize("extra, pattern", [
    (["--targets", "9:0"], "^targets: selection layer 9 is out of range"),
    (["--zone", "x"], "^--zone: bad selection"),
    (["--drift-threshold", "-1"], "^--drift-threshold must be"),
    (["--table-rows", "-1"], "^--table-rows must be"),
    (["--backend", "cudnn"], "^unknown backend"),
])
def test_run_compare_bad_options(tmp_path, extra, pattern):
    a = tmp_path / "a.json"
    _report(BEFORE).to_json(a)
    with pytest.raises(UsageError, match=pattern):
        _run([str(a), str(a), *extra])


def test_run_compare_refuses_overwriting_an_input(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _report(BEFORE).to_json(a)
    _report(AFTER).to_json(b)
    with pytest.raises(UsageError, match="^--json would overwrite input B"):
        _run([str(a), str(b), "--json", str(b), "--overwrite"])
    with pytest.raises(UsageError, match="name the same file"):
        _run([str(a), str(b), "--json", str(tmp_path / "x"), "--heatmap", str(tmp_path / "x")])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from alibi_surgery.io.random_model import write_random_bloom

    return write_random_bloom(tmp_path_factory.mktemp("cmp") / "tiny", "tiny")


def test_run_compare_model_with_itself(tiny_dir, tmp_path, capsys):
    out = tmp_path / "self.json"
    _run([str(tiny_dir), str(tiny_dir), "--backend", "torch", "--quiet", "--json", str(out), "--zone", "*:2-3",
          "--table"])
    text = capsys.readouterr().out
    assert "all         0/8    drifting  mean |delta| 0.0000" in text
    c = Comparison.from_json(out)
    assert c.n_layer == 2 and c.n_head == 4
    assert torch.count_nonzero(c.delta).item() == 0  # the torch backend is deterministic: exactly zero
    assert torch.equal(c.before.entropy, c.after.entropy)
    assert c.before.metadata["backend"] == "torch" and c.before.metadata["n_prompts"] >= 12
    assert c.zone == {0: [2, 3], 1: [2, 3]} and c.drift("in-band")["n"] == 4
    # a model directory against its own diagnosis JSON: mixed inputs, thresholds taken from the report
    report_json = tmp_path / "after.json"
    c.after.to_json(report_json)
    mixed = compare(str(report_json), tiny_dir, backend="torch")
    assert torch.count_nonzero(mixed.delta).item() == 0


def test_model_input_checked_before_diagnosing(tiny_dir, tmp_path, monkeypatch):
    def no_diagnosis(*args, **kwargs):
        raise AssertionError("diagnosed although the input was bad")

    monkeypatch.setattr(compare_mod, "_diagnose_source", no_diagnosis)
    measured = tmp_path / "efq.json"
    _report([[0.5] * 4, [0.5] * 4], metric={"exclude_first_query": True}).to_json(measured)
    with pytest.raises(UsageError, match="^B was measured with exclude_first_query=True.*pass --exclude-first-query"):
        compare(tiny_dir, measured)
    with pytest.raises(UsageError, match="^A and B have different shapes: A is 2 layers x 4 heads, B is 4 layers"):
        compare(tiny_dir, _report(BEFORE))
    with pytest.raises(UsageError, match="^targets: selection layer 2 is out of range"):
        compare(tiny_dir, tiny_dir, targets={2: [0]})
    with pytest.raises(UsageError, match="prompt 0 is empty"):
        compare(tiny_dir, tiny_dir, prompts=["  "])
    with pytest.raises(UsageError, match="^B was classified with thresholds dead 0.95"):
        compare(tiny_dir, _report([[0.5] * 4, [0.5] * 4]), thresholds=Thresholds(dead=0.9))


# ---- prompt sets: diagnoses of a real (tiny) model, the command in a subprocess ------------------------------------


def _cli(*args, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "alibi_surgery.cli", "compare", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def measured(tiny_dir, tmp_path_factory):
    """Diagnoses of the tiny model: ``a`` on two prompts, ``b`` on the same words in reverse order (the byte
    tokenizer gives them exactly the same token counts), ``a16`` on ``a``'s prompts cut to 16 tokens."""
    from alibi_surgery.cli import main

    root = tmp_path_factory.mktemp("measured")
    same = ["alpha beta gamma delta epsilon", "one two three four five six seven"]
    (root / "same.txt").write_text("\n".join(same) + "\n")
    (root / "other.txt").write_text("\n".join(" ".join(reversed(p.split())) for p in same) + "\n")
    for name, extra in (("a", ["same.txt"]), ("b", ["other.txt"]), ("a16", ["same.txt", "--max-length", "16"])):
        assert main(["diagnose", str(tiny_dir), "--json", str(root / f"{name}.json"), "--backend", "torch", "--quiet",
                     "--prompts-file", str(root / extra[0]), *extra[1:]]) == 0
    return root


def test_different_prompt_sets_with_equal_token_counts(measured, tmp_path):
    a, b = (json.loads((measured / f"{n}.json").read_text())["metadata"] for n in "ab")
    assert a["prompt_tokens"] == b["prompt_tokens"] == [30, 33]  # only the token ids tell the sets apart
    refused = _cli(measured / "a.json", measured / "b.json", "--json", tmp_path / "c.json", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"error: A and B were measured differently: the prompt sets differ: A has 2 prompts, 63 tokens (fingerprint "
        f"{a['prompt_set_fingerprint']}), B 2 prompts, 63 tokens (fingerprint {b['prompt_set_fingerprint']}); "
        f"pass --force to compare them anyway"]
    assert not (tmp_path / "c.json").exists()
    forced = _cli(measured / "a.json", measured / "b.json", "--force", "--json", tmp_path / "c.json", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr.splitlines() == [
        f"warning: comparing anyway (--force), although A and B were measured differently: the prompt sets differ: "
        f"A has 2 prompts, 63 tokens (fingerprint {a['prompt_set_fingerprint']}), B 2 prompts, 63 tokens "
        f"(fingerprint {b['prompt_set_fingerprint']})"]
    assert json.loads((tmp_path / "c.json").read_text())["notes"][0].startswith("the prompt sets differ")


def test_max_length_and_same_prompts(measured, tiny_dir, capsys):
    with pytest.raises(UsageError, match=r"^A and B were measured differently: max_length differs: None A, 16 B; "):
        _run([str(measured / "a.json"), str(measured / "a16.json")])
    # the model diagnosed here with the same prompts: the same fingerprint (max_length taken from the report)
    for name in ("a", "a16"):
        _run([str(measured / f"{name}.json"), str(tiny_dir), "--prompts-file", str(measured / "same.txt"),
              "--backend", "torch", "--quiet"])
        out, err = capsys.readouterr()
        assert err == "" and "all         0/8    drifting  mean |delta| 0.0000" in out


def test_reports_of_two_model_families_are_refused_unless_forced():
    """Issue 31: compare of a BLOOM and an MPT diagnosis went through as if before/after of one model."""
    from alibi_surgery.diagnosis.report import check_same_measurement

    bos = torch.full((2, 4), 0.1)
    a, b = _report(bos, family="bloom", prompt_set_fingerprint="x"), _report(bos, family="mpt",
                                                                               prompt_set_fingerprint="x")
    assert measurement_differences(a, b) == ["they are two model families: bloom before, mpt after"]
    with pytest.raises(UsageError, match="two model families: bloom A, mpt B; pass force=True"):
        check_same_measurement(a, b)
    with pytest.warns(UserWarning, match="two model families"):
        check_same_measurement(a, b, force=True)
    assert measurement_differences(a, _report(bos, family="bloom", prompt_set_fingerprint="x")) == []

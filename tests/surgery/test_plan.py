"""Surgery plans: head specs, the selection modes, freeze/include, zones, JSON, text, and predicted memory."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BloomForCausalLM

from alibi_surgery.errors import UsageError
from alibi_surgery.families import family_for
from alibi_surgery.io.random_model import shape_config
from alibi_surgery.surgery.memory_plan import format_memory, predict_memory
from alibi_surgery.surgery.plan import Plan, make_plan
from alibi_surgery.diagnosis.selection import format_heads, parse_heads, parse_range
from alibi_surgery.diagnosis.report import HeadReport
from helpers import bloom_config

GIB = 2**30
VALUES = {"dead": (0.99, 0.05), "bos-sink": (0.70, 0.80), "low-entropy": (0.10, 0.20), "healthy": (0.10, 2.00)}

# 8 layers x 8 heads. Collapse band H4-H6 over layers 2-5, except two healthy in-band heads (L2:H5, L3:H4);
# two collapsed heads outside the band (L0:H7 bos-sink, L6:H1 dead); one low-entropy head (not sick).
N_LAYER, N_HEAD, HEAD_DIM = 8, 8, 4
HIDDEN = N_HEAD * HEAD_DIM
BAND_SICK = {(layer, h) for layer in range(2, 6) for h in range(4, 7)} - {(2, 5), (3, 4)}
OUTLIERS = {(0, 7): "bos-sink", (6, 1): "dead"}


def make_report(classes: dict, n_layer: int = N_LAYER, n_head: int = N_HEAD) -> HeadReport:
    """A HeadReport whose heads have the given classes ({(layer, head): class}); the rest are healthy."""
    bos = torch.full((n_layer, n_head), VALUES["healthy"][0])
    ent = torch.full((n_layer, n_head), VALUES["healthy"][1])
    for (layer, h), cls in classes.items():
        bos[layer, h], ent[layer, h] = VALUES[cls]
    return HeadReport(bos, ent, n_tokens=100)


def sel(pairs) -> dict:
    out: dict = {}
    for layer, h in sorted(pairs):
        out.setdefault(layer, []).append(h)
    return out


@pytest.fixture
def report():
    classes = {p: ("dead" if p[1] == 6 else "bos-sink") for p in BAND_SICK}
    classes.update(OUTLIERS)
    classes[(7, 3)] = "low-entropy"
    rep = make_report(classes)
    assert rep.band() == (4, 6)
    return rep


def plan_for(**kw) -> Plan:
    return make_plan(n_layer=N_LAYER, n_head=N_HEAD, head_dim=HEAD_DIM, hidden=HIDDEN, **kw)


def raises(fragment: str):
    return pytest.raises(UsageError, match=fragment)


# --------------------------------------------------------------------------------------------- parse_range

@pytest.mark.parametrize("spec, what, expected", [
    ("9-15", "head", (9, 15)), ("9", "head", (9, 9)), (" 9 - 15 ", "head", (9, 15)), ("H9-H15", "head", (9, 15)),
    ("h9-15", "head", (9, 15)), ("L5-22", "layer", (5, 22)), ("5\u201322", "layer", (5, 22)), ("0-31", "head", (0, 31)),
])
def test_parse_range_good(spec, what, expected):
    assert parse_range(spec, 0, 31, what) == expected


@pytest.mark.parametrize("spec, what, fragment", [
    ("15-9", "head", "reversed: write 9-15"), ("9-32", "head", "head 32 is out of range 0..31"),
    ("x", "head", "bad head range"), ("", "layer", "bad layer range"), ("-3", "head", "bad head range"),
    ("L9", "head", "bad head range"), ("9-15-20", "head", "bad head range"), ("1.5", "layer", "bad layer range"),
    (7, "head", "must be text"),
])
def test_parse_range_bad(spec, what, fragment):
    with raises(fragment):
        parse_range(spec, 0, 31, what)


# --------------------------------------------------------------------------------------------- parse_heads

@pytest.mark.parametrize("spec, expected", [
    ("5:14,15;6:9-15", {5: [14, 15], 6: list(range(9, 16))}),
    (" L5 : H14, h15 ; 6 : 9 - 11 ; ", {5: [14, 15], 6: [9, 10, 11]}),
    ("5-7:1", {5: [1], 6: [1], 7: [1]}),
    ("5:3;5:1,3;5:2-3", {5: [1, 2, 3]}),                     # duplicates merge
    ("6:2;5:9-10,0", {5: [0, 9, 10], 6: [2]}),              # any order in, sorted out
    ("L0-L1:H0-H1", {0: [0, 1], 1: [0, 1]}),
    ("29:31", {29: [31]}),
])
def test_parse_heads_good(spec, expected):
    assert parse_heads(spec, 30, 32) == expected


@pytest.mark.parametrize("spec, fragment", [
    ("30:1", "layer 30 is out of range 0..29"),
    ("5:32", "head 32 is out of range 0..31"),
    ("5:15-9", "reversed"),
    ("9-5:1", "reversed"),
    ("", "empty head spec"),
    ("  ;", "empty head spec"),
    ("5:1;;6:2", "empty entry"),
    ("5", "expected LAYER:HEADS"),
    ("5:1:2", "expected LAYER:HEADS"),
    ("5:", "bad head range"),
    ("5:1,", "bad head range"),
    ("five:1", "bad layer range"),
    ("5:1 2", "bad head range"),
    ("5:-1", "bad head range"),
    ("H5:1", "bad layer range"),
])
def test_parse_heads_bad(spec, fragment):
    with raises(fragment) as info:
        parse_heads(spec, 30, 32)
    assert "\n" not in str(info.value)


def test_parse_heads_bad_input_types():
    with raises("must be text"):
        parse_heads(None, 30, 32)
    with raises("n_head must be a positive integer"):
        parse_heads("1:1", 30, 0)


def test_error_messages_are_one_line_even_for_multiline_specs():
    with pytest.raises(UsageError) as info:
        parse_heads("5:1\n6:x", 30, 32)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------- format_heads

def test_format_heads_examples():
    assert format_heads({5: [9, 10, 11, 12, 15], 6: [9]}) == "5:9-12,15;6:9"
    assert format_heads({layer: list(range(9, 16)) for layer in range(5, 23)}) == "5-22:9-15"
    assert format_heads({1: [0], 2: [0], 4: [0]}) == "1-2:0;4:0"   # a gap in the layers breaks the group
    assert format_heads({3: [2, 1, 1]}) == "3:1-2"
    assert format_heads({}) == ""


@st.composite
def selections(draw):
    n_layer = draw(st.integers(1, 40))
    n_head = draw(st.integers(1, 112))
    layers = draw(st.sets(st.integers(0, n_layer - 1), min_size=1, max_size=n_layer))
    selection = {layer: sorted(draw(st.sets(st.integers(0, n_head - 1), min_size=1, max_size=n_head)))
                 for layer in layers}
    return n_layer, n_head, dict(sorted(selection.items()))


@settings(max_examples=300, deadline=None)
@given(selections())
def test_format_then_parse_round_trips(case):
    n_layer, n_head, selection = case
    spec = format_heads(selection)
    assert parse_heads(spec, n_layer, n_head) == selection
    assert format_heads(parse_heads(spec, n_layer, n_head)) == spec   # canonical form is a fixed point


@settings(max_examples=200, deadline=None)
@given(selections(), st.randoms(use_true_random=False))
def test_any_spelling_of_a_selection_parses_to_it(case, rnd):
    """One entry per (layer, head) in random order, random L/H prefixes, spaces and duplicates: same selection."""
    n_layer, n_head, selection = case
    pairs = [(layer, h) for layer, heads in selection.items() for h in heads]
    pairs += rnd.sample(pairs, min(3, len(pairs)))
    rnd.shuffle(pairs)

    def word(prefix, n):
        return f"{rnd.choice(['', ' '])}{rnd.choice(['', prefix, prefix.lower()])}{n}{rnd.choice(['', ' '])}"

    spec = ";".join(f"{word('L', layer)}:{word('H', h)}" for layer, h in pairs) + rnd.choice(["", ";", " ; "])
    assert parse_heads(spec, n_layer, n_head) == selection


# --------------------------------------------------------------------------------------------- modes

def test_auto_takes_every_sick_head(report):
    plan = plan_for(report=report)
    assert plan.source == "auto"
    assert plan.selection == report.sick_heads() == sel(BAND_SICK | set(OUTLIERS))
    assert plan.n_heads == len(BAND_SICK) + 2
    # zone: band H4-6 over the layers holding targets (0, 2-6), plus the outlier targets
    target_layers = {0, 2, 3, 4, 5, 6}
    assert plan.zone == sel({(layer, h) for layer in target_layers for h in (4, 5, 6)} | set(OUTLIERS))
    assert plan.frozen == {} and plan.included == {}
    assert plan.zone_of(2, 5) == "in-band"          # healthy, inside the band
    assert plan.zone_of(0, 5) == "in-band"          # healthy, band column of a layer with a target
    assert plan.zone_of(6, 1) == "target"           # collapsed outlier
    assert plan.zone_of(1, 5) == "outside"          # layer 1 holds no target
    assert plan.zone_of(7, 3) == "outside"          # low-entropy is not sick


def test_auto_with_source_override_is_the_from_report_case(report, tmp_path):
    path = tmp_path / "report.json"
    report.to_json(path)
    plan = plan_for(report=HeadReport.from_json(path), source="report")
    assert plan.source == "report"
    assert plan.selection == report.sick_heads()


def test_auto_without_band_zone_is_the_targets():
    # one sick head: band is that head's index, zone = band over the target's layer = the target
    rep = make_report({(3, 2): "dead"})
    plan = plan_for(report=rep)
    assert plan.selection == plan.zone == {3: [2]}


def test_band_mode(report):
    plan = plan_for(report=report, band="4-6", layers="2-5")
    assert plan.source == "band"
    assert plan.selection == sel(BAND_SICK)
    assert plan.n_heads == 10
    assert plan.zone == {layer: [4, 5, 6] for layer in range(2, 6)}
    assert plan.in_band() == {2: [5], 3: [4]}
    assert plan.zone_of(3, 4) == "in-band"
    assert plan.zone_of(6, 1) == "outside"          # collapsed, but outside band x layers: not targeted
    assert plan.zone_of(0, 7) == "outside"


def test_band_mode_layers_default_to_all(report):
    plan = plan_for(report=report, band="H4-H6")
    assert plan.selection == sel(BAND_SICK)
    assert plan.zone == {layer: [4, 5, 6] for layer in range(N_LAYER)}
    assert plan.zone_of(7, 5) == "in-band"


def test_band_mode_heads_none_is_accepted(report):
    assert plan_for(report=report, heads=None, band="4-6").selection == sel(BAND_SICK)


def test_list_mode(report):
    plan = plan_for(heads="2:4;5:6")
    assert plan.source == "list"
    assert plan.selection == {2: [4], 5: [6]}
    assert plan.zone == {layer: [4, 5, 6] for layer in range(2, 6)}   # min..max head x min..max layer
    assert plan.zone_of(3, 5) == "in-band"
    # a report is optional in list mode, and healthy heads may be listed
    assert plan_for(heads="2:4;7:0", report=report).selection == {2: [4], 7: [0]}


def test_paper_pass_one_shape():
    """bloom-1b7: 108 heads of band H9-H15 over layers 5-22; the 18 in-band healthy heads stay frozen."""
    band = [(layer, h) for layer in range(5, 23) for h in range(9, 16)]
    sick = set(random.Random(0).sample(band, 108))
    rep = make_report({p: "dead" for p in sick}, n_layer=24, n_head=16)
    plan = make_plan(n_layer=24, n_head=16, head_dim=128, hidden=2048, report=rep, band="9-15", layers="5-22")
    assert plan.n_heads == 108
    assert sum(map(len, plan.zone.values())) == 126
    assert sum(map(len, plan.in_band().values())) == 18
    assert plan.trainable_params == 108 * 1_048_960


# --------------------------------------------------------------------------------------------- freeze / include

def test_freeze_keeps_heads_in_the_zone(report):
    plan = plan_for(report=report, band="4-6", layers="2-5", freeze="2:4;4:4-6")
    assert plan.frozen == {2: [4], 4: [4, 5, 6]}
    assert plan.selection == sel(BAND_SICK - {(2, 4), (4, 4), (4, 5), (4, 6)})
    assert plan.zone == {layer: [4, 5, 6] for layer in range(2, 6)}
    assert plan.zone_of(2, 4) == "in-band"


def test_freeze_of_an_unselected_head_is_recorded_only(report):
    plan = plan_for(report=report, band="4-6", layers="2-5", freeze="7:0")
    assert plan.selection == sel(BAND_SICK)
    assert plan.frozen == {7: [0]}
    assert plan.zone_of(7, 0) == "outside"


def test_include_adds_healthy_heads(report):
    """The H5 experiment: re-initialise the healthy heads of column H1 too."""
    plan = plan_for(report=report, band="4-6", layers="2-5", include="2-5:1;2:5")
    assert plan.included == {layer: [1] for layer in range(2, 6)} | {2: [1, 5]}
    assert plan.selection == sel(BAND_SICK | {(layer, 1) for layer in range(2, 6)} | {(2, 5)})
    assert plan.zone_of(3, 1) == "target"
    assert plan.zone_of(2, 5) == "target"
    assert plan.in_band() == {3: [4]}


def test_include_of_a_target_is_a_no_op(report):
    plan = plan_for(report=report, band="4-6", layers="2-5", include="2:4")
    assert plan.included == {}
    assert plan.selection == sel(BAND_SICK)


def test_include_only(report):
    plan = plan_for(heads=None, include="3:1;5:2")
    assert plan.source == "list"
    assert plan.selection == plan.included == {3: [1], 5: [2]}
    assert plan.zone == {layer: [1, 2] for layer in range(3, 6)}


def test_frozen_and_included_is_an_error(report):
    with raises(r"head L3:H1 is both frozen \(freeze='3:1'\) and included"):
        plan_for(report=report, band="4-6", include="3:1-2", freeze="3:1")


def test_freezing_everything_is_nothing_to_repair(report):
    with raises("nothing to repair: freeze="):
        plan_for(report=report, band="4-6", layers="2-5", freeze="2-5:4-6")


def test_an_explicit_list_overlapping_freeze_is_an_error(report):
    with raises(r"head L2:H5 is both listed in heads='.*' and frozen by freeze='.*'"):
        plan_for(heads="2:4-6", freeze="2:5;7:0")
    assert plan_for(heads="2:4-6", freeze="7:0").selection == {2: [4, 5, 6]}  # disjoint: fine


def test_freeze_and_include_specs_are_validated(report):
    with raises("layer 8 is out of range 0..7"):
        plan_for(report=report, freeze="8:1")
    with raises("head 8 is out of range 0..7"):
        plan_for(report=report, include="1:8")


# --------------------------------------------------------------------------------------------- errors

def test_nothing_to_repair(report):
    healthy = make_report({})
    with raises("nothing to repair: the report classes no head dead or bos-sink"):
        plan_for(report=healthy)
    with raises(r"nothing to repair: no dead or bos-sink head in band H0 over layers 0-7"):
        plan_for(report=report, band="0")
    with raises(r"nothing to repair: no dead or bos-sink head in band H1-2 over layer 7"):
        plan_for(report=report, band="1-2", layers="7")
    with raises("nothing to repair: no heads were selected"):
        plan_for(heads=None)


def test_allow_empty_gives_a_no_op_plan(tmp_path):
    plan = plan_for(report=make_report({}), allow_empty=True)
    assert plan.selection == plan.zone == {} and plan.n_heads == 0 and plan.trainable_params == 0
    assert plan.zone_of(3, 3) == "outside"
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert Plan.from_json(path) == plan
    assert "0 heads in 0 layers" in plan.format()
    assert "1 head in 1 layer " in plan_for(heads="2:2").format()
    mem = predict_memory(plan, dtype="bf16", seq_len=16, batch=1, vocab=100, n_params_total=1000)
    assert mem["total"] == mem["weights"] == 2000


@pytest.mark.parametrize("kw, fragment", [
    (dict(), "heads=.auto. needs a diagnosis report"),
    (dict(band="4-6"), "band='4-6' needs a diagnosis report"),
    (dict(heads="1:1", layers="2-5"), "layers='2-5' only applies with band"),
    (dict(heads="1:1", band="4-6"), "exclusive"),
    (dict(heads="1:1", source="bogus"), "plan source must be one of"),
    (dict(heads="1:1", source="report"), "source 'report' needs a report"),
    (dict(heads=""), "empty head spec"),
])
def test_usage_errors(kw, fragment):
    with raises(fragment):
        plan_for(**kw)


def test_band_range_errors(report):
    with raises("head 8 is out of range 0..7"):
        plan_for(report=report, band="4-8")
    with raises(r"head range '6-4' is reversed: write 4-6"):
        plan_for(report=report, band="6-4")
    with raises("layer 9 is out of range 0..7"):
        plan_for(report=report, band="4-6", layers="2-9")


def test_report_shape_must_match_the_model(report):
    with raises(r"the report is for 8 layers x 8 heads, but the model has 9 x 8"):
        make_plan(n_layer=9, n_head=8, head_dim=4, hidden=32, report=report)


def test_model_shape_is_checked():
    with raises("hidden size 30 is not 8 heads x head_dim 4"):
        make_plan(n_layer=8, n_head=8, head_dim=4, hidden=30, heads="1:1")
    with raises("head_dim must be a positive integer"):
        make_plan(n_layer=8, n_head=8, head_dim=0, hidden=0, heads="1:1")


# --------------------------------------------------------------------------------------------- JSON

def test_json_round_trip(report, tmp_path):
    plan = plan_for(report=report, band="4-6", layers="2-5", freeze="4:5", include="2-3:0")
    path = tmp_path / "plan.json"
    plan.to_json(path)
    data = json.loads(path.read_text())
    assert data["selection"]["2"] == [0, 4, 6]
    assert data["n_heads"] == plan.n_heads and data["trainable_params"] == plan.trainable_params
    assert parse_heads(data["spec"], N_LAYER, N_HEAD) == plan.selection
    back = Plan.from_json(path)
    assert back == plan
    assert all(isinstance(k, int) for k in back.selection)
    assert Plan.from_dict(plan.to_dict()) == plan


def test_from_dict_rejects_bad_plans(report, tmp_path):
    good = plan_for(report=report, band="4-6", freeze="4:5").to_dict()
    cases = [
        (dict(format="something-else"), "not a surgery plan"),
        (dict(version=99), "unsupported plan version"),
        (dict(selection={"2": [4], "4": [5]}), "plan selects frozen head L4:H5"),
        (dict(selection={"9": [1]}), "layer 9 is out of range"),
        (dict(selection={"x": [1]}), "is not an integer"),
        (dict(selection={"2": []}), "must list at least one head"),
        (dict(selection={"2": [8]}), "head 8 is out of range"),
        (dict(selection={"1": [1]}), "lies outside its zone"),
        (dict(included={"7": [7]}), "without selecting it"),
        (dict(source="nope"), "plan source must be one of"),
        (dict(hidden=33), "inconsistent"),
    ]
    for change, fragment in cases:
        with raises(fragment):
            Plan.from_dict({**good, **change})
    with raises("plan is missing zone"):
        Plan.from_dict({k: v for k, v in good.items() if k != "zone"})
    with raises("must be a JSON object"):
        Plan.from_dict([1])
    with raises("plan file not found"):
        Plan.from_json(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with raises("is not valid JSON"):
        Plan.from_json(bad)


# --------------------------------------------------------------------------------------------- format

def test_format(report):
    plan = plan_for(report=report, band="4-6", layers="2-5", freeze="5:4", include="3:0-1")
    text = plan.format()
    lines = text.splitlines()
    assert lines[0] == "surgery plan (band): 11 heads in 4 layers (model: 8 layers x 8 heads of 4, hidden 32)"
    assert "    L2: H4,6  (2)" in lines
    assert "    L3: H0-1,5-6  (4)" in lines
    assert "    L5: H5-6  (2)" in lines
    assert "  zone: 14 heads = 11 targets + 3 in-band frozen" in lines
    assert "  frozen (--freeze): 1 head: L5: H4" in lines
    assert "  included (--include): 2 heads: L3: H0-1" in lines
    per_head = 3 * 4 * 32 + 3 * 4 + 32 * 4
    assert plan.params_per_head == per_head
    assert f"  trainable parameters: {11 * per_head:,} ({per_head:,} per head" in text
    assert "predicted" not in text
    mem = predict_memory(plan, dtype="bfloat16", seq_len=64, batch=2, vocab=1000, n_params_total=10**6)
    with_mem = plan.format(mem)
    assert with_mem.startswith(text)
    assert format_memory(mem) in with_mem and "predicted peak memory" in with_mem
    assert str(plan) == text


# --------------------------------------------------------------------------------------------- memory

def bloom_params(n_layer: int, hidden: int, vocab: int) -> int:
    """BLOOM by hand (tied LM head): embedding and its LayerNorm, 12 h^2 + 13 h per block, the final LayerNorm."""
    return vocab * hidden + 2 * hidden + n_layer * (12 * hidden * hidden + 13 * hidden) + 2 * hidden


def test_the_family_parameter_count_is_the_one_the_planner_uses():
    config = shape_config("bloom-7b1")
    assert family_for(config).params(config) == bloom_params(30, 4096, 250880) == 7_069_016_064
    model = BloomForCausalLM(bloom_config(24, 3, n_layer=2, vocab=50))
    assert bloom_params(2, 24, 50) == sum(p.numel() for p in model.parameters())


def bloom_7b1_300_heads() -> Plan:
    selection = {layer: list(range(10)) for layer in range(30)}   # the benchmark's 300 heads, 10 per layer
    return make_plan(n_layer=30, n_head=32, head_dim=128, hidden=4096, heads=format_heads(selection))


@pytest.mark.parametrize("stochastic, measured_peak, measured_state", [(True, 19.386, 4.688), (False, 21.73, 7.033)])
def test_predict_memory_matches_the_h100_measurement(stochastic, measured_peak, measured_state):
    """bench/results/train_step.csv: bloom-7b1, bf16, seq 512, batch 1, 300 heads, on an H100."""
    plan = bloom_7b1_300_heads()
    assert plan.trainable_params == 629_260_800
    mem = predict_memory(plan, dtype="bfloat16", seq_len=512, batch=1, vocab=250880,
                         n_params_total=bloom_params(30, 4096, 250880), stochastic_rounding=stochastic)
    assert mem["weights"] / GIB == pytest.approx(13.167, abs=1e-3)
    assert mem["grads"] / GIB == pytest.approx(1.172, abs=1e-3)
    assert mem["optimizer"] / GIB == pytest.approx(measured_state, abs=1e-3)
    assert abs(mem["total"] / GIB - measured_peak) < 0.05        # the brief allows 0.2
    assert mem["chunk_tokens"] == 133


def test_predict_memory_exact_bytes():
    """4 layers x 2 heads of 8 (hidden 16), heads in layers 1 and 3, fp16, seq 10, batch 3, vocab 2**22."""
    plan = make_plan(n_layer=4, n_head=2, head_dim=8, hidden=16, heads="1:0;3:0-1")
    per_head = 3 * 8 * 16 + 3 * 8 + 16 * 8
    assert per_head == 536 and plan.trainable_params == 3 * 536
    n = 3 * 536
    mem = predict_memory(plan, dtype="float16", seq_len=10, batch=3, vocab=2**22, n_params_total=12345)
    tokens_hidden = 3 * 10 * 16 * 2                       # B*T*h*w
    chunk = 16                                            # max(16, 2**25 // 2**22 = 8), below B*T = 30
    assert mem["chunk_tokens"] == chunk
    expected = {
        "weights": 12345 * 2,
        "grads": n * 2,
        "moments": n * 8,
        "master": n * 4,
        "optimizer": n * 12,
        "activations": (3 + 1 + 16) * tokens_hidden,      # layers 1..3 recorded, final hidden, one block recomputed
        "loss_chunk": chunk * 2**22 * (4 + 2) + tokens_hidden,
    }
    for key, value in expected.items():
        assert mem[key] == value, key
    assert mem["total"] == sum(expected[k] for k in ("weights", "grads", "optimizer", "activations", "loss_chunk"))

    fp32 = predict_memory(plan, dtype=torch.float32, seq_len=10, batch=3, vocab=100, n_params_total=12345)
    assert fp32["master"] == 0 and fp32["grads"] == n * 4
    assert fp32["chunk_tokens"] == 30                    # capped at B*T tokens
    assert fp32["loss_chunk"] == 30 * 100 * 4 + 3 * 10 * 16 * 4

    sr = predict_memory(plan, dtype="bf16", seq_len=10, batch=3, vocab=2**22, n_params_total=12345,
                        stochastic_rounding=True)
    assert sr["master"] == 0 and sr["optimizer"] == n * 8 and sr["total"] == mem["total"] - n * 4


@pytest.mark.parametrize("kw, fragment", [
    (dict(dtype="int8"), "unknown dtype"),
    (dict(dtype="float32", stochastic_rounding=True), "stochastic rounding is for bfloat16"),
    (dict(dtype="bf16", seq_len=0), "seq_len must be a positive integer"),
    (dict(dtype="bf16", n_params_total=None), "n_params_total must be a positive integer"),
])
def test_predict_memory_errors(kw, fragment):
    plan = plan_for(heads="1:1")
    args = dict(seq_len=8, batch=1, vocab=100, n_params_total=1000) | kw
    with raises(fragment):
        predict_memory(plan, **args)

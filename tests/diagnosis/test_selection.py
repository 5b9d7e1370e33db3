"""The one head-selection grammar, validator and zone rule (diagnosis/selection.py), and the sizes the planner takes
from the family adapter. Expected selections are written out by hand; parameter counts come from transformers'
own models."""

from __future__ import annotations

import pytest
import torch

from alibi_surgery.analysis.compare import parse_selection_spec
from alibi_surgery.analysis.comparison import Comparison
from alibi_surgery.diagnosis.report import HeadReport
from alibi_surgery.errors import UsageError
from alibi_surgery.families import family_for
from alibi_surgery.io.random_model import shape_config
from alibi_surgery.surgery.memory_plan import plan_memory
from alibi_surgery.surgery.plan import make_plan, plan_shape
from alibi_surgery.diagnosis.selection import (HeadOutOfRange, check_head, check_selection, head_zone, parse_heads,
                                             parse_spec, zone_grid)
from alibi_surgery.surgery.slices import HeadSlices

# spelling -> selection on a model of 6 layers x 4 heads; every spelling is read the same by repair's --heads and
# compare's --targets
SPELLINGS = [
    ("1:0", {1: [0]}),
    ("1-2:1,3", {1: [1, 3], 2: [1, 3]}),
    ("L1-L2:H1, h3", {1: [1, 3], 2: [1, 3]}),
    ("1,4:2", {1: [2], 4: [2]}),                           # a layer list (once compare-only)
    ("*:3", {layer: [3] for layer in range(6)}),           # every layer (once compare-only)
    ("5:*", {5: [0, 1, 2, 3]}),
    ("0\u20131:0-1;", {0: [0, 1], 1: [0, 1]}),             # en dash, trailing ';'
    ("2:3;2:1;2:1-2", {2: [1, 2, 3]}),                     # entries add up, duplicates merge
]


@pytest.mark.parametrize("spec, expected", SPELLINGS)
def test_one_grammar_for_plan_and_compare(spec, expected):
    assert parse_heads(spec, 6, 4) == expected
    assert parse_selection_spec(spec).resolve(6, 4) == expected


@pytest.mark.parametrize("spec, plan_error, compare_error", [
    ("1:0;;2:0", "empty entry between ';'", "^--targets: bad selection"),
    ("3-1:0", "layer range '3-1' is reversed: write 1-3", "^--targets: reversed range '3-1' in '3-1:0'"),
    ("1", "expected LAYER:HEADS", "^--targets: bad selection"),
    ("H1:0", "bad layer range 'H1'", "^--targets: bad selection"),
    (" ", "empty head spec", "^--targets: empty selection"),
])
def test_one_grammar_refuses_the_same_specs(spec, plan_error, compare_error):
    with pytest.raises(UsageError, match=plan_error) as info:
        parse_heads(spec, 6, 4)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match=compare_error):
        parse_selection_spec(spec)


def test_bounds_are_checked_before_a_range_is_expanded():
    spec = parse_spec("0-999999999:0-999999999")       # expanding this would take minutes and gigabytes
    with pytest.raises(UsageError, match="^targets: selection layer 999999999 is out of range 0..5"):
        spec.resolve(6, 4, what="targets")
    with pytest.raises(UsageError, match="head 4 is out of range 0..3"):
        parse_heads("5:2-4", 6, 4)


def test_check_selection():
    assert check_selection({"3": [2, 0, 2], 1: 1, 3: (1,)}, 6, 4) == {1: (1,), 3: (0, 1, 2)}
    assert check_selection({}, 6, 4, allow_empty=True) == {}
    cases = [
        ({}, {}, "^a head selection must be a non-empty dict"),
        ([1], {"allow_empty": True}, r"^a head selection must be a dict \{layer: \[heads\]\}, got list"),
        ({6: [0]}, {"what": "zone"}, "^zone: selection layer 6 is out of range 0..5"),
        ({-1: [0]}, {}, "selection layer -1 is out of range"),
        ({"x": [0]}, {"what": "targets"}, "^targets: layer 'x' is not an integer"),
        ({True: [0]}, {}, "layer True is not an integer"),
        ({1: []}, {}, "selection layer 1 lists no heads"),
        ({1: [0, True]}, {}, "head True is out of range 0..3"),
        ({1: [9, 5]}, {}, "selection layer 1: head 5 is out of range 0..3"),   # the smallest bad head
        ({1: [[0]]}, {}, "heads must be integers"),
        ({1: [0]}, {"n_head": 0}, "n_head must be a positive integer"),
    ]
    for selection, kwargs, pattern in cases:
        shape = {"n_layer": 6, "n_head": 4} | {k: kwargs.pop(k) for k in ("n_head",) if k in kwargs}
        with pytest.raises(UsageError, match=pattern):
            check_selection(selection, shape["n_layer"], shape["n_head"], **kwargs)


def test_one_zone_rule_for_plans_and_comparisons():
    targets, zone = {1: [1, 2]}, {1: [0, 1, 2], 2: [0]}
    expected = [["outside"] * 3,
                ["in-band", "target", "target"],
                ["in-band", "outside", "outside"]]
    assert zone_grid(3, 3, targets, zone) == expected
    assert head_zone(0, 0, None, None) == "outside"
    plan = make_plan(n_layer=3, n_head=3, head_dim=2, hidden=6, heads="1:1-2", include=None)
    plan.zone = zone
    report = HeadReport(torch.zeros(3, 3), torch.ones(3, 3), n_tokens=10)
    comparison = Comparison(report, report, targets=targets, zone=zone)
    for layer in range(3):
        for h in range(3):
            assert plan.zone_of(layer, h) == comparison.zone_of(layer, h) == expected[layer][h]
    for bad in ((3, 0), (0, -1)):
        with pytest.raises(HeadOutOfRange):
            check_head(*bad, 3, 3)
        with pytest.raises(IndexError):
            comparison.zone_of(*bad)
        with pytest.raises(UsageError, match="outside the model's 3 x 3 heads"):
            plan.zone_of(*bad)


@pytest.mark.parametrize("shape, qkv_bias", [("tiny", True), ("tiny-mpt", False), ("tiny-falcon", True)])
def test_plan_sizes_come_from_the_family(shape, qkv_bias):
    config = shape_config(shape)
    family = family_for(config)
    assert plan_shape(config)["qkv_bias"] is qkv_bias
    plan = make_plan(**plan_shape(config), heads="0:1;1:0,3")
    torch.manual_seed(0)
    real = family.model_class()(config)
    slices = HeadSlices(real, plan.selection)
    assert plan.trainable_params == slices.numel              # the plan counts exactly what HeadSlices trains
    slices.remove()
    with torch.device("meta"):  # plan-memory's parameter count is transformers' own model's
        full = family.model_class()(shape_config(shape))
    prediction = plan_memory(shape, heads="2", dtype="float32", device="cpu", seq_len=8)
    assert prediction["params"] == sum(p.numel() for p in full.parameters())
    assert prediction["family"] == family.name


def test_selection_files(tmp_path):
    empty_layer, ok = tmp_path / "empty.json", tmp_path / "ok.json"
    empty_layer.write_text('{"1": []}')
    ok.write_text('{"targets": {"2": [3, 1], "0": 2}}')
    assert parse_selection_spec([str(ok), "1:0"]).resolve(6, 4) == {0: [2], 1: [0], 2: [1, 3]}
    with pytest.raises(UsageError, match="^zone: selection layer 1 lists no heads"):
        parse_selection_spec(str(empty_layer), "--zone").resolve(6, 4, what="zone")

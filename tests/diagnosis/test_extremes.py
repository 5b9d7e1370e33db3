"""Extreme-token metrics (value_ratio, output_norm, residual_peak, dormant) against an independent computation.

The reference runs the unpatched fp32 transformers model on each prompt alone (no padding) and captures, with forward
hooks on its own modules, the fused QKV projection output (the value rows of each head, from family_cases.py's
test-side layout; MPT's clip_qkv applied as MptAttention applies it), the input of the output projection and each
block's input; the formulas of docs/metrics.md are then computed in float64 here. Our side is ``diagnose`` on
left-padded batches (loaded with the torch and triton backends, streamed from safetensors shards).
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from alibi_surgery import HeadReport, diagnose
from alibi_surgery.diagnosis import extremes
from alibi_surgery.diagnosis.extremes import ExtremeSink, dormant_heads, residual_hooks
from alibi_surgery.diagnosis.report import read_report
from alibi_surgery.diagnosis.stream import diagnose_streamed
from alibi_surgery.io.random_model import byte_tokenizer
from alibi_surgery.viz.extremes import companion_path
from family_cases import CASES, HEAD_DIM, HIDDEN, N_HEAD
from helpers import BACKENDS, hooked_runs

PARAMS = [pytest.param(c, id=c.id) for c in CASES]
PROMPTS = ["the cat sat on the mat", "a", "a much longer prompt, with more words in it than the others",
           "birds sang", "xy"]  # "a" is one token: it counts for output_norm only
BLOCKS = {"bloom": "h", "mpt": "blocks", "falcon": "h"}


def build(case, n_layer=2, seed=0):
    torch.manual_seed(seed)
    config = case.make_config(n_layer)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=case.reference_attn).eval()
    with torch.no_grad():  # spread the value norms so that the ratios are far from 1
        for attn in case.attentions(model):
            getattr(attn, case.qkv).weight.mul_(torch.linspace(0.3, 3.0, getattr(attn, case.qkv).weight.shape[0])
                                                [:, None])
    return model


def _hooks(case, model, captured):
    def keep(key, tensor):
        assert key not in captured  # one call per module and prompt
        captured[key] = tensor.detach().clone()

    blocks = getattr(model.transformer, BLOCKS[case.id])
    handles = []
    for layer, (attn, block) in enumerate(zip(case.attentions(model), blocks)):
        handles.append(getattr(attn, case.qkv).register_forward_hook(
            lambda m, a, out, layer=layer: keep(("qkv", layer), out)))
        handles.append(getattr(attn, case.out).register_forward_pre_hook(
            lambda m, a, layer=layer: keep(("ctx", layer), a[0])))
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, layer=layer: keep(("res", layer), a[0] if a else kw["hidden_states"]), with_kwargs=True))
    return handles


def reference(case, model, prompts):
    """(value_ratio [L, H], output_norm [L, H], residual_peak [L]) in float64, one prompt at a time."""
    tok = byte_tokenizer()
    attns = case.attentions(model)
    n_layer = len(attns)
    clip = getattr(getattr(model.config, "attn_config", None), "clip_qkv", None) if case.id == "mpt" else None
    value_sum = torch.zeros(n_layer, N_HEAD, dtype=torch.float64)
    out_sum = torch.zeros(n_layer, N_HEAD, dtype=torch.float64)
    resid_sum = torch.zeros(n_layer, dtype=torch.float64)
    weight = rows = 0
    for n, captured in hooked_runs(model, tok, prompts, lambda captured: _hooks(case, model, captured)):
        rows += n
        weight += n if n >= 2 else 0
        for layer, attn in enumerate(attns):
            qkv = captured[("qkv", layer)][0].double()  # [T, 3 * hidden]
            if clip:
                qkv = qkv.clamp(-clip, clip)
            ctx = captured[("ctx", layer)][0].double()  # [T, hidden]: the heads' contexts, head h in cols [hd, (h+1)d)
            w_out = getattr(attn, case.out).weight.double()
            for h in range(N_HEAD):
                start, stop = case.head_rows(h, HEAD_DIM, HIDDEN)[-1]
                v = qkv[:, stop - HEAD_DIM:stop]  # the value rows are the last d of the head's (last) range
                norms = v.norm(dim=-1)
                if n >= 2:
                    value_sum[layer, h] += n * norms[0] / norms[1:].mean()
                cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                out_sum[layer, h] += (ctx[:, cols] @ w_out[:, cols].T).norm(dim=-1).sum()
            res = captured[("res", layer)][0].double().norm(dim=-1)
            if n >= 2:
                resid_sum[layer] += n * res[0] / res[1:].mean()
    return value_sum / weight, out_sum / rows, resid_sum / weight


@pytest.fixture(scope="module", params=PARAMS)
def case_model(request):
    case = request.param
    model = build(case)
    return case, model, reference(case, model, PROMPTS)


def assert_metrics(report, expected):
    value_ratio, output_norm, residual_peak = expected
    for name, got, want in (("value_ratio", report.value_ratio, value_ratio),
                            ("output_norm", report.output_norm, output_norm),
                            ("residual_peak", report.residual_peak, residual_peak)):
        assert got is not None and got.shape == want.shape, name
        err = ((got.double() - want).abs() / want.abs().clamp_min(1e-6)).max().item()
        assert err < 1e-4, f"{name}: relative error {err:.3g}\n{got}\n{want}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaded_diagnosis_equals_the_hook_reference(case_model, backend):
    case, model, expected = case_model
    assert (expected[0] - 1).abs().max() > 0.01 and expected[1].std() > 0.01 * expected[1].mean()  # not uniform
    report = diagnose(model, byte_tokenizer(), PROMPTS, backend=backend, batch_size=3)  # left-padded batches
    assert_metrics(report, expected)


def test_streamed_diagnosis_equals_the_hook_reference(case_model, tmp_path):
    case, model, expected = case_model
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    byte_tokenizer().save_pretrained(tmp_path)
    report = diagnose_streamed(tmp_path, byte_tokenizer(), PROMPTS, backend="torch", batch_size=2)
    assert_metrics(report, expected)


def test_eager_backend_gives_residual_peak_only(case_model):
    case, model, expected = case_model
    if case.id == "falcon":
        from alibi_surgery.families.falcon import takes_alibi

        if takes_alibi():
            pytest.skip("transformers <= 5.24: diagnose refuses --backend eager for Falcon")
    report = diagnose(model, byte_tokenizer(), PROMPTS, backend="eager", batch_size=3)
    assert report.value_ratio is None and report.output_norm is None and report.dormant is None
    assert ((report.residual_peak.double() - expected[2]).abs() / expected[2]).max() < 1e-4


@pytest.mark.parametrize("step", [None, 4], ids=["one-step", "steps-of-4-rows"])
def test_add_attention_with_grouped_kv_heads_equals_a_direct_computation(step, monkeypatch):
    """4 query heads on 2 key/value heads (head h reads kv head h // 2), non-contiguous values, left padding, a
    1-token prompt; the direct computation loops over prompts and heads in float64. ``steps-of-4-rows``: the output
    norms in float64 steps of 4 rows (11 valid rows: two full steps and a remainder of 3)."""
    if step:
        monkeypatch.setattr(extremes, "OUTPUT_NORM_ROWS", step)
    torch.manual_seed(0)
    batch, length, n_head, n_kv, d, hidden = 3, 6, 4, 2, 5, 7
    value = torch.randn(batch, n_kv, length, d).transpose(1, 2)  # [B, T, Hkv, d], not contiguous
    value = value * torch.linspace(0.2, 2.0, length)[None, :, None, None]
    context = torch.randn(batch, length, n_head, d)
    w_out = torch.randn(hidden, n_head * d)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :2] = False
    valid[2, :5] = False  # one valid token
    sink = ExtremeSink(1, n_head)
    sink.add_attention(0, value, valid, context, w_out, valid)
    want_v, want_o, weight, rows = torch.zeros(n_head, dtype=torch.float64), torch.zeros(n_head,
                                                                                        dtype=torch.float64), 0, 0
    for b in range(batch):
        idx = valid[b].nonzero().flatten().tolist()
        rows += len(idx)
        for h in range(n_head):
            norms = [value[b, j, h // 2].double().norm() for j in idx]
            if len(idx) >= 2:
                want_v[h] += len(idx) * norms[0] / (sum(norms[1:]) / (len(idx) - 1))
            for j in idx:
                want_o[h] += (w_out[:, h * d:(h + 1) * d].double() @ context[b, j, h].double()).norm()
        weight += len(idx) if len(idx) >= 2 else 0
    assert torch.allclose(sink.value_ratio[0].double(), want_v / weight, rtol=1e-5)
    assert torch.allclose(sink.output_norm[0].double(), want_o / rows, rtol=1e-5)
    assert sink.value_ratio[0, 0] == sink.value_ratio[0, 1] != sink.value_ratio[0, 2]  # shared kv head
    only_one = ExtremeSink(1, n_head)
    only_one.add_attention(0, value[2:], valid[2:], context[2:], w_out, valid[2:])
    assert only_one.value_ratio.isnan().all() and not only_one.output_norm.isnan().any()


def test_dormant_flag_on_a_head_whose_output_columns_are_zero():
    case = CASES[0]
    model = build(case, seed=3)
    with torch.no_grad():
        getattr(case.attentions(model)[1], case.out).weight[:, HEAD_DIM:2 * HEAD_DIM] = 0  # layer 1, head 1
    report = diagnose(model, byte_tokenizer(), PROMPTS, backend="torch")
    assert report.output_norm[1, 1] == 0
    assert report.dormant == [[False] * 3, [False, True, False]]
    assert "dormant (output norm < 0.1 x layer median): 1/6" in report.format_summary()
    assert dormant_heads(torch.tensor([[1.0, 0.2, 2.0, 3.0]]), 0.1).tolist() == [[False, False, False, False]]
    assert dormant_heads(torch.tensor([[1.0, 0.2, 2.0, 3.0]]), 0.15).tolist() == [[False, True, False, False]]


def _report():
    bos = torch.tensor([[0.99, 0.2], [0.6, 0.1]])
    return HeadReport(bos, torch.ones(2, 2), 50, metadata={"model": "toy"},
                      value_ratio=torch.tensor([[0.05, 1.2], [float("nan"), 0.9]]),
                      output_norm=torch.tensor([[1.0, 0.01], [2.0, 2.5]]),
                      residual_peak=torch.tensor([3.5, 12.0]), dormant_fraction=0.2)


def test_json_and_csv_round_trip(tmp_path):
    report = _report()
    report.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["residual_peak"] == [3.5, 12.0] and data["metric"]["dormant_fraction"] == 0.2
    head = data["heads"][1]
    assert (head["value_ratio"], head["output_norm"], head["dormant"]) == (pytest.approx(1.2), pytest.approx(0.01),
                                                                           True)
    assert data["heads"][2]["value_ratio"] is None  # NaN is written as null
    back = read_report(tmp_path / "r.json")
    assert torch.equal(back.value_ratio.nan_to_num(-1), report.value_ratio.nan_to_num(-1))
    assert torch.equal(back.output_norm, report.output_norm) and torch.equal(back.residual_peak, report.residual_peak)
    assert back.dormant_fraction == 0.2 and back.dormant == [[False, True], [False, False]]
    assert back.classes == report.classes and back.to_dict() == report.to_dict()
    report.to_csv(tmp_path / "r.csv")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert list(rows[0]) == ["layer", "head", "bos_mass", "entropy", "class", "value_ratio", "output_norm", "dormant",
                             "residual_peak"]
    assert [(r["value_ratio"], r["dormant"], r["residual_peak"]) for r in rows] == [
        ("0.050000", "false", "3.500000"), ("1.200000", "true", "3.500000"), ("", "false", "12.000000"),
        ("0.900000", "false", "12.000000")]


def test_an_old_json_without_the_fields_loads(tmp_path):
    data = _report().to_dict()
    for head in data["heads"]:
        for key in ("value_ratio", "output_norm", "dormant"):
            del head[key]
    del data["residual_peak"], data["metric"]["dormant_fraction"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = read_report(tmp_path / "old.json")
    assert old.value_ratio is None and old.output_norm is None and old.residual_peak is None and old.dormant is None
    assert torch.equal(old.bos_mass, _report().bos_mass) and "dormant" not in old.format_summary()
    old.to_csv(tmp_path / "old.csv")
    assert (tmp_path / "old.csv").read_text().splitlines()[0] == "layer,head,bos_mass,entropy,class"


def test_residual_hooks_need_the_batch_mask_and_are_removed():
    case = CASES[0]
    model = build(case)
    sink = ExtremeSink(2, N_HEAD)
    ids = torch.tensor([[5, 6, 7]])
    with residual_hooks(model, sink) as feed:
        with pytest.raises(RuntimeError, match="set feed.mask"):
            model(input_ids=ids)
        feed.mask = torch.ones(1, 3, dtype=torch.long)
        model(input_ids=ids)
    assert sink.seen_residual and not sink.seen_attention and not sink.residual_peak.isnan().any()
    before = sink.resid_sum.clone()
    model(input_ids=ids)  # the hooks are gone
    assert torch.equal(sink.resid_sum, before)


def test_the_extremes_figure_sits_beside_the_heatmap(tmp_path):
    assert companion_path(tmp_path / "h.png") == tmp_path / "h.extremes.png"
    assert companion_path(tmp_path / "h.svg") == tmp_path / "h.extremes.svg"
    assert companion_path(tmp_path / "h") == tmp_path / "h.extremes.png"

"""The benchmark tooling: providers compute the same attention, FLOP convention, CSV rows, generated tables."""

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import attention  # noqa: E402
import common  # noqa: E402
import plot  # noqa: E402


def test_eager_provider_is_bloom_attention_and_agrees_with_ours():
    """The eager provider must be BLOOM's own computation: compare it with BloomAttention.forward (q, k, v taken from
    the module's fused projection), then with our torch provider."""
    from transformers import BloomConfig
    from transformers.models.bloom.modeling_bloom import BloomAttention, build_alibi_tensor

    torch.manual_seed(0)
    cfg = BloomConfig(hidden_size=48, n_head=3, attn_implementation="eager")
    attn = BloomAttention(cfg, layer_idx=0).eval()
    b, t = 2, 7
    x = torch.randn(b, t, 48)
    mask = torch.ones(b, t, dtype=torch.long)
    causal = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None].expand(b, 1, t, t)
    with torch.no_grad():
        ref = attn(x, torch.zeros_like(x), build_alibi_tensor(mask, 3, torch.float32), causal)[0]
        q, k, v = attn._reshape(attn.query_key_value(x))  # each [B, H, T, d]
        case = attention.Case("bloom-560m", t, b, "float32", "cpu")
        inputs = attention.Inputs(case, requires_grad=False)
        inputs.q, inputs.k, inputs.v = q, k, v
        inputs.slopes = attention.alibi_slopes(3, "cpu")
        ctx = attention.make("eager", case, inputs)()  # [B, T, H, d]
        ours = attention.make("torch", case, inputs)()
    out = attn.dense(ctx.reshape(b, t, 48))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, ctx, rtol=1e-5, atol=1e-6)


def test_flop_convention():
    case = attention.Case("bloom-7b1", 2048, 4, "bfloat16")
    fwd = 4 * 4 * 32 * 2048 * 2048 * 128 / 2  # two products of 2 FLOPs per MAC, causal half
    assert case.flops(False) == fwd and case.flops(True) == 3.5 * fwd


def test_append_rows_widens_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "environment", lambda: {"commit": "abc"})
    common.append_rows("op", [{"a": 1}])
    common.append_rows("op", [{"a": 2, "b": 3}, {"a": 4}])
    rows = list(csv.DictReader(open(tmp_path / "op.csv")))
    assert [r["a"] for r in rows] == ["1", "2", "4"] and [r["b"] for r in rows] == ["", "3", ""]


def _attention_rows():
    base = dict(timestamp="2026-11-23T00:00:00+00:00", commit="c1", device="NVIDIA H100", shape="bloom-7b1",
                seq="2048", batch="4", dtype="bfloat16", mode="fwd", peak_mem_gb="0.5")
    return [dict(base, provider="triton", ms="9.0", tflops="1"),  # superseded by the later triton row
            dict(base, provider="flex", ms="2.0", tflops="150"),
            dict(base, provider="triton", ms="1.0", tflops="300", commit="c2")]


def test_tables_keep_the_latest_row_and_compute_ratios():
    table = plot.attention_table(_attention_rows())
    assert "1.000 ms" in table and "9.000 ms" not in table
    assert "2.00× flex" in table and "c1, c2" in table


def test_update_docs_rewrites_only_the_marked_span(tmp_path):
    with open(tmp_path / "attention_fwd.csv", "w", newline="") as fh:
        rows = _attention_rows()
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    doc = tmp_path / "b.md"
    doc.write_text("intro\n<!-- bench:attention_fwd -->\nold table\n<!-- /bench:attention_fwd -->\noutro\n")
    assert plot.update_docs(tmp_path, doc) == ["attention_fwd"]
    text = doc.read_text()
    assert text.startswith("intro\n<!-- bench:attention_fwd -->\n| device") and text.endswith("-->\noutro\n")
    assert "old table" not in text


@pytest.mark.parametrize("name", sorted(plot.TABLES))
def test_every_table_renders_the_committed_results(name):
    assert plot.TABLES[name](plot.HERE / "results").startswith("| device")

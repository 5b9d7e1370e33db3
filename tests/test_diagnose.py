"""diagnose(): fused statistics against the paper's eager computation, report classes, JSON/CSV."""

from __future__ import annotations

import json

import pytest
import torch

from alibi_surgery import HeadReport, Thresholds, UsageError, diagnose
from alibi_surgery.prompts import DEFAULT_PROMPTS
from alibi_surgery.random_model import byte_tokenizer
from alibi_surgery.report import classify, collapse_band
from helpers import BACKENDS

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x * 2\n", "Bonjour, ça va ?",
           "短い", "SELECT 1;", "a"]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _paper_way(model, tokenizer, prompts, **kw):
    """The paper's computation, per prompt, unbatched, on eager output_attentions: independent of our batching."""
    rows = 0
    bos = ent = 0
    for p in prompts:
        ids = torch.tensor([tokenizer(p)["input_ids"]])
        with torch.no_grad():
            att = model(ids, output_attentions=True).attentions  # n_layer x [1, H, T, T]
        a = torch.stack(att).double()[:, 0]  # [L, H, T, T]
        T = a.shape[-1]
        first = 1 if kw.get("exclude_first_query") else 0
        bos = bos + a[:, :, first:, 0].sum(-1)
        ent = ent - (a * a.clamp_min(1e-10).log()).sum(-1)[:, :, first:].sum(-1)
        rows += T - first
    return bos / rows, ent / rows, rows


@pytest.mark.parametrize("backend", BACKENDS + ["eager"])
def test_diagnose_matches_paper_computation(tiny_lm, tokenizer, backend):
    report = diagnose(tiny_lm, tokenizer, PROMPTS, batch_size=4, backend=backend)
    bos, ent, rows = _paper_way(tiny_lm, tokenizer, PROMPTS)
    assert report.bos_mass.shape == (3, 4) and report.bos_mass.dtype == torch.float32
    assert (report.bos_mass.double() - bos).abs().max() < 1e-4
    assert (report.entropy.double() - ent).abs().max() < 1e-4
    assert report.n_tokens == rows == report.metadata["rows_counted"]


def test_exclude_first_query_variant(tiny_lm, tokenizer):
    report = diagnose(tiny_lm, tokenizer, PROMPTS, exclude_first_query=True)
    bos, ent, rows = _paper_way(tiny_lm, tokenizer, PROMPTS, exclude_first_query=True)
    assert (report.bos_mass.double() - bos).abs().max() < 1e-4
    assert report.metadata["rows_counted"] == rows and report.metadata["metric"]["exclude_first_query"]


def test_normalized_entropy_agrees_between_fused_and_eager(tiny_lm, tokenizer):
    fused = diagnose(tiny_lm, tokenizer, PROMPTS, normalize_entropy=True, backend="torch")
    eager = diagnose(tiny_lm, tokenizer, PROMPTS, normalize_entropy=True, backend="eager")
    assert (fused.entropy - eager.entropy).abs().max() < 1e-4
    assert 0 < fused.entropy.max() <= 1.0 + 1e-5


def test_batching_and_truncation(tiny_lm, tokenizer):
    one = diagnose(tiny_lm, tokenizer, PROMPTS, batch_size=1)
    many = diagnose(tiny_lm, tokenizer, PROMPTS, batch_size=16)
    assert (one.bos_mass - many.bos_mass).abs().max() < 1e-5
    short = diagnose(tiny_lm, tokenizer, PROMPTS, max_length=5)
    assert short.metadata["prompt_tokens"] == [min(5, len(tokenizer(p)["input_ids"])) for p in PROMPTS]


def test_only_the_base_model_runs(tiny_lm, tokenizer):
    def forbid(*_):
        raise AssertionError("lm_head must not run during diagnosis")

    tiny_lm.lm_head.register_forward_hook(forbid)
    diagnose(tiny_lm, tokenizer, PROMPTS[:2])


@pytest.mark.parametrize("prompts,match", [([], "empty"), (["ok", "  "], "prompt 1 is empty"), ([""], "empty")])
def test_bad_prompts(tiny_lm, tokenizer, prompts, match):
    with pytest.raises(UsageError, match=match):
        diagnose(tiny_lm, tokenizer, prompts)


def test_unknown_backend(tiny_lm, tokenizer):
    with pytest.raises(UsageError, match="unknown backend"):
        diagnose(tiny_lm, tokenizer, PROMPTS, backend="cuda-magic")


def test_classes_follow_paper_thresholds():
    assert classify(0.96, 2.0) == "dead" and classify(0.95, 2.0) == "bos-sink"
    assert classify(0.51, 0.1) == "bos-sink" and classify(0.50, 0.1) == "low-entropy"
    assert classify(0.2, 0.49) == "low-entropy" and classify(0.2, 0.5) == "healthy"
    assert classify(0.7, 2.0, Thresholds(dead=0.6, sink=0.3)) == "dead"
    with pytest.raises(ValueError):
        Thresholds(dead=0.4, sink=0.5)


def _report():
    bos = torch.tensor([[0.1, 0.2, 0.97, 0.6], [0.1, 0.3, 0.8, 0.99], [0.05, 0.1, 0.2, 0.3]])
    ent = torch.tensor([[2.0, 0.3, 0.1, 1.0], [2.0, 2.0, 0.5, 0.0], [2.0, 2.0, 2.0, 2.0]])
    return HeadReport(bos, ent, 123, metadata={"model": "toy", "metric": {"exclude_first_query": False}})


def test_report_summary_band_and_json_roundtrip(tmp_path):
    report = _report()
    assert report.summary() == {"healthy": 7, "bos_sink": 2, "dead": 2, "low_entropy": 1}
    assert report.band() == (2, 3)
    assert report.sick_heads() == {0: [2, 3], 1: [2, 3]}
    report.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) >= {"model", "n_layer", "n_head", "n_tokens", "metric", "heads", "summary"}
    assert data["heads"][2] == {"layer": 0, "head": 2, "bos_mass": pytest.approx(0.97), "entropy":
                                pytest.approx(0.1), "class": "dead"}
    back = HeadReport.from_json(tmp_path / "r.json")
    assert torch.equal(back.bos_mass, report.bos_mass) and back.classes == report.classes
    report.to_csv(tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == "layer,head,bos_mass,entropy,class" and len(lines) == 13
    text = report.format_summary()
    assert "collapse band: H2-H3" in text and "L0:2 L1:2 L2:0" in text


def test_collapse_band_is_the_dense_run_of_head_indices():
    sick = [[False] * 16 for _ in range(4)]
    for layer in range(4):
        for h in range(9, 16):
            sick[layer][h] = layer > 0 or h < 12  # H9-15 collapsed in 3-4 layers each
    sick[0][1] = True  # a stray collapsed head outside the band
    assert collapse_band(sick) == (9, 15)
    sick[1][5] = sick[2][5] = True  # a second, smaller run
    assert collapse_band(sick) == (9, 15)
    assert collapse_band([[False, False]]) is None


def test_default_prompt_set_is_multidomain():
    assert len(DEFAULT_PROMPTS) >= 12 and all(p.strip() for p in DEFAULT_PROMPTS)
    joined = "".join(DEFAULT_PROMPTS)
    assert "def " in joined and "SELECT" in joined and any("\u4e00" <= c <= "\u9fff" for c in joined)

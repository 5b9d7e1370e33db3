"""diagnose(): fused statistics against the paper's eager computation, report classes, JSON/CSV."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

from alibi_surgery import HeadReport, Thresholds, UsageError, diagnose
from alibi_surgery.diagnosis.prompts import DEFAULT_PROMPTS
from alibi_surgery.io.random_model import byte_tokenizer
from alibi_surgery.diagnosis.report import classify, collapse_band
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
    with pytest.warns(UserWarning, match="prompts are short"):
        short = diagnose(tiny_lm, tokenizer, PROMPTS, max_length=5)
    assert short.metadata["prompt_tokens"] == [min(5, len(tokenizer(p)["input_ids"])) for p in PROMPTS]


def _sha16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def test_prompt_fingerprints_recorded_and_round_tripped(tiny_lm, tokenizer, tmp_path):
    """The documented format, from the tokenizer's ids: sha256 of little-endian int64 ids per prompt (16 hex digits),
    and of the sorted per-prompt ones joined by newlines for the set; prompt order changes only the list."""
    report = diagnose(tiny_lm, tokenizer, PROMPTS[:3], max_length=20)
    ids = [tokenizer(p)["input_ids"][:20] for p in PROMPTS[:3]]
    each = [_sha16(np.asarray(i, dtype="<i8").tobytes()) for i in ids]
    assert report.metadata["prompt_fingerprints"] == each
    assert report.metadata["prompt_set_fingerprint"] == _sha16("\n".join(sorted(each)).encode())
    assert report.metadata["max_length"] == 20 and report.metadata["metric"]["normalize_entropy"] is False
    shuffled = diagnose(tiny_lm, tokenizer, [PROMPTS[2], PROMPTS[0], PROMPTS[1]], max_length=20, backend="eager")
    assert shuffled.metadata["prompt_fingerprints"] == [each[2], each[0], each[1]]
    assert shuffled.metadata["prompt_set_fingerprint"] == report.metadata["prompt_set_fingerprint"]
    report.to_json(tmp_path / "r.json")
    back = HeadReport.from_json(tmp_path / "r.json").metadata
    for key in ("prompt_fingerprints", "prompt_set_fingerprint", "max_length", "uniform_bos_mass", "metric"):
        assert back[key] == report.metadata[key], key


def test_short_prompts_warn(tiny_lm, tokenizer):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "prompts are short")  # none for the built-in prompts at full length
        full = diagnose(tiny_lm, tokenizer, DEFAULT_PROMPTS)
    assert full.metadata["uniform_bos_mass"] < 0.25
    # 4 tokens each: rows see 1, 2, 3, 4 keys -> (1 + 1/2 + 1/3 + 1/4) / 4 = 25/48 = 0.5208
    long_prompts = [p for p in PROMPTS if len(tokenizer(p)["input_ids"]) >= 4]
    with pytest.warns(UserWarning) as caught:
        short = diagnose(tiny_lm, tokenizer, long_prompts, max_length=4)
    assert short.metadata["uniform_bos_mass"] == pytest.approx(25 / 48)
    assert [str(w.message) for w in caught] == [
        "prompts are short (mean 4.0 tokens): a head attending uniformly would put 0.52 of its attention on the "
        "first token, at least half the sink threshold 0.5; max_length=4 cuts them: raise it or use longer prompts"]
    # row 0 left out: (1/2 + 1/3 + 1/4) / 3 = 13/36; a sink threshold of 0.8 puts the bar at 0.4: no warning
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "prompts are short")
        efq = diagnose(tiny_lm, tokenizer, long_prompts, max_length=4, exclude_first_query=True,
                       thresholds=Thresholds(sink=0.8))
    assert efq.metadata["uniform_bos_mass"] == pytest.approx(13 / 36)
    with pytest.warns(UserWarning, match=r"^prompts are short \(mean 1.0 tokens\): with exclude_first_query no "
                                         r"query row is counted"):
        none = diagnose(tiny_lm, tokenizer, long_prompts, max_length=1, exclude_first_query=True)
    assert none.metadata["uniform_bos_mass"] is None


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

"""``--healthy ours|paper``: the two definitions of a healthy head, checked against the paper's own formula applied
to transformers' eager attention probabilities of the demo model (one text, as evaluate_epoch3.py measures)."""

from __future__ import annotations

import json

import pytest
import torch

from alibi_surgery import demo
from alibi_surgery.analysis.comparison import Comparison
from alibi_surgery.cli.main import main
from alibi_surgery.diagnosis.diagnose import diagnose
from alibi_surgery.diagnosis.report import HeadReport
from alibi_surgery.errors import UsageError

# a text of the demo's kind (bytes of English prose) inside its 128-token context, long enough that a uniform head
# is far below the sink line
TEXT = "The river carried sediment downstream, depositing layers that would eventually become stone, year by year."


def _paper_classes(model, ids) -> list[list[str]]:
    """The paper's rule, written out here: per head, bos = mean over rows of A[:, 0]; entropy = mean over rows of
    -sum A log A with A clamped at 1e-10; DEAD > 0.95, BOS-sink > 0.5, low-entropy < 0.5 nats, else healthy."""
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    out = []
    for layer in attentions:
        row = []
        for a in layer[0].double():
            bos = a[:, 0].mean().item()
            c = a.clamp(min=1e-10)
            ent = -(c * c.log()).sum(-1).mean().item()
            row.append((bos, ent, "dead" if bos > 0.95 else "bos-sink" if bos > 0.5 else
                        "low-entropy" if ent < 0.5 else "healthy"))
        out.append(row)
    return out


@pytest.fixture(scope="module")
def demo_eager():
    model, tokenizer = demo.load_model()
    model.config._attn_implementation = "eager"
    model.eval()
    return model, tokenizer


def test_paper_definition_counts_what_evaluate_epoch3_counts(demo_eager):
    model, tokenizer = demo_eager
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    reference = _paper_classes(model, ids)
    report = diagnose(model, tokenizer, [TEXT], backend="torch")
    assert report.n_tokens == ids.shape[1]
    flat = [c for row in reference for c in row]
    kinds = {cls for _, _, cls in flat}
    assert {"healthy", "low-entropy"} <= kinds and kinds & {"dead", "bos-sink"}, "the text shows too few classes"
    # a head within 1e-4 of a threshold could fall either side of it: none does on this text
    assert all(min(abs(b - 0.95), abs(b - 0.5), abs(e - 0.5)) > 1e-4 for b, e, _ in flat)
    assert report.classes == [[cls for _, _, cls in row] for row in reference]
    paper = sum(cls == "healthy" for _, _, cls in flat)
    ours = sum(cls not in ("dead", "bos-sink") for _, _, cls in flat)
    assert paper < ours  # the low-entropy heads make the difference
    assert report.n_healthy("paper") == paper and report.n_healthy("ours") == ours
    assert report.n_healthy() == ours  # ours is the default
    assert report.summary("paper")["healthy_heads"] == paper
    assert report.summary("paper")["healthy_definition"] == "paper"
    assert set(report.summary()) == {"healthy", "bos_sink", "dead", "low_entropy"}  # unchanged without a definition


def _toy() -> HeadReport:
    # classes: L0 healthy, low-entropy, bos-sink, dead; L1 healthy, healthy, low-entropy, low-entropy
    bos = torch.tensor([[0.1, 0.2, 0.6, 0.99], [0.1, 0.3, 0.2, 0.4]])
    ent = torch.tensor([[2.0, 0.3, 1.0, 0.1], [2.0, 2.0, 0.2, 0.4]])
    return HeadReport(bos, ent, 50, metadata={"model": "toy", "metric": {"exclude_first_query": False}})


def test_definitions_on_a_toy_report_and_in_json(tmp_path):
    report = _toy()
    assert report.n_healthy("ours") == 6 and report.n_healthy("paper") == 3
    report.to_json(tmp_path / "r.json", healthy="paper")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["healthy_definition"] == "paper" and data["summary"]["healthy_heads"] == 3
    assert HeadReport.from_json(tmp_path / "r.json").classes == report.classes
    text = report.format_summary("paper")
    assert "healthy heads (paper: the healthy class" in text and "3/8 = 37.5%" in text
    assert "healthy heads" not in report.format_summary()
    with pytest.raises(UsageError, match=r"^healthy='both': must be one of ours, paper$"):
        report.n_healthy("both")


def test_comparison_reports_healthy_before_and_after(tmp_path):
    before = _toy()
    after = HeadReport(torch.full((2, 4), 0.1), torch.tensor([[2.0, 0.3, 2.0, 2.0], [2.0, 2.0, 2.0, 0.1]]), 50,
                       metadata=dict(before.metadata))
    c = Comparison(before, after, healthy="paper")
    assert c.summary()["healthy"] == {"definition": "paper", "before": 3, "after": 6}
    assert "healthy heads (paper: " in c.format_summary() and ": 3 -> 6 of 8" in c.format_summary()
    ours = Comparison(before, after, healthy="ours")
    assert ours.summary()["healthy"] == {"definition": "ours", "before": 6, "after": 8}
    assert "healthy" not in Comparison(before, after).summary()  # no definition: as before
    c.to_json(tmp_path / "c.json")
    assert Comparison.from_json(tmp_path / "c.json").healthy == "paper"
    with pytest.raises(UsageError, match="healthy='x'"):
        Comparison(before, after, healthy="x")


def test_cli_diagnose_and_compare_take_healthy(tmp_path, capsys):
    model = str(demo.model_dir())
    out = tmp_path / "d.json"
    assert main(["diagnose", model, "--prompt", TEXT, "--healthy", "paper", "--json", str(out), "--quiet",
                 "--backend", "torch"]) == 0
    data = json.loads(out.read_text())
    classes = [h["class"] for h in data["heads"]]
    assert data["summary"]["healthy_definition"] == "paper"
    assert data["summary"]["healthy_heads"] == classes.count("healthy")
    assert "healthy heads (paper:" in capsys.readouterr().out
    assert main(["compare", str(out), str(out), "--healthy", "paper", "--json", str(tmp_path / "c.json")]) == 0
    text = capsys.readouterr().out
    n = classes.count("healthy")
    assert f"healthy heads (paper: " in text and f"{n} -> {n} of {len(classes)}" in text
    assert json.loads((tmp_path / "c.json").read_text())["summary"]["healthy"]["definition"] == "paper"
    assert main(["compare", str(out), str(out), "--healthy", "both"]) == 2
    err = capsys.readouterr().err
    assert "--healthy both: must be one of ours, paper" in err and len(err.strip().splitlines()) == 1

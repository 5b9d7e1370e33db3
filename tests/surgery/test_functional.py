"""Functional recovery in repair reports (surgery/functional.py; the rule in docs/metrics.md).

The point of issue 30's item 1: a re-initialised, untrained head no longer looks at the first token, so it is *not
collapsed*, but its output columns are zero, so it cannot do work. The demo-model test checks exactly that against
the weights written to OUT/final (read here, not taken from the report); the tiny-model tests check that the
report's counts follow its own rows and the rule, that resume reads the measurement before surgery back, and that
``ablation_draws=0`` turns it off.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alibi_surgery.analysis.ablation_report import does_work
from alibi_surgery.demo import corpus_spec, model_dir, write_corpus
from alibi_surgery.diagnosis.report import Thresholds
from alibi_surgery.surgery.repair import RepairSettings, repair
from test_controls import crafted_report, inputs, run, settings  # noqa: F401 (inputs is a fixture)


def _rows_agree_with_counts(functional: dict) -> None:
    sink = Thresholds().sink
    collapsed = [h for h in functional["heads"] if h["before"]["bos_mass"] > sink]
    fixed = [h for h in collapsed if h["after"]["bos_mass"] <= sink]
    alive = [h for h in fixed
             if h["after"]["mean"] is not None and (h["after"]["mean"]["interval"] or [h["after"]["mean"]["effect"]])[0]
             > h["after"]["mean"]["floor"]]
    assert functional["recovery"] == {"targets": len(functional["heads"]), "collapsed_before": len(collapsed),
                                      "not_collapsed": len(fixed), "revived": len(alive)}


@pytest.mark.slow
def test_reinit_only_on_the_demo_model_is_not_collapsed_but_not_revived(tmp_path):
    """The demo model's band H12-H15: re-initialised and never trained, every target stops being collapsed, and
    none is revived, because its output columns in OUT/final are zero (read from the file here)."""
    train, held_out = write_corpus(tmp_path / "corpus", seed=5, docs=(8, 4))
    report = repair(model_dir(), tmp_path / "out", eval_text=corpus_spec(held_out), band="12-15", device="cpu",
                    settings=RepairSettings(control="reinit-only", seq_len=128, diag_max_length=128),
                    ablation_texts=4, ablation_draws=4, ablation_bootstrap=200)
    functional = report["functional"]
    counts = functional["recovery"]
    assert report["arm"] == "reinit-only"
    assert counts["collapsed_before"] >= 8  # the band's collapsed heads (11 at 128 tokens, docs/demo-model.md)
    assert counts["not_collapsed"] > counts["collapsed_before"] / 2
    assert counts["revived"] == 0
    _rows_agree_with_counts(functional)
    final = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    d = 256 // 16
    for row in functional["heads"]:
        layer, h = row["layer"], row["head"]
        columns = final[f"transformer.h.{layer}.self_attention.dense.weight"][:, h * d:(h + 1) * d]
        assert torch.count_nonzero(columns) == 0  # it writes nothing: it cannot do work
        assert row["after"]["output_norm"] == 0 and row["after"]["mean"]["effect"] == 0
        assert row["after"]["does_work"] is False
        assert row["before"]["output_norm"] > 0  # the stock head did write something
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"revived (does work) 0/{counts['collapsed_before']}" in text


def test_treatment_report_counts_follow_its_rows_and_the_rule(tmp_path, inputs):  # noqa: F811
    report = run(inputs, tmp_path / "out", ablation_texts=2, ablation_draws=3, ablation_bootstrap=50)
    functional = report["functional"]
    assert [(h["layer"], h["head"]) for h in functional["heads"]] == [(0, 1), (1, 2), (1, 3)]
    _rows_agree_with_counts(functional)
    for row in functional["heads"]:
        assert row["after"]["output_norm"] > 0  # trained from zeroed columns: it writes again
        mean = row["after"]["mean"]
        from alibi_surgery.analysis.ablation_report import ModeEffect

        assert row["after"]["does_work"] == does_work(ModeEffect(mean["effect"], mean["floor"],
                                                                 tuple(mean["interval"]) if mean["interval"] else None))
    before = json.loads((tmp_path / "out" / "ablation_before.json").read_text())
    assert [(h["layer"], h["head"]) for h in before["heads"]] == [(0, 1), (1, 2), (1, 3)]
    assert [h["before"]["output_norm"] for h in functional["heads"]] == [h["output_norm"] for h in before["heads"]]


def test_ablation_draws_zero_skips_it_and_bad_values_are_refused(tmp_path, inputs):  # noqa: F811
    report = run(inputs, tmp_path / "out", ablation_draws=0)
    assert report["functional"]["recovery"] is None
    assert "not measured" in (tmp_path / "out" / "report.md").read_text()
    from alibi_surgery.errors import UsageError

    with pytest.raises(UsageError, match=r"^ablation_texts=0: must be a whole number >= 1$"):
        run(inputs, tmp_path / "bad", ablation_texts=0)
    assert not (tmp_path / "bad").exists()


def test_random_healthy_is_counted_on_the_heads_it_stands_in_for(tmp_path, inputs):  # noqa: F811
    report = run(inputs, tmp_path / "out", settings=settings(control="random-healthy"), ablation_texts=2,
                 ablation_draws=2, ablation_bootstrap=0)
    assert [(h["layer"], h["head"]) for h in report["functional"]["heads"]] == [(0, 1), (1, 2), (1, 3)]
    _rows_agree_with_counts(report["functional"])

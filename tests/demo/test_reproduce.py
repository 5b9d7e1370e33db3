"""The reproduction script's pieces (the full run is a 90-minute job, not a test): the runs it plans, the healthy
column it picks, the noisy corpus, and the verdict rules of the claim table on hand-made numbers."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from alibi_surgery.demo.reproduce import healthy_column, plan_jobs, write_corpora
from alibi_surgery.demo.reproduction_report import claim_table
from alibi_surgery.diagnosis.report import HeadReport, Thresholds


def _report(mass) -> HeadReport:
    mass = torch.tensor(mass, dtype=torch.float32)
    return HeadReport(mass, torch.ones_like(mass), 100, Thresholds(), {})


def test_plan_has_every_arm_of_the_five_experiments_per_seed():
    jobs = plan_jobs(3, (5, 7), 4, 4)
    assert len(jobs) == 18 and len({j.name for j in jobs}) == 18
    assert Counter(j.seed for j in jobs) == {0: 6, 1: 6, 2: 6}
    band = [j for j in jobs if j.name.startswith("band-")]
    assert all(j.passes == 2 and j.corpus == "structured" and not j.settings for j in band)
    assert dict(next(j for j in jobs if j.name == "noreinit-1").settings) == {"reinit": False}
    assert next(j for j in jobs if j.name == "extended-2").include == "0-3:4"
    assert next(j for j in jobs if j.name == "noisy-0").corpus == "noisy"
    paper, ours = (next(j for j in jobs if j.name == f"{arm}-0") for arm in ("paper", "ours"))
    assert paper.dtype == ours.dtype == "bfloat16"
    assert dict(paper.settings) == {"optimizer_precision": "bf16", "schedule": "paper"} and not ours.settings
    assert not any(j.name.startswith("extended") for j in plan_jobs(1, (5, 7), 4, None))


def test_healthy_column_is_the_band_neighbour_with_fewer_than_half_collapsed():
    # 4 layers x 8 heads, band H5-H7; H4 collapsed in 2 of 4 layers (not mostly healthy), H3 beyond reach
    mass = [[0.1] * 8 for _ in range(4)]
    for layer in range(4):
        mass[layer][5:8] = [0.9, 0.9, 0.9]
    mass[0][4] = mass[1][4] = 0.9
    report = _report(mass)
    assert report.band() == (4, 7)  # H4 has sick heads, so the band is H4-H7
    assert healthy_column(report, (4, 7)) == 3
    mass[1][4] = 0.1  # now 1 of 4: mostly healthy, and right below band H5-H7
    assert healthy_column(_report(mass), (5, 7)) == 4
    full = _report([[0.9] * 8 for _ in range(4)])
    assert healthy_column(full, (0, 7)) is None


def test_noisy_corpus_is_each_structured_document_shuffled(tmp_path):
    paths = write_corpora(tmp_path, 0, (6, 2), 40)
    structured = [json.loads(line)["text"] for line in paths["structured"].read_text().splitlines()]
    noisy = [json.loads(line)["text"] for line in paths["noisy"].read_text().splitlines()]
    assert len(structured) == len(noisy) == 6 and len(paths["eval"].read_text().splitlines()) == 2
    assert all(sorted(a) == sorted(b) for a, b in zip(structured, noisy))
    assert sum(a != b for a, b in zip(structured, noisy)) == 6
    before = paths["noisy"].read_bytes()
    write_corpora(tmp_path, 0, (6, 2), 40)  # idempotent: nothing rewritten
    assert paths["noisy"].read_bytes() == before


def _results(**means) -> dict:
    summary = {k: {"mean": v, "min": v, "max": v, "n": 3} for k, v in means.items()}
    return {"n_layer": 4, "n_head": 16, "column": 4, "summary": summary}


GOOD = {"exp1.noreinit": 0.0, "exp1.reinit": 1.0, "exp2.baseline": 40, "exp2.pass1": 55, "exp2.pass2": 63,
        "exp2.pass1_iatrogenic": 1, "exp3.best_eval_ratio": 0.9, "exp3.last_eval_ratio": 0.95,
        "exp3.best_step": 20, "exp3.best_train_ratio": 0.9, "exp3.control_best_eval_ratio": 1.0,
        "exp3.mass_before": 0.2, "exp3.mass_after": 0.1,
        "exp4.structured.early.outside_count": 5, "exp4.noisy.early.outside_count": 2,
        "exp4.structured.early.outside_mean_abs": 0.05, "exp4.noisy.early.outside_mean_abs": 0.02,
        "exp4.structured.late.outside_mean_abs": 0.03, "exp4.noisy.late.outside_mean_abs": 0.06,
        "exp4.structured.small_slope_change": 0.0, "exp4.noisy.small_slope_change": 0.04,
        "exp4.structured.late.in_band_mean_abs": 0.01, "exp4.noisy.late.in_band_mean_abs": 0.02,
        "exp5.paper.recovered": 0.5, "exp5.ours.recovered": 1.0, "exp5.paper.best_eval": 9.0,
        "exp5.ours.best_eval": 8.5}


@pytest.mark.parametrize("change, row, verdict", [
    ({}, None, "holds"),
    ({"exp1.noreinit": 0.2}, 0, "does not hold"),
    ({"exp2.pass2": 60}, 1, "does not hold"),  # 60 of 64 is below 95%
    ({"exp2.pass1_iatrogenic": 2}, 2, "does not hold"),  # 2 of 64 is above 2%
    ({"exp3.last_eval_ratio": 0.9}, 3, "does not hold"),  # no rise after the best: not transient
    ({"exp4.noisy.early.outside_count": 5}, 4, "does not hold"),
    ({"exp4.noisy.small_slope_change": 0.0}, 5, "does not hold"),
])
def test_verdicts_follow_their_stated_rules(change, row, verdict):
    rows = claim_table(_results(**dict(GOOD, **change)))
    assert len(rows) == 7 and rows[6][3] == "—"  # experiment 5 compares recipes; the paper has no figure for it
    verdicts = [r[3] for r in rows[:6]]
    if row is None:
        assert verdicts == ["holds"] * 6
    else:
        assert verdicts[row] == verdict and verdicts.count("holds") == 5


def test_rewriting_the_page_keeps_the_notes_below_the_marker(tmp_path, monkeypatch):
    from alibi_surgery.demo import reproduction_figures, reproduction_report

    monkeypatch.setattr(reproduction_figures, "save_figures", lambda r, d: ["repro-outcomes.png"])
    r = dict(_results(**GOOD), model="/x/model", context=128, collapsed=20, band=[9, 15], seeds=3,
             runs=["band-0"], wall_seconds=600.0, workers=2, settings={"lr": 0.001})
    out, docs = tmp_path / "out", tmp_path / "docs"
    out.mkdir()
    reproduction_report.write_report(r, out, docs_dir=docs)
    page = (docs / "reproduction.md").read_text()
    assert page.count("| holds |") == 6 and page.endswith(reproduction_report.NOTES + "\n\n")
    (docs / "reproduction.md").write_text(page + "Our reading: it mostly holds.\n")
    r["wall_seconds"] = 1200.0
    reproduction_report.write_report(r, out, docs_dir=docs)
    page = (docs / "reproduction.md").read_text()
    assert "20.0 min" in page and page.endswith(reproduction_report.NOTES + "\n\nOur reading: it mostly holds.\n")
    assert json.loads((out / "results.json").read_text())["wall_seconds"] == 1200.0

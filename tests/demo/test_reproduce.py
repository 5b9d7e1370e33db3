"""The reproduction's pieces (the full run is a multi-hour job, not a test): the jobs it plans, what each kind of
run asks repair for, the healthy column, the corpora, the pooled statistics and verdict rules on hand-made numbers
(checked against closed forms), the page; and one tiny end-to-end run on the demo model (slow)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from alibi_surgery.demo.reproduce import (FUNCTIONAL_KINDS, KINDS, Job, _repair_options, healthy_column,
                                          parse_testbeds, plan_jobs, write_corpora)
from alibi_surgery.demo.reproduce import Testbed as _Testbed
from alibi_surgery.demo.reproduction_report import both, claims, conjunction, mean_ci, pooled
from alibi_surgery.diagnosis.report import HeadReport, Thresholds
from alibi_surgery.errors import UsageError


def _report(mass) -> HeadReport:
    mass = torch.tensor(mass, dtype=torch.float32)
    return HeadReport(mass, torch.ones_like(mass), 100, Thresholds(), {})


def _bed(name="A", column=4) -> _Testbed:
    return _Testbed(name, "/m", 128, "/b.json", (5, 7), column, 4)


def test_plan_has_every_kind_per_testbed_and_seed_then_the_functional_jobs():
    runs, functional = plan_jobs([_bed("A"), _bed("B", None)], 2)
    assert len({j.name for j in runs}) == len(runs) == 2 * (9 + 8)  # B has no healthy column: no extended run
    assert Counter(j.kind for j in runs if j.testbed == "A") == {k: 2 for k in KINDS}
    assert not any(j.kind == "extended" for j in runs if j.testbed == "B")
    assert [j.seed for j in runs[:17]] == [0] * 17  # seed by seed: a stopped run has whole seeds
    assert functional[:2] == [Job("A", "functional"), Job("B", "functional")]  # the stock models
    assert Counter(j.arm for j in functional[2:]) == {k: 4 for k in FUNCTIONAL_KINDS}
    assert Job("A", "functional", 1, "ablate").name == "A-ablate-1" and Job("B", "functional").name == "B-stock"


@pytest.mark.parametrize("kind, expect", [
    ("treatment", {"passes": 2}),
    ("gradient-only", {"settings": {"reinit": False}}),
    ("reinit-only", {"settings": {"control": "reinit-only"}}),
    ("random-healthy", {"settings": {"control": "random-healthy"}}),
    ("ablate", {"settings": {"control": "ablate"}}),
    ("extended", {"include": "0-3:4"}),
    ("noisy", {"corpus": "noisy"}),
    ("paper", {"dtype": "bfloat16", "settings": {"optimizer_precision": "bf16", "schedule": "paper"}}),
    ("ours", {"dtype": "bfloat16"}),
])
def test_each_kind_asks_repair_for_its_arm_and_nothing_else(kind, expect):
    base = {"passes": 1, "corpus": "structured", "include": None, "dtype": None, "settings": {}}
    assert _repair_options(Job("A", kind, 0), _bed()) == dict(base, **expect)


def test_testbed_specs_are_checked(tmp_path):
    assert parse_testbeds([f"B={tmp_path}"]) == [("B", str(tmp_path))]
    for bad in ([f"{tmp_path}"], ["B=/no/such/dir"], [f"A={tmp_path}", f"A={tmp_path}"], [f"a-b={tmp_path}"]):
        with pytest.raises(UsageError, match="--testbed"):
            parse_testbeds(bad)


def test_healthy_column_is_the_band_neighbour_with_fewer_than_half_collapsed():
    mass = [[0.1] * 8 for _ in range(4)]
    for layer in range(4):
        mass[layer][5:8] = [0.9, 0.9, 0.9]
    mass[0][4] = mass[1][4] = 0.9
    report = _report(mass)
    assert report.band() == (4, 7)
    assert healthy_column(report, (4, 7)) == 3
    mass[1][4] = 0.1
    assert healthy_column(_report(mass), (5, 7)) == 4
    assert healthy_column(_report([[0.9] * 8 for _ in range(4)]), (0, 7)) is None


def test_corpora_one_held_out_set_and_per_seed_noisy_twins(tmp_path):
    paths = write_corpora(tmp_path, 2, (6, 3), 40)
    assert len(paths["eval"].read_text().splitlines()) == 3
    texts = [[json.loads(x)["text"] for x in paths[s]["structured"].read_text().splitlines()] for s in (0, 1)]
    assert texts[0] != texts[1] and all(len(t) == 6 and all(len(d) == 39 for d in t) for t in texts)
    noisy = [json.loads(x)["text"] for x in paths[0]["noisy"].read_text().splitlines()]
    assert all(sorted(a) == sorted(b) and a != b for a, b in zip(texts[0], noisy))
    before = paths[0]["noisy"].read_bytes()
    write_corpora(tmp_path, 2, (6, 3), 40)  # idempotent
    assert paths[0]["noisy"].read_bytes() == before


def test_pooled_proportion_against_closed_forms():
    p = pooled([0] * 10, [11] * 10, line=0.10, side="below")
    assert (p["k"], p["n"]) == (0, 110) and p["cp"][0] == 0
    assert p["cp"][1] == pytest.approx(1 - 0.025 ** (1 / 110), rel=1e-6)  # k = 0: upper = 1 - (alpha/2)^(1/n)
    assert p["boot"] == [0.0, 0.0] and p["verdict"] == "holds"
    p = pooled([2] * 10, [11] * 10, line=0.10, side="below")  # 20/110 = 18%: both intervals above 10%
    assert p["p"] == pytest.approx(20 / 110) and p["boot"] == pytest.approx([20 / 110] * 2)
    assert p["verdict"] == "does not hold"
    p = pooled([0] * 2, [11] * 2, line=0.10, side="below")  # 0/22: CP upper 15% crosses the line
    assert p["verdict"] == "inconclusive"
    mixed = pooled([0, 11], [11, 11])  # runs disagree: the run bootstrap spans 0..1, CP does not
    assert mixed["boot"] == [0.0, 1.0] and 0.25 < mixed["cp"][0] < mixed["cp"][1] < 0.75


def test_verdict_combinators():
    assert both("holds", "holds") == "holds" and both("holds", "inconclusive") == "inconclusive"
    assert both("does not hold", "does not hold") == "does not hold"
    assert conjunction(["holds", "holds"]) == "holds"
    assert conjunction(["holds", "does not hold", "inconclusive"]) == "does not hold"
    assert conjunction(["holds", "inconclusive"]) == "inconclusive"
    m = mean_ci([0.9, 0.95, 0.92, 0.93], line=1.0, side="below")
    assert m["mean"] == pytest.approx(0.925) and m["ci"][1] < 1 and m["verdict"] == "holds"


def _unit(seed, *, revived=(11, 0, 0, 0), healthy=(22, 33, 63), noisy_late=0.08, flagged=True, ppl=None):
    ppl = ppl or {"treatment": 0.95, "gradient-only": 1.0, "reinit-only": 1.01, "random-healthy": 1.0,
                  "ablate": 1.01, "extended": 0.96, "noisy": 1.1, "paper": 0.97, "ours": 0.96}
    ev = {k: {"last": 10 * v, "best": 10 * v, "final": 10 * v, "stock": 10.0} for k, v in ppl.items()}
    fun = {arm: {"targets": 11, "collapsed_before": 11, "not_collapsed": 11, "revived": r, "does_work": r,
                 "base_loss": 2.0} for arm, r in zip(("treatment", "gradient-only", "reinit-only", "random-healthy"),
                                                     revived)}
    fun["ablate"] = dict(fun["reinit-only"], revived=0, not_collapsed=0)
    fun["stock"] = dict(fun["ablate"], does_work=1)
    cols = [{"head": h, "n_frozen": 1, "change": 0.0, "trend": "flat"} for h in range(16)]
    drift = {c: {"early": {"step": 64, "outside_count": n, "outside_mean_abs": 0.01},
                 "late": {"step": 256, "outside_count": 5, "outside_mean_abs": m},
                 "paper_columns": cols, "paper_spreading": [15] if (flagged and c == "noisy") else []}
             for c, n, m in (("structured", 3, 0.01), ("noisy", 1, noisy_late))}
    return {"testbed": "A", "seed": seed, "n_heads": 64, "targets": 11,
            "healthy": dict(zip(("baseline", "pass1", "pass2"), healthy)), "iatrogenic": 0, "eval": ev,
            "functional": fun, "drift": drift,
            "extended": {"curve": [[32, 9.4], [64, 9.6]], "band_only": [[32, 9.5], [64, 9.5]], "mass_before": 0.3,
                         "mass_after": 0.1}}


def test_claims_on_units_where_every_rule_is_met_then_broken_one_at_a_time():
    good = [_unit(s) for s in range(10)]
    c = claims(good, 15)
    assert [c[k]["verdict"] for k in ("1a", "1b", "1c", "1d", "2", "2b", "3", "4a", "4b", "5")] == ["holds"] * 10
    assert c["1b"]["p"] == 1 and c["6"]["mean"] == pytest.approx(0.97 / 0.96)
    assert c["2"]["final"]["p"] == pytest.approx(63 / 64)
    assert c["arms"]["ablate"]["not_collapsed"]["k"] == 0 and c["stock_does_work"] == {"k": 10, "n": 110}
    broken = {
        "1a": [_unit(s, revived=(11, 3, 0, 0)) for s in range(10)],
        "1b": [_unit(s, revived=(5, 0, 0, 0)) for s in range(10)],
        "2": [_unit(s, healthy=(22, 33, 43)) for s in range(10)],  # low-entropy heads never heal: 43 of 64
        "4b": [_unit(s, flagged=False) for s in range(10)],
        "5": [_unit(s, ppl={**{k: 1.0 for k in ("gradient-only", "random-healthy", "extended", "noisy", "paper",
                                                "ours")}, "treatment": 1.005, "reinit-only": 1.0, "ablate": 1.0})
              for s in range(10)],
    }
    for key, units in broken.items():
        result = claims(units, 15)
        assert result[key]["verdict"] == "does not hold", key


def test_page_keeps_the_notes_and_gives_every_claim(tmp_path, monkeypatch):
    from alibi_surgery.demo import reproduction_figures, reproduction_report

    monkeypatch.setattr(reproduction_figures, "save_figures", lambda r, d: ["repro-arms.png"])
    units = [_unit(s) for s in range(4)]
    r = {"units": units, "seeds": 2, "claims": claims(units, 15), "held_out": {"special": 0, "targets": 100},
         "seconds": {"A-treatment-0": 10}, "wall_seconds": 600.0, "workers": 2,
         "settings": {"docs": [512, 64], "batch_size": 8, "lr": 1e-3, "epochs": 4, "save_every_steps": 32},
         "ablation": {"draws": 10, "texts": 32, "bootstrap": 1000},
         "testbeds": [{"name": "A", "model": "/x/alibi_surgery/demo/model", "band": [12, 15], "column": 11}]}
    out, docs = tmp_path / "out", tmp_path / "docs"
    out.mkdir()
    reproduction_report.write_report(r, out, docs_dir=docs)
    page = (docs / "reproduction.md").read_text()
    assert page.count("| holds |") == 10 and page.endswith(reproduction_report.NOTES + "\n\n")
    assert "0/44 = 0% (CP 0%–8.0%" in page  # 1a: 0 of 4 x 11; CP upper 1 - 0.025^(1/44) = 8.04%
    (docs / "reproduction.md").write_text(page + "Our reading.\n")
    r["wall_seconds"] = 1200.0
    reproduction_report.write_report(r, out, docs_dir=docs)
    page = (docs / "reproduction.md").read_text()
    assert "20 min" in page and page.endswith(reproduction_report.NOTES + "\n\nOur reading.\n")
    assert json.loads((out / "results.json").read_text())["wall_seconds"] == 1200.0


@pytest.mark.slow
def test_tiny_reproduction_end_to_end_on_the_demo_model(tmp_path):
    """One seed on testbed A, one optimizer step per run: every run and measurement lands, the numbers are read
    back from the right places (stock perplexity against a plain cross-entropy; the controls' known outcomes)."""
    from transformers import AutoModelForCausalLM

    from alibi_surgery.demo import corpus_spec, model_dir
    from alibi_surgery.demo.reproduce import reproduce
    from alibi_surgery.io.corpus import load_corpus
    from alibi_surgery.io.loading import load_tokenizer

    out = tmp_path / "repro"
    kinds = tuple(k for k in KINDS if k not in ("paper", "ours"))  # bf16 on a CPU: minutes (the run skips them too)
    r = reproduce(out, seeds=1, workers=1, docs=(8, 4), epochs=1, save_every=1, batch_size=8, kinds=kinds,
                  ablation={"draws": 2, "texts": 2, "bootstrap": 20}, progress=False, log=lambda *a: None)
    (u,) = r["units"]
    assert u["targets"] == 11 and u["n_heads"] == 64  # the shipped model's collapsed band heads at 128 tokens
    assert set(u["eval"]) == set(kinds)
    functional = {"functional/A-stock"} | {f"functional/A-{k}-0" for k in ("treatment", "gradient-only",
                                                                           "reinit-only", "random-healthy", "ablate")}
    assert set(r["seconds"]) == {f"A-{k}-0" for k in kinds} | functional  # every job once: runs and measurements
    chunks = load_corpus(corpus_spec(out / "corpus" / "held-out" / "eval.jsonl"), load_tokenizer(str(model_dir())),
                         128)[0]
    net = AutoModelForCausalLM.from_pretrained(str(model_dir()), attn_implementation="eager").eval()
    with torch.no_grad():
        logits = net(chunks).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunks[:, 1:].reshape(-1))
    assert u["eval"]["treatment"]["stock"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    fun = u["functional"]
    assert fun["reinit-only"]["not_collapsed"] == 11 and fun["reinit-only"]["revived"] == 0  # zeroed columns
    assert fun["ablate"]["not_collapsed"] == 0 and fun["ablate"]["revived"] == 0  # Q/K untouched: still collapsed
    assert u["eval"]["reinit-only"]["last"] == pytest.approx(u["eval"]["ablate"]["last"], rel=1e-6)  # same model
    assert r["held_out"] == {"special": 0, "targets": 4 * 127}
    page = (out / "reproduction.md").read_text()
    assert all(f"| {k}. " in page for k in ("1a", "1b", "1c", "1d", "2", "2b", "3", "4a", "4b", "5", "6"))
    assert (out / "img" / "repro-arms.png").is_file()


def test_kinds_left_out_are_not_planned_and_their_claim_reads_not_run():
    runs, functional = plan_jobs([_bed()], 1, tuple(k for k in KINDS if k not in ("paper", "ours")))
    assert {j.kind for j in runs} == set(KINDS) - {"paper", "ours"} and len(functional) == 1 + 5
    runs, functional = plan_jobs([_bed()], 1, ("treatment", "noisy"))
    assert [j.kind for j in runs] == ["treatment", "noisy"] and [j.arm for j in functional] == [None, "treatment"]
    for bad in (("treatment", "fp8"), ("noisy",)):
        with pytest.raises(UsageError, match="kinds"):
            plan_jobs([_bed()], 1, bad)
    units = [_unit(s) for s in range(3)]
    for u in units:
        del u["eval"]["paper"], u["eval"]["ours"]
    assert claims(units, 15)["6"] is None

"""``alibi-surgery paper --dry-run`` on named shapes (config only, no weights): the plan, memory and time against
closed-form BLOOM arithmetic, nothing written; and the command's one-line refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from alibi_surgery.cli.main import main
from alibi_surgery.demo.paper_estimate import DEVICES
from alibi_surgery.demo.paper_protocol import PaperOptions, paper

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "paper_repo"
SHAPES = {"bloom-1b7": (24, 2048, 16), "bloom-7b1": (30, 4096, 32)}  # layers, hidden, heads (bloom-facts.md)
VOCAB = 250880


def _block(h: int) -> int:
    """A BLOOM block's parameters: qkv 3h^2+3h, dense h^2+h, MLP 8h^2+5h, two LayerNorms 4h."""
    return 12 * h * h + 13 * h


@pytest.mark.parametrize("shape", SHAPES)
def test_dry_run_on_a_shape_matches_the_arithmetic(shape, tmp_path):
    n_layer, h, n_head = SHAPES[shape]
    d = h // n_head
    out = tmp_path / "never"
    options = PaperOptions(corpus_tokens=10_000, arms=("treatment", "gradient-only"))
    result = paper(shape, FIXTURE, out, options, dry_run=True)
    assert not out.exists()
    params = VOCAB * h + 4 * h + n_layer * _block(h)
    rows = [r for r in result["runs"] if not r["skipped"]]
    assert {(r["experiment"], r["arm"]) for r in rows} == {(e, a) for e in ("pass1", "pass2", "column")
                                                           for a in ("treatment", "gradient-only")}
    skipped = [r for r in result["runs"] if r["skipped"]]
    assert {r["experiment"] for r in skipped} == {"c4"} and all("--c4" in r["skipped"] for r in skipped)
    per_head = 3 * d * h + 3 * d + h * d  # qkv rows + their bias + output columns
    seq, tokens = 32, 10_000  # the fixture's settings: 1 epoch, batch 2 x 1, 32 tokens
    steps = math.ceil((tokens // seq) / 2)
    total = 0.0
    for row in rows:
        n = {"pass1": 8, "pass2": 2, "column": 10}[row["experiment"]]  # the fixture's maps; column: + 2 layers
        assert row["heads"] == n and row["trainable_params"] == n * per_head
        assert row["steps"] == steps
        mem = row["memory"]
        assert mem["weights"] == 2 * params  # bfloat16
        assert mem["grads"] == 2 * n * per_head and mem["moments"] == 4 * n * per_head  # bf16 moments
        # every map starts in layer 0 (pass 2: layer 1), so all (all but one) layers are recorded
        recorded = n_layer - (1 if row["experiment"] == "pass2" else 0)
        flops_token = (2 * n_layer * _block(h) + 4 * recorded * _block(h) + 4 * VOCAB * h
                       + 2 * n_layer * seq * h + 6 * recorded * seq * h + 2 * n * per_head)
        assert row["flops"] == pytest.approx((tokens // seq) * seq * flops_token, rel=1e-12)
        total += row["flops"]
    assert result["total_flops"] == pytest.approx(total, rel=1e-12)
    assert result["peak_memory"] == max(r["memory"]["total"] for r in rows)
    text = result["text"]
    for name, peak, util in DEVICES:
        assert name in text and f"utilisation {util:.0%}" in text


def test_cli_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["paper", "bloom-1b7", "--paper-repo", str(FIXTURE), "--out", str(out), "--dry-run",
                 "--arms", "treatment"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "the paper's protocol on bloom-1b7: 24 layers x 16 heads" in text
    assert "pass1      treatment" in text and "predicted time" in text and "predicted peak memory" in text


@pytest.mark.parametrize("argv, expected", [
    (["--arms", "treatment,placebo"], "error: --arms treatment,placebo: unknown 'placebo'"),
    (["--experiments", "pass3"], "error: --experiments pass3: unknown 'pass3'"),
    (["--pass1-heads", "mine"], "error: --pass1-heads mine: must be 'paper'"),
    (["--epochs", "0"], "error: --epochs 0: must be an integer >= 1"),
    ([], "error: corpus is required"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    assert main(["paper", str(tmp_path / "model"), "--paper-repo", str(FIXTURE), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected) and "\n" not in err, err
    assert not out.exists()


def test_a_map_the_shape_cannot_hold_is_refused(tmp_path, capsys):
    assert main(["paper", "tiny", "--paper-repo", str(FIXTURE), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "names layer 1 / head 15, but the model has 2 layers x 4 heads" in err and "--pass1-heads auto" in err
    assert main(["paper", "bloom-1b7", "--paper-repo", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: --paper-repo {tmp_path / 'none'}: not a directory")

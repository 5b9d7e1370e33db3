"""``diagnose --histogram`` and the diagnosis JSON's class counts at sink thresholds 0.4, 0.5 and 0.6: a hand-built
report whose counts are worked out by hand, the figure's bars against numpy's histogram, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alibi_surgery.cli.main import main
from alibi_surgery.diagnosis.report import HeadReport, Thresholds
from alibi_surgery.io.random_model import write_random_bloom
from alibi_surgery.viz.histogram import BINS, plot_histogram

PNG = b"\x89PNG\r\n\x1a\n"
# bos_mass; entropy 2.0 except the head marked (*) at 0.25.
BOS = [[0.0625, 0.34375, 0.4375, 0.5625],  # exact in float32: no value sits a rounding away from a threshold
       [0.65625, 0.96875, 0.5, 0.375]]
ENTROPY = [[2.0, 0.25, 2.0, 2.0],  # (0, 1) low-entropy unless sink
           [2.0, 2.0, 2.0, 2.0]]
# By hand. sink 0.4: sink = .4375 .5625 .65625 .5, dead .96875, low-entropy .34375, healthy .0625 .375.
#          sink 0.5: sink = .5625 .65625 (.5 is not > .5), dead 1, low-entropy 1, healthy .0625 .4375 .5 .375.
#          sink 0.6: sink = .65625, dead 1, low-entropy 1, healthy .0625 .4375 .5625 .5 .375.
EXPECTED = {"0.4": {"healthy": 2, "bos_sink": 4, "dead": 1, "low_entropy": 1},
            "0.5": {"healthy": 4, "bos_sink": 2, "dead": 1, "low_entropy": 1},
            "0.6": {"healthy": 5, "bos_sink": 1, "dead": 1, "low_entropy": 1}}


def _report(thresholds=Thresholds()):
    return HeadReport(torch.tensor(BOS), torch.tensor(ENTROPY), 40, thresholds, {"model": "hand-built"})


def test_class_counts_by_sink_threshold_in_the_json(tmp_path):
    _report().to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["class_counts_by_sink_threshold"] == EXPECTED
    assert data["summary"] == EXPECTED["0.5"]  # the report's own thresholds agree with the sweep at 0.5
    assert HeadReport.from_json(tmp_path / "r.json").summary() == EXPECTED["0.5"]  # still reads back


def test_sink_values_not_below_the_dead_threshold_are_null():
    counts = _report(Thresholds(dead=0.55, sink=0.3)).class_counts_by_sink_threshold()
    assert counts["0.6"] is None
    assert counts["0.4"] == {"healthy": 2, "bos_sink": 2, "dead": 3, "low_entropy": 1}  # .5625 .65625 .96875 dead


def test_histogram_bars_and_threshold_lines():
    fig = plot_histogram(_report())
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches if p.get_width() > 0][:BINS]
    expected, _ = np.histogram(np.array(BOS, dtype=np.float32).ravel(), bins=BINS, range=(0.0, 1.0))
    assert heights == expected.tolist()
    xs = sorted(round(line.get_xdata()[0], 6) for line in ax.lines)
    assert xs == [0.4, 0.5, 0.6, 0.95]


def test_diagnose_writes_histogram_and_counts(tmp_path, capsys):
    model = write_random_bloom(tmp_path / "m", "tiny", n_layer=2, seed=5)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["diagnose", str(model), "--json", str(out / "d.json"), "--histogram", str(out / "h.png"),
                 "--backend", "torch", "--device", "cpu", "--quiet"]) == 0
    data = json.loads((out / "d.json").read_text())
    by_hand = {}
    for sink in (0.4, 0.5, 0.6):
        c = {"healthy": 0, "bos_sink": 0, "dead": 0, "low_entropy": 0}
        for h in data["heads"]:
            key = "dead" if h["bos_mass"] > 0.95 else "bos_sink" if h["bos_mass"] > sink else \
                "low_entropy" if h["entropy"] < 0.5 else "healthy"
            c[key] += 1
        by_hand[f"{sink:g}"] = c
    assert data["class_counts_by_sink_threshold"] == by_hand
    png = (out / "h.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 2000
    assert f"wrote {out / 'h.png'}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["h.xyz"])
def test_histogram_format_checked_first(tmp_path, name):
    from alibi_surgery.cli.main import build_parser
    from alibi_surgery.cli.diagnose import run
    from alibi_surgery.errors import UsageError

    args = build_parser().parse_args(["diagnose", str(tmp_path / "no-model"), "--histogram", str(tmp_path / name)])
    with pytest.raises(UsageError, match="cannot write a figure"):
        run(args)

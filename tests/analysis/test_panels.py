"""``compare STOCK A B ... --panels``: hand-built diagnoses whose deltas are exact binary fractions; every statistic is
recomputed here with numpy from the grids, and the figure is checked for its fixed scale and its labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alibi_surgery.analysis.compare import run_compare
from alibi_surgery.analysis.panels import panels_dict
from alibi_surgery.cli.main import build_parser
from alibi_surgery.diagnosis.report import HeadReport
from alibi_surgery.errors import UsageError
from alibi_surgery.viz.panel_figures import plot_panels

pytestmark = pytest.mark.filterwarnings("ignore:.*no prompt fingerprint")

PNG = b"\x89PNG\r\n\x1a\n"
STOCK = [[0.5, 0.25, 0.75], [0.125, 0.96875, 0.0625]]
CONDITIONS = {"a": [[0.5, 0.25, 0.75], [0.125, 0.96875, 0.0625]],  # unchanged
              "b": [[0.75, 0.25, 0.125], [0.125, 0.5, 0.0625]],  # +0.25, -0.625 (clipped), -0.46875 (clipped)
              "c": [[0.5625, 0.1875, 0.75], [0.25, 0.96875, 0.0]]}  # +-0.0625, +0.125, -0.0625: none over 0.15


def _write(tmp_path):
    paths = []
    for name, grid in [("stock", STOCK), *CONDITIONS.items()]:
        bos = torch.tensor(grid, dtype=torch.float32)
        HeadReport(bos, torch.full_like(bos, 2.0), 50, metadata={"model": name}).to_json(tmp_path / f"{name}.json")
        paths.append(str(tmp_path / f"{name}.json"))
    return paths


def _run(argv):
    run_compare(build_parser().parse_args(["compare", *argv]))


def _expected(grid, t=0.15, scale=0.4):
    d = np.array(grid) - np.array(STOCK)
    sick = lambda g: int((np.array(g) > 0.5).sum())  # noqa: E731 (dead or bos-sink: bos_mass > 0.5)
    return {"mean_abs": np.abs(d).mean(), "max_abs": np.abs(d).max(), "over_annotate": int((np.abs(d) > t).sum()),
            "over_drift": int((np.abs(d) > 0.05).sum()), "clipped": int((np.abs(d) > scale).sum()),
            "collapsed_before": sick(STOCK), "collapsed_after": sick(grid), "delta": d}


def test_panels_numbers_and_figure(tmp_path, capsys):
    paths = _write(tmp_path)
    _run([*paths, "--panels", str(tmp_path / "p.png"), "--json", str(tmp_path / "p.json")])
    assert (tmp_path / "p.png").read_bytes().startswith(PNG) and (tmp_path / "p.png").stat().st_size > 2000
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["kind"] == "alibi-surgery panels" and data["scale"] == 0.4 and len(data["conditions"]) == 3
    for cond, (name, grid) in zip(data["conditions"], CONDITIONS.items()):
        exp = _expected(grid)
        assert cond["model"] == name
        np.testing.assert_array_equal(cond["delta"], exp.pop("delta"))
        for key, value in exp.items():
            assert cond["stats"][key] == pytest.approx(value, abs=1e-12), (name, key)
    assert data["conditions"][1]["stats"]["worst"] == {"layer": 0, "head": 2, "delta": -0.625}
    text = capsys.readouterr().out
    assert "3 conditions against stock" in text and "3 heads > 0.15" in text


@pytest.mark.parametrize("scale", [0.4, 0.25])
def test_panels_share_one_fixed_scale_and_label_heads_over_the_threshold(tmp_path, scale):
    from alibi_surgery.analysis.compare import compare

    paths = _write(tmp_path)
    comparisons = [compare(paths[0], p) for p in paths[1:]]
    fig = plot_panels(panels_dict(comparisons, ["a", "b", "c"], scale=scale, annotate_threshold=0.15))
    panels = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"][:3]
    for ax, grid in zip(panels, CONDITIONS.values()):
        norm = ax.images[0].norm
        assert (norm.vmin, norm.vmax) == (-scale, scale)
        labels = sorted(t.get_text() for t in ax.texts if "\n" not in t.get_text())
        d = (np.array(grid) - np.array(STOCK)).ravel()
        assert labels == sorted(f"{x:+.2f}".replace("0.", ".") for x in d if abs(x) > 0.15)
        stats = next(t.get_text() for t in ax.texts if "\n" in t.get_text())
        assert f"mean |Δ| {np.abs(d).mean():.3f}" in stats


def test_two_inputs_keep_working_and_may_add_panels(tmp_path, capsys):
    paths = _write(tmp_path)
    _run([paths[0], paths[2], "--json", str(tmp_path / "cmp.json"), "--panels", str(tmp_path / "p.png")])
    assert json.loads((tmp_path / "cmp.json").read_text())["kind"] == "alibi-surgery comparison"
    assert (tmp_path / "p.png").read_bytes().startswith(PNG)
    assert "drift (|delta| > 0.05)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, pattern", [
    (lambda p, t: [p[0], "--panels", str(t / "p.png")], "a stock model and at least one condition"),
    (lambda p, t: [p[0]], "two inputs"),
    (lambda p, t: p, "with --panels"),
    (lambda p, t: [*p, "--panels", str(t / "p.png"), "--heatmap", str(t / "h.png")], "--heatmap shows one pair"),
    (lambda p, t: [*p, "--panels", str(t / "p.png"), "--panel-scale", "0"], "scale=0.0: must be"),
    (lambda p, t: [*p, "--panels", str(t / "p.xyz")], "cannot write a figure"),
])
def test_bad_panel_options(tmp_path, extra, pattern):
    paths = _write(tmp_path)
    with pytest.raises(UsageError, match=pattern):
        _run(extra(paths, tmp_path))
    assert not any(tmp_path.glob("*.png")) and not any(tmp_path.glob("*.xyz"))

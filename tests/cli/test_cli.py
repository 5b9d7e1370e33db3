"""The ``alibi-surgery`` CLI: real runs (bad input is the matrix in test_bad_input.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alibi_surgery.cli import main
from alibi_surgery.io.random_model import write_random_bloom


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_bloom(tmp_path_factory.mktemp("m") / "tiny", "tiny", n_layer=2, vocab_size=300)


def _tree(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_diagnose_writes_json_csv_heatmap(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["diagnose", str(model_dir), "--prompt", "hello world, hello again", "--prompt", "x = 1 + 2",
               "--json", str(out / "d.json"), "--csv", str(out / "d.csv"), "--heatmap", str(out / "d.png"),
               "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "healthy" in text and "collapse band" in text and "collapsed per layer" in text
    data = json.loads((out / "d.json").read_text())
    assert data["n_layer"] == 2 and data["n_head"] == 4 and len(data["heads"]) == 8
    assert data["metadata"]["prompt_tokens"] == [24, 9] and data["n_tokens"] == 33
    assert (out / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "d.csv").read_text().splitlines()) == 9
    assert (out / "d.extremes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # value_ratio, output_norm, peaks
    assert len(data["residual_peak"]) == 2 and {"value_ratio", "output_norm", "dormant"} <= set(data["heads"][0])
    assert "dormant (output norm < 0.1 x layer median)" in text
    assert (out / "d.csv").read_text().splitlines()[0].endswith(",value_ratio,output_norm,dormant,residual_peak")


def test_default_prompts_and_prompts_file(model_dir, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\nsecond prompt\n")
    assert main(["diagnose", str(model_dir), "--prompts-file", str(f), "--json", str(tmp_path / "a.json"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["metadata"]["n_prompts"] == 2
    assert main(["diagnose", str(model_dir), "--json", str(tmp_path / "b.json"), "--quiet", "--max-length", "32"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["metadata"]["n_prompts"] >= 12


def test_console_script_exit_code_and_no_top_level_kernels(tmp_path):
    """Run the installed console script from the repository root: one-line error, exit 2, and the kernels
    directory is not importable as a top-level ``kernels`` (that name belongs to Hugging Face's kernel hub)."""
    repo = Path(__file__).resolve().parents[2]
    exe = Path(sys.executable).with_name("alibi-surgery")
    proc = subprocess.run([str(exe), "diagnose", str(tmp_path / "missing")], cwd=repo, capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model path does not exist: {tmp_path / 'missing'}"]
    probe = subprocess.run([sys.executable, "-c", "import importlib.util, alibi_surgery.kernels as k;"
                            "s = importlib.util.find_spec('kernels');"
                            "print(s.origin if s else None, k.__name__)"],
                           cwd=tmp_path, capture_output=True, text=True)
    origin, name = probe.stdout.split()
    assert name == "alibi_surgery.kernels", probe.stderr
    # a top-level kernels, if any, is Hugging Face's (transformers >= 5.25 installs it), never this project's folder
    assert origin == "None" or (repo / "kernels") not in Path(origin).parents, origin

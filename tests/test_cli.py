"""The ``alibi-surgery`` CLI: a real run, and bad input (one-line error, non-zero exit, nothing written)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alibi_surgery.cli import main
from alibi_surgery.random_model import write_random_bloom


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


def test_default_prompts_and_prompts_file(model_dir, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\nsecond prompt\n")
    assert main(["diagnose", str(model_dir), "--prompts-file", str(f), "--json", str(tmp_path / "a.json"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["metadata"]["n_prompts"] == 2
    assert main(["diagnose", str(model_dir), "--json", str(tmp_path / "b.json"), "--quiet", "--max-length", "32"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["metadata"]["n_prompts"] >= 12


def _gpt2_dir(root: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    d = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(d)
    return d


def _no_tokenizer_dir(model_dir: Path, root: Path) -> Path:
    d = root / "notok"
    d.mkdir()
    for f in model_dir.iterdir():
        if "token" not in f.name and "special" not in f.name:
            shutil.copy(f, d / f.name)
    return d


def _bad_config_dir(root: Path) -> Path:
    d = root / "badcfg"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "bloom", ')
    return d


def _pickle_dir(model_dir: Path, root: Path) -> Path:
    d = root / "pickle"
    d.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, d / f.name)
    torch.save({}, d / "pytorch_model.bin")
    return d


BAD = {
    "missing-path": (lambda m, r: ["diagnose", str(r / "nope")], "does not exist"),
    "not-bloom": (lambda m, r: ["diagnose", str(_gpt2_dir(r))], "not BLOOM"),
    "no-tokenizer": (lambda m, r: ["diagnose", str(_no_tokenizer_dir(m, r))], "tokenizer"),
    "bad-config": (lambda m, r: ["diagnose", str(_bad_config_dir(r))], "not valid JSON"),
    "pickle-only": (lambda m, r: ["diagnose", str(_pickle_dir(m, r))], "pickle"),
    "empty-prompt": (lambda m, r: ["diagnose", str(m), "--prompt", "   "], "prompt 0 is empty"),
    "empty-prompts-file": (lambda m, r: ["diagnose", str(m), "--prompts-file", str(_touch(r / "e.txt"))],
                           "prompts file is empty"),
    "bad-dtype": (lambda m, r: ["diagnose", str(m), "--dtype", "float8"], "unsupported dtype"),
    "bad-device": (lambda m, r: ["diagnose", str(m), "--device", "tpu"], "unsupported device"),
    "cuda-missing": (lambda m, r: ["diagnose", str(m), "--device", "cuda"], "CUDA is not available"),
    "out-dir-missing": (lambda m, r: ["diagnose", str(m), "--json", str(r / "no" / "x.json")], "does not exist"),
    "out-exists": (lambda m, r: ["diagnose", str(m), "--csv", str(_touch(r / "old.csv"))], "already exists"),
    "bad-backend": (lambda m, r: ["diagnose", str(m), "--backend", "cudnn"], "unknown backend"),
    "bad-thresholds": (lambda m, r: ["diagnose", str(m), "--sink-threshold", "0.99"], "thresholds"),
}


def _touch(p: Path) -> Path:
    p.write_text("")
    return p


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_error_nothing_written(case, model_dir, tmp_path, capsys):
    if case == "cuda-missing" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make_args, needle = BAD[case]
    args = make_args(model_dir, tmp_path) + ["--heatmap", str(tmp_path / "never.png"), "--quiet"]
    capsys.readouterr()  # drop what building the bad input printed
    before, model_before = _tree(tmp_path), _tree(model_dir)
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert _tree(tmp_path) == before and _tree(model_dir) == model_before


def test_console_script_exit_code_and_no_top_level_kernels(tmp_path):
    """Run the installed console script from the repository root: one-line error, exit 2, and the kernels
    directory is not importable as a top-level ``kernels`` (that name belongs to Hugging Face's kernel hub)."""
    repo = Path(__file__).resolve().parents[1]
    exe = Path(sys.executable).with_name("alibi-surgery")
    proc = subprocess.run([str(exe), "diagnose", str(tmp_path / "missing")], cwd=repo, capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model path does not exist: {tmp_path / 'missing'}"]
    probe = subprocess.run([sys.executable, "-c", "import importlib.util, alibi_surgery.kernels as k;"
                            "print(importlib.util.find_spec('kernels'), k.__name__)"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert probe.stdout.split() == ["None", "alibi_surgery.kernels"], probe.stderr

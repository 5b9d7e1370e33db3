"""repair --max-tokens and --no-eos: the run trains on the first N tokens only (fewer steps than the whole corpus
would give) and records how the corpus was read in run.json."""

from __future__ import annotations

import json

from alibi_surgery.cli import main
from alibi_surgery.io.random_model import write_random_bloom


def test_max_tokens_and_no_eos_reach_the_run_and_its_record(tmp_path):
    model = write_random_bloom(tmp_path / "model", "tiny", n_layer=2, seed=5)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(20)]  # far more than 64 tokens
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "p.json").write_text(json.dumps(["a prompt\nwith two lines", "another prompt"]))
    out = tmp_path / "out"
    assert main(["repair", str(model), "--out", str(out), "--corpus", str(tmp_path / "c.jsonl"), "--max-tokens", "64",
                 "--no-eos", "--heads", "0:1", "--device", "cpu", "--backend", "torch", "--seq-len", "16",
                 "--batch-size", "2", "--grad-accum", "1", "--epochs", "1", "--prompts-file", str(tmp_path / "p.json"),
                 "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["corpus_options"] == {"text_field": "text", "split": None, "eos": False, "max_tokens": 64}
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoints"][-1]["step"] == 64 // 16 // 2  # 4 rows of 16 tokens, 2 per step


def test_max_tokens_below_one_is_refused_before_anything_is_written(tmp_path, capsys):
    model = write_random_bloom(tmp_path / "model", "tiny", n_layer=2, seed=5)
    (tmp_path / "c.txt").write_text("some text " * 50)
    assert main(["repair", str(model), "--out", str(tmp_path / "out"), "--corpus", str(tmp_path / "c.txt"),
                 "--max-tokens", "0", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --max-tokens 0: must be a whole number of tokens >= 1", err
    assert not (tmp_path / "out").exists()

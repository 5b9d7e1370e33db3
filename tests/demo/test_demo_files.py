"""The demo's files are written atomically: an interrupted install of the demo model leaves the old model whole,
and the corpus and checksum writers leave no temporary files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alibi_surgery import demo


def test_an_interrupted_demo_install_keeps_the_old_model(tmp_path, monkeypatch):
    """install_model gathers the new model beside the old one and swaps it in: an install that fails while
    copying leaves the old model and its checksums as they were, and no partial directory."""
    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        (run / "last" / name).write_text(f"new {name}")
    (run / "last" / "config.json").write_text(json.dumps({"seq_length": 8}))
    (run / "recipe.json").write_text(json.dumps({"steps_run": 1, "seq_len": 8}))
    target = tmp_path / "model"
    demo.install_model(run, target=target)
    demo.verify_checksums(target)
    old = {p.name: p.read_bytes() for p in target.iterdir()}

    (run / "last" / "config.json").write_text(json.dumps({"seq_length": 8, "newer": True}))
    copies = []

    def failing_copy(src, dst, **kwargs):
        copies.append(Path(dst).name)
        if len(copies) == 3:
            raise KeyboardInterrupt
        return shutil.copyfile(src, dst)

    monkeypatch.setattr(shutil, "copy2", failing_copy)
    with pytest.raises(KeyboardInterrupt):
        demo.install_model(run, target=target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run"]
    monkeypatch.undo()
    demo.install_model(run, target=target)
    demo.verify_checksums(target)
    assert json.loads((target / "config.json").read_text()) == {"seq_length": 8, "newer": True}


def test_demo_corpus_and_checksums_leave_no_temporary_files(tmp_path):
    train, held_out = demo.write_corpus(tmp_path / "corpus", seq_len=16)
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["eval.jsonl", "train.jsonl"]
    assert all(json.loads(line)["text"] for line in train.read_text().splitlines())
    sums = demo.write_checksums(tmp_path / "corpus")
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["SHA256SUMS", "eval.jsonl", "train.jsonl"]
    assert len(sums.read_text().splitlines()) == 2

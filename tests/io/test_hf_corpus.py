"""Corpora from ``datasets``: save_to_disk directories, .parquet and .arrow files and cached dataset ids give the
documents a .jsonl file gives, and a repair on them is bit-identical to one on the .jsonl file."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alibi_surgery.errors import UsageError
from alibi_surgery.io.corpus import CorpusSpec, corpus_documents

datasets = pytest.importorskip("datasets")

WORDS = "the cat sat on a mat while dogs ran past the old red barn and birds sang".split()
DOCS = [" ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(5 + i % 3)) for i in range(6)]  # 9 chunks of 16


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(2))}).save_to_disk(str(root / "dict"))
    ds.to_parquet(str(root / "docs.parquet"))
    shutil.copy(glob.glob(str(root / "saved" / "*.arrow"))[0], root / "docs.arrow")
    return root


def test_every_source_gives_the_jsonl_documents(sources):
    expected, _ = corpus_documents([str(sources / "docs.jsonl")])
    assert expected == DOCS
    for name in ("saved", "dict", "docs.parquet", "docs.arrow"):
        assert corpus_documents([str(sources / name)])[0] == DOCS, name
    assert corpus_documents(CorpusSpec((str(sources / "dict"),), split="validation"))[0] == DOCS[:2]


def test_refusals(sources):
    with pytest.raises(UsageError, match=r"has no column 'body' \(columns: text, n\); choose one with text_field='NAME'"):
        corpus_documents(CorpusSpec((str(sources / "saved"),), text_field="body"))
    with pytest.raises(UsageError, match="row 0 of column 'n' is not a string"):
        corpus_documents(CorpusSpec((str(sources / "docs.parquet"),), text_field="n"))
    with pytest.raises(UsageError, match=r"has no split 'test' \(splits: train, validation\)"):
        corpus_documents(CorpusSpec((str(sources / "dict"),), split="test"))
    with pytest.raises(UsageError, match="is a single table, without splits"):
        corpus_documents(CorpusSpec((str(sources / "docs.arrow"),), split="train"))
    with pytest.raises(UsageError, match="nor is a dataset of that name in the local Hugging Face cache"):
        corpus_documents(["no-such-user/no-such-dataset"])


def test_a_cached_dataset_id_offline(sources, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    """A dataset the local cache holds (laid out as ``load_dataset`` leaves it) is read by its id, offline."""
    cache = tmp_path / "cache"
    datasets.load_dataset("parquet", data_files={"train": str(sources / "docs.parquet")}, cache_dir=str(cache))
    built = glob.glob(str(cache / "parquet" / "default-*" / "0.0.0" / "*") + os.sep)[0]
    target = cache / "someone___tiny-corpus" / "default" / "0.0.0" / os.path.basename(built.rstrip(os.sep))
    shutil.copytree(built, target)
    os.rename(target / "parquet-train.arrow", target / "tiny-corpus-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    assert corpus_documents(["someone/tiny-corpus"])[0] == DOCS
    assert corpus_documents(["someone/tiny-corpus:default"])[0] == DOCS
    assert "HF_HUB_OFFLINE" not in os.environ and not datasets.config.HF_HUB_OFFLINE  # switched back afterwards


def test_jsonl_and_saved_dataset_repair_bit_identically(sources, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the optimizer's torch path, as a CPU user runs it
    from alibi_surgery.io.random_model import write_random_bloom
    from alibi_surgery.surgery.repair import RepairSettings, repair

    model = write_random_bloom(tmp_path / "model", "tiny", n_layer=2, seed=5)
    settings = RepairSettings(seq_len=16, batch_size=3, grad_accum=1, epochs=1, diag_max_length=16, seed=3)
    (tmp_path / "head.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:2]))
    runs = {}
    for name, corpus, held_out in (("jsonl", [str(sources / "docs.jsonl")], str(tmp_path / "head.jsonl")),
                                   ("saved", CorpusSpec((str(sources / "saved"),)),
                                    CorpusSpec((str(sources / "dict"),), split="validation"))):
        runs[name] = repair(model, tmp_path / name, corpus=corpus, eval_text=held_out, device="cpu",
                            backend="torch", heads="0:1;1:2", settings=settings)
    a = load_file(tmp_path / "jsonl" / "final" / "model.safetensors")
    b = load_file(tmp_path / "saved" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [[(c["step"], c["train_ppl"], c["eval_ppl"]) for c in runs[n]["checkpoints"]] for n in runs]
    assert steps[0] == steps[1] and steps[0][-1][0] > 0

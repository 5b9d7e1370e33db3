"""Pre-training: bigram-recall data, document framing in the corpus packer, the pre-training tool."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alibi_surgery.io.corpus import load_corpus, pack_text
from alibi_surgery.errors import UsageError
from alibi_surgery.io.random_model import byte_tokenizer
from alibi_surgery.demo.recall_data import TRIGGERS, RecallData

TEXT = "the cat sat on the mat; the dog sat on the log. " * 20


def test_after_every_trigger_comes_the_first_byte_and_the_rest_follows_the_bigram_chain():
    data = RecallData(TEXT, trigger_p=0.2)
    x = data.sample_bytes(64, 50, torch.Generator().manual_seed(0))
    pairs = {(a, b) for a, b in zip(TEXT.encode(), TEXT.encode()[1:])}
    n_triggers = 0
    for row in x.tolist():
        assert row[-1] not in TRIGGERS  # a trigger is never the last byte: its recall is always in the sequence
        last = None  # the last chain byte
        for t in range(1, len(row)):
            if row[t - 1] in TRIGGERS:
                assert row[t] == row[0]
                n_triggers += 1
            elif row[t] not in TRIGGERS and last is not None:
                assert (last, row[t]) in pairs
            if row[t] not in TRIGGERS:
                last = row[t]
            if t == 1:
                last = row[0] if row[1] in TRIGGERS else row[1]
    assert n_triggers > 200


def test_samples_are_seeded_ascii_text():
    data = RecallData("héllo wörld, " * 10)
    a = data.texts(4, 30, torch.Generator().manual_seed(1))
    b = data.texts(4, 30, torch.Generator().manual_seed(1))
    assert a == b and all(len(t) == 30 and t.isascii() for t in a)
    with pytest.raises(UsageError, match="empty"):
        RecallData("ééé")
    with pytest.raises(UsageError, match="trigger probability"):
        RecallData(TEXT, trigger_p=0.7)


def test_pack_text_frames_documents_as_the_tokenizer_does():
    plain, framed = byte_tokenizer(), byte_tokenizer(add_bos=True)
    rows = pack_text(["abc", "de"], plain, 3)
    assert rows.flatten().tolist() == plain("abc")["input_ids"] + [plain.eos_token_id] + plain("de")["input_ids"]
    rows = pack_text(["abc", "de"], framed, 5)
    assert rows[0].tolist() == [framed.bos_token_id] + plain("abc")["input_ids"] + [framed.eos_token_id]


def test_jsonl_corpus_is_one_document_per_line(tmp_path):
    tok = byte_tokenizer(add_bos=True)
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ab"}) + "\n\n" + json.dumps({"text": "cd"}) + "\n")
    rows, files = load_corpus([path], tok, 4)
    ids = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id] for t in ("ab", "cd")]
    assert files == [path] and rows.tolist() == ids
    path.write_text('{"text": "ab"}\nnot json\n')
    with pytest.raises(UsageError, match="docs.jsonl:2: not a JSON line"):
        load_corpus([path], tok, 4)
    path.write_text('{"body": "ab"}\n')
    with pytest.raises(UsageError, match='docs.jsonl:1: the object has no "text" field'):
        load_corpus([path], tok, 4)


@pytest.mark.parametrize("data", ["recall", "text"])
def test_pretrain_smoke(tmp_path, data):
    """The pre-training tool runs end to end on CPU, logs per-head diagnoses, saves a loadable model and installs
    it as a checksummed demo model."""
    from transformers import AutoModelForCausalLM

    from alibi_surgery.demo import install_model, verify_checksums
    from alibi_surgery.demo.pretrain import pretrain

    corpus = tmp_path / "doc.txt"
    corpus.write_text(TEXT * 5)
    result = pretrain(tmp_path / "pt", data=data, corpus=[str(corpus)], bos=True, layers=1, hidden=32, heads=2,
                      seq_len=16, batch_size=4, steps=6, warmup=2, diagnose_every=3, threads=1, log=lambda *a: None)
    assert result["steps"] == 6
    log = [json.loads(line) for line in (tmp_path / "pt" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert [len(r["bos_mass"]) for r in log if "bos_mass" in r] == [1, 1]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pt" / "last").config.n_layer == 1
    assert (tmp_path / "pt" / "curves.png").stat().st_size > 0
    recipe = json.loads((tmp_path / "pt" / "recipe.json").read_text())
    assert recipe["steps_run"] == 6 and recipe["data"] == data
    assert json.loads((tmp_path / "pt" / "last" / "config.json").read_text())["seq_length"] == 16
    target = install_model(tmp_path / "pt", target=tmp_path / "demo_model")
    verify_checksums(target)
    assert json.loads((target / "config.json").read_text())["seq_length"] == 16


def test_short_context_warm_up_keeps_the_tokens_per_step(tmp_path, monkeypatch):
    """--short-context 8:3: the first 3 batches are 8 tokens x 8 rows, then 16 x 4, every row opening with <s>;
    --stop-after ends a schedule early, repeating the full run's steps; a run whose config lacks seq_length gets the
    recipe's at install."""
    from transformers import BloomForCausalLM

    from alibi_surgery.demo import install_model
    from alibi_surgery.demo.pretrain import pretrain
    from alibi_surgery.io.random_model import byte_tokenizer

    bos = byte_tokenizer(add_bos=True).bos_token_id
    shapes = []
    original = BloomForCausalLM.forward

    def spy(self, input_ids=None, labels=None, **kw):
        if labels is not None:  # training steps (the diagnoses pass no labels)
            shapes.append((tuple(input_ids.shape), bool((input_ids[:, 0] == bos).all())))
        return original(self, input_ids=input_ids, labels=labels, **kw)

    monkeypatch.setattr(BloomForCausalLM, "forward", spy)
    pretrain(tmp_path / "pt", layers=1, hidden=32, heads=2, seq_len=16, batch_size=4, steps=5, warmup=1,
             diagnose_every=100, threads=1, short_context=(8, 3), save_every=4, log=lambda *a: None)
    assert shapes == [((8, 8), True)] * 3 + [((4, 16), True)] * 2
    recipe = json.loads((tmp_path / "pt" / "recipe.json").read_text())
    assert recipe["short_context"] == [8, 3] and recipe["schedule_steps"] == 5 and recipe["steps_run"] == 5
    # --stop-after: the same 5-step schedule ended after 4 steps repeats the first 4 steps of the full run exactly
    full = [json.loads(line)["loss"] for line in (tmp_path / "pt" / "log.jsonl").read_text().splitlines()]
    shapes.clear()
    pretrain(tmp_path / "cut", layers=1, hidden=32, heads=2, seq_len=16, batch_size=4, steps=5, warmup=1,
             diagnose_every=100, threads=1, short_context=(8, 3), stop_after=4, log=lambda *a: None)
    cut = json.loads((tmp_path / "cut" / "recipe.json").read_text())
    assert len(shapes) == 4 and cut["steps_run"] == 4 and cut["schedule_steps"] == 5 and cut["stop_after"] == 4
    assert [json.loads(line)["loss"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()] == full[:4]
    # and it ends with the full run's step-4 checkpoint, bit for bit (the shipped model is such a checkpoint)
    saved = load_file(tmp_path / "pt" / "checkpoints" / "step-000004" / "model.safetensors")
    ended = load_file(tmp_path / "cut" / "last" / "model.safetensors")
    assert saved.keys() == ended.keys() and all(torch.equal(saved[k], ended[k]) for k in saved)
    config = tmp_path / "pt" / "last" / "config.json"
    data = json.loads(config.read_text())
    del data["seq_length"]
    config.write_text(json.dumps(data))
    target = install_model(tmp_path / "pt", target=tmp_path / "demo_model")
    assert json.loads((target / "config.json").read_text())["seq_length"] == 16


def test_a_second_stage_starts_from_the_first_stages_weights(tmp_path):
    """--init-from: a second stage at lr 0 ends with the first stage's weights exactly (it started from them, not
    from a fresh model), its config records the new context, and its recipe keeps the first stage's."""
    import torch
    from transformers import BloomForCausalLM

    from alibi_surgery.demo.pretrain import pretrain

    kw = dict(layers=1, hidden=32, heads=2, batch_size=4, warmup=1, diagnose_every=100, threads=1, log=lambda *a: None)
    pretrain(tmp_path / "one", seq_len=8, steps=4, **kw)
    pretrain(tmp_path / "two", seq_len=16, steps=2, seed=1, lr=0.0, init_from=tmp_path / "one" / "last", **kw)
    one = BloomForCausalLM.from_pretrained(tmp_path / "one" / "last")
    two = BloomForCausalLM.from_pretrained(tmp_path / "two" / "last")
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(a, b), name
    assert two.config.seq_length == 16 and one.config.seq_length == 8
    stage = json.loads((tmp_path / "two" / "recipe.json").read_text())["init_from"]
    assert stage["path"] == str(tmp_path / "one" / "last") and stage["recipe"]["seq_len"] == 8

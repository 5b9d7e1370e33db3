"""``generate``: the same inputs give the same JSONL; the sampling is transformers' own (temperature, top-k, top-p, a
seeded multinomial draw), checked against ``model.generate``; greedy decoding through the patched attention and the
KV cache equals argmax decoding by hand on the eager model without a cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from alibi_surgery.analysis.generation import GenerationSettings, filter_logits, generate_completions
from alibi_surgery.attention.patch import patch
from alibi_surgery.cli.main import main
from alibi_surgery.io.loading import load_model
from alibi_surgery.io.random_model import write_random_model

PROMPTS = ["The cat sat on the", "def f(x):\n    return"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer random BLOOM whose tied embedding is scaled up 2x: logits with one likely token and a long tail, so that temperature,
    top-k and top-p all change which tokens can be drawn."""
    from safetensors.torch import load_file, save_file

    path = write_random_model(tmp_path_factory.mktemp("gen") / "model", "tiny", n_layer=2, seed=3)
    tensors = load_file(path / "model.safetensors")
    key = next(k for k in tensors if k.endswith("word_embeddings.weight"))
    tensors[key] = tensors[key] * 2
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _seed(seed: int, index: int) -> int:  # the documented rule, written out again
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") % 2**63


def test_twice_the_same_jsonl(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    args = ["generate", str(model_dir), "--prompts-file", str(prompts), "--max-new-tokens", "6", "--backend", "torch",
            "--device", "cpu", "--quiet", "--seed", "7"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = (tmp_path / "a" / "model.jsonl").read_bytes(), (tmp_path / "b" / "model.jsonl").read_bytes()
    assert a == b
    rows = [json.loads(line) for line in a.decode().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["seed"] for r in rows] == [_seed(7, 0), _seed(7, 1)]
    assert rows[0]["settings"] == {"temperature": 0.7, "top_p": 0.92, "top_k": 50, "max_new_tokens": 6, "seed": 7,
                                   "repetition_penalty": 1.0}
    assert all(len(r["token_ids"]) == 6 or r["stop"] == "eos" for r in rows)
    md = (tmp_path / "a" / "completions.md").read_text()
    assert "## Prompt 2" in md and "**model**" in md and rows[1]["completion"] in md
    assert main([*args, "--out", str(tmp_path / "a")]) == 2  # not empty, no --overwrite
    assert main([*args, "--out", str(tmp_path / "a"), "--overwrite"]) == 0
    assert (tmp_path / "a" / "model.jsonl").read_bytes() == a


@pytest.mark.parametrize("settings", [GenerationSettings(max_new_tokens=8),
                                      GenerationSettings(temperature=1.5, top_p=0.6, top_k=0, max_new_tokens=8),
                                      GenerationSettings(temperature=0.9, top_p=1.0, top_k=5, max_new_tokens=8)],
                         ids=["paper", "top-p-only", "top-k-only"])
def test_sampling_is_transformers_own(model_dir, settings):
    """Our decoding (patched attention, our cache loop, a generator per prompt) draws the very tokens that
    transformers' ``generate`` draws on the same model with the same settings after ``torch.manual_seed``."""
    model, tokenizer = load_model(str(model_dir))
    patch(model, "torch")
    ours = generate_completions(model, tokenizer, PROMPTS, settings)
    for row in ours:
        ids = torch.tensor([row["prompt_token_ids"]])
        torch.manual_seed(row["seed"])
        with torch.no_grad():
            theirs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                    temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                                    max_new_tokens=settings.max_new_tokens, repetition_penalty=1.0, pad_token_id=3)
        assert row["token_ids"] == theirs[0, ids.shape[1]:].tolist()
    if settings.top_k == 50:  # the paper's: a hotter draw with the same seeds gives other tokens
        hotter = generate_completions(model, tokenizer, PROMPTS, dataclasses.replace(settings, temperature=3.0))
        assert [r["token_ids"] for r in hotter] != [r["token_ids"] for r in ours]  # the settings do reach the draw


def test_greedy_through_the_cache_equals_argmax_by_hand(model_dir):
    model, tokenizer = load_model(str(model_dir))
    eager, _ = load_model(str(model_dir))
    patch(model, "torch")
    rows = generate_completions(model, tokenizer, PROMPTS, GenerationSettings(temperature=0, max_new_tokens=10))
    for row in rows:
        ids = list(row["prompt_token_ids"])
        expected = []
        with torch.no_grad():
            for _ in range(10):  # the whole sequence again at every step: no cache, transformers' own attention
                token = int(eager(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                expected.append(token)
                ids.append(token)
                if token == 2:
                    break
        assert row["token_ids"] == expected


def test_filters_by_hand():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()

    def kept(**kw):
        out = filter_logits(logits, GenerationSettings(temperature=1.0, **kw))
        return sorted(torch.nonzero(torch.isfinite(out)).flatten().tolist())

    assert kept(top_p=0.8, top_k=0) == [1, 3]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81, top_k=0) == [1, 2, 3]
    assert kept(top_p=0.3, top_k=0) == [1]  # the most likely token always stays
    assert kept(top_p=1.0, top_k=2) == [1, 3]
    assert kept(top_p=1.0, top_k=0) == [0, 1, 2, 3]
    halved = filter_logits(logits, GenerationSettings(temperature=0.5, top_p=1.0, top_k=0))
    assert torch.allclose(halved.softmax(-1), probs ** 2 / (probs ** 2).sum())


def test_output_names_keep_non_latin_model_names_readable():
    """Issue 31: a model directory named in Cyrillic or Chinese came out as a row of underscores."""
    from alibi_surgery.cli.generate import output_names

    assert output_names(["/m/модель", "/m/模型/", "/m/a b:c", "/m/модель", "/m/.hidden", "/m/…"]) == \
        ["модель", "模型", "a_b_c", "модель-2", "hidden", "_"]

"""``perplexity``: both conventions against their formulas, recomputed here from transformers' own eager BLOOM in fp32
(each text alone, the loss worked out by hand from the logits in float64), through the API and the CLI; the packed
``--text`` figure against a hand packing; and the model left as it was found."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BloomForCausalLM

from alibi_surgery import Perplexity, packed_perplexity, prompt_perplexity
from alibi_surgery.attention.patch import current_backend, patch
from alibi_surgery.cli import main
from alibi_surgery.errors import UsageError
from alibi_surgery.io.loading import load_model, load_tokenizer
from alibi_surgery.io.random_model import write_random_bloom
from helpers import needs_triton

# Byte-level tokenizer: one token per UTF-8 byte, so these are 2, 9, 22 and 57 tokens long.
TEXTS = ["ab", "x = 1 + 2", "The lighthouse keeper.", "def merge(a, b):\n    return sorted(a + b)  # both lists!!"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_bloom(tmp_path_factory.mktemp("ppl") / "tiny", "tiny", n_layer=2, seed=4)


@pytest.fixture(scope="module")
def reference(model_dir):
    """Eager transformers BLOOM in fp32 and the tokenizer: the ground truth."""
    net = BloomForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return net, load_tokenizer(str(model_dir))


def _nll(net, ids: list[int]) -> list[float]:
    """Per predicted token negative log-likelihood of one text run alone, by hand from the logits (float64)."""
    with torch.no_grad():
        logits = net(torch.tensor([ids])).logits[0].double()
    logp = logits[:-1] - torch.logsumexp(logits[:-1], dim=-1, keepdim=True)
    return (-logp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)).tolist()


def _by_hand(reference, texts, max_length=None):
    """(paper figure, tokens figure, [(T_i, loss_i)]) from the eager model, each text alone."""
    net, tok = reference
    rows = []
    for text in texts:
        ids = tok(text)["input_ids"][:max_length]
        nll = _nll(net, ids)
        rows.append((len(ids), sum(nll) / len(nll), sum(nll)))
    paper = math.exp(sum(t * loss for t, loss, _ in rows) / sum(t for t, _, _ in rows))
    tokens = math.exp(sum(s for _, _, s in rows) / sum(t - 1 for t, _, _ in rows))
    return paper, tokens, [(t, loss) for t, loss, _ in rows]


def test_the_texts_have_different_lengths(reference):
    assert [len(reference[1](t)["input_ids"]) for t in TEXTS] == [2, 9, 22, 57]


@pytest.mark.parametrize("max_length", [None, 12])
def test_api_both_conventions_equal_their_formulas(model_dir, reference, max_length):
    paper, tokens, rows = _by_hand(reference, TEXTS, max_length)
    assert abs(paper / tokens - 1) > 1e-3  # the two conventions really differ on these texts
    net, tok = load_model(str(model_dir), device="cpu")
    got = {c: prompt_perplexity(net, tok, TEXTS, convention=c, max_length=max_length, backend="torch")
           for c in ("paper", "tokens")}
    assert isinstance(got["paper"], Perplexity)
    assert got["paper"].perplexity == pytest.approx(paper, rel=RTOL)
    assert got["tokens"].perplexity == pytest.approx(tokens, rel=RTOL)
    for c in got:
        assert [t.tokens for t in got[c].texts] == [t for t, _ in rows]
        for text, (_, loss) in zip(got[c].texts, rows):
            assert text.loss == pytest.approx(loss, rel=RTOL)


def test_cli_paper_and_tokens_equal_their_formulas(model_dir, reference, tmp_path, capsys):
    texts = [t.replace("\n", " ") for t in TEXTS]  # one text per line
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    paper, tokens, rows = _by_hand(reference, texts)
    for convention, expected in (("paper", paper), ("tokens", tokens)):
        out = tmp_path / f"{convention}.json"
        assert main(["perplexity", str(model_dir), str(model_dir), "--prompts-file", str(prompts), "--convention",
                     convention, "--json", str(out), "--device", "cpu", "--quiet"]) == 0
        data = json.loads(out.read_text())
        assert data["convention"] == convention and len(data["models"]) == 2
        for entry in data["models"]:
            assert entry["model"] == str(model_dir)
            assert entry["perplexity"] == pytest.approx(expected, rel=RTOL)
            assert [p["tokens"] for p in entry["prompts"]] == [t for t, _ in rows]
            assert [p["loss"] for p in entry["prompts"]] == pytest.approx([loss for _, loss in rows], rel=RTOL)
        table = capsys.readouterr().out
        assert f"{convention} convention" in table and f"{expected:.4f}"[:-1] in table


def test_cli_text_is_repairs_packed_figure(model_dir, reference, tmp_path, capsys):
    net, tok = reference
    text = " ".join(TEXTS).replace("\n", " ") * 3
    (tmp_path / "held-out.txt").write_text(text)
    seq_len = 16
    stream = tok(text)["input_ids"] + [tok.eos_token_id]  # one document, then EOS; the tail is dropped
    n = len(stream) // seq_len
    nll = [x for r in range(n) for x in _nll(net, stream[r * seq_len:(r + 1) * seq_len])]
    expected = math.exp(sum(nll) / len(nll))
    out = tmp_path / "packed.json"
    assert main(["perplexity", str(model_dir), "--text", str(tmp_path / "held-out.txt"), "--seq-len", str(seq_len),
                 "--batch-size", "2", "--json", str(out), "--device", "cpu", "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["seq_len"] == seq_len and data["batch_size"] == 2
    (entry,) = data["models"]
    assert entry["chunks"] == n and entry["tokens"] == n * seq_len
    assert entry["perplexity"] == pytest.approx(expected, rel=RTOL)
    assert "chunks" in capsys.readouterr().out


def test_a_patched_training_model_is_left_as_it_was(model_dir, reference):
    """repair calls this at each checkpoint on its in-memory model: patch state and train mode come back."""
    paper, _, _ = _by_hand(reference, TEXTS)
    net, tok = load_model(str(model_dir), device="cpu")
    patch(net, "torch")
    net.train()
    result = prompt_perplexity(net, tok, TEXTS, convention="paper", backend="eager")
    assert result.perplexity == pytest.approx(paper, rel=RTOL)
    assert net.training and current_backend(net) == "torch"


def test_packed_api_matches_the_same_rows_scored_alone(model_dir):
    from alibi_surgery.io.corpus import pack_text

    net, tok = load_model(str(model_dir), device="cpu")
    chunks = pack_text([" ".join(TEXTS) * 2], tok, 12)
    packed = packed_perplexity(net, chunks, batch_size=3, backend="torch")
    assert packed.chunks == len(chunks) and packed.seq_len == 12 and packed.tokens == chunks.numel()
    alone = prompt_perplexity(net, tok, [tok.decode(r) for r in chunks.tolist()], backend="torch")
    assert [t.tokens for t in alone.texts] == [12] * len(chunks)  # the byte tokenizer round-trips every row
    assert packed.perplexity == pytest.approx(alone.perplexity, rel=RTOL)


def test_texts_that_predict_nothing_are_refused(model_dir):
    net, tok = load_model(str(model_dir), device="cpu")
    with pytest.raises(UsageError, match="text 1 has 1 token: it predicts nothing"):
        prompt_perplexity(net, tok, ["ab", "a"], backend="torch")
    with pytest.raises(UsageError, match="max length must be at least 2"):
        prompt_perplexity(net, tok, ["abc"], max_length=1, backend="torch")
    with pytest.raises(UsageError, match="unknown convention 'mean'"):
        prompt_perplexity(net, tok, ["abc"], convention="mean")
    with pytest.raises(UsageError, match="prompt 0 is empty"):
        prompt_perplexity(net, tok, ["  "])


@needs_triton
def test_the_triton_kernel_gives_the_same_figures(model_dir, reference):
    paper, _, _ = _by_hand(reference, TEXTS[1:3])
    net, tok = load_model(str(model_dir), device="cuda" if torch.cuda.is_available() else "cpu", dtype="float32")
    assert prompt_perplexity(net, tok, TEXTS[1:3], convention="paper", backend="triton").perplexity == \
        pytest.approx(paper, rel=RTOL)

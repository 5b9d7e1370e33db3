"""Perplexity that one token cannot fool: the figure without special tokens, the per-class breakdown, the bootstrap
intervals and the one-token warning, each against a reference worked out here from transformers' eager BLOOM in fp32
(per-token NLL by log_softmax of ``model(...).logits``, in float64), through the API and the CLI."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch
from transformers import BloomForCausalLM

from alibi_surgery.analysis.loss import chunked_lm_loss
from alibi_surgery.analysis.perplexity import compare_perplexities, packed_perplexity, prompt_perplexity
from alibi_surgery.cli import main
from alibi_surgery.errors import UsageError
from alibi_surgery.io.loading import load_model, load_tokenizer
from alibi_surgery.io.random_model import write_random_bloom

# Byte tokenizer (specials <unk> 0, <s> 1, </s> 2, <pad> 3; one token per byte): "</s>" in a text is the special
# token. It ends three texts (a predicted target) and sits inside one (then also context); "é" is two bytes.
TEXTS = ["hello world</s>", "The lighthouse keeper, 1984.</s>", "x = 1 + 2", "ab</s>cd; caf\u00e9 ok</s>"]
SPECIALS = {0, 1, 2, 3}
EOS = 2
RTOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_bloom(tmp_path_factory.mktemp("pplb") / "tiny", "tiny", n_layer=2, seed=4)


def _eager(path):
    return BloomForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def boosted_dir(model_dir, tmp_path_factory):
    """The same model with the </s> embedding row (tied to the LM head) pushed towards the hidden states that
    predict </s>: its loss on </s> falls by several nats, the other tokens barely move."""
    net, tok = _eager(model_dir), load_tokenizer(str(model_dir))
    states = []
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text)["input_ids"]
            hidden = net.transformer(torch.tensor([ids])).last_hidden_state[0]
            states += [hidden[p] for p in range(len(ids) - 1) if ids[p + 1] == EOS]
        u = torch.stack(states).mean(0)
        net.transformer.word_embeddings.weight[EOS] += 2.0 * u / u.norm() ** 2
    out = tmp_path_factory.mktemp("pplb") / "boosted"
    net.save_pretrained(out)
    for f in model_dir.iterdir():
        if "token" in f.name:
            shutil.copy(f, out / f.name)
    return out


def _nll(net, ids):
    """(targets, per-target NLL) of one text run alone, by hand from the logits (float64)."""
    with torch.no_grad():
        logits = net(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return ids[1:], (-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]).tolist()


def _reference(path, texts):
    net, tok = _eager(path), load_tokenizer(str(path))
    return [_nll(net, tok(t)["input_ids"]) for t in texts]


def _figures(rows, convention, drop=()):
    """Perplexity of per-text (targets, nll) rows with the targets in ``drop`` left out, written longhand: tokens
    weighs every kept target alike; paper weighs each text's mean by its kept targets + 1."""
    num = den = 0.0
    for targets, nll in rows:
        kept = [x for t, x in zip(targets, nll) if t not in drop]
        if not kept:
            continue
        if convention == "tokens":
            num, den = num + sum(kept), den + len(kept)
        else:
            num, den = num + sum(kept) / len(kept) * (len(kept) + 1), den + len(kept) + 1
    return math.exp(num / den)


@pytest.mark.parametrize("convention", ["tokens", "paper"])
def test_total_and_without_specials_equal_the_hand_figures(model_dir, convention):
    rows = _reference(model_dir, TEXTS)
    assert sum(t == EOS for targets, _ in rows for t in targets) == 4
    total, without = _figures(rows, convention), _figures(rows, convention, SPECIALS)
    assert abs(total / without - 1) > 1e-3  # leaving </s> out really changes the figure
    net, tok = load_model(str(model_dir), device="cpu")
    got = prompt_perplexity(net, tok, TEXTS, convention=convention, backend="torch", bootstrap=0)
    assert got.perplexity == pytest.approx(total, rel=RTOL)
    assert got.without_specials == pytest.approx(without, rel=RTOL)
    assert got.specials == {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<pad>"}
    assert got.interval is None and got.interval_without_specials is None and got.breakdown is None
    for text, (targets, nll) in zip(got.texts, rows):  # per text
        kept = [x for t, x in zip(targets, nll) if t not in SPECIALS]
        assert text.without(SPECIALS) == (len(kept), pytest.approx(sum(kept) / len(kept), rel=RTOL))
        assert list(text.targets) == targets and list(text.nll) == pytest.approx(nll, rel=RTOL, abs=1e-6)


def test_per_token_losses_average_to_the_mean_loss(model_dir):
    net, tok = load_model(str(model_dir), device="cpu")
    ids = torch.tensor([tok(TEXTS[1])["input_ids"]] * 2)
    with torch.no_grad():
        hidden = net.transformer(ids).last_hidden_state
        weight = net.get_output_embeddings().weight
        each = chunked_lm_loss(hidden, weight, ids, reduction="none", chunk_tokens=7)
        mean = chunked_lm_loss(hidden, weight, ids)
    assert each.shape == (2 * (ids.shape[1] - 1),)
    assert float(each.mean()) == pytest.approx(float(mean), rel=1e-6)
    with pytest.raises(UsageError, match="reduction='sum'"):
        chunked_lm_loss(hidden, weight.detach(), ids, reduction="sum")


def test_breakdown_classes_sum_to_the_total(model_dir):
    rows = _reference(model_dir, TEXTS)
    net, tok = load_model(str(model_dir), device="cpu")
    got = prompt_perplexity(net, tok, TEXTS, backend="torch", bootstrap=0, breakdown=True)
    table = {c.name: c for c in got.breakdown}
    # expected classes by hand: every text is ASCII but for "é" (two bytes, each a partial character)
    expected = {}
    for text, (targets, nll) in zip(TEXTS, rows):
        chars = list(text.replace("</s>", "\0").replace("\u00e9", "\1\1"))[1:]
        assert len(chars) == len(targets)
        for ch, x in zip(chars, nll):
            name = ("</s>" if ch == "\0" else "partial-bytes" if ch == "\1" else "letters" if ch.isalpha() else
                    "digits" if ch.isdigit() else "whitespace" if ch.isspace() else "punctuation")
            count, loss = expected.get(name, (0, 0.0))
            expected[name] = (count + 1, loss + x)
    assert set(table) == set(expected)
    grand = sum(x for _, nll in rows for x in nll)
    for name, (count, loss) in expected.items():
        assert table[name].tokens == count
        assert table[name].loss == pytest.approx(loss, rel=RTOL)
        assert table[name].mean == pytest.approx(loss / count, rel=RTOL)
        assert table[name].share == pytest.approx(loss / grand, rel=RTOL)
    assert sum(c.tokens for c in got.breakdown) == sum(len(t) for t, _ in rows)
    assert sum(c.share for c in got.breakdown) == pytest.approx(1.0)
    assert [c.name for c in got.breakdown][0] == "</s>"  # special tokens first


def test_bootstrap_interval_holds_the_estimate_and_repeats_for_a_seed(model_dir):
    net, tok = load_model(str(model_dir), device="cpu")
    texts = TEXTS + ["def merge(a, b):", "return sorted(a + b)</s>", "zz top", "Quick brown fox."]
    a = prompt_perplexity(net, tok, texts, backend="torch", bootstrap=500, seed=3)
    for estimate, (low, high) in ((a.perplexity, a.interval), (a.without_specials, a.interval_without_specials)):
        assert low < estimate < high
    b = prompt_perplexity(net, tok, texts, backend="torch", bootstrap=500, seed=3)
    c = prompt_perplexity(net, tok, texts, backend="torch", bootstrap=500, seed=4)
    assert (a.interval, a.interval_without_specials) == (b.interval, b.interval_without_specials)
    assert a.interval != c.interval
    with pytest.raises(UsageError, match=r"bootstrap=-1: must be a whole number >= 0"):
        prompt_perplexity(net, tok, texts, bootstrap=-1)


def _hand_shares(base_rows, other_rows):
    change = {}
    for (targets, nb), (_, no) in zip(base_rows, other_rows):
        for t, x0, x1 in zip(targets, nb, no):
            change[t] = change.get(t, 0.0) + x1 - x0
    gross = sum(abs(d) for d in change.values())
    return {t: abs(d) / gross for t, d in change.items()}


def test_the_warning_names_a_dominant_token(model_dir, boosted_dir):
    shares = _hand_shares(_reference(model_dir, TEXTS), _reference(boosted_dir, TEXTS))
    assert shares[EOS] > 0.5 and max(s for t, s in shares.items() if t != EOS) < 0.25
    (net0, tok), (net1, _) = load_model(str(model_dir), device="cpu"), load_model(str(boosted_dir), device="cpu")
    r0, r1 = (prompt_perplexity(n, tok, TEXTS, backend="torch", bootstrap=200) for n in (net0, net1))
    assert r1.perplexity < r0.perplexity
    with pytest.warns(UserWarning, match=f"one token carries {shares[EOS]:.0%} .*'</s>' \\(id 2\\)"):
        (entry,) = compare_perplexities([r0, r1], tokenizer=tok, bootstrap=200)
    (dominant,) = entry["dominant_tokens"]
    assert dominant["id"] == EOS and dominant["share"] == pytest.approx(shares[EOS], rel=1e-4)
    assert entry["ratio"] == pytest.approx(r1.perplexity / r0.perplexity)
    low, high = entry["interval"]
    assert low <= entry["ratio"] <= high


def test_no_warning_when_every_token_moves_a_little(model_dir):
    net0, tok = load_model(str(model_dir), device="cpu")
    net1, _ = load_model(str(model_dir), device="cpu")
    with torch.no_grad():
        net1.transformer.ln_f.weight.mul_(0.9)  # a temperature: every token's loss moves
    r0, r1 = (prompt_perplexity(n, tok, TEXTS, backend="torch", bootstrap=0) for n in (net0, net1))
    assert r0.perplexity != r1.perplexity
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (entry,) = compare_perplexities([r0, r1], tokenizer=tok, bootstrap=0)
    assert entry["dominant_tokens"] == [] and entry["interval"] is None


def test_packed_rows_leave_the_packing_eos_out(model_dir):
    """Packed rows carry the EOS that joins documents: the figure without it, against a hand packing."""
    docs = ["hello world", "The lighthouse keeper, 1984.", "x = 1 + 2 and some more text"]
    net, tok = _eager(model_dir), load_tokenizer(str(model_dir))
    stream = [i for d in docs for i in tok(d)["input_ids"] + [EOS]]
    seq_len = 16
    chunks = torch.tensor(stream[:len(stream) // seq_len * seq_len]).view(-1, seq_len)
    rows = [_nll(net, r) for r in chunks.tolist()]
    model, _ = load_model(str(model_dir), device="cpu")
    got = packed_perplexity(model, chunks, batch_size=2, backend="torch", tokenizer=tok, seed=1)
    assert got.perplexity == pytest.approx(_figures(rows, "tokens"), rel=RTOL)
    assert got.without_specials == pytest.approx(_figures(rows, "tokens", SPECIALS), rel=RTOL)
    assert len(got.rows) == len(chunks) and got.interval[0] < got.perplexity < got.interval[1]


def test_cli_breakdown_bootstrap_and_json(model_dir, boosted_dir, tmp_path, capsys):
    texts = TEXTS
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    rows = _reference(model_dir, texts)
    out = tmp_path / "ppl.json"
    assert main(["perplexity", str(model_dir), str(boosted_dir), "--prompts-file", str(prompts), "--breakdown",
                 "--bootstrap", "200", "--seed", "7", "--json", str(out), "--device", "cpu", "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert (data["bootstrap"], data["seed"], data["level"]) == (200, 7, 0.95)
    first = data["models"][0]
    assert first["perplexity"] == pytest.approx(_figures(rows, "tokens"), rel=RTOL)
    assert first["perplexity_without_specials"] == pytest.approx(_figures(rows, "tokens", SPECIALS), rel=RTOL)
    assert first["interval"][0] < first["perplexity"] < first["interval"][1]
    assert sum(c["tokens"] for c in first["breakdown"]) == sum(len(t) for t, _ in rows)
    assert [p["special_targets"] for p in first["prompts"]] == [1, 1, 0, 2]
    (comparison,) = data["comparisons"]
    assert comparison["dominant_tokens"][0]["token"] == "</s>" and comparison["interval"] is not None
    printed, err = capsys.readouterr()
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "'</s>' (id 2)" in warning
    assert "w/o specials" in printed and "breakdown of" in printed and "partial-bytes" in printed
    assert f"{first['perplexity_without_specials']:.4f}" in printed

    out0 = tmp_path / "ppl0.json"
    assert main(["perplexity", str(model_dir), "--prompts-file", str(prompts), "--bootstrap", "0", "--json",
                 str(out0), "--device", "cpu", "--quiet"]) == 0
    (entry,) = json.loads(out0.read_text())["models"]
    assert entry["interval"] is None and entry["interval_without_specials"] is None and "breakdown" not in entry


def test_cli_refuses_a_negative_bootstrap_in_one_line(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n")
    out = tmp_path / "ppl.json"
    assert main(["perplexity", str(model_dir), "--prompts-file", str(prompts), "--bootstrap", "-1", "--json",
                 str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --bootstrap -1: must be a whole number >= 0 (0 skips the intervals)"]
    assert not out.exists()

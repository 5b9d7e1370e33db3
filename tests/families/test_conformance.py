"""The conformance suite: every registered family against its own transformers implementation (family_cases.py).

Per family (tiny random models: head_dim 80, 3 heads; MPT with clip_qkv and a non-default softmax_scale):
patched logits equal the family's ground-truth attention in fp32 with left padding, greedy generation with a cache is
token-identical, fused statistics equal the paper's formulas on correct probabilities, head slices train exactly
what full matrices with gradient masks and torch.optim.AdamW train, re-initialisation touches exactly the selected
slices, streamed diagnosis equals in-memory diagnosis, and ``alibi-surgery repair`` runs end to end with every
frozen weight bit-identical after a reload in stock transformers.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from alibi_surgery import HeadSlicedAdamW, HeadSlices, diagnose, patched
from alibi_surgery.diagnosis.diagnose import stats_from_attention_probs
from alibi_surgery.diagnosis.stream import diagnose_streamed
from alibi_surgery.families import FAMILIES
from alibi_surgery.io.loading import load_model
from alibi_surgery.io.random_model import byte_tokenizer
from alibi_surgery.surgery.reinit import reinit_heads
from family_cases import CASES, HEAD_DIM, HIDDEN, VOCAB
from helpers import BACKENDS, left_padded_mask
from surgery_runs import SMALL_ABLATION_ARGS, cli_env

PARAMS = [pytest.param(c, id=c.id) for c in CASES]
SELECTION = {0: [2], 1: [0, 1]}
PROMPTS = ["the cat sat on the mat", "a much longer prompt, with more words in it than the first one has",
           "birds sang"]


def build(case, n_layer=2, attn=None, seed=0):
    torch.manual_seed(seed)
    config = case.make_config(n_layer)
    config._attn_implementation = attn or case.reference_attn
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn or case.reference_attn).eval()


def batch(t=13, pads=(0, 4), seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (len(pads), t), generator=gen)
    return ids, left_padded_mask(len(pads), t, pads)


def test_every_registered_family_has_a_case():
    assert {FAMILIES[t].name for t in FAMILIES} == {c.id for c in CASES}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PARAMS)
def test_patched_logits_equal_the_family_reference(case, backend):
    model = build(case)
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with patched(model, backend):
            got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # padded positions' logits are not defined the same way (query rows output 0 here)
    err = (got - want)[real].abs().max().item()
    assert err < 2e-5 * max(1.0, want[real].abs().max().item()), err


@pytest.mark.parametrize("case", PARAMS)
def test_greedy_generation_with_cache_is_token_identical(case):
    model = build(case)
    ids, mask = batch(t=9, pads=(0, 3))
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=3)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        with patched(model, "torch"):
            got = model.generate(ids, **kw)
    assert torch.equal(got, want)


def _probs(case, model, ids, mask):
    if case.reference_probs is not None:
        return case.reference_probs(model, ids, mask)
    eager = build(case, attn="eager")
    eager.load_state_dict(model.state_dict())
    return eager(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False).attentions


@pytest.mark.parametrize("case", PARAMS)
def test_fused_statistics_equal_the_paper_formulas(case):
    model = build(case)
    ids, mask = batch(t=97, pads=(0, 30))
    with torch.no_grad():
        want = torch.stack([stats_from_attention_probs(p, mask).sum(0) for p in _probs(case, model, ids, mask)])
        from alibi_surgery import head_stats

        with patched(model, "torch"), head_stats(model) as sink:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    got = sink.sums.float()
    rows = want[..., 2:]
    assert torch.equal(got[..., 2], want[..., 2])
    assert torch.allclose(got[..., :2] / rows, want[..., :2] / rows, atol=1e-4, rtol=0)


def _masks(case, model, selection):
    """Per selected layer: (qkv row mask, output column mask) from the case's own head layout."""
    out = {}
    attns = case.attentions(model)
    for layer, heads in selection.items():
        qkv, dense = getattr(attns[layer], case.qkv), getattr(attns[layer], case.out)
        rows = torch.zeros(qkv.weight.shape[0], dtype=torch.bool)
        cols = torch.zeros(dense.weight.shape[1], dtype=torch.bool)
        for h in heads:
            for a, b in case.head_rows(h, HEAD_DIM, HIDDEN):
                rows[a:b] = True
            cols[h * HEAD_DIM:(h + 1) * HEAD_DIM] = True
        out[layer] = (qkv, dense, rows, cols)
    return out


def _element_masks(case, model):
    """id(parameter) -> bool mask of its selected elements, for the parameters surgery may change."""
    masks = {}
    for qkv, dense, rows, cols in _masks(case, model, SELECTION).values():
        masks[id(qkv.weight)] = rows[:, None].expand_as(qkv.weight)
        masks[id(dense.weight)] = cols[None, :].expand_as(dense.weight)
        if qkv.bias is not None:
            masks[id(qkv.bias)] = rows
    return masks


STEPS, LRS = 5, [1e-3 * (i + 1) / 5 for i in range(5)]


@pytest.mark.parametrize("case", PARAMS)
def test_head_slices_train_what_masked_full_matrices_train(case):
    base = build(case)
    batches = [batch(t=11, pads=(0, 2), seed=s) for s in range(STEPS)]
    batches = [(ids, mask, ids.masked_fill(mask == 0, -100)) for ids, mask in batches]

    ref = copy.deepcopy(base).train()
    for p in ref.parameters():
        p.requires_grad_(False)
    params = []
    for qkv, dense, rows, cols in _masks(case, ref, SELECTION).values():
        pairs = [(qkv.weight, rows[:, None]), (dense.weight, cols[None, :])]
        if qkv.bias is not None:
            pairs.append((qkv.bias, rows))
        for p, m in pairs:
            p.requires_grad_(True)
            p.register_hook(lambda g, m=m: g * m)
            params.append(p)
    opt = torch.optim.AdamW(params, lr=LRS[0], eps=1e-8, weight_decay=0.0)
    with patched(ref, "torch"):
        for lr, (ids, mask, labels) in zip(LRS, batches):
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
            ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()

    ours = copy.deepcopy(base).train()
    with patched(ours, "torch"):
        slices = HeadSlices(ours, SELECTION)
        sliced = HeadSlicedAdamW(slices, lr=LRS[0], eps=1e-8)
        for lr, (ids, mask, labels) in zip(LRS, batches):
            sliced.zero_grad()
            ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            sliced.step(lr=lr)
        slices.remove()

    trained = {id(p) for p in params}
    before = dict(base.named_parameters())
    for (name, p_ref), (_, p_ours) in zip(ref.named_parameters(), ours.named_parameters()):
        if id(p_ref) not in trained:
            assert torch.equal(p_ours, before[name]), name  # frozen: bit-identical
    for layer, (qkv, dense, rows, cols) in _masks(case, ours, SELECTION).items():
        ref_qkv, ref_dense, _, _ = _masks(case, ref, SELECTION)[layer]
        old_qkv, old_dense, _, _ = _masks(case, base, SELECTION)[layer]
        assert torch.equal(qkv.weight[~rows], old_qkv.weight[~rows])  # unselected rows: bit-identical
        assert torch.equal(dense.weight[:, ~cols], old_dense.weight[:, ~cols])
        torch.testing.assert_close(qkv.weight[rows], ref_qkv.weight[rows], atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(dense.weight[:, cols], ref_dense.weight[:, cols], atol=2e-6, rtol=1e-4)
        assert not torch.equal(dense.weight[:, cols], old_dense.weight[:, cols])  # it did train


@pytest.mark.parametrize("case", PARAMS)
def test_reinit_touches_exactly_the_selected_slices(case):
    model = build(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinit_heads(model, SELECTION, seed=3)
    for layer, (qkv, dense, rows, cols) in _masks(case, model, SELECTION).items():
        if qkv.bias is not None:
            assert (qkv.bias[rows] == 0).all()
        assert (dense.weight[:, cols] == 0).all()
        assert (qkv.weight[rows] != before_name(model, qkv.weight, before)[rows]).float().mean() > 0.99
    masks = _element_masks(case, model)
    for name, p in model.named_parameters():
        m = masks.get(id(p))
        old = before[name]
        if m is None:
            assert torch.equal(p, old), name
        else:
            assert torch.equal(p[~m], old[~m]), name


def before_name(model, param, before):
    return before[next(n for n, p in model.named_parameters() if p is param)]


def _save(case, path, max_shard_size="200KB"):
    model = build(case)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    byte_tokenizer().save_pretrained(path)
    return model


@pytest.mark.parametrize("case", PARAMS)
def test_streamed_diagnosis_equals_in_memory(case, tmp_path):
    _save(case, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # really sharded
    tok = byte_tokenizer()
    streamed = diagnose_streamed(tmp_path, tok, PROMPTS, backend="torch", batch_size=2)
    model, tok = load_model(str(tmp_path), dtype="float32", device="cpu")
    whole = diagnose(model, tok, PROMPTS, backend="torch", batch_size=2)
    assert torch.allclose(streamed.bos_mass, whole.bos_mass, atol=1e-6, rtol=0)
    assert torch.allclose(streamed.entropy, whole.entropy, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", PARAMS)
def test_repair_end_to_end_and_stock_reload(case, tmp_path, forked_cli):
    _save(case, tmp_path / "model", max_shard_size="2GB")
    (tmp_path / "corpus.txt").write_text("the cat sat on a mat while dogs ran past the old red barn " * 8)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "alibi_surgery.cli", "repair", str(tmp_path / "model"), "--out", str(out),
           "--corpus", str(tmp_path / "corpus.txt"), "--heads", "0:2;1:0,1", "--device", "cpu", "--backend",
           "torch", "--seq-len", "16", "--batch-size", "2", "--epochs", "1", "--quiet", *SMALL_ABLATION_ARGS]
    proc = forked_cli.run(cmd, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    after = AutoModelForCausalLM.from_pretrained(out / "final")
    masks = _element_masks(case, after)
    old = dict(before.named_parameters())
    changed = 0
    for name, p in after.named_parameters():
        m = masks.get(id(p))
        if m is None:
            assert torch.equal(p, old[name]), name
        else:
            assert torch.equal(p[~m], old[name][~m]), name
            changed += int(not torch.equal(p[m], old[name][m]))
    assert changed > 0

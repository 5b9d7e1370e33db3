"""HeadSlices: slice gradients against full eager autograd, nothing else trained, autograd stops early."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BloomForCausalLM

from alibi_surgery import patch_bloom
from alibi_surgery.errors import UsageError
from alibi_surgery.analysis.loss import causal_lm_labels
from alibi_surgery.surgery.slices import HeadSlices
from helpers import BACKENDS, DTYPES, assert_tolerance, bloom_config, left_padded_mask

SELECTION = {0: [2], 2: [0, 1]}  # non-adjacent layers, the last head, two adjacent heads


def small_model(seed=0, n_layer=3, n_head=3, head_dim=80):
    torch.manual_seed(seed)
    model = BloomForCausalLM(bloom_config(n_head * head_dim, n_head, n_layer=n_layer)).eval()
    with torch.no_grad():  # sharper attention than the default init
        for block in model.transformer.h:
            block.self_attention.query_key_value.weight.mul_(4)
    return model


def batch(model, seed=1, length=37):
    torch.manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, length))
    mask = left_padded_mask(2, length, [0, 6])
    return ids, mask, causal_lm_labels(ids, mask)


def eager_slice_grads(model, ids, mask, labels, selection):
    """Full-matrix gradients from stock transformers (eager attention), cut to the selected slices."""
    model.zero_grad(set_to_none=True)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    out = []
    for layer, heads in sorted(selection.items()):
        attn = model.transformer.h[layer].self_attention
        d = attn.head_dim
        for h in sorted(heads):
            rows, cols = slice(h * 3 * d, (h + 1) * 3 * d), slice(h * d, (h + 1) * d)
            out += [attn.query_key_value.weight.grad[rows], attn.query_key_value.bias.grad[rows],
                    attn.dense.weight.grad[:, cols]]
    return [g.float() for g in out]


def sliced_grads(model, ids, mask, labels, selection, **kw):
    with HeadSlices(model, selection, **kw) as slices:
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads = [t.grad.float().clone() for t in slices.tensors]
        assert all(p.grad is None for p in model.parameters()), "a full-matrix gradient was allocated"
    return grads


@pytest.mark.parametrize("backend", ["eager", *BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_slice_gradients_match_full_eager_autograd(backend, dtype):
    ref_model = small_model()
    ids, mask, labels = batch(ref_model)
    ref = eager_slice_grads(ref_model, ids, mask, labels, SELECTION)
    eager = eager_slice_grads(copy.deepcopy(ref_model).to(dtype), ids, mask, labels, SELECTION)
    ours = sliced_grads(patch_bloom(copy.deepcopy(ref_model).to(dtype), backend), ids, mask, labels, SELECTION)
    for a, b, r in zip(ours, eager, ref):
        assert_tolerance(a, b, r, torch.ones(r.shape[:-1] or (1,), dtype=torch.bool).view(r.shape[:-1]), dtype,
                         what="slice gradient")


def test_fp32_slices_over_a_bf16_model_have_fp32_gradients_and_write_back():
    model = small_model().to(torch.bfloat16)
    ids, mask, labels = batch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slices = HeadSlices(model, SELECTION, dtype=torch.float32)
    assert not slices.in_place and slices.grad.dtype == torch.float32
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(t.grad.abs().sum() > 0 for t in slices.tensors)
    with torch.no_grad():
        for t in slices.tensors:
            t.add_(0.01)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "copies leaked into the model"
    assert slices.write_back() == slices.numel
    attn = model.transformer.h[2].self_attention
    assert torch.equal(attn.dense.weight[:, 80:160], (before["transformer.h.2.self_attention.dense.weight"][:, 80:160]
                                                       .float() + 0.01).to(torch.bfloat16))
    assert torch.equal(attn.dense.weight[:, 160:], before["transformer.h.2.self_attention.dense.weight"][:, 160:])
    slices.remove()


def test_autograd_records_nothing_below_the_lowest_selected_layer():
    model = patch_bloom(small_model(n_layer=4), "torch")
    ids, mask, labels = batch(model)
    seen = {}
    hooks = [block.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: seen.__setitem__(i, args[0].requires_grad if args else
                                                      kwargs["hidden_states"].requires_grad), with_kwargs=True)
        for i, block in enumerate(model.transformer.h)]
    with HeadSlices(model, {2: [1], 3: [0]}):
        loss = model(ids, attention_mask=mask, labels=labels).loss
    for h in hooks:
        h.remove()
    assert seen == {0: False, 1: False, 2: False, 3: True}
    # Walk the graph: only layer 2's post-attention norm, layer 3's two norms and ln_f are recorded (4 of the
    # 10 LayerNorms), and no embedding node.
    names, stack, visited = [], [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert sum("LayerNorm" in n for n in names) == 4
    assert not any("Embedding" in n for n in names)
    assert model.transformer.word_embeddings.weight.grad is None


def test_remove_restores_the_model_exactly():
    model = patch_bloom(small_model(), "torch")
    model.transformer.h[1].mlp.dense_4h_to_h.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    dicts = [dict(m.__dict__) for m in model.modules()]
    keys = list(model.state_dict())
    slices = HeadSlices(model, SELECTION)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(UsageError, match="already has HeadSlices"):
        HeadSlices(model, {1: [0]})
    slices.remove()
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [dict(m.__dict__).keys() for m in model.modules()] == [d.keys() for d in dicts]
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("selection,message", [
    ({}, "non-empty"), ({3: [0]}, "layer 3 is out of range"), ({0: [3]}, "head 3 is out of range"),
    ({0: []}, "lists no heads"), ([0], "non-empty dict"), ({-1: [0]}, "out of range")])
def test_bad_selection_is_a_one_line_error(selection, message):
    model = small_model()
    with pytest.raises(UsageError, match=message):
        HeadSlices(model, selection)
    assert all(p.requires_grad for p in model.parameters()), "a refused selection must leave the model untouched"


@pytest.mark.parametrize("backend", BACKENDS)
def test_slices_under_gradient_checkpointing(backend):
    model = patch_bloom(small_model(), backend).train()
    ids, mask, labels = batch(model)
    plain = sliced_grads(model, ids, mask, labels, SELECTION)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = sliced_grads(model, ids, mask, labels, SELECTION)
    for a, b in zip(plain, ckpt):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)

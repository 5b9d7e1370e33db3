"""``trainable_stats``: head statistics of a whole patched model as a differentiable loss term (issue 33), against
transformers' own eager BLOOM with ``output_attentions`` (the mean taken from its attention maps in float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BloomForCausalLM

from alibi_surgery import patched
from alibi_surgery.attention.row_stats import trainable_stats
from alibi_surgery.surgery.trainer import enable_checkpointing
from helpers import BACKENDS, bloom_config, left_padded_mask

SELECTION = {0: [1, 3], 1: [0]}


def _model():
    torch.manual_seed(0)
    model = BloomForCausalLM(bloom_config(64, 4, n_layer=2)).float()
    model.config._attn_implementation = "eager"
    return model


def _inputs():
    torch.manual_seed(3)
    return torch.randint(4, 300, (2, 21)), left_padded_mask(2, 21, [0, 5])


def eager_means(model, ids, mask):
    """(mean first-token mass, mean entropy) of SELECTION over the real query rows at position > 0, from eager
    BLOOM's attention maps (float64 arithmetic on them), on the autograd graph of the model's parameters."""
    maps = model(ids, attention_mask=mask, output_attentions=True).attentions
    real = mask.bool()
    first = real.int().argmax(-1)  # each row's first real token
    counted = real.clone()
    counted[torch.arange(len(ids)), first] = False  # position 0 is not counted
    mass, ent, rows = 0.0, 0.0, 0
    for layer, heads in SELECTION.items():
        p = maps[layer][:, heads].double()  # [B, n, T, T]
        p0 = p[torch.arange(len(ids)), :, :, first]  # [B, n, T]
        h = -(p * torch.log(torch.where(p > 0, p, 1.0))).sum(-1)
        mass = mass + (p0 * counted[:, None]).sum()
        ent = ent + (h * counted[:, None]).sum()
        rows += int(counted.sum()) * len(heads)
    return mass / rows, ent / rows


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", ["first_token_mass", "entropy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_stats_equal_eager_maps_with_gradients(backend, which):
    ids, mask = _inputs()
    reference = _model()
    ref_mass, ref_ent = eager_means(reference, ids, mask)
    (ref_mass if which == "first_token_mass" else ref_ent).backward()
    want = _grads(reference)

    model = _model()
    with patched(model, backend), trainable_stats(model) as stats:
        model(ids, attention_mask=mask)
        value = getattr(stats, which)(SELECTION)
        value.backward()
    got = _grads(model)
    torch.testing.assert_close(value.double(), ref_mass if which == "first_token_mass" else ref_ent,
                               atol=1e-5, rtol=0)
    assert want.keys() == got.keys() and len(got) > 4
    for name in want:  # only the two layers' attention and what feeds them get gradients
        scale = max(want[name].abs().max().item(), 1e-3)
        assert (got[name] - want[name]).abs().max().item() <= 1e-4 * scale, name
    assert 0.05 < ref_mass.item() < 0.95  # not a degenerate case


def test_activation_checkpointing_recomputes_without_collecting_twice():
    """With non-reentrant activation checkpointing (repair's default) the backward recomputes each layer inside the
    block: the statistics are kept from the first forward and the gradients equal those without checkpointing."""
    ids, mask = _inputs()
    plain, checkpointed = _model(), _model()
    enable_checkpointing(checkpointed)
    results = []
    for model in (plain, checkpointed):
        model.train()
        with patched(model, "torch"), trainable_stats(model) as stats:
            out = model(ids, attention_mask=mask).logits[mask.bool()].square().mean()
            (out + 0.5 * stats.first_token_mass(SELECTION)).backward()
        results.append(_grads(model))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=1e-6, rtol=1e-5)


def test_refusals():
    ids, mask = _inputs()
    model = _model()
    with pytest.raises(RuntimeError, match="patched model"), trainable_stats(model):
        pass
    with patched(model, "torch"), trainable_stats(model) as stats:
        with pytest.raises(RuntimeError, match="no statistics for layer"):
            stats.first_token_mass(SELECTION)
        model(ids, attention_mask=mask)
        with pytest.raises(RuntimeError, match="ran twice"):
            model(ids, attention_mask=mask)
    with patched(copy.deepcopy(model), "torch") as other, trainable_stats(other):
        with pytest.raises(RuntimeError, match="triton or torch backend"):
            other(ids, attention_mask=mask, output_attentions=True)

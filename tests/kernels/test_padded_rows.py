"""Padded query rows (ALiBi position -1): the fused attention outputs exactly 0 there, and its backward is the true
derivative of that forward. Checked on a whole model with the common label idiom ``labels = ids.masked_fill(mask ==
0, -100)``, which scores each row's first real token from the last padding position:

* by central finite differences, independently of any reference implementation;
* against transformers' eager BLOOM whose attention context is zeroed at padded rows (a hook on ``dense``): the
  same definition, differentiated by autograd through transformers' own code;
* at the attention module: exactly 0 at padded rows, eager fp32 at real rows.

The finite differences probe K random orthonormal directions ``u_k`` over all parameters at once and compare the
vector of ``(L(theta + eps u_k) - L(theta - eps u_k)) / 2 eps`` with the vector of ``g . u_k`` (the gradient
projected on those directions) within 0.1 % of the projection's norm. One direction alone would not do: the part of
the gradient that passes through padded rows (under 1 % of it here) projects onto a single random direction over
10^5 parameters at ~1/300 of its size, below any honest tolerance; a K-dimensional projection keeps the ratio of the
two norms. The model runs in fp32; the perturbed losses are the cross-entropy of its fp32 logits taken in float64
(the same number as ``.loss``, without the fp32 rounding of the reduction), so that eps = 1e-2 leaves a rounding and
truncation error under 0.01 % of the projection. Before padded rows were defined as 0 the error was 0.7 %.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import BloomForCausalLM

from alibi_surgery import patch_bloom
from helpers import BACKENDS, assert_tolerance, bloom_config, left_padded_mask, make_attention, run_attention

VOCAB = 300
T, PADS = 64, [50, 57, 62]  # short real tails: 3 of the 23 targets are predicted from padding


def _model() -> BloomForCausalLM:
    """2 layers, hidden 64, 4 heads of 16, fp32; QKV weights scaled up so that attention is far from uniform."""
    torch.manual_seed(0)
    model = BloomForCausalLM(bloom_config(64, 4, n_layer=2, vocab=VOCAB)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.self_attention.query_key_value.weight.normal_(0, 0.3)
            block.self_attention.query_key_value.bias.normal_(0, 0.1)
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (len(PADS), T), generator=gen)
    mask = left_padded_mask(len(PADS), T, PADS)
    return ids, mask, ids.masked_fill(mask == 0, -100)  # the idiom: first real targets predicted from padding


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_the_derivative_of_the_loss_with_padding_scored(backend):
    model = patch_bloom(_model(), backend)
    ids, mask, labels = _batch()
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in params]).double()

    def loss64() -> float:
        logits = model(ids, attention_mask=mask).logits[:, :-1].double()
        return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).item()

    base = [p.detach().double().clone() for p in params]

    def set_params(step: torch.Tensor) -> None:
        offset = 0
        for p, b in zip(params, base):
            p.copy_((b + step[offset:offset + p.numel()].view_as(b)).float())
            offset += p.numel()

    k, eps = 6, 1e-2
    gen = torch.Generator().manual_seed(2)
    directions = torch.linalg.qr(torch.randn(grad.numel(), k, generator=gen, dtype=torch.float64))[0].T
    numeric = []
    with torch.no_grad():
        assert abs(loss64() - loss.item()) <= 1e-5 * loss.item()
        try:
            for u in directions:
                set_params(eps * u)
                up = loss64()
                set_params(-eps * u)
                numeric.append((up - loss64()) / (2 * eps))
        finally:
            set_params(torch.zeros_like(grad))
    analytic = directions @ grad
    err = (torch.tensor(numeric, dtype=torch.float64) - analytic).norm().item()
    assert err <= 1e-3 * analytic.norm().item(), (
        f"finite differences {numeric} vs g.u {analytic.tolist()}: error {err:.3g}, |g.u| {analytic.norm():.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_gradients_match_eager_with_padded_rows_zeroed(backend):
    """The definition, through transformers' own code: eager BLOOM with its attention context set to 0 at padded
    query rows gives the same loss and the same gradient of every parameter."""
    ref = _model()
    ours = patch_bloom(copy.deepcopy(ref), backend)
    ids, mask, labels = _batch()
    real = mask[..., None].float()
    for block in ref.transformer.h:
        block.self_attention.dense.register_forward_pre_hook(lambda module, args: (args[0] * real,))
    losses, grads = [], []
    for model in (ref, ours):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(dict(model.named_parameters()))
    assert abs(losses[0] - losses[1]) <= 1e-5 * losses[0]
    for name, p_ref in grads[0].items():
        g_ref, g = p_ref.grad, grads[1][name].grad
        assert (g - g_ref).abs().max() <= 1e-4 * g_ref.abs().max() + 1e-8, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,pads,past", [(12, [0, 3, 11], 0), (80, [0, 70, 79], 0), (80, [0, 75, 79], 70)],
                         ids=["one-block", "two-blocks", "decode"])
def test_padded_query_rows_output_zero(backend, T, pads, past):
    """The attention context (the input of ``dense``) is exactly 0 at padded query rows; real rows match eager."""
    mask = left_padded_mask(len(pads), T, pads)
    ref_mod = make_attention(64 * 2, 2)
    ours_mod = patch_bloom(copy.deepcopy(ref_mod), backend)
    contexts = []
    ours_mod.dense.register_forward_pre_hook(lambda module, args: contexts.append(args[0].detach().clone()))
    torch.manual_seed(1)
    x = torch.randn(len(pads), T, 64 * 2)
    ref = run_attention(ref_mod, x, mask, past)
    ours = run_attention(ours_mod, x, mask, past)
    padded = mask[:, past:] == 0
    assert padded.any()
    assert torch.equal(contexts[-1][padded], torch.zeros_like(contexts[-1][padded]))
    assert_tolerance(ours, ref, ref, ~padded, torch.float32)

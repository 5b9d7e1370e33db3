"""Gradients of the fused statistics (issue 33, item 1): the first-token mass and the entropy returned by
``alibi_attention(..., return_stats=True)`` carry gradients through the attention's own backward pass.

References are independent of the kernels: float64 autograd through a dense attention matrix (``dense_attention``,
written from the definitions), ``torch.autograd.gradcheck`` (finite differences), and eager low-precision autograd
for the 2x tolerance rule. Every case has ALiBi slopes and left padding (a padded query row included)."""

from __future__ import annotations

import pytest
import torch

from alibi_surgery import alibi_attention, alibi_attention_qkvpacked
from helpers import BACKENDS, assert_compiles_like_eager, dense_attention, left_padded_mask


def dense_stats(q, k, v, mask):
    """float64 ``(out, first-token mass [B, H, Tq], entropy [B, H, Tq])`` from the dense probabilities (0 on
    padded query rows; masked keys have p = 0 exactly and add nothing, nor any gradient)."""
    out, p = dense_attention(q, k, v, mask)
    first = (mask.cumsum(-1) - 1 == 0) & mask.bool()  # each row's first real key
    mass = (p * first[:, None, None, :]).sum(-1)
    entropy = -(p * torch.log(torch.where(p > 0, p, 1.0))).sum(-1)
    return out, mass, entropy


def _weights(batch, q_len, n_head, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, q_len, n_head, head_dim, generator=g, dtype=torch.float64),
            torch.randn(batch, n_head, q_len, generator=g, dtype=torch.float64),
            torch.randn(batch, n_head, q_len, generator=g, dtype=torch.float64))


def _loss(out, mass_rows, entropy_rows, mass_sum, entropy_sum, weights, use_out=True):
    """A loss on every differentiable result: the output, both statistics per row, and their per-head sums."""
    w_out, w_mass, w_ent = (w.to(out.dtype) for w in weights)
    loss = (mass_rows * w_mass).sum() + (entropy_rows * w_ent).sum() + 0.3 * mass_sum.sum() - 0.2 * entropy_sum.sum()
    return loss + (out * w_out).sum() if use_out else loss


CASES = [  # (batch, q_len, k_len, heads, head_dim, left pads): q_len < k_len is a chunk after a cached prefix
    (2, 23, 23, 3, 32, [0, 6]),
    (2, 5, 29, 2, 16, [0, 26]),  # row 1: 26 pads of 29 keys, so its first 2 query rows are padding
]


@pytest.mark.parametrize("use_out", [True, False], ids=["with-output", "stats-only"])
@pytest.mark.parametrize("batch,q_len,k_len,n_head,head_dim,pads", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_gradients_match_float64_autograd(backend, batch, q_len, k_len, n_head, head_dim, pads, use_out):
    torch.manual_seed(q_len)
    mask = left_padded_mask(batch, k_len, pads)
    base = [torch.randn(batch, n, n_head, head_dim, dtype=torch.float64) * 1.5 for n in (q_len, k_len, k_len)]
    weights = _weights(batch, q_len, n_head, head_dim, seed=k_len)

    ours = [t.float().requires_grad_() for t in base]
    out, stats = alibi_attention(*ours, attention_mask=mask, return_stats=True, row_stats=True, backend=backend)
    _loss(out, stats.first_token_rows, stats.entropy_rows, stats.first_token_mass, stats.entropy, weights,
          use_out).backward()

    ref = [t.clone().requires_grad_() for t in base]
    ref_out, ref_mass, ref_ent = dense_stats(*ref, mask)
    _loss(ref_out, ref_mass, ref_ent, ref_mass.sum(-1), ref_ent.sum(-1), weights, use_out).backward()

    torch.testing.assert_close(stats.first_token_rows.double(), ref_mass, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.entropy_rows.double(), ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.rows, (mask[:, k_len - q_len:].sum(-1, keepdim=True).float()
                                            .expand(batch, n_head)))
    for name, a, b in zip("qkv", ours, ref):
        want = torch.zeros_like(b) if b.grad is None else b.grad  # stats only: v has no part in them
        scale = want.abs().max().item()
        err = (a.grad.double() - want).abs().max().item()
        assert err <= 1e-5 * max(scale, 1.0), f"d{name}: {err:.3g} against scale {scale:.3g}"
    assert ref_ent.max() > 0.5 and ref_mass.max() - ref_mass[ref_mass > 0].min() > 0.1  # not a degenerate case


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_stats_gradients_match_float64_autograd(backend):
    """The packed operator (BLOOM's fused QKV) takes the same path: one dqkv, statistics' terms included."""
    torch.manual_seed(5)
    mask = left_padded_mask(2, 19, [0, 4])
    base = torch.randn(2, 19, 3, 3, 32, dtype=torch.float64)
    weights = _weights(2, 19, 3, 32, seed=1)
    qkv = base.float().requires_grad_()
    out, stats = alibi_attention_qkvpacked(qkv, attention_mask=mask, return_stats=True, row_stats=True,
                                           backend=backend)
    _loss(out, stats.first_token_rows, stats.entropy_rows, stats.first_token_mass, stats.entropy, weights).backward()
    ref = base.clone().requires_grad_()
    ref_out, ref_mass, ref_ent = dense_stats(*ref.unbind(3), mask)
    _loss(ref_out, ref_mass, ref_ent, ref_mass.sum(-1), ref_ent.sum(-1), weights).backward()
    err = (qkv.grad.double() - ref.grad).abs().max().item()
    assert err <= 1e-5 * max(ref.grad.abs().max().item(), 1.0), err


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_of_both_statistics(backend):
    """Finite differences (``gradcheck`` in fast mode: random directions, both sides) of the per-row statistics and
    the output. The kernels compute in fp32, so the inputs are fp32 with a step and tolerances to match."""
    torch.manual_seed(0)
    mask = left_padded_mask(2, 9, [0, 3])

    def fn(q, k, v):
        out, stats = alibi_attention(q, k, v, attention_mask=mask, return_stats=True, row_stats=True,
                                     backend=backend)
        return out, stats.first_token_rows, stats.entropy_rows

    inputs = [torch.randn(2, 9, 2, 16, requires_grad=True) for _ in range(3)]
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-2, atol=2e-3, rtol=2e-2, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_stats_gradients_within_twice_eager(backend, dtype):
    """fp16/bf16: the statistics' gradients err against float64 at most 2x what eager autograd through the dense
    matrix errs in the same dtype (inputs rounded to the dtype first, for both)."""
    torch.manual_seed(3)
    mask = left_padded_mask(2, 33, [0, 5])
    base = [(torch.randn(2, 33, 3, 32) * 1.5).to(dtype).double() for _ in range(3)]
    weights = _weights(2, 33, 3, 32, seed=2)

    def grads(inputs, run):
        leaves = [t.clone().requires_grad_() for t in inputs]
        _loss(*run(leaves), weights, use_out=False).backward()
        return [torch.zeros(t.shape, dtype=torch.float64) if t.grad is None else t.grad.double() for t in leaves]

    def ours(leaves):
        out, stats = alibi_attention(*leaves, attention_mask=mask, return_stats=True, row_stats=True,
                                     backend=backend)
        return out, stats.first_token_rows, stats.entropy_rows, stats.first_token_mass, stats.entropy

    def eager(leaves):  # the dense definition run in the low-precision dtype
        out, mass, ent = dense_stats_in(leaves, mask, dtype)
        return out, mass, ent, mass.sum(-1), ent.sum(-1)

    def reference(leaves):
        out, mass, ent = dense_stats(*leaves, mask)
        return out, mass, ent, mass.sum(-1), ent.sum(-1)

    ref = grads(base, reference)
    got = grads([t.to(dtype) for t in base], ours)
    low = grads([t.to(dtype) for t in base], eager)
    for name, a, e, r in zip("qkv", got, low, ref):
        err, base_err = (a - r).abs().max().item(), (e - r).abs().max().item()
        assert err <= 2 * base_err + 1e-6, f"d{name}: {err:.3g} > 2 x eager {base_err:.3g}"


def dense_stats_in(leaves, mask, dtype):
    """:func:`dense_stats` computed in ``dtype`` (scores, softmax, logs), as eager PyTorch would."""
    q, k, v = (t.transpose(1, 2) for t in leaves)
    head_dim, k_len, q_len = q.shape[-1], k.shape[2], q.shape[2]
    from alibi_surgery.kernels.alibi import alibi_slopes
    pos = (mask.cumsum(-1) - 1).to(dtype)
    s = q @ k.transpose(-1, -2) * head_dim ** -0.5 + alibi_slopes(q.shape[1]).to(dtype)[None, :, None, None] * \
        pos[:, None, None]
    rows = torch.arange(q_len)[:, None] + k_len - q_len
    visible = mask.bool()[:, None, None, :] & (torch.arange(k_len)[None, :] <= rows)[None, None]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    real = mask.bool()[:, k_len - q_len:][:, None, :, None]
    p = p * real
    first = ((mask.cumsum(-1) - 1 == 0) & mask.bool())[:, None, None, :]
    mass = (p * first).sum(-1)
    entropy = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)
    return (p @ v).transpose(1, 2), mass, entropy


def _stats_loss(q, k, v, mask):
    out, stats = alibi_attention(q, k, v, attention_mask=mask, return_stats=True, row_stats=True)
    penalty = stats.first_token_mass.sum() / stats.rows.sum() - 0.1 * stats.entropy_rows.mean()
    return out.square().mean() + penalty, stats.entropy


def test_compiled_stats_with_gradient_has_no_graph_break():
    """``torch.compile(fullgraph=True)`` of a loss on the statistics (a sink penalty): one graph, no break, and the
    compiled gradients equal eager ones."""
    torch.manual_seed(7)
    mask = left_padded_mask(2, 13, [0, 4])
    leaves = [torch.randn(2, 13, 3, 16, requires_grad=True) for _ in range(3)]
    entropy = assert_compiles_like_eager(_stats_loss, leaves, mask, atol=1e-6)
    assert entropy.requires_grad  # the statistics carry gradients in the compiled graph too


def test_statistics_without_gradients_keep_the_summing_path():
    """Under no_grad (diagnosis) the statistics come from the kernels' per-head sums and carry no graph; they equal
    the per-row path's sums."""
    torch.manual_seed(1)
    mask = left_padded_mask(2, 17, [0, 3])
    q, k, v = (torch.randn(2, 17, 3, 16) for _ in range(3))
    with torch.no_grad():
        _, summed = alibi_attention(q, k, v, attention_mask=mask, return_stats=True)
    _, per_row = alibi_attention(q, k, v, attention_mask=mask, return_stats=True, row_stats=True)
    assert summed.first_token_rows is None and not summed.entropy.requires_grad
    torch.testing.assert_close(summed.first_token_mass, per_row.first_token_mass, atol=1e-5, rtol=0)
    torch.testing.assert_close(summed.entropy, per_row.entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(summed.rows, per_row.rows)

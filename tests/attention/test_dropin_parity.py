"""Drop-in parity with FlashAttention's conventions: per-batch slopes ``[B, H]``, ``Tq < Tk`` aligned to the
bottom-right corner, and left padding read as FlashAttention's varlen packing (each sequence alone).

The reference is written here from the definition of FlashAttention's test reference (its ``attention_ref``
convention), in float64 and dense, independently of this package's code: scores ``q.k * scale`` plus the ALiBi bias
``-slope * |i + Tk - Tq - j|``, keys ``j > i + Tk - Tq`` masked, softmax, ``P @ v``. It uses relative distances,
not BLOOM's key positions: the two differ by a per-row constant, which softmax ignores, so agreement is the claim
the module docstring of :mod:`alibi_surgery.attention.functional` makes.
"""

from __future__ import annotations

import pytest
import torch

from alibi_surgery import UsageError, alibi_attention, alibi_attention_qkvpacked
from helpers import BACKENDS, left_padded_mask


def flash_reference(q, k, v, slopes, scale=None):
    """Causal ALiBi attention as FlashAttention defines it, float64. q ``[B, Tq, H, D]``, k, v ``[B, Tk, H, D]``
    (no padding: varlen sequences are passed one at a time), slopes ``[H]`` or ``[B, H]``."""
    q, k, v = (t.double() for t in (q, k, v))
    batch, q_len, n_head, head_dim = q.shape
    k_len = k.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * (scale or head_dim ** -0.5)
    row = torch.arange(q_len)[:, None]
    col = torch.arange(k_len)[None, :]
    slopes = slopes.double().expand(batch, n_head)[:, :, None, None]
    scores = scores - slopes * (row + k_len - q_len - col).abs()
    scores = scores.masked_fill(col > row + k_len - q_len, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, -1), v)


def _leaves(*shapes, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def _grads_close(ours, theirs, atol=5e-5):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b, atol=atol * max(1.0, float(b.abs().max())), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_batch,q_len,k_len", [(True, 5, 23), (True, 1, 9), (False, 12, 12)])
def test_matches_flash_convention(backend, per_batch, q_len, k_len):
    """Forward and backward, ``Tq <= Tk`` (a chunk after a prefix, a decode step, a prompt), slopes shared by the
    batch or one row per sequence (very different rows: a wrong batch stride shows)."""
    q, k, v = _leaves((3, q_len, 4, 16), (3, k_len, 4, 16), (3, k_len, 4, 16), seed=q_len)
    slopes = torch.tensor([[0.5, 0.25, 0.0, 1.0], [0.0, 2.0, 0.125, 0.03], [1.5, 0.0, 0.7, 0.3]])
    slopes = slopes if per_batch else slopes[1]
    out = alibi_attention(q, k, v, slopes=slopes, backend=backend)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = flash_reference(*ref_leaves, slopes)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    upstream = torch.randn_like(ref)
    ours = torch.autograd.grad((out.double() * upstream).sum(), (q, k, v))
    _grads_close(ours, torch.autograd.grad((ref * upstream).sum(), ref_leaves))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len", [11, 4])
def test_left_padding_is_varlen(backend, q_len):
    """A left-padded batch equals each sequence alone, unpadded (FlashAttention's varlen packing): keys count real
    tokens only, the queries are the last ``Tq`` tokens of each row, a padded query row outputs 0 and no gradient
    reaches a padded token."""
    k_len, pads = 11, [0, 5, 2]
    q, k, v = _leaves((3, q_len, 2, 16), (3, k_len, 2, 16), (3, k_len, 2, 16), seed=q_len)
    slopes = torch.tensor([[0.5, 0.1], [1.0, 0.0], [0.3, 2.0]])
    mask = left_padded_mask(3, k_len, pads)
    out = alibi_attention(q, k, v, attention_mask=mask, slopes=slopes, backend=backend)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    for b, pad in enumerate(pads):
        first_row = max(0, pad - (k_len - q_len))  # query rows before it are padding
        seq = [q[b:b + 1, first_row:], k[b:b + 1, pad:], v[b:b + 1, pad:]]
        seq = [t.detach().double().requires_grad_() for t in seq]
        ref = flash_reference(*seq, slopes[b])
        torch.testing.assert_close(out[b:b + 1, first_row:].double(), ref, atol=2e-5, rtol=0)
        assert not out[b, :first_row].any()
        ref_grads = torch.autograd.grad((ref * upstream[b:b + 1, first_row:].double()).sum(), seq)
        _grads_close([grads[0][b:b + 1, first_row:], grads[1][b:b + 1, pad:], grads[2][b:b + 1, pad:]], ref_grads)
        assert not grads[0][b, :first_row].any() and not grads[1][b, :pad].any() and not grads[2][b, :pad].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_takes_per_batch_slopes(backend):
    (qkv,) = _leaves((2, 10, 3, 3, 16), seed=3)
    slopes = torch.tensor([[0.5, 0.0, 1.0], [2.0, 0.25, 0.0]])
    out = alibi_attention_qkvpacked(qkv, slopes=slopes, backend=backend)
    ref_qkv = qkv.detach().double().requires_grad_()
    ref = flash_reference(*ref_qkv.unbind(3), slopes)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    (grad,) = torch.autograd.grad(out.double().sum(), qkv)
    _grads_close([grad], torch.autograd.grad(ref.sum(), ref_qkv))


def test_per_batch_slopes_trace_fullgraph():
    """Through the custom operators under ``torch.compile(fullgraph=True)`` (forward and backward traced), against
    the reference, not against eager."""
    q, k, v = _leaves((2, 3, 2, 16), (2, 7, 2, 16), (2, 7, 2, 16), seed=5)
    slopes = torch.tensor([[0.5, 0.0], [0.1, 1.0]])
    compiled = torch.compile(lambda q, k, v, s: alibi_attention(q, k, v, slopes=s), fullgraph=True,
                             backend="aot_eager")
    out = compiled(q, k, v, slopes)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = flash_reference(*ref_leaves, slopes)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    _grads_close(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), ref_leaves))


@pytest.mark.parametrize("slopes, message", [
    (torch.ones(3, 4), r"slopes must be \[heads\] = \[4\] or \[batch, heads\] = \[2, 4\], got \[3, 4\]"),
    (torch.ones(4, 2), r"slopes must be \[heads\] = \[4\] or .*got \[4, 2\]"),
    (torch.ones(2, 4, 1), r"slopes must be .*got \[2, 4, 1\]"),
    (torch.ones(4, dtype=torch.int64), "slopes must be a floating-point tensor"),
    ([0.5] * 4, "slopes must be a tensor"),
    (torch.ones(4, device="meta"), r"slopes must be on the inputs' device \(cpu\), got meta"),
])
def test_bad_slopes_are_refused_in_one_line(slopes, message):
    q = torch.randn(2, 5, 4, 16)
    for call in (lambda: alibi_attention(q, q, q, slopes=slopes),
                 lambda: alibi_attention_qkvpacked(torch.stack([q] * 3, 3), slopes=slopes)):
        with pytest.raises(UsageError, match=message) as info:
            call()
        assert "\n" not in str(info.value)

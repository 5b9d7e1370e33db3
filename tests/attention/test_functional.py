"""The drop-in API ``alibi_attention`` / ``alibi_attention_qkvpacked`` against a dense float64 reference, its
one-line refusals, and ``torch.compile(fullgraph=True)`` on CPU."""

from __future__ import annotations

import pytest
import torch

import alibi_surgery
from alibi_surgery import AttentionStats, UsageError, alibi_attention, alibi_attention_qkvpacked
from alibi_surgery.kernels.alibi import alibi_slopes
from helpers import BACKENDS, assert_compiles_like_eager, dense_attention as dense, left_padded_mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len,k_len,n_head,head_dim", [(97, 97, 3, 80), (1, 33, 6, 64), (5, 40, 12, 16)])
def test_matches_dense_reference_with_gradients(backend, q_len, k_len, n_head, head_dim):
    torch.manual_seed(q_len + n_head)
    q = torch.randn(2, q_len, n_head, head_dim, requires_grad=True)
    k, v = (torch.randn(2, k_len, n_head, head_dim, requires_grad=True) for _ in range(2))
    mask = left_padded_mask(2, k_len, [0, min(7, k_len - 1)])
    out, stats = alibi_attention(q, k, v, attention_mask=mask, return_stats=True, backend=backend)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, p = dense(*ref_inputs, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    upstream = torch.randn_like(ref)
    (out.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for ours, theirs in zip((q, k, v), ref_inputs):
        assert ours.grad.is_contiguous()
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=5e-5 * theirs.grad.abs().max(), rtol=0)
    # statistics: sums over real query rows of p[first real key] and of -sum p ln p
    real = (mask[:, k_len - q_len:] > 0)[:, None, :].double()  # [B, 1, Tq]
    first = (mask.cumsum(-1) == 1).double().argmax(-1)
    p0 = p[torch.arange(2), :, :, first]  # [B, H, Tq]
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    assert isinstance(stats, AttentionStats)
    torch.testing.assert_close(stats.rows.double(), real.sum(-1).expand(2, n_head))
    torch.testing.assert_close(stats.first_token_mass.double(), (p0 * real).sum(-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.entropy.double(), (entropy * real).sum(-1), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_separate_and_options_reach_the_scores(backend):
    torch.manual_seed(1)
    qkv = torch.randn(2, 21, 4, 3, 32, requires_grad=True)
    slopes, scale = torch.tensor([0.3, 0.0, 1.0, 0.01]), 0.05
    mask = left_padded_mask(2, 21, [4, 0])
    packed = alibi_attention_qkvpacked(qkv, attention_mask=mask, slopes=slopes, softmax_scale=scale, backend=backend)
    (packed * packed).sum().backward()
    leaf = qkv.detach().clone().requires_grad_()
    separate = alibi_attention(*leaf.unbind(3), attention_mask=mask, slopes=slopes, softmax_scale=scale,
                               backend=backend)
    (separate * separate).sum().backward()
    torch.testing.assert_close(packed, separate, rtol=0, atol=0)
    assert qkv.grad.is_contiguous() and qkv.grad.shape == qkv.shape
    torch.testing.assert_close(qkv.grad, leaf.grad, rtol=1e-6, atol=1e-7)
    ref, _ = dense(*qkv.detach().unbind(3), mask, slopes, scale)
    torch.testing.assert_close(packed.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("call, message", [
    (lambda q: alibi_attention(q, q[:, :, :2], q), "k must be"),
    (lambda q: alibi_attention(q, q, q.double()), "float32, float16 or bfloat16"),
    (lambda q: alibi_attention(q, q[:, :3], q[:, :3]), "more rows"),
    (lambda q: alibi_attention(q[0], q[0], q[0]), "4D tensor"),
    (lambda q: alibi_attention(q, q, q, attention_mask=torch.ones(2, 5)), "attention_mask must be"),
    (lambda q: alibi_attention(q, q, q, slopes=torch.ones(3)), "slopes must be"),
    (lambda q: alibi_attention(q, q, q, backend="eager"), "backend"),
    (lambda q: alibi_attention(q, q, q, backend="cuda"), "unknown backend"),
    (lambda q: alibi_attention(q, q, q, softmax_scale=-1.0), "softmax_scale"),
    (lambda q: alibi_attention_qkvpacked(q), "qkv must be"),
    (lambda q: alibi_attention(q, q[:, :, :3], q[:, :, :3]), "does not divide"),
    (lambda q: alibi_attention(q, q, q, window=0), "window must be"),
    (lambda q: alibi_attention(q.requires_grad_(), q[:, :, :2], q[:, :, :2]), "backward of grouped-query"),
    (lambda q: alibi_attention(q.transpose(-1, -2), q.transpose(-1, -2), q.transpose(-1, -2)), "unit stride"),
    (lambda q: alibi_attention(q, q, q, attention_mask=torch.zeros(2, 4).masked_fill_(torch.eye(2, 4).bool(),
                                                                                        float("-inf"))), "additive"),
    (lambda q: alibi_attention(q, q, q, attention_mask=torch.full((2, 4), 2)), r"1 \(or True\) for real tokens"),
    (lambda q: alibi_attention_qkvpacked(torch.stack([q] * 3, 3), attention_mask=-torch.ones(2, 4)), "additive"),
    (lambda q: alibi_attention(q, q[:, :, :0], q[:, :, :0]), "does not divide"),
    (lambda q: alibi_attention(q[:0], q[:0], q[:0], attention_mask=torch.ones(1, 4)), "attention_mask must be"),
])
def test_bad_input_is_refused_in_one_line(call, message):
    q = torch.randn(2, 4, 4, 4)
    with pytest.raises((UsageError, ValueError), match=message) as info:
        call(q)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_query_and_window_forward(backend):
    """k and v with 2 heads for 4 query heads (and 1 head, multi-query), a window of 3 keys, left padding."""
    torch.manual_seed(4)
    q = torch.randn(2, 11, 4, 16)
    mask = left_padded_mask(2, 11, [0, 5])
    for n_kv, window in ((2, 3), (1, None), (1, 1)):
        k, v = (torch.randn(2, 11, n_kv, 16) for _ in range(2))
        out, stats = alibi_attention(q, k, v, attention_mask=mask, window=window, return_stats=True, backend=backend)
        ref, p = dense(q, k, v, mask, window=window)
        assert out.shape == q.shape
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
        first_mass = torch.stack([p[b, :, :, first].sum(-1) for b, first in enumerate((0, 5))])  # first real keys
        torch.testing.assert_close(stats.first_token_mass.double(), first_mass, atol=2e-5, rtol=0)


def _loss(q, k, v, qkv, mask):
    out, stats = alibi_attention(q * 1.5, k, v, attention_mask=mask, return_stats=True)
    packed = alibi_attention_qkvpacked(qkv, attention_mask=mask)
    return (out.square().sum() + packed.sin().sum()), stats.entropy


def test_torch_compile_fullgraph_equals_eager_forward_and_backward():
    torch.manual_seed(2)
    mask = left_padded_mask(2, 13, [0, 4])
    leaves = [torch.randn(2, 13, 3, 16, requires_grad=True) for _ in range(3)]
    leaves.append(torch.randn(2, 13, 3, 3, 16, requires_grad=True))
    assert_compiles_like_eager(_loss, leaves, mask)


def test_exported_from_the_package():
    assert {"alibi_attention", "alibi_attention_qkvpacked", "AttentionStats"} <= set(alibi_surgery.__all__)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,q_len,k_len,n_head,head_dim", [(0, 4, 4, 3, 8), (2, 0, 0, 3, 8), (2, 0, 5, 3, 8),
                                                                (2, 4, 4, 0, 8), (2, 4, 4, 3, 0)])
def test_empty_inputs_give_empty_outputs_like_sdpa(backend, batch, q_len, k_len, n_head, head_dim):
    q = torch.randn(batch, q_len, n_head, head_dim, requires_grad=True)
    k, v = (torch.randn(batch, k_len, n_head, head_dim, requires_grad=True) for _ in range(2))
    mask = torch.ones(batch, k_len, dtype=torch.bool)
    out, stats = alibi_attention(q, k, v, attention_mask=mask, return_stats=True, backend=backend)
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert out.shape == sdpa.shape == q.shape and out.dtype == q.dtype
    assert all(s.shape == (batch, n_head) and not s.any() for s in stats[:3])
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and not q.grad.any() and not k.grad.any()
    if q_len == k_len:
        packed = torch.randn(batch, q_len, n_head, 3, head_dim)
        assert alibi_attention_qkvpacked(packed, backend=backend).shape == (batch, q_len, n_head, head_dim)


@pytest.mark.parametrize("mask", [torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
                                  torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]),
                                  torch.tensor([[False, True, True, True], [True, True, True, True]])])
def test_integer_float_and_bool_masks_agree(mask):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 8) for _ in range(3))
    want, _ = dense(q, k, v, mask.long())
    torch.testing.assert_close(alibi_attention(q, k, v, attention_mask=mask, backend="torch").double(), want,
                               atol=1e-5, rtol=1e-5)

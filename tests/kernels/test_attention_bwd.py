"""The attention backward (both backends) against autograd through transformers' eager BloomAttention."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from alibi_surgery import patch_bloom
from alibi_surgery.attention.backends import run_attention
from alibi_surgery.kernels.alibi import alibi_slopes, key_positions
from alibi_surgery.kernels.attention_bwd import alibi_attention_bwd
from alibi_surgery.kernels.reference import alibi_attention_blocked, alibi_attention_blocked_bwd
from helpers import BACKENDS, assert_tolerance, attention_grads, left_padded_mask, make_attention, needs_triton
from test_attention import SHAPE_DTYPES


@functools.lru_cache(maxsize=8)
def _eager_grads(hidden, n_head, dtype, mask_rows, seed):
    """Eager BloomAttention gradients in fp32 (the reference) and in ``dtype`` (the baseline of the tolerance rule),
    cached: both backends of one case share them (eager fp16/bf16 is the slow part on CPU)."""
    mask = torch.tensor(mask_rows)
    ref_mod = make_attention(hidden, n_head, seed)
    torch.manual_seed(seed + 1)
    x = torch.randn(mask.shape[0], mask.shape[1], hidden)
    upstream = torch.randn_like(x) * mask[..., None]
    ref = attention_grads(ref_mod, x, mask, upstream)
    eager = attention_grads(copy.deepcopy(ref_mod).to(dtype), x.to(dtype), mask, upstream)
    return ref_mod, x, upstream, ref, eager


def grad_case(hidden, n_head, dtype, backend, mask, seed=0):
    """Gradients of ours (patched, in dtype), eager in dtype and eager fp32, for a random upstream gradient that is
    zero on padded rows (their outputs are undefined, and in BLOOM no loss reaches them)."""
    ref_mod, x, upstream, ref, eager = _eager_grads(hidden, n_head, dtype, tuple(map(tuple, mask.tolist())), seed)
    ours_mod = patch_bloom(copy.deepcopy(ref_mod).to(dtype), backend)
    ours = attention_grads(ours_mod, x.to(dtype), mask, upstream)
    return ours, eager, ref


def check_all(ours, eager, ref, mask, dtype):
    valid_rows = mask.bool()
    for name in ref:
        rows = valid_rows if name in ("input", "qkv_out") else torch.ones(ref[name].shape[:-1], dtype=torch.bool)
        assert_tolerance(ours[name], eager[name], ref[name], rows, dtype, what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,head_dim,n_head,dtype", SHAPE_DTYPES)
def test_backward_matches_eager(T, head_dim, n_head, dtype, backend):
    pads = [min(5, T - 1), T - 1]  # a left-padded row and a single real token (T = 1: no padding)
    mask = left_padded_mask(2, T, pads)
    ours, eager, ref = grad_case(head_dim * n_head, n_head, dtype, backend, mask)
    check_all(ours, eager, ref, mask, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_with_mask_hole(backend):
    mask = left_padded_mask(2, 40, [0, 39])
    mask[0, 10:13] = 0
    ours, eager, ref = grad_case(80 * 3, 3, torch.float32, backend, mask)
    check_all(ours, eager, ref, mask, torch.float32)


def _dense_attention(q, k, v, key_pos, slopes):
    """float64 attention with a materialised matrix, q_len <= k_len; fully padded rows give zeros."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s + slopes.double().view(1, -1, 1, 1) * key_pos.double()[:, None, None, :]
    rows = torch.arange(q.shape[2])[:, None] + k.shape[2] - q.shape[2]
    visible = (key_pos >= 0)[:, None, None, :] & (torch.arange(k.shape[2])[None, :] <= rows)[None, None]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("q_len,head_dim", [(1, 64), (3, 96), (70, 16), (70, 112)])
def test_backward_decode_shapes_and_odd_head_dims(impl, q_len, head_dim):
    """q_len < k_len (a chunk after a prefix) and head dims BLOOM does not use, against float64 autograd."""
    torch.manual_seed(5)
    mask = left_padded_mask(2, 70, [0, 9])
    key_pos, slopes = key_positions(mask), alibi_slopes(3)
    q, k, v = (torch.randn(2, 3, n, head_dim, dtype=torch.float64) for n in (q_len, 70, 70))
    do = torch.randn(2, q_len, 3, head_dim, dtype=torch.float64) * (key_pos[:, 70 - q_len:] >= 0)[..., None, None]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    (_dense_attention(*ref, key_pos, slopes) * do).sum().backward()
    ours = [t.float().requires_grad_() for t in (q, k, v)]
    out, _, _ = run_attention(*ours, key_pos, slopes, impl)
    (out.double() * do).sum().backward()
    for a, b in zip(ours, ref):
        assert (a.grad.double() - b.grad).abs().max() <= 1e-5 * b.grad.abs().max()


@needs_triton
def test_triton_backward_equals_torch_backward():
    """The two backward implementations agree far below the tolerance rule (fp32)."""
    torch.manual_seed(7)
    mask = left_padded_mask(2, 97, [0, 30])
    key_pos, slopes = key_positions(mask), alibi_slopes(12)
    q, k, v = (torch.randn(2, 12, 97, 64) for _ in range(3))
    out, lse, _ = alibi_attention_blocked(q, k, v, key_pos, slopes)
    do = torch.randn_like(out)
    a = alibi_attention_bwd(do, q, k, v, out, lse, key_pos, slopes)
    b = alibi_attention_blocked_bwd(do, q, k, v, out, lse, key_pos, slopes, block_q=32, block_k=16)
    rows = (key_pos >= 0)[:, None, :, None]
    assert ((a[0] - b[0]) * rows).abs().max() < 1e-5 * b[0].abs().max()
    for x, y in zip(a[1:], b[1:]):
        assert (x - y).abs().max() < 1e-5 * y.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_checkpointing_recomputes_the_same_gradients(backend, tiny_lm):
    """Non-reentrant checkpointing reruns the fused forward in the backward: same gradients as without it."""
    model = patch_bloom(copy.deepcopy(tiny_lm).train(), backend)
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    mask = left_padded_mask(2, 33, [0, 4])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad(set_to_none=True)
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)

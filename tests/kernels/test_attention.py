"""The fused attention (both backends) against transformers' eager BloomAttention, over awkward shapes."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

from alibi_surgery.kernels.reference import alibi_attention_blocked
from alibi_surgery.kernels.attention_fwd import alibi_attention_fwd
from alibi_surgery.kernels.alibi import alibi_slopes, key_positions
from helpers import BACKENDS, DTYPES, assert_tolerance, attention_case, left_padded_mask, needs_triton

# Every (T, head_dim) pair and every (T, heads) and (head_dim, heads) pair appears at least once.
# The widest layer (head_dim 128 x 16 heads, bloom-1b7's) at T = 1: eager fp16/bf16 on a CPU spends most of a
# minute per case on its 2048-wide projections at T = 97.
SHAPES = [(1, 64, 3), (1, 80, 12), (1, 96, 16), (1, 128, 16), (2, 64, 12), (2, 80, 16), (2, 96, 3), (2, 128, 12),
          (97, 64, 16), (97, 80, 3), (97, 96, 12), (97, 128, 3), (130, 64, 3), (130, 80, 12), (130, 96, 16),
          (130, 128, 3)]
# Every shape in fp32; in half precision each shape takes one of fp16 and bf16, alternating within each T and starting
# on the other one at the next T, so that each half dtype meets every T and every head_dim twice (a pairwise covering
# of dtype x T and dtype x head_dim instead of the whole product: interpreter and eager-half time, 2026-12-07).
_HALF = ((torch.float16, "fp16"), (torch.bfloat16, "bf16"))
SHAPE_DTYPES = [pytest.param(t, d, h, dtype, id=f"T{t}-d{d}-h{h}-{name}") for i, (t, d, h) in enumerate(SHAPES)
                for dtype, name in ((torch.float32, "fp32"), _HALF[(i + i // 4) % 2])]


@pytest.mark.parametrize("n_head", [1, 2, 3, 5, 8, 12, 16, 24, 32, 40, 112, 130])
def test_slopes_bit_identical_to_transformers(n_head):
    assert torch.equal(alibi_slopes(n_head), _get_alibi_slopes(n_head, torch.device("cpu")))


def test_key_positions_match_build_alibi_tensor():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 1]])
    pos = key_positions(mask)
    # build_alibi_tensor with a single head of slope 1/2 (n_head=... ) is slope * position; recover positions.
    alibi = build_alibi_tensor(mask, 1, torch.float32).view(4, 6) / _get_alibi_slopes(1, torch.device("cpu"))
    assert torch.equal(pos.float() * mask, alibi.round())
    assert (pos[mask == 0] == -1).all() and (pos[mask == 1] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,head_dim,n_head,dtype", SHAPE_DTYPES)
def test_attention_matches_eager(T, head_dim, n_head, dtype, backend):
    pads = [0, min(5, T - 1), T - 1] if T > 1 else [0, 0, 0]  # different left paddings, one row of a single token
    mask = left_padded_mask(3, T, pads)
    ours, eager, ref, valid = attention_case(head_dim * n_head, n_head, dtype, backend, mask)
    assert_tolerance(ours, eager, ref, valid, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_decode_step_with_kv_cache(new_tokens, dtype, backend):
    """q_len < k_len through a DynamicCache, as generate() runs it, with left padding."""
    mask = left_padded_mask(2, 70, [0, 9])
    ours, eager, ref, valid = attention_case(80 * 3, 3, dtype, backend, mask, past=70 - new_tokens)
    assert_tolerance(ours, eager, ref, valid, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hole_in_mask_and_fully_padded_rows_are_finite(backend):
    """A padding hole mid-sequence (positions skip it, as in BLOOM) and a row that is all padding but one token."""
    mask = left_padded_mask(2, 40, [0, 39])
    mask[0, 10:13] = 0
    ours, eager, ref, valid = attention_case(64 * 2, 2, torch.float32, backend, mask)
    assert torch.isfinite(ours).all()
    assert_tolerance(ours, eager, ref, valid, torch.float32)


def _dense_reference(q, k, v, key_pos, slopes):
    """float64 softmax attention with a materialised matrix: only for checking the two backends agree."""
    d = q.shape[-1]
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    s = s + slopes.double().view(1, -1, 1, 1) * key_pos.double()[:, None, None, :]
    q_len, k_len = q.shape[2], k.shape[2]
    rows = torch.arange(q_len)[:, None] + k_len - q_len
    visible = (key_pos >= 0)[:, None, None, :] & (torch.arange(k_len)[None, :] <= rows)[None, None]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    return (p @ v.double()).transpose(1, 2), p


@pytest.mark.parametrize("impl", [pytest.param(alibi_attention_fwd, id="triton", marks=needs_triton),
                                  pytest.param(alibi_attention_blocked, id="torch")])
@pytest.mark.parametrize("head_dim", [16, 48, 112])
def test_small_and_odd_head_dims(impl, head_dim):
    """Head dims that BLOOM does not use but the kernel supports: any multiple of 16 up to 128."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 5, 33, head_dim) for _ in range(3))
    key_pos = key_positions(left_padded_mask(2, 33, [0, 7]))
    out, lse, _ = impl(q, k, v, key_pos, alibi_slopes(5))
    ref, p = _dense_reference(q, k, v, key_pos, alibi_slopes(5))
    assert (out[1, 7:] - ref[1, 7:]).abs().max() < 1e-5 and (out[0] - ref[0]).abs().max() < 1e-5


@needs_triton
def test_bad_head_dim_is_refused():
    q = torch.randn(1, 1, 4, 24)
    with pytest.raises(ValueError, match="head_dim"):
        alibi_attention_fwd(q, q, q, key_positions(torch.ones(1, 4)), alibi_slopes(1))

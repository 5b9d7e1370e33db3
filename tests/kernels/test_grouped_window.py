"""Grouped-query attention (k, v with fewer heads than q, read in place) and the sliding window, both
implementations (the Triton kernel under the interpreter, and its torch twin), forward and statistics.

The reference is independent and dense, in this file only: k and v expanded with ``repeat_interleave`` (query head h
reads key/value head h // G), the T x T scores materialised with explicit causal, window (transformers'
``sliding_window_causal_mask_function``: key j visible to the query at key index r iff ``r - window < j <= r``) and
left-padding masks, softmax, and the paper's first-token mass and entropy (A clamped at 1e-10). fp32 must agree to
~1e-5; bf16 follows the house rule (error against the fp32 reference at most 2x that of the same dense attention run
eagerly in bf16, on the same bf16-rounded inputs). Checks that k and v are never expanded, that the window matches
transformers' own mask function, and that a call needing gradients is refused (the backward is not extended).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from alibi_surgery.attention.backends import run_attention
from alibi_surgery.errors import UsageError
from alibi_surgery.kernels import ops
from alibi_surgery.kernels.reference import alibi_attention_blocked
from alibi_surgery.kernels.attention_fwd import alibi_attention_fwd
from alibi_surgery.kernels.alibi import alibi_slopes, key_positions
from alibi_surgery.kernels import attention_fwd
from alibi_surgery.kernels.alibi import first_real_key
from helpers import assert_tolerance, left_padded_mask, needs_triton

IMPLS = [pytest.param("triton", id="triton", marks=needs_triton), pytest.param("torch", id="torch")]
# (Hq, Hkv, d, Tq, Tk, window, left pads, slopes): every group shape, head dim, length and window appears; decode
# steps (Tq < Tk); paddings longer than the window (rows that no longer see their first real token); BLOOM's
# slopes and 0 (plain causal attention). T = 150 makes the kernel skip whole key blocks left of the window.
CASES = [
    (4, 2, 64, 17, 17, 5, [0, 3], "bloom"),
    (6, 1, 80, 97, 97, 16, [0, 30], "zero"),
    (12, 3, 96, 1, 1, 1, [0, 0], "bloom"),
    (3, 3, 64, 97, 97, 1, [0, 10], "bloom"),
    (4, 2, 96, 1, 40, 5, [0, 12], "zero"),
    (6, 1, 64, 17, 17, None, [0, 16], "bloom"),
    (12, 3, 80, 97, 97, 200, [0, 5], "zero"),
    (4, 2, 80, 8, 40, 16, [0, 30], "bloom"),
    (3, 3, 96, 17, 17, 5, [9, 0], "zero"),
    (4, 1, 64, 150, 150, 16, [0, 37], "bloom"),
]
IDS = [f"h{hq}-{hkv}-d{d}-q{tq}-k{tk}-w{w}-{s}" for hq, hkv, d, tq, tk, w, _, s in CASES]
# statistics variants, alternated over the cases
VARIANTS = [{}, {"normalize_entropy": True}, {"exclude_first_query": True},
            {"exclude_first_query": True, "normalize_entropy": True}]


def dense(q, k, v, mask2d, slopes, window, dtype, scale=None):
    """Dense causal attention in ``dtype`` (softmax in fp32, as transformers' eager attention), k and v expanded,
    scores scaled by ``scale`` (None: 1/sqrt(d)): ``(out [B, Tq, Hq, d] fp32, probabilities [B, Hq, Tq, Tk] fp32)``."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (t.to(dtype) for t in (q, k, v))
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # query head h -> key/value head h // G
    q_len, k_len = q.shape[2], k.shape[2]
    pos = key_positions(mask2d).float()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)).float() * scale + slopes[None, :, None, None] * pos[:, None, None]
    r = torch.arange(q_len)[:, None] + k_len - q_len  # key index of each query row (bottom-right aligned)
    j = torch.arange(k_len)[None, :]
    visible = (j <= r) & (j > r - window if window else True)
    visible = visible[None, None] & mask2d.bool()[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    out = probs.to(dtype) @ v
    return out.float().transpose(1, 2), probs


def paper_stats(probs, mask2d, window, exclude_first_query=False, normalize_entropy=False):
    """Per-(batch row, head) sums of first-token mass and entropy (A clamped at 1e-10) and counted rows."""
    q_len = probs.shape[2]
    qpos = key_positions(mask2d)[:, -q_len:].long()[:, None, :]  # [B, 1, Tq]
    counted = (qpos > 0 if exclude_first_query else qpos >= 0).expand(probs.shape[:3])
    first = first_real_key(key_positions(mask2d)).long()
    mass = probs.gather(-1, first.view(-1, 1, 1, 1).expand(*probs.shape[:3], 1)).squeeze(-1)
    ent = -(probs * torch.log(probs.clamp_min(1e-10))).sum(-1)
    if normalize_entropy:
        visible = (qpos + 1).clamp_max(window) if window else qpos + 1
        ent = torch.where(qpos > 0, ent / torch.log(visible.float().clamp_min(2.0)), 0.0)
    return torch.stack([torch.where(counted, x, 0.0).sum(-1) for x in (mass, ent, counted.float())], -1)


def problem(hq, hkv, d, tq, tk, pads, slopes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, tq, d, generator=gen)
    k, v = (torch.randn(2, hkv, tk, d, generator=gen) for _ in range(2))
    mask = left_padded_mask(2, tk, pads)
    return q, k, v, mask, alibi_slopes(hq) if slopes == "bloom" else torch.zeros(hq)


def ours(impl, q, k, v, mask, slopes, window, **options):
    if impl == "triton":
        return alibi_attention_fwd(q, k, v, key_positions(mask), slopes, window=window, **options)
    # small tiles: several query and key tiles, and whole key tiles left of the window skipped
    return alibi_attention_blocked(q, k, v, key_positions(mask), slopes, window=window, block_q=16, block_k=16,
                                   **options)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_grouped_window_against_dense(case, dtype, impl):
    hq, hkv, d, tq, tk, window, pads, slope_kind = CASES[case]
    if dtype == torch.bfloat16 and tq > 100:
        pytest.skip("the long case runs in fp32 only (interpreter time)")
    variant = VARIANTS[case % len(VARIANTS)]
    q, k, v, mask, slopes = problem(hq, hkv, d, tq, tk, pads, slope_kind, seed=case)
    q, k, v = (t.to(dtype).float() for t in (q, k, v))  # every run sees the same rounded inputs
    ref_out, ref_p = dense(q, k, v, mask, slopes, window, torch.float32)
    eager_out, eager_p = dense(q, k, v, mask, slopes, window, dtype)
    out, lse, stats = ours(impl, *(t.to(dtype) for t in (q, k, v)), mask, slopes, window, with_stats=True, **variant)
    assert out.shape == (2, tq, hq, d) and out.dtype == dtype
    assert lse.shape == (2, hq, tq) and stats.shape == (2, hq, 3)
    valid = mask[:, -tq:].bool()
    assert_tolerance(*(t.float().reshape(2, tq, -1) for t in (out, eager_out, ref_out)), valid, dtype)
    ref_stats = paper_stats(ref_p, mask, window, **variant)
    assert torch.equal(stats[..., 2], ref_stats[..., 2])
    if dtype == torch.float32:
        torch.testing.assert_close(stats, ref_stats, rtol=0, atol=1e-5 * max(1.0, ref_stats.abs().max().item()))
    else:
        eager_stats = paper_stats(eager_p, mask, window, **variant)
        err, base = ((s - ref_stats)[..., :2].abs().max().item() for s in (stats, eager_stats))
        assert err <= 2 * base + 1e-5, f"statistics: error {err:.3g} > 2 x eager bf16 {base:.3g}"
    if window and window < tk and tq > window and not variant.get("exclude_first_query"):
        # rows past the window put no mass on the first real token: the case really exercises the window
        assert (ref_p[0, :, -1, 0] == 0).all() and (ref_stats[0, :, 0] < ref_stats[0, :, 2]).all()


def test_window_is_transformers_sliding_window_mask():
    """Our visibility rule is transformers' ``sliding_window_causal_mask_function`` (q_idx and kv_idx absolute
    cache indices, as the key index r of our rows)."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    fn = sliding_window_causal_mask_function(5)
    tk, tq = 12, 4
    r, j = torch.arange(tk - tq, tk)[:, None], torch.arange(tk)[None, :]  # our rows' key indices, the keys
    expected = fn(torch.tensor(0), torch.tensor(0), r, j)
    assert torch.equal(expected, (r - 5 < j) & (j <= r))
    # the same mask, from our kernels: a window of 5 keys, one-hot values reveal which keys each row averages
    q = torch.zeros(1, 1, tq, 16)
    v = torch.eye(tk, 16)[None, None]
    out, _, _ = alibi_attention_blocked(q, torch.zeros_like(v), v, key_positions(torch.ones(1, tk)), torch.zeros(1),
                                        window=5)
    assert torch.equal(out[0, :, 0, :tk] > 0, expected)


class LargestOutput(TorchDispatchMode):
    """The largest output, in bytes, of any torch operation run inside the block (views included; under the
    interpreter also the byte views it takes of each kernel argument's storage)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.largest:
                self.largest, self.op = t.numel() * t.element_size(), str(func)
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_keys_and_values_are_never_expanded(impl, monkeypatch):
    """8 query heads on 2 key/value heads: no torch operation outputs more bytes than k itself, a quarter of k
    expanded to the query heads (k and v are 64 keys long, the queries 4 rows, the torch twin's tiles 16 keys); the
    kernel is handed k and v themselves."""
    q, k, v, mask, slopes = problem(8, 2, 16 * 4, 4, 64, [0, 9], "bloom")
    handed = []
    if impl == "triton":
        kernel = attention_fwd._alibi_fwd_kernel

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    handed.append((args[1].data_ptr(), args[2].data_ptr(), tuple(args[1].shape)))
                    return kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(attention_fwd, "_alibi_fwd_kernel", Spy())
    with LargestOutput() as seen:
        if impl == "triton":  # through the dispatcher and the custom operator, as models call it
            out, _, stats = run_attention(q, k, v, key_positions(mask), slopes, "triton", with_stats=True, window=7)
        else:
            out, _, stats = alibi_attention_blocked(q, k, v, key_positions(mask), slopes, block_k=16, with_stats=True,
                                                    window=7)
    assert seen.largest <= k.numel() * k.element_size(), (seen.largest, seen.op)
    if impl == "triton":
        assert handed == [(k.data_ptr(), v.data_ptr(), tuple(k.shape))]
    ref_out, _ = dense(q, k, v, mask, slopes, 7, torch.float32)
    assert (out - ref_out).abs().max() < 1e-5  # the 4 query rows are real in both batch rows


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hkv,window,what", [(2, None, "grouped-query"), (4, 8, "sliding-window")])
def test_backward_is_refused_in_one_line(impl, hkv, window, what):
    q, k, v, mask, slopes = problem(4, hkv, 16, 9, 9, [0, 2], "zero")
    q.requires_grad_()
    pos = key_positions(mask)
    with pytest.raises(UsageError, match=f"backward of {what} attention is not implemented") as err:
        run_attention(q, k, v, pos, slopes, impl, window=window)
    assert "\n" not in str(err.value)
    # the operator itself (torch.compile's path) refuses too, in its autograd set-up
    args = (pos.int(), first_real_key(pos).int(), slopes, impl, False, False, False, None, 1.0, False, window or 0)
    with pytest.raises(UsageError, match=what):
        ops.attention(*(t.transpose(1, 2) for t in (q, k, v)), *args)
    with torch.no_grad():  # forward only: fine
        out, _, _ = run_attention(q, k, v, pos, slopes, impl, window=window)
    assert out.shape == (2, 9, 4, 16)


def test_fake_implementation_follows_q():
    """Under torch.compile's fake tensors the output has q's heads, whatever k and v have."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(2, 9, 6, 32), torch.empty(2, 11, 2, 32)
        out, lse, stats = ops.attention(q, k, k, torch.zeros(2, 11, dtype=torch.int32),
                                        torch.zeros(2, dtype=torch.int32), torch.zeros(6), "torch", True, False, False,
                                        None, 1.0, False, 4)
    assert out.shape == (2, 9, 6, 32) and lse.shape == (2, 6, 9) and stats.shape == (2, 6, 3)


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_window_is_refused(bad):
    q, k, v, mask, slopes = problem(2, 1, 16, 3, 3, [0, 0], "zero")
    with pytest.raises(ValueError, match="window"):
        alibi_attention_blocked(q, k, v, key_positions(mask), slopes, window=bad)


def test_heads_that_do_not_divide_are_refused():
    q, k, v, mask, slopes = problem(3, 2, 16, 3, 3, [0, 0], "zero")
    with pytest.raises(ValueError, match="dividing"):
        alibi_attention_blocked(q, k, v, key_positions(mask), slopes)


@st.composite
def problems(draw, long: bool):
    """A grouped-query problem: 1-4 key/value heads, 1-4 query heads each, head_dim 16-128, 1-2 batch rows with any
    left padding, q_len <= k_len <= 40 (130 for ``long``), any window, the scores' scale None or 0.02-0.5, BLOOM's
    slopes or 0."""
    n_kv, group = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([16, 32, 64, 80, 96, 128]))
    k_len = draw(st.integers(1, 130 if long else 40))
    q_len = draw(st.one_of(st.just(k_len), st.integers(1, k_len)))
    pads = draw(st.lists(st.integers(0, k_len - 1), min_size=1, max_size=2))
    window = draw(st.one_of(st.none(), st.integers(1, k_len + 2)))
    scale = draw(st.one_of(st.none(), st.floats(0.02, 0.5)))
    return n_kv * group, n_kv, head_dim, q_len, k_len, pads, window, scale, draw(st.booleans()), draw(st.integers(0, 99))


def check_problem(impl, hq, hkv, d, tq, tk, pads, window, scale, bloom, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(len(pads), hq, tq, d, generator=gen)
    k, v = (torch.randn(len(pads), hkv, tk, d, generator=gen) for _ in range(2))
    mask = left_padded_mask(len(pads), tk, pads)
    slopes = alibi_slopes(hq) if bloom else torch.zeros(hq)
    ref_out, ref_p = dense(q, k, v, mask, slopes, window, torch.float32, scale)
    out, _, stats = ours(impl, q, k, v, mask, slopes, window, with_stats=True, softmax_scale=scale)
    valid = mask[:, -tq:].bool()[:, :, None, None]
    assert ((out - ref_out).abs() * valid).max() <= 2e-5 * max(1.0, ref_out.abs().max().item())
    ref_stats = paper_stats(ref_p, mask, window)
    assert torch.equal(stats[..., 2], ref_stats[..., 2])
    assert (stats - ref_stats).abs().max() <= 2e-5 * max(1.0, ref_stats.abs().max().item())


@settings(max_examples=30)
@given(problem=problems(long=True))
def test_torch_twin_property(problem):
    check_problem("torch", *problem)


@needs_triton
@settings(max_examples=12)
@given(problem=problems(long=False))
def test_triton_property(problem):
    check_problem("triton", *problem)

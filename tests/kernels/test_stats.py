"""Fused statistics against the paper's formulas applied to eager ``output_attentions``."""

from __future__ import annotations

import copy

import pytest
import torch

from alibi_surgery import head_stats, patch_bloom
from helpers import BACKENDS, DTYPES, left_padded_mask, make_attention, run_attention


def paper_metrics(probs, mask2d, exclude_first_query=False, normalize_entropy=False):
    """Per-head token-weighted means straight from the paper's definitions, over valid query rows of all rows b."""
    probs = probs.double()
    bos, ent, rows = torch.zeros(probs.shape[1], dtype=torch.float64), torch.zeros(probs.shape[1]), 0
    ent = ent.double()
    for b in range(probs.shape[0]):
        real = mask2d[b].nonzero().flatten()
        first = int(real[0])
        for pos, t in enumerate(real.tolist()):
            if exclude_first_query and pos == 0:
                continue
            a = probs[b, :, t]  # [H, T]
            h = -(a * torch.log(a.clamp_min(1e-10))).sum(-1)
            if normalize_entropy:
                h = h / torch.log(torch.tensor(pos + 1.0)) if pos > 0 else torch.zeros_like(h)
            bos += a[:, first]
            ent += h
            rows += 1
    return bos / rows, ent / rows, rows


def fused_metrics(attn, x, mask, backend, **variant):
    model = patch_bloom(copy.deepcopy(attn), backend)
    with head_stats(model, **variant) as sink:
        run_attention(model, x, mask)
    sums = sink.sums[0]
    return sums[:, 0] / sums[:, 2], sums[:, 1] / sums[:, 2], int(sums[0, 2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [{}, {"exclude_first_query": True}, {"normalize_entropy": True},
                                     {"exclude_first_query": True, "normalize_entropy": True}],
                         ids=["paper", "exclude-first", "normalized", "both"])
@pytest.mark.parametrize("T,head_dim,n_head", [(97, 80, 3), (130, 64, 12), (2, 96, 3)])
def test_stats_match_paper_formula_fp32(T, head_dim, n_head, variant, backend):
    attn = make_attention(head_dim * n_head, n_head, seed=T)
    mask = left_padded_mask(3, T, [0, min(7, T - 1), T - 1])
    torch.manual_seed(1)
    x = torch.randn(3, T, head_dim * n_head)
    _, probs = run_attention(attn, x, mask, output_attentions=True)
    ref_bos, ref_ent, ref_rows = paper_metrics(probs, mask, **variant)
    bos, ent, rows = fused_metrics(attn, x, mask, backend, **variant)
    assert rows == ref_rows
    assert (bos - ref_bos).abs().max() < 1e-4, (bos, ref_bos)
    assert (ent - ref_ent).abs().max() < 1e-4, (ent, ref_ent)
    assert ref_bos.min() >= 0 and (ref_bos.max() - ref_bos.min()) > 0.01  # the case is not degenerate


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_stats_low_precision_tolerance(dtype, backend):
    """bf16/fp16: statistics error against fp32 at most 2x that of the paper's formula on eager low-precision probs."""
    attn = make_attention(96 * 3, 3, seed=5)
    mask = left_padded_mask(2, 97, [0, 20])
    torch.manual_seed(2)
    x = torch.randn(2, 97, 96 * 3)
    _, probs = run_attention(attn, x, mask, output_attentions=True)
    ref = paper_metrics(probs, mask)
    low = copy.deepcopy(attn).to(dtype)
    _, probs_low = run_attention(low, x.to(dtype), mask, output_attentions=True)
    eager = paper_metrics(probs_low.float(), mask)
    ours = fused_metrics(low, x.to(dtype), mask, backend)
    for i, name in enumerate(["bos_mass", "entropy"]):
        err = (ours[i] - ref[i]).abs().max().item()
        base = (eager[i] - ref[i]).abs().max().item()
        assert torch.isfinite(ours[i]).all()
        assert err <= 2 * base + 1e-6, f"{name}: {err:.3g} > 2 x eager {base:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_need_no_padding_rows_and_skip_them(backend):
    """A row that is almost all padding contributes exactly its one real token; nothing is NaN."""
    attn = make_attention(64 * 2, 2, seed=9)
    mask = left_padded_mask(2, 40, [39, 39])
    x = torch.randn(2, 40, 128)
    bos, ent, rows = fused_metrics(attn, x, mask, backend)
    assert rows == 2
    assert torch.allclose(bos, torch.ones(2, dtype=bos.dtype)) and torch.allclose(ent, torch.zeros(2, dtype=ent.dtype),
                                                                                  atol=1e-6)

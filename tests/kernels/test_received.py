"""The key-side pass (attention received per key) against a dense float64 attention matrix written from the
definition, and Gu et al.'s per-key sink score against their formula on that matrix (issue 33, item 4)."""

from __future__ import annotations

import pytest
import torch

from alibi_surgery.attention.backends import run_attention
from alibi_surgery.kernels.alibi import alibi_slopes, key_positions
from alibi_surgery.kernels.received import attention_received, attention_received_blocked, gu_scores
from helpers import BACKENDS, dense_attention, left_padded_mask

RECEIVED = {"torch": attention_received_blocked, "triton": attention_received}


@pytest.mark.parametrize("batch,q_len,k_len,n_head,n_kv,head_dim,pads", [
    (2, 64, 64, 4, 4, 32, [0, 7]),     # the parity length of the issue, left padding
    (2, 64, 64, 4, 2, 16, [0, 0]),     # grouped-query attention (Llama-like), no ALiBi below
    (1, 5, 40, 3, 3, 80, [0]),         # a chunk after a cached prefix, head_dim 80
    (2, 97, 97, 6, 6, 64, [0, 30]),    # more than one key and query block
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_received_matches_dense_probabilities(backend, batch, q_len, k_len, n_head, n_kv, head_dim, pads):
    torch.manual_seed(k_len + n_kv)
    q = torch.randn(batch, q_len, n_head, head_dim) * 1.5
    k = torch.randn(batch, k_len, n_kv, head_dim) * 1.5
    v = torch.randn(batch, k_len, n_kv, head_dim)
    mask = left_padded_mask(batch, k_len, pads)
    slopes = alibi_slopes(n_head) if n_kv == n_head else torch.zeros(n_head)
    key_pos = key_positions(mask.bool())
    _, lse, _ = run_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_pos, slopes, backend)
    got = RECEIVED[backend](q.transpose(1, 2), k.transpose(1, 2), lse, key_pos, slopes)

    _, p = dense_attention(q, k, v, mask, slopes=slopes)  # float64 [B, H, Tq, Tk], 0 on padded rows
    want = p.sum(-2)
    assert (got.double() - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())
    assert (want > 0.5).any() and want.max() > 2 * want[want > 0].min()  # not a flat case

    # Gu et al.'s score: received over the real query rows that see the key, 0 on padded keys
    rows_seeing = torch.zeros(batch, k_len, dtype=torch.float64)
    for b in range(batch):
        for j in range(k_len):
            rows_seeing[b, j] = sum(1 for i in range(q_len) if mask[b, k_len - q_len + i] and i + k_len - q_len >= j)
    ref = torch.where(mask.bool()[:, None] & (rows_seeing > 0)[:, None], want / rows_seeing.clamp_min(1)[:, None], 0)
    torch.testing.assert_close(gu_scores(got, key_pos, q_len).double(), ref, atol=1e-5, rtol=0)


def test_received_refuses_a_window():
    q = torch.randn(1, 2, 4, 16)
    key_pos = torch.arange(4)[None].int()
    with pytest.raises(ValueError, match="sliding window"):
        attention_received_blocked(q, q, torch.zeros(1, 2, 4), key_pos, torch.zeros(2), window=2)

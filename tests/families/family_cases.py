"""One tiny, awkward configuration per registered family, for the conformance suite (test_conformance.py).

Adding a family to the suite is one :class:`Case` here. Everything a case states is test-side truth written from the
family's transformers code, independent of the adapter under test: where the attention modules are, which rows of the
fused QKV weight and which columns of the output projection belong to a head, and how to get correct attention
probabilities (the family's own eager attention, or a formula where eager is known wrong).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

HIDDEN, N_HEAD, HEAD_DIM, VOCAB = 240, 3, 80, 300  # head_dim 80 and a non-power-of-two head count


@dataclasses.dataclass
class Case:
    id: str
    make_config: Callable  # (n_layer) -> config
    reference_attn: str  # attn_implementation of the ground truth
    attentions: Callable  # model -> attention modules in layer order
    qkv: str  # attribute names on the attention module
    out: str
    head_rows: Callable  # (head, head_dim, hidden) -> list of (start, stop) rows of the fused QKV weight
    reference_probs: Callable | None = None  # (model, ids, mask) -> per-layer [B, H, T, T]; None: eager attentions


def _interleaved(h, d, hidden):
    return [(3 * d * h, 3 * d * (h + 1))]


def _blocked(h, d, hidden):
    return [(part * hidden + h * d, part * hidden + (h + 1) * d) for part in range(3)]


def bloom_config(n_layer=2):
    from transformers import BloomConfig

    return BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=n_layer, n_head=N_HEAD, bos_token_id=1,
                       eos_token_id=2, pad_token_id=3)


def mpt_config(n_layer=2):
    from transformers import MptConfig

    return MptConfig(d_model=HIDDEN, n_heads=N_HEAD, n_layers=n_layer, vocab_size=VOCAB, max_seq_len=512,
                     attn_config={"clip_qkv": 0.6, "softmax_scale": 0.07}, bos_token_id=1, eos_token_id=2,
                     pad_token_id=3)


def falcon_config(n_layer=2):
    from transformers import FalconConfig

    return FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=n_layer, num_attention_heads=N_HEAD,
                        alibi=True, multi_query=False, new_decoder_architecture=False, parallel_attn=False,
                        bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def falcon_probs(model, ids, mask):
    """Falcon-RW attention probabilities from the formula softmax((q.k + alibi) / sqrt(d)) with transformers' own
    bf16 ALiBi tensor, on q and k captured from each layer's fused QKV output (Falcon's eager maps are wrong)."""
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    captured = []
    hooks = [blk.self_attention.query_key_value.register_forward_hook(lambda m, i, o: captured.append(o))
             for blk in model.transformer.h]
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    batch, t = ids.shape
    alibi = build_alibi_tensor(mask, N_HEAD, torch.float32).view(batch, N_HEAD, 1, t)
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    out = []
    for fused in captured:
        qkv = fused.view(batch, t, N_HEAD, 3, HEAD_DIM)
        q, k = qkv[..., 0, :].transpose(1, 2), qkv[..., 1, :].transpose(1, 2)
        scores = (q @ k.transpose(-1, -2) + alibi) / math.sqrt(HEAD_DIM)
        out.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0))
    return out


CASES = [
    Case("bloom", bloom_config, "eager", lambda m: [b.self_attention for b in m.transformer.h], "query_key_value",
         "dense", _interleaved),
    Case("mpt", mpt_config, "eager", lambda m: [b.attn for b in m.transformer.blocks], "Wqkv", "out_proj", _blocked),
    Case("falcon", falcon_config, "sdpa", lambda m: [b.self_attention for b in m.transformer.h], "query_key_value",
         "dense", _interleaved, falcon_probs),
]

"""Property-based check of each family's score semantics through its adapter: drawn shapes and options, patched
logits against the family's own transformers attention (BLOOM eager, MPT eager, Falcon SDPA) in fp32.

What is drawn: the head count (1..12, so slope schedules of non-powers of two), head_dim, length (1..40), left
padding per row, and per family its options: MPT's ``softmax_scale`` and ``clip_qkv``; Falcon's slope schedule and
bf16-rounded ALiBi (positions stay small here; the rounding of large positions is in test_falcon.py). A 1-layer
model per example, the torch backend: 40 examples per family in the ci profile.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, BloomConfig, FalconConfig, MptConfig

from alibi_surgery import patched

VOCAB = 64


def _config(family, n_head, head_dim, data):
    hidden = n_head * head_dim
    ids = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if family == "bloom":
        return BloomConfig(hidden_size=hidden, n_layer=1, n_head=n_head, **ids), "eager"
    if family == "mpt":
        attn = {"softmax_scale": data.draw(st.one_of(st.none(), st.floats(0.01, 0.5)), label="softmax_scale"),
                "clip_qkv": data.draw(st.one_of(st.none(), st.floats(0.05, 2.0)), label="clip_qkv")}
        return MptConfig(d_model=hidden, n_heads=n_head, n_layers=1, max_seq_len=64, attn_config=attn, **ids), "eager"
    return FalconConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=n_head, alibi=True,
                        multi_query=False, new_decoder_architecture=False, parallel_attn=data.draw(st.booleans()),
                        bias=True, **ids), "sdpa"


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
@settings(max_examples=40)
@given(data=st.data())
def test_patched_logits_equal_the_family_reference(family, data):
    n_head = data.draw(st.integers(1, 12), label="n_head")
    head_dim = data.draw(st.sampled_from([8, 16, 24, 32, 80]), label="head_dim")
    length = data.draw(st.integers(1, 40), label="length")
    batch = data.draw(st.integers(1, 3), label="batch")
    pads = [data.draw(st.integers(0, length - 1), label="pad") for _ in range(batch)]
    config, attn = _config(family, n_head, head_dim, data)
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    for p in model.parameters():  # larger weights than the default init, so clip_qkv and the scale matter
        p.data.mul_(4.0)
    ids = torch.randint(4, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with patched(model, "torch"):
            got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    scale = max(1.0, want[real].abs().max().item())
    assert (got - want)[real].abs().max().item() <= 5e-5 * scale

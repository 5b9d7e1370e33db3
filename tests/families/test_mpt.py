"""MPT adapter, what is particular to it: slopes, patched logits against transformers' own MptForCausalLM (eager,
fp32) with clip_qkv and softmax_scale, holes inside a row, the cache under either name, refusals, parameter counts,
output_attentions. Generation, head slices, re-initialisation and streaming are in the conformance suite.

Every reference is independent of the adapter: transformers' modules, or the blocked layout written out here
(``Wqkv.weight.view(3, H, d, D)``).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import MptConfig, MptForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from alibi_surgery.attention.patch import patch
from alibi_surgery.errors import UsageError
from alibi_surgery.families import family_for, family_of_module
from alibi_surgery.families.mpt import MPT
from helpers import left_padded_mask, needs_triton

N_HEAD, HEAD_DIM, CLIP, SCALE = 3, 80, 1.5, 0.3  # softmax_scale 0.3, not 1/sqrt(80) = 0.112


def mpt_model(n_layer=2, seed=0, **attn):
    attn = {"clip_qkv": CLIP, "softmax_scale": SCALE, **attn}
    config = MptConfig(d_model=N_HEAD * HEAD_DIM, n_heads=N_HEAD, n_layers=n_layer, vocab_size=200, max_seq_len=128,
                       attn_config=attn, initializer_range=0.2,  # sharp attention, and clip_qkv clips
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return MptForCausalLM(config).eval()


def batch(length, pads=(0, 5), seed=1):
    torch.manual_seed(seed)
    ids = torch.randint(3, 200, (len(pads), length))
    return ids, left_padded_mask(len(pads), length, [min(p, length - 1) for p in pads])


@pytest.mark.parametrize("n_head", [*range(1, 17), 24, 32])
def test_slopes_equal_transformers_mpt_schedule(n_head):
    ref = -build_mpt_alibi_tensor(n_head, 2)[:, 0, 0]  # the bias at position -1 is -slope
    assert torch.equal(MPT.slopes(n_head), ref)


@pytest.mark.parametrize("backend,length", [("torch", 1), ("torch", 21), ("torch", 97),
                                            pytest.param("triton", 13, marks=needs_triton)])
def test_patched_logits_equal_eager_with_left_padding_clip_and_scale(backend, length):
    model = mpt_model()
    ids, mask = batch(length)
    seen = []
    hook = model.transformer.blocks[0].attn.Wqkv.register_forward_hook(
        lambda m, a, out: seen.append((out.abs() > CLIP).float().mean().item()))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        ours = patch(model, backend)(ids, attention_mask=mask).logits
    hook.remove()
    assert length == 1 or seen[0] > 0.05, "clip_qkv clips nothing: the test would not see it"
    real = mask.bool()
    err = (ours - ref)[real].abs().max().item()
    assert err <= 1e-5 * max(ref[real].abs().max().item(), 1.0), f"fp32 logits error {err:.3g}"


def test_holes_inside_a_row_follow_mpt_positions():
    model = mpt_model()
    ids, _ = batch(23)
    mask = torch.ones_like(ids)
    mask[0, 6:9] = 0  # a hole: MPT's positions stay index-based (BLOOM's would count real tokens only)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        ours = patch(model, "torch")(ids, attention_mask=mask).logits
    real = mask.bool()
    err = (ours - ref)[real].abs().max().item()
    assert err <= 1e-5 * max(ref[real].abs().max().item(), 1.0), f"fp32 logits error {err:.3g}"
    assert MPT.key_positions(mask.bool())[0].tolist() == [0, 1, 2, 3, 4, 5, -1, -1, -1, *range(9, 23)]


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_patched_attention_decodes_with_the_cache_under_either_name(name):
    attn = mpt_model(n_layer=1).transformer.blocks[0].attn
    torch.manual_seed(2)
    x = torch.randn(2, 9, N_HEAD * HEAD_DIM)
    bias = build_mpt_alibi_tensor(N_HEAD, 128)  # what MptModel passes
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)[None, None]  # MPT's bool mask: True = masked
    out = {}
    own = "cache" if "cache" in inspect.signature(type(attn).forward).parameters else "past_key_values"  # <= 5.24
    for run in ("eager", "patched"):
        cache = DynamicCache()
        kw = {own: cache} if run == "eager" else {name: cache}
        if run == "patched":
            patch(attn, "torch")
        with torch.no_grad():
            attn(x[:, :6], bias, attention_mask=causal[..., :6, :6], **kw)
            out[run] = attn(x[:, 6:], bias, attention_mask=causal[..., 6:, :], **kw)[0]
        assert cache.get_seq_length() == 9
    assert (out["patched"] - out["eager"]).abs().max() <= 1e-5 * out["eager"].abs().max()


@pytest.mark.parametrize("attn,words", [
    ({"alibi": False}, "MPT without ALiBi is not supported"), ({"qk_ln": True}, "qk_ln"),
    ({"prefix_lm": True}, "prefix_lm"), ({"attn_type": "multiquery_attention"}, "multiquery_attention"),
    ({"rope": True}, "rotary")])
def test_configs_transformers_would_silently_misrun_are_refused_in_one_line(attn, words):
    raw = {"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2, "attn_config": {"alibi": True, **attn}}
    with pytest.raises(UsageError, match=words) as info:
        family_for(raw)
    assert "\n" not in str(info.value)


def test_plain_mpt_configs_are_accepted():
    assert family_for({"model_type": "mpt"}) is MPT  # no attn_config: transformers' defaults (ALiBi on)
    assert family_for(mpt_model().config) is MPT
    assert family_for({"model_type": "mpt", "attn_config": {"alibi": True, "clip_qkv": 6, "alibi_bias_max": 8,
                                                              "attn_impl": "triton"}}) is MPT
    assert family_of_module(mpt_model().transformer.blocks[0]) is MPT


def test_parameter_counts_and_names():
    model = mpt_model(n_layer=3)
    assert MPT.params(model.config) == sum(p.numel() for p in model.parameters())  # the tied head once
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.blocks[2]
    assert MPT.block_params(model.config) == sum(p.numel() for p in block.parameters())
    state = model.state_dict()
    assert all("transformer." + n in state for n in MPT.block_names(2, block))
    assert "transformer." + MPT.embedding in state
    layout = MPT.layout(model.config)
    assert (layout.n_layer, layout.n_head, layout.head_dim, layout.hidden) == (3, N_HEAD, HEAD_DIM, 240)
    assert MPT.with_layers(model.config, 1).n_layers == 1 and model.config.n_layers == 3
    made = MPT.make_config(n_layer=2, hidden=240, n_head=3, vocab=50, clip_qkv=2.0)
    assert (made.n_layers, made.d_model, made.n_heads, made.attn_config.clip_qkv) == (2, 240, 3, 2.0)


def test_output_attentions_on_a_patched_mpt_returns_eager_maps():
    """MptBlock does not pass output_attentions to its attention: the patch must still return the eager maps."""
    import warnings

    from transformers import MptConfig, MptForCausalLM

    from alibi_surgery import patched

    torch.manual_seed(0)
    model = MptForCausalLM(MptConfig(d_model=48, n_heads=3, n_layers=2, vocab_size=64, max_seq_len=32)).eval()
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with patched(model, "torch"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert all(g is not None and torch.equal(g, w) for g, w in zip(got, want))
    assert not model.transformer.blocks[0]._forward_pre_hooks  # unpatch removed the hook

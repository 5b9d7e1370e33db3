"""MPT adapter: slopes, patched logits and generation against transformers' own MptForCausalLM (eager, fp32),
refusals, head slices and re-initialisation on MPT's blocked QKV layout, streaming inputs, parameter counts.

Every reference is independent of the adapter: transformers' modules, or the blocked layout written out here
(``Wqkv.weight.view(3, H, d, D)``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MptConfig, MptForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from alibi_surgery.attention.patch import patch
from alibi_surgery.errors import UsageError
from alibi_surgery.families import family_for, family_of_module
from alibi_surgery.families.mpt import MPT
from alibi_surgery.surgery.loss import causal_lm_labels
from alibi_surgery.surgery.reinit import reinit_heads
from alibi_surgery.surgery.slices import HeadSlices
from helpers import left_padded_mask, needs_triton

N_HEAD, HEAD_DIM, CLIP, SCALE = 3, 80, 1.5, 0.3  # softmax_scale 0.3, not 1/sqrt(80) = 0.112
SELECTION = {0: [2], 1: [0, 1]}


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


def test_greedy_generate_with_cache_is_token_identical():
    model = mpt_model()
    ids, mask = batch(11, pads=(0, 4))
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    ref = model.generate(ids, **options)
    ours = patch(model, "torch").generate(ids, **options)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_patched_attention_decodes_with_the_cache_under_either_name(name):
    attn = mpt_model(n_layer=1).transformer.blocks[0].attn
    torch.manual_seed(2)
    x = torch.randn(2, 9, N_HEAD * HEAD_DIM)
    bias = build_mpt_alibi_tensor(N_HEAD, 128)  # what MptModel passes
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)[None, None]  # MPT's bool mask: True = masked
    out = {}
    for run in ("eager", "patched"):
        cache = DynamicCache()
        kw = {"cache": cache} if run == "eager" else {name: cache}
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


def _selected(name: str, shape, selection) -> torch.Tensor:
    """True where parameter ``name`` of the test model belongs to a selected head (MPT's blocked layout)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    parts = name.split(".")  # transformer.blocks.<i>.attn.<Wqkv|out_proj>.weight
    if len(parts) == 6 and parts[3] == "attn" and int(parts[2]) in selection:
        for h in selection[int(parts[2])]:
            if parts[4] == "Wqkv":
                mask.view(3, N_HEAD, HEAD_DIM, -1)[:, h] = True  # q, k and v blocks of head h
            else:
                mask[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = True
    return mask


def test_head_slices_gradients_equal_full_autograd_and_nothing_else_moves():
    ref_model = mpt_model()
    ids, mask = batch(19)
    labels = causal_lm_labels(ids, mask)  # no target predicted from a padded row (the kernels output 0 there)
    ref_model(ids, attention_mask=mask, labels=labels).loss.backward()  # stock eager, full matrices
    ref = dict(ref_model.named_parameters())

    model = patch(copy.deepcopy(ref_model), "torch")
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with HeadSlices(model, SELECTION) as slices:
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        assert len(slices.tensors) == 4 * 3  # per head: q, k, v row blocks and the output columns
        with torch.no_grad():
            for t in slices.tensors:
                t.sub_(t.grad)  # an SGD step of rate 1 through the in-place views
    for name, now in model.state_dict().items():
        sel = _selected(name, now.shape, SELECTION)
        assert torch.equal(now[~sel], before[name][~sel]), f"{name}: an unselected element moved"
        if sel.any():
            step = before[name][sel] - now[sel]
            grad = ref[name].grad[sel]
            assert (step - grad).abs().max() <= 1e-5 * max(grad.abs().max().item(), 1e-3), name
            assert grad.abs().max() > 0


def test_reinit_touches_exactly_the_selected_heads():
    model = mpt_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinit_heads(model, SELECTION, seed=3)
    for name, now in model.state_dict().items():
        sel = _selected(name, now.shape, SELECTION)
        assert torch.equal(now[~sel], before[name][~sel]), f"{name}: an unselected element changed"
        if "out_proj" in name:
            assert sel.any() == (int(name.split(".")[2]) in SELECTION) and (now[sel] == 0).all()
        elif "Wqkv" in name and sel.any():
            assert (now[sel] != before[name][sel]).all()


class _Tensors:
    """The ``tensors`` object streamed diagnosis hands to ``embed``, over an in-memory state dict."""

    def __init__(self, state):
        self.state = state

    def __call__(self, names):
        return {n: self.state[n] for n in names}

    def rows(self, name, ids):
        return self.state[name][ids]


def test_embed_and_block_inputs_reproduce_the_model_blocks():
    model = mpt_model()
    ids, mask = batch(17)
    captured = []
    hook = model.transformer.blocks[1].register_forward_hook(lambda m, a, out: captured.append(out[0]))
    patch(model, "torch")
    with torch.no_grad():
        model(ids, attention_mask=mask)
        state = {k[len("transformer."):]: v for k, v in model.state_dict().items() if k.startswith("transformer.")}
        hidden = MPT.embed(_Tensors(state), ids, model.config, "cpu", torch.float32)
        args, kwargs = MPT.block_inputs(mask, model.config, torch.float32)
        for block in model.transformer.blocks:
            hidden = block(hidden, *args, **kwargs)[0]
    hook.remove()
    real = mask.bool()
    assert (hidden - captured[0])[real].abs().max() <= 1e-5 * captured[0][real].abs().max()


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

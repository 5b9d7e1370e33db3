"""Falcon-RW adapter, what is particular to it: slopes, patched logits against transformers' own FalconForCausalLM on
its SDPA path (fp32; before transformers 5.25 its eager path is wrong, see below) where bf16 rounding of the bias
matters, the upstream eager bug and the refusals it calls for (or, from 5.25, the eager fallback of output_attentions), config refusals, the QKV rows, parameter counts. Generation, head slices,
re-initialisation and streaming are in the conformance suite.

Every reference is independent of the adapter: transformers' modules (``build_alibi_tensor``, ``_split_heads``,
``FalconForCausalLM`` with ``attn_implementation="sdpa"``), or the layout written out here.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM
from transformers.models.falcon.modeling_falcon import build_alibi_tensor

from alibi_surgery.attention.patch import patch, unpatch
from alibi_surgery.diagnosis.diagnose import diagnose
from alibi_surgery.errors import UsageError
from alibi_surgery.families import family_for, family_of_module
from alibi_surgery.families.falcon import FALCON, takes_alibi
from alibi_surgery.io.random_model import byte_tokenizer
from family_cases import falcon_probs
from helpers import left_padded_mask, needs_triton

VOCAB = 200
RW = dict(alibi=True, multi_query=False, new_decoder_architecture=False, parallel_attn=False, bias=True)


def falcon_config(n_head=3, head_dim=80, n_layer=2, vocab=VOCAB, **extra):
    options = {**RW, **extra}
    return FalconConfig(vocab_size=vocab, hidden_size=n_head * head_dim, num_hidden_layers=n_layer,
                        num_attention_heads=n_head, initializer_range=0.1,  # sharper attention than 0.02
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, **options)


def falcon_model(attn="sdpa", seed=0, **kw):
    torch.manual_seed(seed)
    return FalconForCausalLM._from_config(falcon_config(**kw), attn_implementation=attn).eval()


def batch(length, pads=(0, 13), seed=1):
    torch.manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(pads), length))
    return ids, left_padded_mask(len(pads), length, [min(p, length - 1) for p in pads])


def logits_error(model, ids, mask, ref):
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
    real = mask.bool()
    return (ours - ref)[real].abs().max().item(), 1e-5 * max(ref[real].abs().max().item(), 1.0)


@pytest.mark.parametrize("n_head", [1, 2, 3, 6, 12, 16, 20, 32, 71])
def test_slopes_are_falcons_and_kernel_options_its_scale(n_head):
    # position 1 of build_alibi_tensor is the bf16-rounded slope (the only rounding there: bf16 slope times 1)
    ref = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_head, torch.float32)[:, 0, 1]
    assert torch.equal(FALCON.slopes(n_head).bfloat16().float(), ref)
    attn = falcon_model(n_head=3, head_dim=80, n_layer=1).transformer.h[0].self_attention
    assert FALCON.kernel_options(attn) == {"softmax_scale": 1 / math.sqrt(80), "bias_scale": 1 / math.sqrt(80),
                                           "alibi_bf16": True}


# (n_head, head_dim, T, n_layer, parallel_attn, bf16 rounding of slope * pos visibly matters)
LOGIT_CASES = [
    pytest.param(6, 80, 97, 2, False, False, id="6x80-T97"),
    pytest.param(12, 16, 97, 1, False, True, id="12x16-T97-slopes-round"),  # slopes 2^(-k/2) are not bf16
    pytest.param(3, 80, 300, 1, False, True, id="3x80-T300-positions-round"),  # positions above 256 round
    pytest.param(3, 80, 21, 2, True, False, id="3x80-T21-parallel-attn"),
    pytest.param(3, 80, 1, 1, False, False, id="3x80-T1"),
]


@pytest.mark.parametrize("n_head,head_dim,length,n_layer,parallel,rounding_matters", LOGIT_CASES)
def test_patched_logits_equal_sdpa_with_left_padding(n_head, head_dim, length, n_layer, parallel, rounding_matters,
                                                     monkeypatch):
    model = falcon_model(n_head=n_head, head_dim=head_dim, n_layer=n_layer, parallel_attn=parallel)
    ids, mask = batch(length, pads=(0, min(13, length // 3)))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    patch(model, "torch")
    err, tol = logits_error(model, ids, mask, ref)
    assert err <= tol, f"fp32 logits error {err:.3g}"
    if rounding_matters:  # the case can fail: without the bf16 rounding the logits miss by far more
        scale = 1 / math.sqrt(head_dim)
        monkeypatch.setattr(FALCON, "kernel_options",
                            lambda attn: {"softmax_scale": scale, "bias_scale": scale, "alibi_bf16": False})
        err, tol = logits_error(model, ids, mask, ref)
        assert err > 100 * tol, f"unrounded ALiBi is only {err:.3g} off: the case does not test the rounding"


def test_patched_eager_configured_model_equals_sdpa():
    """An eager-configured Falcon gets an additive float mask (SDPA's gets a bool one, made float): both read right."""
    sdpa = falcon_model()
    eager = falcon_model(attn="eager")
    eager.load_state_dict(sdpa.state_dict())
    ids, mask = batch(33)
    with torch.no_grad():
        ref = sdpa(ids, attention_mask=mask).logits
    err, tol = logits_error(patch(eager, "torch"), ids, mask, ref)
    assert err <= tol, f"fp32 logits error {err:.3g}"


@needs_triton
def test_patched_logits_equal_sdpa_triton():
    model = falcon_model(n_layer=1)
    ids, mask = batch(13, pads=(0, 4))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    err, tol = logits_error(patch(model, "triton"), ids, mask, ref)
    assert err <= tol, f"fp32 logits error {err:.3g}"


def test_eager_refusal_matches_the_installed_eager_path(monkeypatch):
    """Up to transformers 5.24 eager Falcon computes softmax((q.k + 2 alibi) / sqrt(d)) and the adapter refuses it;
    from 5.25 eager equals SDPA and the adapter does not refuse. Checked on whatever transformers is installed."""
    sdpa = falcon_model()
    eager = falcon_model(attn="eager")
    eager.load_state_dict(sdpa.state_dict())
    ids, mask = batch(40)
    with torch.no_grad():
        ref, theirs = sdpa(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
    real = mask.bool()
    if (theirs - ref)[real].abs().max() <= 1e-5 * ref[real].abs().max():
        assert not takes_alibi() and FALCON.eager_refusal() is None, "eager Falcon is right: nothing to refuse"
        return
    assert takes_alibi() and FALCON.eager_refusal() is not None, "eager Falcon is wrong here: it must be refused"
    scale = 1 / math.sqrt(80)
    monkeypatch.setattr(FALCON, "kernel_options",  # our kernels with the bias doubled reproduce the eager path
                        lambda attn: {"softmax_scale": scale, "bias_scale": 2 * scale, "alibi_bf16": True})
    err, tol = logits_error(patch(sdpa, "torch"), ids, mask, theirs)
    assert err <= tol, f"eager Falcon is not the doubled bias ({err:.3g}): update the module docstring"


def one_line_refusal(call):
    with pytest.raises(UsageError, match="adds the ALiBi bias twice") as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not takes_alibi(), reason="transformers >= 5.25: eager Falcon is right, nothing is refused")
def test_output_attentions_eager_backend_and_diagnose_eager_are_refused():
    model = patch(falcon_model(n_layer=1), "torch")
    ids, mask = batch(9)
    one_line_refusal(lambda: model(ids, attention_mask=mask, output_attentions=True))
    one_line_refusal(lambda: diagnose(model, None, ["a prompt"], backend="eager"))
    eager = patch(falcon_model(attn="eager", n_layer=1), "eager")  # its own forward is the double-bias branch
    one_line_refusal(lambda: eager(ids, attention_mask=mask))
    train = patch(falcon_model(attn="eager", n_layer=1, attention_dropout=0.1), "torch").train()
    one_line_refusal(lambda: train(ids, attention_mask=mask))
    with torch.no_grad():  # the eager backend on an SDPA model runs the module's own (correct) SDPA branch
        ref = unpatch(model)(ids, attention_mask=mask).logits
    assert logits_error(patch(model, "eager"), ids, mask, ref)[0] == 0.0


@pytest.mark.skipif(takes_alibi(), reason="transformers <= 5.24: eager Falcon is wrong and refused (test above)")
def test_output_attentions_falls_back_to_eager_where_eager_is_right():
    model = falcon_model(n_layer=2)
    ids, mask = batch(19, pads=(0, 5))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    truth = falcon_probs(model, ids, mask)  # the formula, written in the conformance cases
    patch(model, "torch")
    with pytest.warns(UserWarning, match="output_attentions=True: this call runs falcon's eager attention"):
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_attentions=True)
    assert model.config._attn_implementation == "sdpa", "the fallback leaves the model's implementation as it was"
    assert len(out.attentions) == 2 and all(a is not None for a in out.attentions)
    real = mask.bool()
    for maps, want in zip(out.attentions, truth):
        rows = real[:, None, :, None].expand_as(want)
        assert (maps - want)[rows].abs().max() <= 1e-5, "eager attention maps against the formula"
    assert (out.logits - ref)[real].abs().max() <= 1e-5 * ref[real].abs().max()
    # the eager backend and a training call with attention dropout run the module's own forward, unrefused
    eager = patch(falcon_model(attn="eager", n_layer=1), "eager")
    with torch.no_grad():
        assert torch.isfinite(eager(ids, attention_mask=mask).logits).all()
    train = patch(falcon_model(n_layer=1, attention_dropout=0.1), "torch").train()
    assert torch.isfinite(train(ids, attention_mask=mask).logits).all()
    prompts = ["a prompt that is long enough", "short"]
    model = falcon_model(n_layer=2, vocab=300)  # diagnosis from output_attentions (eager) against the fused kernels
    via_maps, fused = (diagnose(model, byte_tokenizer(), prompts, backend=b, batch_size=2) for b in ("eager", "torch"))
    assert torch.allclose(via_maps.bos_mass, fused.bos_mass, atol=1e-5, rtol=0)
    assert torch.allclose(via_maps.entropy, fused.entropy, atol=1e-4, rtol=0)


@pytest.mark.parametrize("raw,words", [
    ({"alibi": False}, "rotary position embeddings"),
    ({}, "rotary position embeddings"),  # FalconConfig's default: alibi false
    ({"alibi": True, "multi_query": False, "new_decoder_architecture": True}, "new decoder architecture"),
    ({"alibi": True}, "multi-query attention"),  # FalconConfig's default: multi_query true
    ({"alibi": True, "multi_query": True}, "multi-query attention"),
    ({"alibi": True, "multi_query": False, "num_attention_heads": 8, "num_kv_heads": 2}, "num_kv_heads: 2"),
    ({"alibi": True, "multi_query": False, "n_head": 32, "n_layer": 24}, "reads only num_attention_heads"),
])
def test_other_falcon_configs_are_refused_in_one_line(raw, words):
    with pytest.raises(UsageError, match=words) as info:
        family_for({"model_type": "falcon", **raw})
    assert "\n" not in str(info.value)


def test_rw_configs_are_accepted():
    for parallel in (False, True):
        assert family_for({"model_type": "falcon", "alibi": True, "multi_query": False, "parallel_attn": parallel,
                           "num_attention_heads": 32, "num_hidden_layers": 24, "num_kv_heads": 32}) is FALCON
    model = falcon_model(n_layer=1)
    assert family_for(model.config) is FALCON
    assert family_for(FALCON.make_config(n_layer=1, hidden=64, n_head=4, vocab=50)) is FALCON
    assert family_of_module(model.transformer.h[0]) is FALCON


def _head_rows(attn, head: int) -> torch.Tensor:
    """Rows of the fused QKV output that transformers hands to ``head`` (q, k, v): ``_split_heads`` up to 5.24; from
    5.25 what the module's own forward passes to the attention function, read by one call with the projection's
    output set to the row index."""
    index = torch.arange(attn.query_key_value.out_features, dtype=torch.float32)
    if hasattr(attn, "_split_heads"):
        return torch.cat([part[0, 0, head] for part in attn._split_heads(index[None, None])]).long()
    from transformers import AttentionInterface

    captured = []

    def capture(module, q, k, v, mask, **kwargs):
        captured.extend((q, k, v))
        return torch.zeros_like(q).transpose(1, 2), None

    AttentionInterface.register("capture-rows", capture)
    before = attn.config._attn_implementation
    attn.config._attn_implementation = "capture-rows"
    try:
        with torch.no_grad():
            attn.query_key_value.weight.zero_()
            attn.query_key_value.bias.copy_(index)
            attn(torch.zeros(1, 1, attn.query_key_value.in_features), attention_mask=None)
    finally:
        attn.config._attn_implementation = before
    return torch.cat([t[0, head, 0] for t in captured]).long()


def test_qkv_rows_are_the_rows_split_heads_assigns():
    attn = falcon_model(n_layer=1).transformer.h[0].self_attention
    layout = FALCON.layout(attn.config)
    for h in range(3):
        (a, b), = FALCON.qkv_rows(h, layout)
        assert torch.equal(_head_rows(attn, h), torch.arange(a, b))


def test_parameter_counts_names_and_layout():
    model = falcon_model(n_layer=3)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert FALCON.params(model.config) == sum(p.numel() for p in model.parameters())  # the tied head once
    block = model.transformer.h[2]
    assert FALCON.block_params(model.config) == sum(p.numel() for p in block.parameters())
    state = model.state_dict()
    names = FALCON.block_names(2, block)
    assert sorted("transformer." + n for n in names) == sorted(k for k in state if k.startswith("transformer.h.2."))
    assert "transformer." + FALCON.embedding in state
    layout = FALCON.layout(model.config)
    assert (layout.n_layer, layout.n_head, layout.head_dim, layout.hidden, layout.vocab) == (3, 3, 80, 240, VOCAB)
    assert FALCON.with_layers(model.config, 1).num_hidden_layers == 1 and model.config.num_hidden_layers == 3
    made = FALCON.make_config(n_layer=2, hidden=240, n_head=3, vocab=50, parallel_attn=True)
    assert (made.num_hidden_layers, made.hidden_size, made.num_attention_heads, made.vocab_size) == (2, 240, 3, 50)
    assert made.alibi and not made.multi_query and not made.new_decoder_architecture and made.bias
    assert made.parallel_attn and made.num_kv_heads == 3

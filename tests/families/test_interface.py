"""Models routed through transformers' attention interface (Llama with grouped-query attention, Mistral with a sliding
window shorter than the prompt, Gemma3 with query_pre_attn_scalar and sliding layers): the fused statistics against
the paper's formulas on eager ``output_attentions``, logits against eager and SDPA, greedy generation, and the
absence of any key/value expansion. References are transformers' own modules in fp32; formulas are written here."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alibi_surgery.attention.interface import mask_structure
from alibi_surgery.attention.patch import head_stats, patched
from alibi_surgery.errors import UsageError
from alibi_surgery.families import family_for, family_of_module
from alibi_surgery.io.random_model import shape_config
from helpers import hooked_runs

SHAPES = ("tiny-llama", "tiny-mistral", "tiny-gemma3")
BACKENDS = ("torch", "triton")
LENGTHS = (19, 12, 3)  # longer and shorter than the 8-token windows; one prompt left-padded by 16


def _model(shape: str, seed: int = 0, layers: int = 2):
    config = shape_config(shape, n_layer=layers, vocab_size=300)
    torch.manual_seed(seed)
    model = family_for(config).model_class()(config).eval()
    return model


def _batch(seed: int = 1):
    torch.manual_seed(seed)
    width = max(LENGTHS)
    ids = torch.randint(4, 300, (len(LENGTHS), width))
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        mask[row, width - n:] = 1
        ids[row, : width - n] = 3
    ids[:, -1] = torch.where(mask[:, -1] > 0, ids[:, -1], 3)
    for row, n in enumerate(LENGTHS):
        ids[row, width - n] = 1  # <s> first, as a LLaMA tokenizer does
    return ids, mask


def _eager(model, ids, mask, **kw):
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, **kw)
    finally:
        model.set_attn_implementation(before)


def _paper_stats(probs, mask):
    """Per (head) sums of the first-token mass, the entropy (A clamped at 1e-10) and the row count over valid query
    rows, from materialised probabilities [B, H, T, T], in float64 (the paper's definitions)."""
    probs = probs.double()
    first = mask.long().argmax(-1)
    sums = torch.zeros(probs.shape[1], 3, dtype=torch.float64)
    for b in range(probs.shape[0]):
        rows = mask[b].bool()
        p = probs[b][:, rows]  # [H, n, T]
        sums[:, 0] += p[..., first[b]].sum(-1)
        sums[:, 1] += (-(p * p.clamp_min(1e-10).log()).sum(-1)).sum(-1)
        sums[:, 2] += rows.sum()
    return sums


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_statistics_equal_the_formulas_on_eager_attention_maps(shape, backend):
    model = _model(shape)
    ids, mask = _batch()
    maps = _eager(model, ids, mask, output_attentions=True).attentions
    with torch.no_grad(), patched(model, backend), head_stats(model) as sink:
        model(input_ids=ids, attention_mask=mask)
    assert model.config._attn_implementation == "sdpa"  # put back
    for layer, probs in enumerate(maps):
        expected = _paper_stats(probs, mask)
        got = sink.sums[layer]
        assert torch.equal(got[:, 2], expected[:, 2])
        mean_got, mean_expected = got[:, :2] / got[:, 2:], expected[:, :2] / expected[:, 2:]
        assert torch.allclose(mean_got, mean_expected, atol=1e-4, rtol=0), (layer, mean_got, mean_expected)


def test_the_windows_bind_and_gemma_scales_its_own_way():
    """What the cases above rely on: the windows are shorter than the prompt, and Gemma3's scaling is not
    1/sqrt(head_dim)."""
    mistral, gemma = _model("tiny-mistral"), _model("tiny-gemma3")
    assert mistral.config.sliding_window < max(LENGTHS)
    attn = gemma.model.layers[0].self_attn
    assert attn.sliding_window is not None and gemma.model.layers[1].self_attn.sliding_window is None
    assert abs(attn.scaling - attn.head_dim ** -0.5) > 1e-3


def _errors(dtype, model, ids, mask, backend):
    """Max |logits - fp32 eager| over real positions for eager, SDPA and the patched model, all in ``dtype``."""
    valid = mask.bool()
    reference = _eager(model, ids, mask).logits[valid]
    low = model.to(dtype)
    try:
        eager = _eager(low, ids, mask).logits[valid].float()
        with torch.no_grad():
            sdpa = low(input_ids=ids, attention_mask=mask).logits[valid].float()
            with patched(low, backend):
                ours = low(input_ids=ids, attention_mask=mask).logits[valid].float()
    finally:
        model.float()
    return [(x - reference).abs().max().item() for x in (eager, sdpa, ours)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_patched_logits_equal_eager_and_sdpa(shape, backend):
    model = _model(shape)
    ids, mask = _batch()
    eager, sdpa, ours = _errors(torch.float32, model, ids, mask, backend)
    assert eager == 0.0 and sdpa < 1e-4 and ours < 1e-4, (eager, sdpa, ours)
    eager, sdpa, ours = _errors(torch.bfloat16, model, ids, mask, backend)
    assert ours <= 2 * max(eager, sdpa), (eager, sdpa, ours)  # the tolerance rule


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_generation_is_token_identical(shape):
    model = _model(shape)
    ids, mask = _batch()
    settings = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=3)
    with torch.no_grad():
        stock = model.generate(ids, **settings)
        with patched(model, "torch"):
            ours = model.generate(ids, **settings)
    assert ours.shape[1] > ids.shape[1] + 8  # the prompts plus the windows are exceeded while decoding
    assert torch.equal(ours, stock)


class _Shapes(TorchDispatchMode):
    """Records the output shape of every aten op (and which ops ran) inside the block."""

    def __init__(self):
        super().__init__()
        self.outputs, self.ops = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append(tuple(t.shape))
        return out


def test_no_key_value_expansion_happens(monkeypatch):
    """Grouped key/value heads are never repeated: transformers' repeat_kv is never called, and no operation produces
    a tensor of the expanded key/value shape [B, Hq, Tk, D] or repeat_kv's [B, Hkv, G, Tk, D]. The prompt is
    decoded one token at a time after a prefill, so that the query shape [B, Hq, 1, D] differs from the keys'."""
    import transformers.models.llama.modeling_llama as llama

    def refuse(*args, **kwargs):
        raise AssertionError("repeat_kv was called")

    monkeypatch.setattr(llama, "repeat_kv", refuse)
    model = _model("tiny-llama")
    ids, mask = _batch()
    config = model.config
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    assert hq // hkv == 2
    with torch.no_grad(), patched(model, "torch"):
        out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        with _Shapes() as seen:
            model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    batch, k_len = ids.shape
    expanded = {(batch, hq, k_len, d), (batch, hkv, hq // hkv, k_len, d)}
    assert not expanded & set(seen.outputs), sorted(set(seen.outputs))
    assert (batch, hkv, k_len, d) in seen.outputs  # the cache's own keys were built: the check looked at the keys


def test_mask_structure_reads_padding_and_window_and_refuses_other_patterns():
    batch, length = 2, 10
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :4] = False
    i = torch.arange(length)
    causal = (i[None, :] <= i[:, None])[None] & valid[:, None, :]
    window = causal & (i[None, :] > i[:, None] - 3)[None]
    key_pos, kstart, found = mask_structure({}, window[:, None], batch, length, length, torch.device("cpu"))
    assert found == 3 and kstart.tolist() == [0, 4]
    assert key_pos[1].tolist() == [-1] * 4 + list(range(6))
    assert mask_structure({}, causal[:, None], batch, length, length, torch.device("cpu"))[2] is None
    chunked = causal & ((i[None, :] // 4) == (i[:, None] // 4))[None]  # Llama4's chunked attention
    with pytest.raises(UsageError, match="not causal attention"):
        mask_structure({}, chunked[:, None], batch, length, length, torch.device("cpu"))
    bidirectional = causal.clone()
    bidirectional[0, 2, 5] = True
    with pytest.raises(UsageError, match="not causal attention"):
        mask_structure({}, bidirectional[:, None], batch, length, length, torch.device("cpu"))


def test_patching_switches_the_implementation_and_back():
    model = _model("tiny-llama")
    family = family_of_module(model)
    assert family.interface and family.name == "llama" and family.surgery_refusal
    with patched(model, "torch"):
        assert model.config._attn_implementation == "alibi_surgery"
        with patched(model, "eager"):
            assert model.config._attn_implementation == "eager"
        assert model.config._attn_implementation == "alibi_surgery"
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())


PROMPTS = ["the cat sat on the mat", "a", "a much longer prompt, with more words in it than the others", "birds"]


def _hook_reference(model, prompts):
    """(value_ratio [L, Hq], output_norm [L, Hq], residual_peak [L]) in float64 from forward hooks on the unpatched
    model's own v_proj, o_proj and decoder layers, one prompt at a time (no padding). Query head h reads key/value
    head h // (Hq / Hkv)."""
    from alibi_surgery.io.random_model import byte_tokenizer

    tok = byte_tokenizer(add_bos=True)
    config = model.config
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layers = model.model.layers
    value_sum, out_sum = torch.zeros(len(layers), hq, dtype=torch.float64), torch.zeros(len(layers), hq,
                                                                                          dtype=torch.float64)
    resid_sum = torch.zeros(len(layers), dtype=torch.float64)
    weight = rows = 0
    def install(seen):
        handles = []
        for i, layer in enumerate(layers):
            handles.append(layer.self_attn.v_proj.register_forward_hook(
                lambda m, a, out, i=i: seen.__setitem__(("v", i), out[0].double())))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, i=i: seen.__setitem__(("ctx", i), a[0][0].double())))
            handles.append(layer.register_forward_pre_hook(
                lambda m, a, kw, i=i: seen.__setitem__(("res", i), (a[0] if a else kw["hidden_states"])[0].double()),
                with_kwargs=True))
        return handles

    for n, seen in hooked_runs(model, tok, prompts, install):
        rows += n
        weight += n if n >= 2 else 0
        for i, layer in enumerate(layers):
            w_out = layer.self_attn.o_proj.weight.double()
            for h in range(hq):
                g = h // (hq // hkv)
                norms = seen[("v", i)][:, g * d:(g + 1) * d].norm(dim=-1)
                if n >= 2:
                    value_sum[i, h] += n * norms[0] / norms[1:].mean()
                cols = slice(h * d, (h + 1) * d)
                out_sum[i, h] += (seen[("ctx", i)][:, cols] @ w_out[:, cols].T).norm(dim=-1).sum()
            res = seen[("res", i)].norm(dim=-1)
            if n >= 2:
                resid_sum[i] += n * res[0] / res[1:].mean()
    return value_sum / weight, out_sum / rows, resid_sum / weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_token_metrics_equal_the_hook_reference_on_llama(backend):
    from alibi_surgery import diagnose
    from alibi_surgery.io.random_model import byte_tokenizer

    model = _model("tiny-llama")
    with torch.no_grad():  # spread the value norms so that the ratios are far from 1
        for layer in model.model.layers:
            v = layer.self_attn.v_proj.weight
            v.mul_(torch.linspace(0.3, 3.0, v.shape[0])[:, None])
    expected = _hook_reference(model, PROMPTS)
    report = diagnose(model, byte_tokenizer(add_bos=True), PROMPTS, backend=backend, batch_size=3)
    for name, got, want in (("value_ratio", report.value_ratio, expected[0]),
                            ("output_norm", report.output_norm, expected[1]),
                            ("residual_peak", report.residual_peak, expected[2])):
        err = ((got.double() - want).abs() / want.abs()).max().item()
        assert err < 1e-4, (name, got, want)
    assert (expected[0] - 1).abs().max() > 0.01


@pytest.mark.parametrize("shape", SHAPES)
def test_output_attentions_falls_back_to_the_models_eager_attention(shape):
    """Under the patch, ``output_attentions=True`` returns the maps of the model's own eager attention (with a
    warning), not an empty tuple; the implementation switch stays in place and later calls run fused again."""
    model = _model(shape)
    ids, mask = _batch()
    want = _eager(model, ids, mask, output_attentions=True)
    real = mask.bool()
    with patched(model, "torch"):
        with pytest.warns(UserWarning, match="output_attentions=True: this call runs"):
            with torch.no_grad():
                got = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        assert len(got.attentions) == len(want.attentions) == 2
        for ours, theirs in zip(got.attentions, want.attentions):
            rows = real[:, None, :, None].expand_as(theirs)
            assert (ours - theirs)[rows].abs().max() <= 1e-6
        assert (got.logits - want.logits)[real].abs().max() <= 1e-4
        with head_stats(model) as sink, torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert sink.sums[..., 2].sum() > 0, "a later call without maps runs the fused kernels"
        with head_stats(model), pytest.raises(RuntimeError, match="head statistics need"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, output_attentions=True)

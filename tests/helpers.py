"""Shared test helpers: eager BLOOM ground truth, the tolerance rule, tiny model builders.

Ground truth is always transformers' own eager code in fp32. The tolerance rule (flash-attention's): in low
precision, our error against fp32 may be at most twice eager PyTorch's own error in that precision.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from transformers import BloomConfig
from transformers.cache_utils import DynamicCache
from transformers.models.bloom.modeling_bloom import BloomAttention, build_alibi_tensor

from alibi_surgery import patch_bloom
from alibi_surgery.kernels.alibi import alibi_slopes

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TRITON_RUNS = INTERPRETING or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="triton needs CUDA or TRITON_INTERPRET=1")
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=needs_triton)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def bloom_config(hidden: int, n_head: int, n_layer: int = 1, vocab: int = 300) -> BloomConfig:
    return BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=n_layer, n_head=n_head,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def left_padded_mask(batch: int, length: int, pads) -> torch.Tensor:
    """[batch, length] 0/1 mask with pads[b] leading zeros."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return mask


def causal_4d_mask(mask2d: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """BLOOM's additive [B, 1, q_len, k_len] mask: 0 where key j is real and j <= the query's key index."""
    batch, k_len = mask2d.shape
    rows = torch.arange(q_len)[:, None] + (k_len - q_len)
    allowed = (torch.arange(k_len)[None, :] <= rows)[None] & mask2d.bool()[:, None, :]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


def run_attention(attn: BloomAttention, hidden: torch.Tensor, mask2d: torch.Tensor, past: int = 0,
                  output_attentions: bool = False):
    """Run a BloomAttention as BloomModel does. With ``past`` > 0 the first ``past`` tokens go through the module
    first (filling a DynamicCache) and the output is that of the remaining tokens (the decode path)."""
    dtype = hidden.dtype
    zeros = torch.zeros_like(hidden)
    cache = DynamicCache() if past else None
    with torch.no_grad():
        if past:
            attn(hidden[:, :past], zeros[:, :past], build_alibi_tensor(mask2d[:, :past], attn.num_heads, dtype),
                 causal_4d_mask(mask2d[:, :past], past, dtype), layer_past=cache, use_cache=True)
        q = hidden[:, past:]
        out, probs = attn(q, zeros[:, past:], build_alibi_tensor(mask2d, attn.num_heads, dtype),
                          causal_4d_mask(mask2d, q.shape[1], dtype), layer_past=cache, use_cache=past > 0,
                          output_attentions=output_attentions)
    return (out, probs) if output_attentions else out


def attention_grads(attn: BloomAttention, hidden: torch.Tensor, mask2d: torch.Tensor, upstream: torch.Tensor) -> dict:
    """Backpropagate ``sum(out * upstream)`` through ``attn`` (run as BloomModel does) and return the gradients of
    the input, of the fused QKV projection output (dq, dk, dv interleaved as BLOOM lays them out) and of the weights.
    """
    dtype = hidden.dtype
    x = hidden.detach().clone().requires_grad_()
    attn.zero_grad(set_to_none=True)
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["qkv"] = output

    hook = attn.query_key_value.register_forward_hook(keep)
    try:
        out, _ = attn(x, torch.zeros_like(x), build_alibi_tensor(mask2d, attn.num_heads, dtype),
                      causal_4d_mask(mask2d, x.shape[1], dtype))
        (out.float() * upstream).sum().backward()
    finally:
        hook.remove()
    return {"input": x.grad.float(), "qkv_out": captured["qkv"].grad.float(),
            "qkv_weight": attn.query_key_value.weight.grad.float(), "qkv_bias": attn.query_key_value.bias.grad.float(),
            "dense_weight": attn.dense.weight.grad.float()}


def make_attention(hidden: int, n_head: int, seed: int = 0) -> BloomAttention:
    torch.manual_seed(seed)
    attn = BloomAttention(bloom_config(hidden, n_head), layer_idx=0).eval()
    with torch.no_grad():  # larger-than-default weights: sharper attention, a harder test
        attn.query_key_value.weight.normal_(0, 0.6 / hidden**0.5 * 4)
        attn.query_key_value.bias.normal_(0, 0.1)
    return attn


def attention_case(hidden: int, n_head: int, dtype, backend, mask2d, past: int = 0, seed: int = 0):
    """(ours, eager in dtype, eager fp32 reference, valid-row mask) for one configuration."""
    ref_mod = make_attention(hidden, n_head, seed)
    torch.manual_seed(seed + 1)
    x = torch.randn(mask2d.shape[0], mask2d.shape[1], hidden)
    low = copy.deepcopy(ref_mod).to(dtype)
    ours_mod = patch_bloom(copy.deepcopy(ref_mod).to(dtype), backend)
    ref = run_attention(ref_mod, x, mask2d, past)
    eager = run_attention(low, x.to(dtype), mask2d, past).float()
    ours = run_attention(ours_mod, x.to(dtype), mask2d, past).float()
    valid = mask2d[:, past:].bool()
    return ours, eager, ref, valid


def assert_tolerance(ours, eager, ref, valid, dtype, what="output"):
    """fp32: close to the reference; fp16/bf16: error <= 2x eager's own error in that dtype (+ a tiny floor)."""
    rows = valid[..., None].expand_as(ref)
    err = (ours - ref)[rows].abs().max().item() if rows.any() else 0.0
    base = (eager - ref)[rows].abs().max().item() if rows.any() else 0.0
    scale = ref[rows].abs().max().item() if rows.any() else 1.0
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    if dtype == torch.float32:
        assert err <= 1e-5 * max(scale, 1.0), f"{what}: fp32 error {err:.3g} (scale {scale:.3g})"
    else:
        assert err <= 2 * base + 1e-6 * scale, f"{what}: error {err:.3g} > 2 x eager {dtype} error {base:.3g}"
    return err, base



def selected_mask(name: str, shape, selection: dict, head_dim: int) -> torch.Tensor:
    """True where BLOOM parameter ``name`` belongs to a selected head's slice (qkv rows and bias, dense columns)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    parts = name.split(".")
    if len(parts) > 4 and parts[1] == "h" and int(parts[2]) in selection:
        for h in selection[int(parts[2])]:
            if parts[4] == "query_key_value":
                mask[h * 3 * head_dim:(h + 1) * 3 * head_dim] = True
            elif parts[4] == "dense" and parts[5] == "weight":
                mask[:, h * head_dim:(h + 1) * head_dim] = True
    return mask


def hooked_runs(model, tokenizer, prompts, install):
    """Run each prompt alone (no padding, no cache) through ``model`` with the forward hooks ``install(captured)``
    registers (it returns their handles, removed after each run); yields ``(token count, captured dict)``."""
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        captured = {}
        handles = install(captured)
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        yield ids.shape[1], captured


def dense_attention(q, k, v, mask=None, slopes=None, scale=None, window=None):
    """float64 causal ALiBi attention, FlashAttention layout, BLOOM's positions; ``(out, probs [B, H, Tq, Tk])``.
    Grouped k and v are expanded here (query head h reads head h // G); ``window``: keys r - window < j <= r."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    batch, n_head, q_len, head_dim = q.shape
    k_len = k.shape[2]
    mask = torch.ones(batch, k_len) if mask is None else mask
    valid = mask.bool()
    pos = (mask.cumsum(-1) - 1).double()
    slopes = alibi_slopes(n_head) if slopes is None else slopes
    s = q @ k.transpose(-1, -2) * (scale or head_dim ** -0.5) + slopes.double()[None, :, None, None] * pos[:, None, None]
    rows = torch.arange(q_len)[:, None] + k_len - q_len
    visible = valid[:, None, None, :] & (torch.arange(k_len)[None, :] <= rows)[None, None]
    if window:
        visible &= (torch.arange(k_len)[None, :] > rows - window)[None, None]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    real_rows = valid[:, k_len - q_len:][:, None, :, None]
    return ((p @ v) * real_rows).transpose(1, 2), p * real_rows


SINK_MIRROR = Path(  # a fetched sail-sg/Attention-Sink (checkout or bare git directory)
    os.environ.get("ALIBI_SURGERY_SINK_REPO", "/work/.mirror/sail-sg+Attention-Sink/repo"))


def eager_attention_maps(path: str, prompt: str, tok, length: int | None = None) -> torch.Tensor:
    """[layers, heads, T, T] eager attention probabilities of one prompt (float64)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.tensor([tok(prompt)["input_ids"][:length]])
    with torch.no_grad():
        return torch.stack([a[0] for a in model(ids, output_attentions=True).attentions]).double()


def assert_compiles_like_eager(loss_fn, leaves, *args, atol: float = 1e-5):
    """``torch.compile(loss_fn, fullgraph=True)`` makes one graph with no break, and its ``(loss, extra)`` and the
    gradients of ``leaves`` equal eager's; returns the compiled ``extra``."""
    explained = torch._dynamo.explain(loss_fn)(*leaves, *args)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()
    loss, extra = torch.compile(loss_fn, fullgraph=True)(*leaves, *args)  # inductor on CPU
    loss.backward()
    compiled = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    eager_loss, eager_extra = loss_fn(*leaves, *args)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=atol)
    torch.testing.assert_close(extra, eager_extra, rtol=1e-5, atol=1e-5)
    for a, t in zip(compiled, leaves):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=atol)
    return extra

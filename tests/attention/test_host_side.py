"""The host side of the fused attention inside a patched model: what torch itself does around the kernels.

* the attention backward of a patched BLOOM issues torch operations that write at most 1.25x the bytes of the
  fused QKV gradient (one packed dQKV, written by the kernels, plus the small delta and nothing else; before the
  packed operator it was 6.4x: three zero-filled ``select_backward`` buffers, their sum, fp32 copies for delta);
* an L-layer forward computes the key positions once, not L times;
* ``torch.compile`` traces a patched model without a graph break, forward and backward;
* eager calls skip the custom-operator dispatch (an ``autograd.Function`` runs the same forward and backward) and
  give the operators' numbers exactly.
"""

from __future__ import annotations

import collections
import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import BloomForCausalLM

import alibi_surgery
from alibi_surgery.families import bloom as bloom_family
from alibi_surgery.kernels import ops
from helpers import bloom_config, left_padded_mask, make_attention, needs_triton, causal_4d_mask

_NO_WRITE = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
             torch.ops.aten.empty_like.default}


class WriteCounter(TorchDispatchMode):
    """Bytes written by the torch operations run inside the block (outputs of every op but views and
    allocations), except those the Triton interpreter issues to run a kernel (``paused``). Our own custom
    operators are opened: their Python implementation runs under the counter, so every torch operation inside
    them counts too, and the kernels' own writes do not."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = collections.Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "alibi_surgery":
            with self:
                return getattr(ops, func.__name__.split(".")[0])._init_fn(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if not self.paused and not func.is_view and func not in _NO_WRITE:
            written = sum(t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            self.bytes += written
            self.ops[str(func)] += written
        return out


@pytest.fixture
def counter(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    mode = WriteCounter()
    launch = InterpretedFunction.run

    def run(self, *args, **kwargs):
        mode.paused += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            mode.paused -= 1

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return mode


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_backward_writes_about_one_qkv_gradient(counter, dtype):
    attn = alibi_surgery.patch(make_attention(64, 4).to(dtype), "triton")
    captured = {}

    def qkv_leaf(module, args, out):  # the backward under test ends at this tensor's gradient
        captured["qkv"] = out.detach().requires_grad_()
        return captured["qkv"]

    def dense_input(module, args):  # ... and starts from the dense layer's input gradient
        captured["context"] = args[0]
        return (args[0].detach(),)

    attn.query_key_value.register_forward_hook(qkv_leaf)
    attn.dense.register_forward_pre_hook(dense_input)
    mask = left_padded_mask(2, 40, [0, 6])
    x = torch.randn(2, 40, 64, dtype=dtype)
    attn(x, torch.zeros_like(x), None, causal_4d_mask(mask, 40, dtype))
    upstream = torch.randn_like(captured["context"])
    with counter:
        torch.autograd.backward(captured["context"], upstream)
    grad = captured["qkv"].grad
    fused_bytes = grad.numel() * grad.element_size()
    assert grad is not None and grad.is_contiguous()
    assert counter.bytes <= 1.25 * fused_bytes, (counter.bytes / fused_bytes, dict(counter.ops))

    # the same gradient as the unpacked path (q, k, v as three views): the packed operator changes no number
    ref = captured["qkv"].detach().requires_grad_()
    q, k, v = (ref.view(2, 40, 4, 3, 16)[..., i, :].transpose(1, 2) for i in range(3))
    out, _, _ = alibi_surgery.attention.backends.run_attention(
        q, k, v, alibi_surgery.kernels.alibi.key_positions(mask), alibi_surgery.kernels.alibi.alibi_slopes(4), "triton")
    (out.reshape(2, 40, 64).float() * upstream.float()).sum().backward()
    torch.testing.assert_close(grad, ref.grad, rtol=0, atol=0)


def test_key_positions_are_computed_once_per_model_forward(monkeypatch):
    calls = []
    original = type(bloom_family.BLOOM).key_positions

    def counting(self, valid):
        calls.append(valid.shape)
        return original(self, valid)

    monkeypatch.setattr(type(bloom_family.BLOOM), "key_positions", counting)
    torch.manual_seed(0)
    model = alibi_surgery.patch(BloomForCausalLM(bloom_config(32, 2, n_layer=4)), "torch")
    ids = torch.randint(4, 300, (2, 9))
    mask = left_padded_mask(2, 9, [0, 3])
    loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
    assert len(calls) == 1
    loss.backward()  # the backward reads the saved positions
    assert len(calls) == 1
    with torch.inference_mode():  # the next forward has a new mask: computed again, once
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert len(calls) == 2
    model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()  # after inference mode
    assert len(calls) == 3
    gc.collect()
    cached = alibi_surgery.attention.patch.patch_state(model.transformer.h[0].self_attention).shared["keys"]
    assert cached[0]() is None  # the cache does not keep the model's 4D mask alive


def test_patched_bloom_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = BloomForCausalLM(bloom_config(32, 2, n_layer=2)).eval()
    ids = torch.randint(4, 300, (2, 11))
    mask = left_padded_mask(2, 11, [0, 3])

    def loss_of(m):
        return m(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss

    alibi_surgery.patch(model, "torch")
    eager_loss = loss_of(model)  # the patched model, not compiled
    eager_loss.backward()
    eager_grad = model.transformer.h[0].self_attention.query_key_value.weight.grad.clone()
    model.zero_grad()
    explained = torch._dynamo.explain(loss_of)(model)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")(model)
    compiled.backward()
    torch.testing.assert_close(compiled, eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.transformer.h[0].self_attention.query_key_value.weight.grad, eager_grad,
                               rtol=1e-4, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_eager_calls_skip_the_operator_dispatch_with_the_same_numbers(packed):
    torch.manual_seed(0)
    mask = left_padded_mask(2, 21, [0, 5])
    key_pos = alibi_surgery.kernels.alibi.key_positions(mask)
    kstart = alibi_surgery.kernels.alibi.first_real_key(key_pos).int()
    slopes = alibi_surgery.kernels.alibi.alibi_slopes(3)
    qkv = torch.randn(2, 21, 3, 3, 16)
    upstream = torch.randn(2, 21, 3, 16)
    if packed:
        op, inputs = ops.attention_packed, (qkv, "interleaved")
    else:
        op, inputs = ops.attention, ops.unpack(qkv, "interleaved")
    args = (key_pos.int(), kstart, slopes, "triton", True, False, False, None, 1.0, False)
    results = []
    for run in (lambda *a: ops.call(op, *a), op):  # eager dispatch, then the operator itself
        leaves = [t.detach().clone().requires_grad_() for t in (inputs if not packed else inputs[:1])]
        out, lse, stats = run(*leaves, *inputs[len(leaves):], *args)
        (out * upstream).sum().backward()
        results.append((out.grad_fn.name(), out, lse, stats, [t.grad for t in leaves]))
    (eager_fn, *eager), (op_fn, *via_op) = results
    assert eager_fn.startswith("_Attention") and op_fn.startswith("GeneratedBackwardFor_alibi_surgery"), (eager_fn, op_fn)
    for a, b in zip(eager[:3] + eager[3], via_op[:3] + via_op[3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

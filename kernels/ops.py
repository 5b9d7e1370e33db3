"""The attention kernels as torch custom operators, with autograd: what models, the public API and
``torch.compile`` call.

Four operators in the ``alibi_surgery`` namespace, each with a fake (meta) implementation, so that
``torch.compile(fullgraph=True)`` traces through them as single nodes:

* ``attention(q, k, v, ..., window=0) -> (out, lse2, stats)`` with q ``[B, Tq, H, D]``, k and v ``[B, Tk, Hkv, D]``
  (FlashAttention's layout, any strides with a unit stride on D; Hkv dividing H is grouped-query attention, read in
  place) and ``out`` ``[B, Tq, H, D]``; ``window`` > 0 is a sliding window (``AttentionOptions.window``);
* ``attention_packed(qkv, layout, ...)`` over one packed tensor: ``layout="interleaved"`` is ``[B, T, H, 3, D]``
  (BLOOM's and Falcon-RW's fused QKV), ``"blocked"`` is ``[B, T, 3, H, D]`` (MPT's ``Wqkv``);
* their backward operators, which return gradients in the inputs' own layout: contiguous ``[B, T, H, D]`` for
  q, k, v, and one contiguous ``dqkv`` for the packed operator, written once by the kernels (no ``select_backward``
  buffers, no layout copy in ``AccumulateGrad``).

``impl`` is ``"triton"`` (the kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"`` (the blocked
twins). ``key_pos`` (int32 ``[B, Tk]``, -1 for padding) and ``kstart`` (int32 ``[B]``, each row's first real key)
are computed once per model forward by the caller. ``stats`` is float32 ``[B, H, 3]`` (sum of first-token mass,
sum of entropy, row count) with ``with_stats``, else an empty tensor; ``lse2`` and those sums get no gradient.
With ``row_stats`` (the optional last input) ``stats`` is each query row's raw (first-token mass, entropy)
``[B, H, Tq, 2]`` instead, and it is differentiable: the backward operators take its gradient (``d_rows``, with the
saved rows) and fold it into the same two passes (:func:`~.alibi.stats_grad_terms`).
Only q, k, v (or qkv), the output and the fp32 log-sum-exp are saved for the backward (O(T * H * D)).
The backward exists for Hkv = H and no window only: a call that needs gradients otherwise raises UsageError (one
line) before anything runs, in eager mode (:func:`call`) and when ``torch.compile`` traces the autograd setup.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .alibi import refuse_backward
from .attention_bwd import alibi_attention_bwd
from .attention_fwd import alibi_attention_fwd
from .reference import alibi_attention_blocked, alibi_attention_blocked_bwd

__all__ = ["attention", "attention_packed", "call", "LAYOUTS", "unpack"]

_IMPLS = {"triton": (alibi_attention_fwd, alibi_attention_bwd),
          "torch": (alibi_attention_blocked, alibi_attention_blocked_bwd)}
LAYOUTS = {"interleaved": 3, "blocked": 2}  # packed layout -> the axis that holds (q, k, v)


def unpack(qkv: Tensor, layout: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, k, v)`` as ``[B, T, H, D]`` views of a packed tensor of ``layout``."""
    return qkv.unbind(LAYOUTS[layout])


def _heads_first(*tensors: Tensor) -> list[Tensor]:
    """``[B, T, H, D]`` -> the kernels' ``[B, H, T, D]`` views."""
    return [t.transpose(1, 2) for t in tensors]


def _forward(q, k, v, key_pos, kstart, slopes, impl, with_stats, exclude_first_query, normalize_entropy,
             softmax_scale, bias_scale, alibi_bf16, window=0, row_stats=False):
    fwd, _ = _IMPLS[impl]
    out, lse, stats = fwd(*_heads_first(q, k, v), key_pos, slopes, kstart=kstart, with_stats=with_stats,
                          exclude_first_query=exclude_first_query, normalize_entropy=normalize_entropy,
                          softmax_scale=softmax_scale, bias_scale=bias_scale, alibi_bf16=alibi_bf16,
                          window=window or None, row_stats=row_stats)
    return out, lse, (stats if stats is not None else lse.new_empty(0))


def _backward(do, q, k, v, out, lse, key_pos, kstart, slopes, impl, softmax_scale, bias_scale, alibi_bf16, grads,
              d_rows=None, rows=None):
    """Run the backward into ``grads`` (``[B, T, H, D]`` buffers); ``d_rows`` (with the forward's ``rows``): the
    gradient of the per-row statistics, or None."""
    _, bwd = _IMPLS[impl]
    bwd(do, *_heads_first(q, k, v), out, lse, key_pos, slopes, kstart=kstart, grads=_heads_first(*grads),
        stats_grad=None if d_rows is None else (d_rows, rows), softmax_scale=softmax_scale, bias_scale=bias_scale,
        alibi_bf16=alibi_bf16)


def _refuse_backward(packed: bool, inputs) -> None:
    """UsageError when a call that needs gradients has grouped key/value heads or a window (the first optional
    input of either operator): the backward exists for neither."""
    n_fixed = 12 if packed else 13
    window = inputs[n_fixed] if len(inputs) > n_fixed else 0
    refuse_backward(1, 1, window) if packed else refuse_backward(inputs[0].shape[2], inputs[1].shape[2], window)


def _fake_forward(q, with_stats, row_stats=False):
    batch, q_len, n_head, head_dim = q.shape
    out = q.new_empty(batch, q_len, n_head, head_dim)
    lse = q.new_empty(batch, n_head, q_len, dtype=torch.float32)
    shape = (batch, n_head, q_len, 2) if row_stats else (batch, n_head, 3) if with_stats else (0,)
    return out, lse, q.new_empty(shape, dtype=torch.float32)


def _row_stats(inputs, packed: bool) -> bool:
    """The ``row_stats`` input of either operator (the optional input after ``window``)."""
    index = 13 if packed else 14
    return bool(inputs[index]) if len(inputs) > index else False


# --- separate q, k, v ----------------------------------------------------------------------------------------------

@torch.library.custom_op("alibi_surgery::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, key_pos: Tensor, kstart: Tensor, slopes: Tensor, impl: str,
              with_stats: bool, exclude_first_query: bool, normalize_entropy: bool, softmax_scale: float | None,
              bias_scale: float, alibi_bf16: bool, window: int = 0,
              row_stats: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(q, k, v, key_pos, kstart, slopes, impl, with_stats, exclude_first_query, normalize_entropy,
                    softmax_scale, bias_scale, alibi_bf16, window, row_stats)


@attention.register_fake
def _(q, k, v, key_pos, kstart, slopes, impl, with_stats, *args):
    return _fake_forward(q, with_stats, _row_stats((None,) * 7 + (with_stats, *args), False))


def _attention_backward(do, q, k, v, out, lse, key_pos, kstart, slopes, impl, softmax_scale, bias_scale,
                        alibi_bf16, d_rows=None, rows=None):
    grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    _backward(do, q, k, v, out, lse, key_pos, kstart, slopes, impl, softmax_scale, bias_scale, alibi_bf16, grads,
              d_rows, rows)
    return grads


@torch.library.custom_op("alibi_surgery::attention_backward", mutates_args=())
def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, key_pos: Tensor,
                       kstart: Tensor, slopes: Tensor, impl: str, softmax_scale: float | None, bias_scale: float,
                       alibi_bf16: bool, d_rows: Tensor | None = None,
                       rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    return _attention_backward(do, q, k, v, out, lse, key_pos, kstart, slopes, impl, softmax_scale, bias_scale,
                               alibi_bf16, d_rows, rows)


@attention_backward.register_fake
def _(do, q, k, v, *args):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


def _mark_outputs(ctx, inputs, output, packed: bool) -> bool:
    """Autograd set-up shared by both operators: ``lse`` never gets a gradient; the statistics get one only as
    per-row values (``row_stats``), which are then saved for the backward. Returns ``row_stats``."""
    _refuse_backward(packed, inputs)  # gradients are needed
    ctx.n_inputs = len(inputs)
    ctx.row_stats = _row_stats(inputs, packed)
    _, lse, stats = output
    ctx.mark_non_differentiable(*((lse,) if ctx.row_stats else (lse, stats)))
    ctx.set_materialize_grads(False)  # no zero gradients for lse and stats
    return ctx.row_stats


def _grad_inputs(ctx, d_out, d_stats, out):
    """``(d_out, d_rows)`` for a backward operator, or None when neither the output nor the statistics were
    used. A loss on the statistics alone gets a zero ``d_out``."""
    d_rows = d_stats if ctx.row_stats else None
    if d_out is None and d_rows is None:
        return None
    return (torch.zeros_like(out) if d_out is None else d_out), d_rows


def _setup(ctx, inputs, output):
    q, k, v, key_pos, kstart, slopes, impl, _, _, _, softmax_scale, bias_scale, alibi_bf16, *_ = inputs
    rows = output[2] if _mark_outputs(ctx, inputs, output, False) else None
    ctx.save_for_backward(q, k, v, output[0], output[1], key_pos, kstart, slopes, rows)
    ctx.options = (impl, softmax_scale, bias_scale, alibi_bf16)


def _attention_grad(ctx, d_out, _d_lse, d_stats, backward=attention_backward):
    q, k, v, out, lse, key_pos, kstart, slopes, rows = ctx.saved_tensors
    grad_inputs = _grad_inputs(ctx, d_out, d_stats, out)
    if grad_inputs is None:  # neither the output nor the statistics were used
        return (None,) * ctx.n_inputs
    d_out, d_rows = grad_inputs
    dq, dk, dv = backward(d_out, q, k, v, out, lse, key_pos, kstart, slopes, *ctx.options, d_rows, rows)
    return dq, dk, dv, *([None] * (ctx.n_inputs - 3))


attention.register_autograd(_attention_grad, setup_context=_setup)


# --- one packed qkv tensor -----------------------------------------------------------------------------------------

@torch.library.custom_op("alibi_surgery::attention_packed", mutates_args=())
def attention_packed(qkv: Tensor, layout: str, key_pos: Tensor, kstart: Tensor, slopes: Tensor, impl: str,
                     with_stats: bool, exclude_first_query: bool, normalize_entropy: bool,
                     softmax_scale: float | None, bias_scale: float, alibi_bf16: bool,
                     window: int = 0, row_stats: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(*unpack(qkv, layout), key_pos, kstart, slopes, impl, with_stats, exclude_first_query,
                    normalize_entropy, softmax_scale, bias_scale, alibi_bf16, window, row_stats)


@attention_packed.register_fake
def _(qkv, layout, key_pos, kstart, slopes, impl, with_stats, *args):
    return _fake_forward(unpack(qkv, layout)[0], with_stats, _row_stats((None,) * 6 + (with_stats, *args), True))


def _packed_backward(do, qkv, layout, out, lse, key_pos, kstart, slopes, impl, softmax_scale, bias_scale, alibi_bf16,
                     d_rows=None, rows=None):
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _backward(do, *unpack(qkv, layout), out, lse, key_pos, kstart, slopes, impl, softmax_scale, bias_scale,
              alibi_bf16, unpack(dqkv, layout), d_rows, rows)
    return dqkv


@torch.library.custom_op("alibi_surgery::attention_packed_backward", mutates_args=())
def attention_packed_backward(do: Tensor, qkv: Tensor, layout: str, out: Tensor, lse: Tensor, key_pos: Tensor,
                              kstart: Tensor, slopes: Tensor, impl: str, softmax_scale: float | None,
                              bias_scale: float, alibi_bf16: bool, d_rows: Tensor | None = None,
                              rows: Tensor | None = None) -> Tensor:
    return _packed_backward(do, qkv, layout, out, lse, key_pos, kstart, slopes, impl, softmax_scale, bias_scale,
                            alibi_bf16, d_rows, rows)


@attention_packed_backward.register_fake
def _(do, qkv, *args):
    return qkv.new_empty(qkv.shape)


def _setup_packed(ctx, inputs, output):
    qkv, layout, key_pos, kstart, slopes, impl, _, _, _, softmax_scale, bias_scale, alibi_bf16, *_ = inputs
    rows = output[2] if _mark_outputs(ctx, inputs, output, True) else None
    ctx.save_for_backward(qkv, output[0], output[1], key_pos, kstart, slopes, rows)
    ctx.options = (layout, impl, softmax_scale, bias_scale, alibi_bf16)


def _packed_grad(ctx, d_out, _d_lse, d_stats, backward=attention_packed_backward):
    qkv, out, lse, key_pos, kstart, slopes, rows = ctx.saved_tensors
    grad_inputs = _grad_inputs(ctx, d_out, d_stats, out)
    if grad_inputs is None:
        return (None,) * ctx.n_inputs
    d_out, d_rows = grad_inputs
    layout, *options = ctx.options
    dqkv = backward(d_out, qkv, layout, out, lse, key_pos, kstart, slopes, *options, d_rows, rows)
    return dqkv, *([None] * (ctx.n_inputs - 1))


attention_packed.register_autograd(_packed_grad, setup_context=_setup_packed)


# --- eager calls ---------------------------------------------------------------------------------------------------

def _eager_function(name, forward, setup, grad, backward):
    """An ``autograd.Function`` with an operator's forward, ``setup_context`` and gradient (calling the plain
    ``backward`` instead of the backward operator): the same computation without the custom-operator dispatch."""

    def fwd(ctx, *inputs):
        output = forward(*inputs)
        if ctx is not None:
            setup(ctx, inputs, output)
        return output

    def bwd(ctx, *grads):
        return grad(ctx, *grads, backward=backward)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


_EAGER = {
    attention: _eager_function("_Attention", lambda *a: _forward(*a), _setup, _attention_grad, _attention_backward),
    attention_packed: _eager_function(
        "_AttentionPacked", lambda qkv, layout, *a: _forward(*unpack(qkv, layout), *a), _setup_packed, _packed_grad,
        _packed_backward),
}


def call(op, *inputs):
    """``op(*inputs)`` (``attention`` or ``attention_packed``). Outside ``torch.compile`` and export the same
    forward and backward run through an ``autograd.Function`` instead: the operator's dispatch and registered
    autograd cost about 50 us of host time per call without gradients and 140 us with them (measured on a CPU with
    the kernel launches stubbed out), which small shapes and decode steps pay in full on a GPU."""
    if torch.compiler.is_compiling():
        return op(*inputs)
    function = _EAGER[op]
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs[:3]):
        _refuse_backward(op is attention_packed, inputs)
        return function.apply(*inputs)
    return function.forward(None, *inputs)  # nothing to differentiate: no autograd node

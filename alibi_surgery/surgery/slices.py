"""Head-sliced trainable parameters: gradients for the selected heads' weight slices, and nothing else.

A selection is ``{layer: [head, ...]}``. For head ``h`` the trainable slices are the rows of the fused QKV weight
that the model's family assigns to it (:meth:`~alibi_surgery.families.base.Family.qkv_rows`: one ``[3d, hidden]``
block for BLOOM and Falcon, which interleave q, k, v per head; three ``[d, hidden]`` blocks for MPT), the same rows
of the QKV bias when there is one, and the output projection's columns ``[h*d, (h+1)*d)`` (``[hidden, d]``, a
strided view).

:class:`HeadSlices` freezes every model parameter (``requires_grad=False``), then routes each affected QKV / output
linear through an autograd Function whose forward is the ordinary full linear and whose backward returns the input
gradient in full but weight gradients only for the selected rows or columns. No full-matrix gradient is ever
allocated; the slice gradients live in one flat buffer (``HeadSlices.grad``), in slice order, which is what the fused
optimizer reads. Since nothing below the lowest selected layer requires grad, autograd records nothing there.

Two storage modes:

* ``dtype`` equal to the weights' dtype (the default): the trainable tensors are views into the model's own
  weights, so an optimizer step changes the model in place and no copy of the weights exists.
* another ``dtype`` (e.g. fp32 slices over a bf16 model): the trainable tensors are separate copies; the forward
  pass still runs on the model's weights, so call :meth:`HeadSlices.write_back` after each update
  (:class:`~alibi_surgery.HeadSlicedAdamW` does).

Limits: BLOOM's ``pretraining_tp > 1`` slow-but-exact path is not routed; output-projection biases stay frozen.
"""

from __future__ import annotations

import dataclasses
import types

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UsageError
from ..attention.patch import attention_modules
from ..families import HeadLayout
from ..diagnosis.selection import check_selection

__all__ = ["HeadSlices", "SliceSpec", "check_selection", "head_indices"]

KINDS = ("qkv_weight", "qkv_bias", "dense_weight")
_ROUTED = "_alibi_surgery_sliced"


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """Where one trainable tensor lives: layer, head, which kind of slice, and which row block of the head's QKV
    rows (0 for families that interleave q, k, v per head; 0, 1, 2 for q, k, v in MPT's blocked layout)."""

    layer: int
    head: int
    kind: str
    part: int = 0


class _RowSlicedLinear(torch.autograd.Function):
    """y = x W^T + b; backward: full dx, weight/bias gradients for the row blocks in ``rows`` only."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, n_blocks, *trainable):
        ctx.save_for_backward(x, weight, rows)
        ctx.n_blocks = n_blocks
        ctx.dtypes = [t.dtype for t in trainable]
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rows = ctx.saved_tensors
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        dtype = ctx.dtypes[0]
        g = grad_out.reshape(-1, grad_out.shape[-1]).index_select(1, rows).to(dtype)  # [tokens, n * rows_per_block]
        grad_w = g.t().matmul(x.reshape(-1, x.shape[-1]).to(dtype)).chunk(ctx.n_blocks, 0)
        grads = list(grad_w)
        if len(ctx.dtypes) > ctx.n_blocks:  # bias slices follow the weight slices
            grads += list(g.sum(0).chunk(ctx.n_blocks, 0))
        return (grad_x, None, None, None, None, *grads)


class _ColumnSlicedLinear(torch.autograd.Function):
    """y = x W^T + b; backward: full dx, weight gradients for the column blocks in ``cols`` only (bias frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cols, n_blocks, *trainable):
        ctx.save_for_backward(x, weight, cols)
        ctx.n_blocks = n_blocks
        ctx.dtype = trainable[0].dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, cols = ctx.saved_tensors
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        x_sel = x.reshape(-1, x.shape[-1]).index_select(1, cols).to(ctx.dtype)  # [tokens, n * d]
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype).t().matmul(x_sel)  # [hidden, n * d]
        return (grad_x, None, None, None, None, *grad_w.chunk(ctx.n_blocks, 1))


def head_indices(family, layout: HeadLayout, heads) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)``: the fused QKV weight's rows of ``heads`` (:meth:`Family.qkv_rows`, head by head) and the
    output projection's input columns (:meth:`Family.out_cols`), as int64 index tensors in selection order."""
    rows = torch.cat([torch.arange(a, b) for h in heads for a, b in family.qkv_rows(h, layout)])
    cols = torch.cat([torch.arange(*family.out_cols(h, layout)) for h in heads])
    return rows, cols


class HeadSlices:
    """Trainable per-head slices of a model of any registered family (see the module docstring).

    Args:
        model: a causal LM or base model (patched or not).
        selection: ``{layer: [heads]}``.
        dtype: dtype of the trainable tensors and their gradients; default the weights' dtype (in place).
    Attributes:
        specs, tensors: the trainable tensors in flat order (per layer, per head: qkv row blocks, qkv bias blocks,
            output columns).
        grad: one flat buffer holding every tensor's gradient (``tensor.grad`` are views of it).
        offsets: where each tensor starts in ``grad``.
    Use as a context manager, or call :meth:`remove` to restore the model's forwards and ``requires_grad`` flags.
    """

    def __init__(self, model: nn.Module, selection: dict, *, dtype: torch.dtype | None = None):
        family, attns = attention_modules(model)
        if _ROUTED in model.__dict__:
            raise UsageError("this model already has HeadSlices attached: remove() them first")
        self.model, self.family = model, family
        n_head, d = family.attention_shape(attns[0])
        self.layout = HeadLayout(len(attns), n_head, d, n_head * d, 0)
        self.selection = check_selection(selection, len(attns), n_head)
        weight = family.qkv(attns[0]).weight
        self.dtype = dtype or weight.dtype
        if not self.dtype.is_floating_point:
            raise UsageError(f"slice dtype must be a floating-point dtype, got {self.dtype}")
        self.in_place = self.dtype == weight.dtype
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)

        self.specs: list[SliceSpec] = []
        self.tensors: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []  # the model-weight views each tensor trains
        self._routes = []
        for layer, heads in self.selection.items():
            qkv, out = family.qkv(attns[layer]), family.out(attns[layer])
            start = len(self.tensors)
            for h in heads:
                rows = family.qkv_rows(h, self.layout)
                views = [("qkv_weight", i, qkv.weight.detach()[a:b]) for i, (a, b) in enumerate(rows)]
                if qkv.bias is not None:
                    views += [("qkv_bias", i, qkv.bias.detach()[a:b]) for i, (a, b) in enumerate(rows)]
                a, b = family.out_cols(h, self.layout)
                views.append(("dense_weight", 0, out.weight.detach()[:, a:b]))
                for kind, part, view in views:
                    self.specs.append(SliceSpec(layer, h, kind, part))
                    self._targets.append(view)
                    self.tensors.append(view if self.in_place else view.to(self.dtype, copy=True))
            self._route(qkv, out, heads, self.specs[start:], self.tensors[start:])
        model.__dict__[_ROUTED] = True

        sizes = [t.numel() for t in self.tensors]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.numel = sum(sizes)
        self.grad = torch.zeros(self.numel, dtype=self.dtype, device=weight.device)
        for i, t in enumerate(self.tensors):
            t.requires_grad_(True)
            t.grad = self.grad[self.offsets[i]:self.offsets[i] + sizes[i]].view(t.shape)

    def _route(self, qkv, out, heads, specs, trainable):
        rows, cols = (t.to(qkv.weight.device) for t in head_indices(self.family, self.layout, heads))
        by_kind = {kind: [t for s, t in zip(specs, trainable) if s.kind == kind] for kind in KINDS}
        qkv_w, qkv_b, dense_w = by_kind["qkv_weight"], by_kind["qkv_bias"], by_kind["dense_weight"]
        n_rows, n_cols = sum(len(self.family.qkv_rows(h, self.layout)) for h in heads), len(heads)

        def qkv_forward(module, x):
            return _RowSlicedLinear.apply(x, module.weight, module.bias, rows, n_rows, *qkv_w, *qkv_b)

        def dense_forward(module, x):
            return _ColumnSlicedLinear.apply(x, module.weight, module.bias, cols, n_cols, *dense_w)

        for module, fn in ((qkv, qkv_forward), (out, dense_forward)):
            module.__dict__[_ROUTED] = module.__dict__.get("forward")
            module.forward = types.MethodType(fn, module)
            self._routes.append(module)

    @property
    def n_heads(self) -> int:
        return sum(len(h) for h in self.selection.values())

    def zero_grad(self) -> None:
        self.grad.zero_()

    @torch.no_grad()
    def write_back(self) -> int:
        """Copy the trainable values into the model's own weights (rounded to their dtype); returns elements written.

        In place (slices share the weights' storage) there is nothing to copy and 0 is returned.
        """
        if self.in_place:
            return 0
        for t, target in zip(self.tensors, self._targets):
            target.copy_(t)
        return self.numel

    def remove(self) -> None:
        """Detach from the model: restore its linears' forwards and every parameter's ``requires_grad`` flag."""
        self.write_back()
        for module in self._routes:
            old = module.__dict__.pop(_ROUTED)
            if old is None:
                del module.forward
            else:
                module.forward = old
        self._routes = []
        self.model.__dict__.pop(_ROUTED, None)
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        for t in self.tensors:
            t.grad = None
            t.requires_grad_(False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self) -> str:
        return (f"HeadSlices({self.n_heads} heads in {len(self.selection)} layers, {self.numel:,} elements, "
                f"{self.dtype}, {'in place' if self.in_place else 'copies'})")

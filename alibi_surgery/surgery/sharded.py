"""Head slices as parameters of their own, for FSDP2 (``fully_shard``): only they train, shard and reduce-scatter.

:class:`HeadSlices` trains views into the model's weights through custom autograd Functions; FSDP2 shards whole
parameters and cannot see a view. :class:`HeadParams` instead gives each affected linear one trainable parameter
holding the current values of its selected heads' slices, registered on the linear itself (so the block's
``fully_shard`` shards it with the block):

* the fused QKV linear gets ``head_rows`` ``[n_rows, hidden]`` (the rows :meth:`Family.qkv_rows` assigns to the
  selected heads, in selection order) and, with a bias, ``head_row_bias`` ``[n_rows]``; its forward computes the
  ordinary output and overwrites the selected output features with ``x @ head_rows^T (+ head_row_bias)``;
* the output projection gets ``head_cols`` ``[hidden, n_cols]`` (the selected heads' input columns); its forward is
  ``linear(x with those features zeroed, W, b) + x[..., cols] @ head_cols^T``.

Both equal the linear with the slices written into the weight (the QKV rows exactly; the output projection to one
rounding of the split sum), so AdamW on these parameters (decay included) is AdamW on the slices. The frozen weights
keep their old values at the selected positions until :meth:`HeadParams.fold` writes the parameters back. Every
original parameter is frozen; nothing else needs a gradient, so the blocks below the lowest selected layer record
no graph.

Limits: the parameters' values are the values, not deltas: a state dict holds both the stale frozen slices and the
trained ones until :meth:`fold`; BLOOM's ``pretraining_tp > 1`` path is not routed (as in :mod:`.slices`).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

from ..analysis.loss import causal_lm_labels, chunked_lm_loss
from ..attention.patch import attention_modules
from ..diagnosis.selection import check_selection
from ..errors import UsageError
from ..families import HeadLayout
from .slices import head_indices

__all__ = ["HeadParams", "LanguageModelLoss", "shard", "ROWS", "ROW_BIAS", "COLS"]

ROWS, ROW_BIAS, COLS = "head_rows", "head_row_bias", "head_cols"
_INDEX = "_alibi_surgery_index"  # the linear's selected rows / columns (a plain attribute: FSDP leaves it alone)
_OLD = "_alibi_surgery_forward"


def _qkv_forward(module, x):
    y = F.linear(x, module.weight, module.bias)
    rows = getattr(module, _INDEX).to(y.device)
    return y.index_copy(y.dim() - 1, rows, F.linear(x, getattr(module, ROWS), getattr(module, ROW_BIAS, None)))


def _out_forward(module, x):
    cols = getattr(module, _INDEX).to(x.device)
    kept = x.index_fill(x.dim() - 1, cols, 0)
    return F.linear(kept, module.weight, module.bias) + F.linear(x.index_select(x.dim() - 1, cols),
                                                                  getattr(module, COLS))


class HeadParams:
    """The selected heads' slices of ``model`` (a causal LM or base model of a registered family) as parameters of
    their linears (see the module docstring). Create it before ``fully_shard``; after training, :meth:`fold` (an
    unsharded model) or :meth:`full_state` (a sharded one, gathered one module at a time).

    Attributes:
        selection: ``{layer: [heads]}``, checked.
        params: the trainable parameters (a property: read it after ``fully_shard``).
    """

    def __init__(self, model: nn.Module, selection: dict):
        family, attns = attention_modules(model)
        n_head, d = family.attention_shape(attns[0])
        self.family, self.layout = family, HeadLayout(len(attns), n_head, d, n_head * d, 0)
        self.selection = check_selection(selection, len(attns), n_head)
        if any(hasattr(family.qkv(a), _INDEX) for a in attns):
            raise UsageError("this model already has head parameters attached")
        for p in model.parameters():
            p.requires_grad_(False)
        self.linears: list[nn.Linear] = []
        for layer, heads in self.selection.items():
            qkv, out = family.qkv(attns[layer]), family.out(attns[layer])
            rows, cols = head_indices(family, self.layout, heads)
            with torch.no_grad():
                self._attach(qkv, rows, _qkv_forward, {ROWS: qkv.weight[rows]} |
                             ({ROW_BIAS: qkv.bias[rows]} if qkv.bias is not None else {}))
                self._attach(out, cols, _out_forward, {COLS: out.weight[:, cols]})

    def _attach(self, linear: nn.Linear, index: torch.Tensor, forward, values: dict) -> None:
        setattr(linear, _INDEX, index)
        for name, value in values.items():
            param = nn.Parameter(value.detach().clone())
            linear.register_parameter(name, param)
        linear.__dict__[_OLD] = linear.__dict__.get("forward")
        linear.forward = types.MethodType(forward, linear)
        self.linears.append(linear)

    @torch.no_grad()
    def fold(self) -> None:
        """Write the trained values into the weights and restore the linears (their parameters unregistered, their
        forwards their own). The original parameters stay frozen. Needs plain (unsharded) tensors."""
        for linear in self.linears:
            own = {k: v for k, v in linear._parameters.items() if v is not None}
            for name, value in _folded(linear, own).items():
                getattr(linear, name).copy_(value)
            for name in (ROWS, ROW_BIAS, COLS):
                linear._parameters.pop(name, None)
            old = linear.__dict__.pop(_OLD)
            if old is None:
                del linear.forward
            else:
                linear.forward = old
            delattr(linear, _INDEX)
        self.linears = []

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters, read from the linears (``fully_shard`` replaces them by sharded ones: take
        them after sharding): per selected layer, the qkv rows, their bias (if any), the output columns."""
        return [linear._parameters[n] for linear in self.linears for n in (ROWS, ROW_BIAS, COLS)
                if n in linear._parameters]

    def full_state(self, model: nn.Module):
        """Yield the stock model's ``(key, tensor)`` pairs with the trained values folded in, one module at a time:
        a sharded parameter (a DTensor) is gathered in full with ``full_tensor()``, a collective, so every rank must
        iterate to the end; only the current module's tensors are held in full. Non-persistent buffers are left out,
        as in ``state_dict()``; tied parameters appear under each of their keys."""
        routed = {id(linear) for linear in self.linears}
        for name, module in model.named_modules():
            own = {k: v for k, v in module._parameters.items() if v is not None}
            own |= {k: v for k, v in module._buffers.items()
                    if v is not None and k not in module._non_persistent_buffers_set}
            if not own:
                continue
            full = {k: _full(v) for k, v in own.items()}
            if id(module) in routed:
                full |= _folded(module, full)
            for k, v in full.items():
                if k not in (ROWS, ROW_BIAS, COLS):
                    yield (f"{name}.{k}" if name else k), v


def _folded(linear: nn.Linear, tensors: dict) -> dict:
    """The routed ``linear``'s ``weight`` (and, for QKV rows with a bias, ``bias``) with its head parameters
    written in, from ``tensors`` (its own, by name: the module's, or gathered copies); new tensors."""
    index = getattr(linear, _INDEX).to(tensors["weight"].device)
    weight = tensors["weight"]
    if COLS in tensors:
        return {"weight": weight.index_copy(1, index, tensors[COLS].to(weight.dtype))}
    out = {"weight": weight.index_copy(0, index, tensors[ROWS].to(weight.dtype))}
    if ROW_BIAS in tensors:
        out["bias"] = tensors["bias"].index_copy(0, index, tensors[ROW_BIAS].to(tensors["bias"].dtype))
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t``: gathered when it is a DTensor, detached either way."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class LanguageModelLoss(nn.Module):
    """``forward(ids) -> loss``: the causal LM's chunked cross-entropy (:func:`chunked_lm_loss`, what ``repair``
    trains on) as one module, so that it can be FSDP's root: the output embedding is read inside the root's
    forward, where ``fully_shard`` has gathered it (outside, it is a shard)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        family, _ = attention_modules(self.model)
        hidden = family.base_model(self.model)(ids, use_cache=False).last_hidden_state
        return chunked_lm_loss(hidden, self.model.get_output_embeddings().weight, causal_lm_labels(ids))


def shard(root: nn.Module, mesh=None) -> nn.Module:
    """``fully_shard`` each decoder block of the model in ``root`` (a causal LM, or a :class:`LanguageModelLoss`
    around one), then ``root`` itself (embeddings, final norm, head: gathered for the whole forward and backward), on
    ``mesh`` (default: every rank of the default process group). Attach :class:`HeadParams` first. Returns
    ``root``, now an FSDP module (its parameters DTensors sharded on dim 0)."""
    from torch.distributed.fsdp import fully_shard

    model = root.model if isinstance(root, LanguageModelLoss) else root
    family, _ = attention_modules(model)
    for block in family.decoder_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return root

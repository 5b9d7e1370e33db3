"""``AllParameters``: every parameter of a model trainable, behind :class:`~alibi_surgery.HeadSlices`' interface.

``sparsify --train full`` trains the whole model (Draye et al. post-train every weight) where the default trains the
selected heads' slices. The trainer, :class:`~alibi_surgery.HeadSlicedAdamW` (one multi-tensor kernel launch over
every parameter), checkpoints and resume then work unchanged: the "slices" are the model's own parameters in
``named_parameters()`` order (tied weights once), their gradients views of one flat buffer. No forward is routed;
ordinary autograd fills the gradients.

Limits: in place only (the parameters' own dtype, which must be the same for all; fp16/bf16 get the optimizer's
fp32 master copy, the default); 1-D and 2-D parameters of at most 2**31 - 1 elements (:func:`check_full`, run
before anything is written). Memory per parameter: its gradient (the weights' bytes) and 8 bytes of moments, 12 with
a master copy; the loss's whole logits (``B x T x vocab``, about 12 bytes each beyond the model dtype's); the
``--dry-run`` prediction counts all three. Weight decay, when set, applies to every parameter (LayerNorms, biases
and embeddings too).
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention.patch import attention_modules
from ..errors import UsageError
from ..families import HeadLayout
from .slices import _ROUTED, HeadSlices, SliceSpec

__all__ = ["AllParameters", "check_full"]

_MAX_NUMEL = 2**31 - 1  # the fused AdamW's per-tensor limit


def check_full(model: nn.Module) -> None:
    """Refuse, in one line and before anything is written, a model that ``--train full`` cannot train: parameters of
    several dtypes, of more than two dimensions, or of more than 2**31 - 1 elements."""
    named = list(model.named_parameters())  # tied parameters once
    dtypes = {p.dtype for _, p in named}
    if len(dtypes) != 1:
        raise UsageError(f"--train full needs one parameter dtype, the model has {sorted(map(str, dtypes))}")
    for name, p in named:
        if p.dim() not in (1, 2) or p.numel() > _MAX_NUMEL:
            raise UsageError(f"--train full trains 1-D and 2-D parameters of at most 2**31 - 1 elements; {name} has "
                             f"shape {list(p.shape)}")


class AllParameters(HeadSlices):
    """Every parameter of ``model`` trainable (module docstring). ``specs`` name them (layer and head -1, ``kind``
    the parameter's name); ``selection`` is empty. :meth:`remove` restores every ``requires_grad`` flag."""

    def __init__(self, model: nn.Module):  # HeadSlices.__init__ (the routing) is not called
        family, attns = attention_modules(model)
        if _ROUTED in model.__dict__:
            raise UsageError("this model already has HeadSlices attached: remove() them first")
        check_full(model)
        named = list(model.named_parameters())  # tied parameters once
        self.model, self.family = model, family
        n_head, d = family.attention_shape(attns[0])
        self.layout = HeadLayout(len(attns), n_head, d, n_head * d, 0)
        self.selection = {}
        self.dtype, self.in_place = named[0][1].dtype, True
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.specs = [SliceSpec(-1, -1, name) for name, _ in named]
        self.tensors = [p for _, p in named]
        self._targets = list(self.tensors)
        self._routes = []
        model.__dict__[_ROUTED] = True
        sizes = [t.numel() for t in self.tensors]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.numel = sum(sizes)
        self.grad = torch.zeros(self.numel, dtype=self.dtype, device=self.tensors[0].device)
        for i, t in enumerate(self.tensors):
            t.requires_grad_(True)
            t.grad = self.grad[self.offsets[i]:self.offsets[i] + sizes[i]].view(t.shape)

    def remove(self) -> None:
        flags = list(self._requires_grad)
        super().remove()  # drops the gradients (and clears requires_grad of the tensors: here the parameters)
        for p, flag in flags:
            p.requires_grad_(flag)

    def __repr__(self) -> str:
        return f"AllParameters({len(self.tensors)} tensors, {self.numel:,} elements, {self.dtype})"


"""The paper's operation on every selected head: re-initialise its q/k/v rows, zero its bias and output columns.

For head ``h`` (head size ``d``) of a layer: ``query_key_value.weight`` rows ``[h*3d, (h+1)*3d)`` get a Xavier
initialisation of that ``[3d, hidden]`` block (uniform by default, as the paper's code does; normal optional),
the same rows of the bias become 0, and ``dense.weight`` columns ``[h*d, (h+1)*d)`` become 0. Since the dense
columns start at zero the first step gives the q/k/v rows zero gradient: the output columns must train first.
Each head draws from its own generator seeded with ``(seed, layer, head)``, so the values do not depend on which
other heads are selected. Nothing else in the model is written. :func:`ablate_heads` does the last part alone (zero
the ``dense`` columns: the head's output is removed, its q/k/v kept), the ``ablate`` control arm.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..families import HeadLayout
from ..attention.patch import attention_modules
from ..diagnosis.selection import check_selection

__all__ = ["INITS", "reinit_heads", "ablate_heads"]

INITS = ("xavier_uniform", "xavier_normal")


def _heads(model, selection: dict):
    """``(family, layout, attention module, layer, head)`` of every selected head of ``model``."""
    family, attns = attention_modules(model)
    n_head, d = family.attention_shape(attns[0])
    selection = check_selection(selection, len(attns), n_head)
    layout = HeadLayout(len(attns), n_head, d, n_head * d, 0)
    for layer, heads in selection.items():
        for h in heads:
            yield family, layout, attns[layer], layer, h


def _zero_output(family, layout, attn, h: int) -> None:
    a, b = family.out_cols(h, layout)
    family.out(attn).weight[:, a:b] = 0


@torch.no_grad()
def ablate_heads(model, selection: dict) -> None:
    """Zero the ``dense`` (output projection) columns of every selected head of ``model`` in place; nothing else."""
    for family, layout, attn, _, h in _heads(model, selection):
        _zero_output(family, layout, attn, h)


@torch.no_grad()
def reinit_heads(model, selection: dict, *, seed: int = 0, init: str = "xavier_uniform") -> None:
    """Apply the re-initialisation to every selected head of ``model`` in place (see the module docstring)."""
    if init not in INITS:
        raise UsageError(f"unknown init={init!r}; choose one of {', '.join(INITS)}")
    fill = torch.nn.init.xavier_uniform_ if init == "xavier_uniform" else torch.nn.init.xavier_normal_
    for family, layout, attn, layer, h in _heads(model, selection):
        qkv = family.qkv(attn)
        gen = torch.Generator().manual_seed(((int(seed) * 1_000_003 + layer) * 1_009 + h) % 2**63)
        rows = family.qkv_rows(h, layout)
        block = torch.empty(sum(b - a for a, b in rows), qkv.weight.shape[1], dtype=torch.float32)
        fill(block, generator=gen)  # one [3d, hidden] block, as the paper initialises it, whatever the layout
        block = block.to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        at = 0
        for a, b in rows:
            qkv.weight[a:b] = block[at:at + b - a]
            at += b - a
            if qkv.bias is not None:
                qkv.bias[a:b] = 0
        _zero_output(family, layout, attn, h)

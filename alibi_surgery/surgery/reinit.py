"""The paper's operation on every selected head: re-initialise its q/k/v rows, zero its bias and output columns.

For head ``h`` (head size ``d``) of a layer: ``query_key_value.weight`` rows ``[h*3d, (h+1)*3d)`` get a Xavier
initialisation of that ``[3d, hidden]`` block (uniform by default, as the paper's code does; normal optional),
the same rows of the bias become 0, and ``dense.weight`` columns ``[h*d, (h+1)*d)`` become 0. Since the dense
columns start at zero the first step gives the q/k/v rows zero gradient: the output columns must train first.
Each head draws from its own generator seeded with ``(seed, layer, head)``, so the values do not depend on which
other heads are selected. Nothing else in the model is written.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..attention.patch import bloom_attentions
from .slices import check_selection

__all__ = ["INITS", "reinit_heads"]

INITS = ("xavier_uniform", "xavier_normal")


@torch.no_grad()
def reinit_heads(model, selection: dict, *, seed: int = 0, init: str = "xavier_uniform") -> None:
    """Apply the re-initialisation to every selected head of ``model`` in place (see the module docstring)."""
    if init not in INITS:
        raise UsageError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    attns = bloom_attentions(model)
    selection = check_selection(selection, len(attns), attns[0].num_heads)
    fill = torch.nn.init.xavier_uniform_ if init == "xavier_uniform" else torch.nn.init.xavier_normal_
    for layer, heads in selection.items():
        attn = attns[layer]
        d = attn.head_dim
        qkv_w, qkv_b, dense_w = attn.query_key_value.weight, attn.query_key_value.bias, attn.dense.weight
        for h in heads:
            gen = torch.Generator().manual_seed(((int(seed) * 1_000_003 + layer) * 1_009 + h) % 2**63)
            block = torch.empty(3 * d, qkv_w.shape[1], dtype=torch.float32)
            fill(block, generator=gen)
            qkv_w[h * 3 * d:(h + 1) * 3 * d] = block.to(device=qkv_w.device, dtype=qkv_w.dtype)
            qkv_b[h * 3 * d:(h + 1) * 3 * d] = 0
            dense_w[:, h * d:(h + 1) * d] = 0

"""Head statistics a loss can train on: the first-token mass and entropy of chosen heads, with gradients.

``with trainable_stats(model) as stats:`` (model patched, triton or torch backend) makes every attention call in the
block return its per-row statistics from the fused kernels (``row_stats``: no T x T matrix), differentiable in the
projections; ``stats.first_token_mass(selection)`` and ``stats.entropy(selection)`` are then scalars on the autograd
graph, to add to a loss (``repair --sink-penalty``, ``sparsify``). The block must hold the backward too when the
model uses activation checkpointing: the recomputed forward must run as the first one did (its statistics are not
collected twice: the first call of each layer is kept).

Averages are over the selected heads and the counted query rows of the batch: every real row but position 0 (the
first token attends only to itself: its first-token mass is 1 and its entropy 0, with no gradient).
Limits: one forward per block (a second forward of a layer outside the backward is refused: RuntimeError); the
families' own eager paths (``output_attentions``, attention dropout) produce no statistics and are refused.
"""

from __future__ import annotations

import contextlib

import torch

from .backends import row_sums
from .patch import attention_modules, patch_state

__all__ = ["TrainableStats", "trainable_stats"]


class TrainableStats:
    """Per-layer row statistics of one forward, on the autograd graph (see the module docstring)."""

    def __init__(self, n_layer: int, n_head: int):
        self.n_layer, self.n_head = n_layer, n_head
        self.layers: dict[int, torch.Tensor] = {}  # layer -> per-head sums [B, H, 3] with gradients
        self.closed = False

    def add(self, layer: int, rows: torch.Tensor, key_pos: torch.Tensor) -> None:
        """One attention call's per-row statistics ``[B, H, Tq, 2]`` and its key positions ``[B, Tk]``."""
        sums = row_sums(rows, key_pos, exclude_first_query=True)  # also when recomputed: the same saved tensors
        if self.closed or _in_backward():  # after the block, or recomputed by activation checkpointing
            return
        if layer in self.layers:
            raise RuntimeError(f"layer {layer} ran twice inside one trainable_stats() block: one forward per block")
        self.layers[layer] = sums

    def _mean(self, selection: dict, column: int) -> torch.Tensor:
        missing = sorted(set(selection) - set(self.layers))
        if missing:
            raise RuntimeError(f"no statistics for layer(s) {missing}: run the model's forward inside "
                               f"trainable_stats() first")
        total, count = 0.0, 0.0
        for layer, heads in selection.items():
            sums = self.layers[layer][:, list(heads)]  # [B, n, 3]
            total = total + sums[..., column].sum()
            count = count + sums[..., 2].sum()
        return total / torch.clamp(torch.as_tensor(count), min=1.0)

    def first_token_mass(self, selection: dict) -> torch.Tensor:
        """Mean first-token mass of the heads ``{layer: [heads]}`` over the counted rows: a scalar with gradients."""
        return self._mean(selection, 0)

    def entropy(self, selection: dict) -> torch.Tensor:
        """Mean row entropy (nats) of the heads ``{layer: [heads]}`` over the counted rows, with gradients."""
        return self._mean(selection, 1)


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (activation checkpointing recomputes the
    forward there)."""
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def trainable_stats(model):
    """Collect differentiable head statistics from the forward run inside the block (the model must be patched
    with the triton or torch backend)."""
    family, attns = attention_modules(model)
    states = []
    for attn in attns:
        try:
            states.append(patch_state(attn))
        except KeyError:
            raise RuntimeError("trainable_stats needs a patched model: call patch(model) first") from None
    stats = TrainableStats(len(attns), family.attention_shape(attns[0])[0])
    for state in states:
        state.rows = stats
    try:
        yield stats
    finally:
        stats.closed = True
        for state in states:
            state.rows = None

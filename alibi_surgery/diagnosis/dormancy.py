"""MLP dormancy: the share of MLP neurons that barely take part in the computation.

Neuron ``i`` of a block's MLP reads the residual stream through row ``i`` of the up projection and writes back
through column ``i`` of the down projection; its weight is ``||up[i, :]|| * ||down[:, i]||`` (Euclidean norms).
A neuron is *dormant* when that product is below ``threshold`` (default 0.01). The result, per layer and in total,
is a dict::

    {"threshold": 0.01, "per_layer": [share, ...], "dormant": [count, ...], "neurons": [count, ...], "total": share}

``total`` is dormant neurons over all neurons. Norms are taken in float32 from the weights as they are given (a model
loaded in bfloat16 is measured on its bfloat16 values); biases and the activation are not looked at, so this is a
weight-only proxy (a neuron whose bias keeps it saturated is not caught). The adapter of the model's family says where
the projections are (:meth:`~alibi_surgery.families.base.Family.mlp_weights`). :func:`checkpoint_dormancy` reads a
model directory's safetensors one block at a time, without instantiating the model.
"""

from __future__ import annotations

import torch

from ..errors import UsageError

__all__ = ["DEFAULT_THRESHOLD", "check_threshold", "neuron_weights", "DormancyCounter", "model_dormancy",
           "checkpoint_dormancy"]

DEFAULT_THRESHOLD = 0.01


def check_threshold(threshold: float) -> float:
    if not threshold >= 0:  # also refuses NaN
        raise UsageError(f"dormancy_threshold={threshold}: must be >= 0")
    return float(threshold)


def neuron_weights(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """float32 ``[n_neurons]``: ``||up[i, :]|| * ||down[:, i]||`` for ``up [n, hidden]`` and ``down [hidden, n]``."""
    if up.shape[0] != down.shape[1]:
        raise ValueError(f"MLP shapes do not match: up {tuple(up.shape)}, down {tuple(down.shape)}")
    return up.detach().float().norm(dim=1) * down.detach().float().norm(dim=0)


class DormancyCounter:
    """Collects one layer at a time (``add(up, down)``) and gives the summary dict (``result()``)."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        self.threshold = check_threshold(threshold)
        self.dormant: list[int] = []
        self.neurons: list[int] = []

    def add(self, up: torch.Tensor, down: torch.Tensor) -> None:
        weights = neuron_weights(up, down)
        self.dormant.append(int((weights < self.threshold).sum()))
        self.neurons.append(weights.numel())

    def result(self) -> dict:
        total = sum(self.neurons)
        return {"threshold": self.threshold,
                "per_layer": [d / n if n else 0.0 for d, n in zip(self.dormant, self.neurons)],
                "dormant": list(self.dormant),
                "neurons": list(self.neurons),
                "total": sum(self.dormant) / total if total else 0.0}


def model_dormancy(model, threshold: float = DEFAULT_THRESHOLD) -> dict | None:
    """Dormancy of a loaded model (causal LM or base model) of a registered family; None when its adapter finds no
    MLP up/down projections (a mixture-of-experts block, say)."""
    from ..families import family_of_module

    family = family_of_module(model)
    counter = DormancyCounter(threshold)
    try:
        for block in family.decoder_blocks(model):
            counter.add(*family.mlp_weights(block))
    except LookupError:
        return None
    return counter.result()


def checkpoint_dormancy(model_dir, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Dormancy of the checkpoint in ``model_dir``, read block by block from its safetensors files (float32)."""
    from ..io.shards import CheckpointIndex

    ckpt = CheckpointIndex(model_dir)
    counter = DormancyCounter(threshold)
    for layer in range(ckpt.family.layout(ckpt.config).n_layer):
        names = ckpt.family.mlp_tensor_names(layer)
        tensors = ckpt.load(list(names), "cpu", torch.float32)
        counter.add(tensors[names[0]], tensors[names[1]])
    return counter.result()

"""The trained state of ``repair --distributed fsdp``: the selected heads under FSDP2, over every rank.

:class:`ShardedTraining` is :class:`~alibi_surgery.surgery.trainer.SlicedTraining`'s twin, so that
:func:`~alibi_surgery.surgery.trainer.train` runs one loop at any world size:

* the heads become parameters of their own (:class:`~alibi_surgery.surgery.sharded.HeadParams`), every block and
  the loss root are ``fully_shard``-ed over a 1-D mesh of every rank (:func:`~alibi_surgery.surgery.sharded.shard`),
  and ``torch.optim.AdamW`` (the head-sliced optimizer's betas and epsilon, its weight decay, the same clipping of the
  heads' global norm) steps the local shards;
* each rank takes an equal share of each micro-batch's rows (the batch size must divide by the world size), so the
  gradients FSDP averages are the single process's mean over the batch;
* the forwards of evaluation run inside :meth:`gathered`: the root is gathered and every rank diagnoses every prompt
  (:func:`~alibi_surgery.distributed.replicated`), so each rank holds the single process's report;
* checkpoints hold the head parameters and their AdamW state only (:func:`~alibi_surgery.surgery.sharded_io.
  save_sharded`: Distributed Checkpoint, complete or absent), resumable at any world size; the frozen weights are the
  input model's.

Limits: float32 weights (FSDP2's all-gather wants one dtype per block, and torch's AdamW keeps its moments in the
parameter's); the language-model objective only (no sink penalty, no ``sparsify``); one pass; every rank loads the
whole input model before sharding it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..distributed import replicated, world
from ..errors import UsageError
from .sharded import HeadParams, LanguageModelLoss, shard
from .sharded_io import load_sharded, save_sharded

__all__ = ["ShardedTraining", "fsdp_refusal"]


def fsdp_refusal(settings, dtype: str | None) -> str | None:
    """Why a run with these settings cannot use ``distributed="fsdp"`` in this process group (None: it can);
    no ``dtype`` means float32 here."""
    if settings.objective != "repair" or settings.train != "slices":
        return "distributed='fsdp' trains the selected heads' slices with the language-model loss (not sparsify)"
    if settings.sink_penalty:
        return f"distributed='fsdp' trains without a sink penalty, not sink_penalty={settings.sink_penalty}"
    if settings.optimizer_precision != "master":
        return (f"distributed='fsdp' keeps float32 weights and AdamW state, not "
                f"optimizer_precision={settings.optimizer_precision!r}")
    if dtype not in (None, "float32", "fp32"):
        return f"distributed='fsdp' trains in float32, not dtype={dtype!r}"
    ranks = world()[1]
    if settings.batch_size % ranks:
        return f"batch_size={settings.batch_size} does not split over {ranks} ranks: give a multiple of {ranks}"
    return None


class ShardedTraining:
    """The FSDP2 state of ``run`` (see the module docstring). Built on every rank, in step."""

    def __init__(self, run):
        from torch.distributed.device_mesh import init_device_mesh

        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise UsageError("distributed='fsdp' needs a process group: run under torchrun (the CLI makes a group of "
                             "one without it), or call torch.distributed.init_process_group first")
        s, self.run = run.s, run
        self.rank, self.world_size = world()  # the batch size divides by it (fsdp_refusal, before any write)
        model = run.model
        if next(model.parameters()).dtype != torch.float32:
            raise UsageError(f"distributed='fsdp' trains in float32, not {next(model.parameters()).dtype}")
        self.heads = HeadParams(model, run.plan.selection)
        device = next(model.parameters()).device.type
        self.root = shard(LanguageModelLoss(model), init_device_mesh(device, (self.world_size,)))
        self.params = self.heads.params
        self.opt = torch.optim.AdamW(self.params, lr=s.lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=s.weight_decay)
        self.max_grad_norm = s.max_grad_norm

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's mean loss on its rows of the micro-batch ``ids``."""
        return self.root(ids.tensor_split(self.world_size)[self.rank])

    def mean(self, loss: torch.Tensor) -> float:
        import torch.distributed as dist

        total = loss.detach().float().clone()
        dist.all_reduce(total)
        return float(total) / self.world_size

    def step(self, lr: float) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad()

    def save(self, position: dict) -> Path:
        from .trainer import CKPT_PREFIX, _test_pause

        run = self.run
        meta = run.checkpoint_meta(position, distributed="fsdp", world_size=self.world_size)
        return save_sharded(run.ckpt_dir / f"{CKPT_PREFIX}{position['step']:08d}", self.root, self.opt, meta,
                            before_marker=lambda: _test_pause("save", position["step"]))

    def load(self, checkpoint: Path) -> dict:
        """Restore the head parameters and AdamW state of ``checkpoint`` (written at any world size)."""
        return load_sharded(checkpoint, self.root, self.opt)

    @contextlib.contextmanager
    def gathered(self):
        """Whole forwards on every rank alike (evaluation, re-diagnosis): the root gathered, the work replicated."""
        self.root.unshard()
        try:
            with replicated():
                yield
        finally:
            self.root.reshard()

    def remove(self) -> None:
        """Nothing: the head parameters stay until ``final/`` is written (:meth:`write_final`)."""

    def write_final(self, final: Path, tokenizer, dtype: torch.dtype | None = None) -> Path:
        """``final/`` from the parameters in memory (in ``dtype``, default theirs), gathered one module at a time
        (collective)."""
        from .sharded_io import write_final

        return write_final(final, self.run.model, self.heads, tokenizer, dtype=dtype)

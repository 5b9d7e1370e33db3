"""What a surgery pass minimises, given the language-model loss of a micro-batch (:func:`objective`), and the
constraint of ``sparsify`` (:class:`Geco`); :mod:`~alibi_surgery.surgery.trainer` runs them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import torch

from ..analysis.loss import causal_lm_labels, chunked_lm_loss
from ..families import family_for

__all__ = ["lm_loss", "objective", "Geco", "sparsity_score"]


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of a micro-batch: chunked (no full logits) unless the LM head trains (--train full)."""
    hidden = family_for(model.config).base_model(model)(ids, use_cache=False).last_hidden_state
    head, labels = model.get_output_embeddings(), causal_lm_labels(ids)
    if not head.weight.requires_grad:
        return chunked_lm_loss(hidden, head.weight, labels)
    logits = head(hidden[:, :-1]).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@contextlib.contextmanager
def objective(run, geco: "Geco | None" = None):
    """The block of one micro-batch's forward and backward; yields ``objective(loss)``, what is minimised given
    the language-model loss of that forward:

    * ``repair``: the loss, plus ``sink_penalty`` times the target heads' mean first-token mass;
    * ``sparsify``: the targets' mean row entropy plus the GECO multiplier times (loss - target) (:class:`Geco`),
      with the sink penalty too when one is set.

    The statistics come from the fused kernels with their gradients (:mod:`~alibi_surgery.attention.row_stats`, no
    T x T matrix). The backward stays inside: activation checkpointing recomputes the forward there, and the
    recomputation must ask for the same statistics."""
    s = run.s
    if not s.sink_penalty and geco is None:
        yield lambda loss: loss
        return
    from ..attention.row_stats import trainable_stats

    with trainable_stats(run.model) as stats:
        def objective(loss):
            total = loss
            if geco is not None:
                entropy = stats.entropy(run.plan.selection)
                geco.observe(float(loss.detach()), float(entropy.detach()))
                total = entropy + geco.lam * (loss - geco.target)
            if s.sink_penalty:
                total = total + s.sink_penalty * stats.first_token_mass(run.plan.selection)
            return total

        yield objective


def sparsity_score(run, entry: dict) -> float | None:
    """What ``sparsify`` keeps as its best checkpoint (``final/``): the lowest mean entropy of the targets among
    the checkpoints whose held-out loss stays within ``loss_slack`` of the model's own (any checkpoint without
    held-out text); None for one over the slack."""
    before = json.loads((run.out / "run.json").read_text()).get("eval_ppl_before")
    if before is not None and entry.get("eval_ppl") is not None and \
            math.log(entry["eval_ppl"]) > math.log(before) + run.s.loss_slack:
        return None
    from .sparsify_report import mean_entropy

    return mean_entropy(entry["comparison"]["heads"], run.plan.selection, "entropy_after")


@dataclasses.dataclass
class Geco:
    """The GECO-style constraint of ``sparsify`` (Rezende & Viola 2018): minimise the targets' mean entropy
    subject to loss <= ``target`` (the model's own loss plus ``loss_slack``). The loss term is weighted by the
    multiplier ``lam``, whose log moves after every optimizer step by ``rate`` times the moving average of
    (loss - target) (decay 0.9 per micro-batch): it grows while the loss is above the target and shrinks below it,
    within [1e-4, 1e4]. Saved in every checkpoint (``position["geco"]``), so a resumed run continues it."""

    target: float
    base: float  # the model's own loss before training
    rate: float
    lam: float = 1.0
    excess: float | None = None  # moving average of loss - target
    entropy: float | None = None  # moving average of the targets' mean entropy (nats)

    @classmethod
    def start(cls, run, s) -> "Geco":
        """Measure the model's own loss on the first micro-batches of epoch 0 (up to 8, no gradient)."""
        losses = []
        was_training = run.model.training
        run.model.eval()
        with torch.no_grad():
            for step in range(run.steps_per_epoch):
                for ids in run.micro_batches(0, step):
                    losses.append(float(lm_loss(run.model, ids.to(run.model.device))))
                if len(losses) >= 8:
                    break
        run.model.train(was_training)
        base = sum(losses) / len(losses)
        return cls(target=base + s.loss_slack, base=base, rate=s.geco_rate)

    @classmethod
    def from_dict(cls, data: dict) -> "Geco":
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def observe(self, loss: float, entropy: float) -> None:
        excess = loss - self.target
        self.excess = excess if self.excess is None else 0.9 * self.excess + 0.1 * excess
        self.entropy = entropy if self.entropy is None else 0.9 * self.entropy + 0.1 * entropy

    def step(self) -> None:
        if self.excess is not None:
            self.lam = min(1e4, max(1e-4, self.lam * math.exp(self.rate * self.excess)))

"""The training loop of one surgery pass: data order, optimizer steps, checkpoints, re-diagnosis.

:class:`Run` holds what a pass trains (model, plan, baseline diagnosis, packed corpus, settings); :func:`train` runs
its optimizer steps (resumable from a checkpoint, bit-identically), checkpointing at the end of every
``save_every_epochs``-th epoch (and of the last) and every ``save_every_steps``, and re-diagnosing the model
against the baseline at each checkpoint. A checkpoint (one process: :class:`SlicedTraining`) is the model safetensors + tokenizer, the optimizer's
slice state and the loop position (under FSDP2 the heads and their state only: :mod:`.sharded_train`), written to a temporary directory and moved into place by
:func:`~alibi_surgery.io.files.replace_dir`, so a kill at any instant never leaves a torn one; a failed write removes
the partial one and raises :class:`~alibi_surgery.errors.WriteError`.
:mod:`~alibi_surgery.surgery.repair` drives it. Limits: the corpus is held in memory as packed token rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from ..analysis.comparison import Comparison
from ..diagnosis.diagnose import diagnose
from ..errors import UsageError
from ..families import family_for
from ..io.files import atomic_write_text, staged_dir
from ..io.loading import quiet_transformers
from ..distributed import is_main, world
from ..analysis.perplexity import chunks_perplexity
from .full import AllParameters
from .objective import Geco, lm_loss, objective, sparsity_score
from .optim import HeadSlicedAdamW
from .plan import Plan
from .schedule import lr_at, surgery_lr
from ..diagnosis.report import HeadReport
from .slices import HeadSlices

__all__ = ["Run", "TrainingData", "train", "lr_at", "prompts_perplexity", "enable_checkpointing", "newest_checkpoint",
           "config_key", "CKPT_PREFIX", "STATE_FILE", "OPT_FILE", "PAUSE_ENV"]

CKPT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
OPT_FILE = "optimizer.safetensors"


def config_key(config) -> dict:
    """What must match for a checkpoint to resume a run: the model's shape (BLOOM's field names, for every family)."""
    layout = family_for(config).layout(config)
    return {"n_layer": layout.n_layer, "n_head": layout.n_head, "hidden_size": layout.hidden,
            "vocab_size": layout.vocab}


def prompts_perplexity(model, encoded, convention: str, backend: str) -> float | None:
    """Perplexity of ``model`` over held-out texts (token-id lists), each scored alone and combined by
    ``convention`` (:mod:`alibi_surgery.analysis.perplexity`); None without texts."""
    if encoded is None:
        return None
    from ..analysis.perplexity import combine, score_texts

    return combine(score_texts(model, encoded, backend=backend), convention)


def held_out(entry: dict) -> float | None:
    """The held-out figure that picks the best checkpoint: the packed ``--eval-text`` perplexity, else the
    ``--eval-prompts`` one, else None."""
    return entry["eval_ppl"] if entry["eval_ppl"] is not None else entry.get("eval_prompts_ppl")


@dataclasses.dataclass
class TrainingData:
    """The token data of one pass: the packed training ``chunks`` ``[n, seq_len]``, the packed held-out
    ``eval_chunks`` (or None) and the held-out ``eval_prompts`` as token-id lists (or None)."""

    chunks: torch.Tensor
    eval_chunks: torch.Tensor | None = None
    eval_prompts: list | None = None


class Run:
    """One pass: state shared by training, checkpointing and re-diagnosis. ``job`` is the pass's
    :class:`~alibi_surgery.surgery.settings.RepairJob` (settings, diagnosis prompts, backend, progress)."""

    def __init__(self, model, tokenizer, plan: Plan, baseline: HeadReport, job, out: Path, model_dir: Path,
                 data: TrainingData):
        settings = job.settings
        self.model, self.tokenizer, self.plan, self.baseline = model, tokenizer, plan, baseline
        self.job, self.data = job, data
        self.eval_prompts = data.eval_prompts  # token ids of the eval_prompts texts, or None
        self.s, self.out, self.chunks, self.eval_chunks = settings, out, data.chunks, data.eval_chunks
        self.backend, self.progress, self.model_dir = job.run.backend, job.run.progress, model_dir
        self.prompts = job.prompts()
        self.ckpt_dir = out / "checkpoints"
        chunks = data.chunks
        n_micro = 0 if chunks is None else len(chunks) // settings.batch_size
        if n_micro == 0 and settings.trains:
            raise UsageError(f"the corpus has {len(chunks)} chunks of seq_len={settings.seq_len}, fewer than one "
                             f"batch (batch_size={settings.batch_size})")
        self.n_micro = n_micro
        self.steps_per_epoch = math.ceil(n_micro / settings.grad_accum)
        self.total_steps = self.steps_per_epoch * settings.epochs if settings.trains else 0  # an arm that trains
        self.history: list[dict] = []
        self.learning_rates: list[float] = []  # the lr of every optimizer step so far, in order
        self.latest: tuple[HeadReport, Comparison] | None = None

    # -- data ---------------------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.s.seed * 7919 + epoch)
        return torch.randperm(len(self.chunks), generator=gen)

    def micro_batches(self, epoch: int, step_in_epoch: int):
        order = self.epoch_order(epoch)
        first = step_in_epoch * self.s.grad_accum
        for m in range(first, min(first + self.s.grad_accum, self.n_micro)):
            rows = order[m * self.s.batch_size:(m + 1) * self.s.batch_size]
            yield self.chunks[rows]

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save(self, slices: HeadSlices, opt: HeadSlicedAdamW, position: dict) -> Path:
        from safetensors.torch import save_file

        slices.write_back()
        name = f"{CKPT_PREFIX}{position['step']:08d}"
        final = self.ckpt_dir / name
        with staged_dir(final, "checkpoint") as tmp:
            tmp.mkdir(parents=True)
            with quiet_transformers():
                self.model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
            _test_pause("save", position["step"])
            state = opt.state_dict(device="cpu")  # no second device copy of the state (all of it: --train full)
            tensors = {k: state[k].contiguous() for k in ("exp_avg", "exp_avg_sq", "master") if state[k] is not None}
            save_file(tensors, str(tmp / OPT_FILE))
            meta = self.checkpoint_meta(position, optimizer={
                k: v for k, v in state.items() if k not in tensors and k not in ("exp_avg", "exp_avg_sq", "master")},
                has_master=state["master"] is not None)
            atomic_write_text(tmp / STATE_FILE, json.dumps(meta, indent=1) + "\n")  # last: marks it complete
        return final

    def checkpoint_meta(self, position: dict, **extra) -> dict:
        """A checkpoint's metadata: the loop position, the plan, the settings, the model's shape, the history and
        the learning rates so far, and ``extra`` (what the trained state adds)."""
        return {"position": position, **extra, "plan": self.plan.to_dict(), "settings": dataclasses.asdict(self.s),
                "model": config_key(self.model.config), "history": self.history,
                "learning_rates": self.learning_rates}

    # -- evaluation ---------------------------------------------------------------------------------------------
    def rediagnose(self) -> tuple[HeadReport, Comparison]:
        """Diagnose the model as it is now and compare it with the baseline (kept as ``latest`` for the plots)."""
        was_training = self.model.training
        self.model.eval()
        report = diagnose(self.model, self.tokenizer, self.prompts, backend=self.backend,
                          max_length=self.s.diag_max_length, thresholds=self.baseline.thresholds)
        self.model.train(was_training)
        self.latest = (report, Comparison(self.baseline, report, targets=self.plan.selection, zone=self.plan.zone))
        return self.latest

    def evaluate(self, step: int, epoch: float, train_ppl: float | None, ckpt: Path | None) -> dict:
        report, cmp = self.rediagnose()
        self.model.eval()
        eval_ppl = chunks_perplexity(self.model, self.eval_chunks, self.s.batch_size) if self.eval_chunks is not None \
            else None
        self.model.train()
        prompts_ppl = prompts_perplexity(self.model, self.eval_prompts, self.s.eval_convention, self.backend)
        entry = {"step": step, "epoch": round(epoch, 4), "checkpoint": None if ckpt is None else ckpt.name,
                 "train_ppl": train_ppl, "eval_ppl": eval_ppl, "eval_prompts_ppl": prompts_ppl,
                 "comparison": cmp.to_dict(),
                 "recovered": len(_flat(cmp.recovered())), "still_sick": len(_flat(cmp.still_sick())),
                 "iatrogenic": len(_flat(cmp.iatrogenic()))}
        self.history.append(entry)
        return entry


def _flat(selection) -> list:
    if isinstance(selection, dict):
        return [(layer, h) for layer, heads in selection.items() for h in heads]
    return list(selection)


PAUSE_ENV = "ALIBI_SURGERY_TEST_PAUSE"  # crash tests only: see _test_pause


def _test_pause(point: str, step: int) -> None:
    """Crash-test hook, inert unless ``ALIBI_SURGERY_TEST_PAUSE`` is ``train:STEP`` (inside step STEP, after its first
    backward) or ``save:STEP`` (half-way through writing checkpoint STEP: weights written, optimizer state and the
    completion marker not). There the process writes its pid to ``$ALIBI_SURGERY_TEST_PAUSE_FILE`` (with ``.R``
    appended on rank R of several) and sleeps until the test kills it, or deletes that file (then the run goes on)."""
    if os.environ.get(PAUSE_ENV) != f"{point}:{step}":
        return
    rank, size = world()
    flag = Path(os.environ[f"{PAUSE_ENV}_FILE"] + (f".{rank}" if size > 1 else ""))
    flag.write_text(str(os.getpid()))
    while flag.exists():
        time.sleep(0.05)


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob(f"{CKPT_PREFIX}*") if (p / STATE_FILE).is_file()) \
        if ckpt_dir.is_dir() else []
    return done[-1] if done else None


class SlicedTraining:
    """The trained state of one process: the selected heads' slices (or, with ``--train full``, every parameter)
    and :class:`HeadSlicedAdamW`; checkpoints hold the whole model (:meth:`Run.save`). :class:`~alibi_surgery.
    surgery.sharded_train.ShardedTraining` is its FSDP2 twin; :func:`train` drives either."""

    def __init__(self, run: Run):
        s, self.run = run.s, run
        self.slices = AllParameters(run.model) if s.train == "full" else HeadSlices(run.model, run.plan.selection)
        self.opt = HeadSlicedAdamW(self.slices, lr=s.lr, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
                                   precision=s.optimizer_precision, seed=s.seed)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.run.model, ids)

    def mean(self, loss: torch.Tensor) -> float:
        """The micro-batch's loss as a number (every rank's mean, under FSDP)."""
        return float(loss.detach())

    def step(self, lr: float) -> None:
        self.opt.step(lr=lr)
        self.opt.zero_grad()

    def save(self, position: dict) -> Path:
        return self.run.save(self.slices, self.opt, position)

    def load(self, checkpoint: Path) -> dict:
        """Restore the optimizer state of ``checkpoint`` (the weights were loaded with the model); its metadata."""
        from safetensors.torch import load_file

        meta = json.loads((checkpoint / STATE_FILE).read_text())
        tensors = load_file(str(checkpoint / OPT_FILE))
        device = self.slices.grad.device
        state = dict(meta["optimizer"], exp_avg=tensors["exp_avg"].to(device),
                     exp_avg_sq=tensors["exp_avg_sq"].to(device),
                     master=tensors["master"].to(device) if meta["has_master"] else None)
        state["betas"] = tuple(state["betas"])
        self.opt.load_state_dict(state)
        return meta

    def gathered(self):
        """The block in which the model runs whole forwards (evaluation): nothing to gather in one process."""
        return contextlib.nullcontext()

    def remove(self) -> None:
        """Detach the slices and let go of the optimizer state (nothing of it is needed after training)."""
        self.slices.remove()
        self.slices = self.opt = None


def training_state(run: Run):
    """The trained state of ``run``: :class:`SlicedTraining`, or under ``distributed="fsdp"`` the sharded one."""
    if run.job.run.distributed == "fsdp":
        from .sharded_train import ShardedTraining

        return ShardedTraining(run)
    return SlicedTraining(run)


def train(run: Run, resume_from: Path | None, stop_after_steps: int | None = None) -> None:
    """The training loop of one pass (resumable)."""
    from tqdm.auto import tqdm

    s, model = run.s, run.model
    state = training_state(run)
    position = {"step": 0, "epoch": 0, "step_in_epoch": 0}
    best = {"eval_ppl": None, "checkpoint": None, "stale": 0}  # eval_ppl: the held_out() figure of the best
    if resume_from is not None:
        meta = state.load(resume_from)
        position = meta["position"]
        run.history = meta["history"]
        run.learning_rates = meta.get("learning_rates", [])
        best = position.get("best", best)
    model.train()
    geco = None
    if s.objective == "sparsify":
        geco = Geco.from_dict(position.get("geco")) if "geco" in position else Geco.start(run, s)
    if s.checkpointing:
        enable_checkpointing(model)
    bar = tqdm(total=run.total_steps, initial=position["step"], desc="surgery", unit="step",
               disable=not (run.progress and is_main()))
    window_loss, window_n = 0.0, 0
    try:
        for epoch in range(position["epoch"], s.epochs):
            for step_in_epoch in range(position["step_in_epoch"], run.steps_per_epoch):
                batches = list(run.micro_batches(epoch, step_in_epoch))
                for ids in batches:
                    ids = ids.to(model.device)
                    with objective(run, geco) as minimised:
                        loss = state.loss(ids)
                        value = state.mean(loss)
                        if not math.isfinite(value):
                            last = newest_checkpoint(run.ckpt_dir)
                            raise UsageError(f"the loss is {value} at step {position['step'] + 1}: "
                                             f"stopped; the last good checkpoint is "
                                             f"{last or 'none (nothing was saved yet)'}")
                        (minimised(loss) / len(batches)).backward()
                    _test_pause("train", position["step"] + 1)
                    window_loss += value
                    window_n += 1
                lr = surgery_lr(s.schedule, position["step"] + 1, run.total_steps, s.lr, s.warmup)
                state.step(lr)
                if geco is not None:
                    geco.step()
                run.learning_rates.append(lr)
                position = {"step": position["step"] + 1, "epoch": epoch, "step_in_epoch": step_in_epoch + 1,
                            **({"geco": geco.to_dict()} if geco is not None else {})}
                bar.update(1)
                epoch_end = step_in_epoch + 1 == run.steps_per_epoch
                if epoch_end:
                    position = {"step": position["step"], "epoch": epoch + 1, "step_in_epoch": 0}
                periodic = s.save_every_steps and position["step"] % s.save_every_steps == 0
                saved_epoch = epoch_end and ((epoch + 1) % s.save_every_epochs == 0 or epoch + 1 == s.epochs)
                if saved_epoch or periodic:
                    train_ppl = math.exp(window_loss / window_n) if window_n else None
                    window_loss, window_n = 0.0, 0
                    with state.gathered():
                        entry = run.evaluate(position["step"], position["step"] / run.steps_per_epoch, train_ppl,
                                             None)
                    if geco is not None:
                        entry["geco"] = geco.to_dict()
                    score = held_out(entry) if geco is None else sparsity_score(run, entry)
                    improved = score is not None and (best["eval_ppl"] is None or score < best["eval_ppl"])
                    name = f"{CKPT_PREFIX}{position['step']:08d}"
                    entry["checkpoint"] = name
                    if improved:
                        best = {"eval_ppl": score, "checkpoint": name, "stale": 0}
                    elif saved_epoch and score is not None:
                        best = dict(best, stale=best["stale"] + 1)
                    position["best"] = best
                    state.save(position)
                    bar.set_postfix(recovered=entry["recovered"], eval_ppl=entry["eval_ppl"])
                    if s.patience and best["stale"] >= s.patience:
                        return
                if stop_after_steps is not None and position["step"] >= stop_after_steps:
                    raise KeyboardInterrupt  # tests: a kill at a step boundary
            position = dict(position, step_in_epoch=0)
    finally:
        bar.close()
        state.remove()
        run.best = best
        run.state = state


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (reentrant would drop the lowest selected layer's gradients)."""
    import warnings

    kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5.2x; the old name works in 5.17
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

"""Surgery: plan, re-initialise, train the selected heads, checkpoint, re-diagnose, report.

``repair(model_dir, out, corpus=..., ...)`` runs the paper's procedure with the head-sliced machinery
(:class:`HeadSlices`, :class:`HeadSlicedAdamW`, :func:`chunked_lm_loss`, fused attention, gradient checkpointing):

1. diagnose the input model (or take ``report``) and make a :class:`~alibi_surgery.plan.Plan`;
2. re-initialise the selected heads (:func:`~alibi_surgery.surgery.reinit_heads`, seeded);
3. train on the packed corpus: AdamW (lr 5e-5, no weight decay, clip 1.0), linear warm-up then cosine decay,
   ``batch_size`` x ``grad_accum`` sequences per step, ``epochs`` epochs, early stop on held-out perplexity;
4. checkpoint at the end of every epoch (and every ``save_every_steps``): model safetensors + tokenizer, the
   optimizer's slice state and the loop position, written to a temporary directory, synced and renamed
   (:func:`replace_dir`), so a kill at any instant never leaves a torn checkpoint; ``resume=True`` continues from
   the newest complete one, bit-identically;
5. re-diagnose at every checkpoint against the baseline: recovered / still sick targets, iatrogenic heads, drift
   per zone, training and held-out perplexity, written to ``report.json``, ``report.md`` and PNGs;
6. write ``OUT/final/``, a complete model directory (the best checkpoint by held-out perplexity, else the last)
   that stock transformers loads.

The input directory is only read. Before anything is written: the checkpoint's headers and weights are checked
(:mod:`~alibi_surgery.checkpoint`), and with ``budget`` the plan's predicted peak memory. With ``passes > 1`` each later pass starts from the previous pass's final model
and targets the heads still collapsed. Limits: BLOOM only; the corpus is read into memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from .compare import Comparison
from .corpus import load_corpus, pack_text, read_documents
from .diagnose import diagnose
from .errors import UsageError, WriteError, mark_resumable
from .io_utils import atomic_write_text, read_text, replace_dir, writing
from .checkpoint import cast_checkpoint, stored_dtype
from .loading import load_bloom, parse_dtype, resolve_model_dir
from .lock import LOCK_NAME, DirLock, lock_holder
from .loss import causal_lm_labels, chunked_lm_loss
from .optim import HeadSlicedAdamW
from .patch import patch_bloom
from .plan import NothingToRepair, Plan, make_plan, predict_memory
from .repair_report import write_markdown, write_passes_markdown, write_plots
from .prompts import DEFAULT_PROMPTS
from .report import HeadReport
from .slices import HeadSlices
from .surgery import reinit_heads

__all__ = ["RepairSettings", "plan_surgery", "repair", "repair_pass", "check_out_dir", "clear_dir", "check_budget", "lr_at",
           "enable_checkpointing"]

CKPT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
OPT_FILE = "optimizer.safetensors"


@dataclasses.dataclass
class RepairSettings:
    """Everything a run depends on (saved in every checkpoint; a resumed run must use the same)."""

    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of all steps spent in linear warm-up
    epochs: int = 1
    patience: int | None = None  # checkpoints without held-out improvement before stopping
    max_grad_norm: float = 1.0
    init: str = "xavier_uniform"
    seed: int = 0
    save_every_steps: int | None = None
    checkpointing: bool = True
    stochastic_rounding: bool = False
    diag_max_length: int | None = 128

    def check(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise UsageError(f"--epochs must be >= 0, got {self.epochs}")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"--warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.lr < 0 or self.max_grad_norm <= 0:
            raise UsageError("--lr must be >= 0 and --max-grad-norm > 0")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"--patience must be >= 1, got {self.patience}")
        if self.save_every_steps is not None and self.save_every_steps < 1:
            raise UsageError(f"--save-every-steps must be >= 1, got {self.save_every_steps}")


def lr_at(step: int, total: int, base: float, warmup: float) -> float:
    """Learning rate for 1-based optimizer ``step`` of ``total``: linear warm-up, then cosine decay to 0."""
    n_warm = max(1, math.ceil(warmup * total)) if warmup > 0 else 0
    if step <= n_warm:
        return base * step / n_warm
    progress = (step - n_warm) / max(1, total - n_warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_out_dir(out, model_dir: Path, *, resume: bool, overwrite: bool) -> Path:
    """Refuse an OUT that is the input or inside it, exists non-empty (unless resume/overwrite), or is unwritable."""
    out = Path(out).resolve()
    model_dir = Path(model_dir).resolve()
    if out == model_dir or model_dir in out.parents:
        raise UsageError(f"--out {out} is the input model directory or inside it: the input is never written to")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    holder = lock_holder(out)
    if holder is not None:
        raise UsageError(f"--out {out} is in use by another run ({holder}); wait for it to finish or choose another "
                         f"directory")
    if out.exists() and _contents(out) and not (resume or overwrite):
        raise UsageError(f"--out {out} is not empty: pass --resume to continue or --overwrite to start again")
    parent = out if out.exists() else next(p for p in out.parents if p.exists())
    if not parent.is_dir():
        raise UsageError(f"--out {out} is not writable: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} is not writable: no write permission on {parent}")
    return out


def _contents(directory: Path) -> list[Path]:
    """What ``directory`` holds, less the lock file."""
    return [p for p in directory.iterdir() if p.name != LOCK_NAME]


def clear_dir(directory: Path) -> None:
    """Empty ``directory`` for a fresh start (--overwrite), keeping the lock this run holds on it."""
    with writing(directory, "directory"):
        for p in _contents(directory):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def perplexity(model, chunks: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token loss) of ``model`` over packed ``[n, seq_len]`` chunks (no gradients)."""
    base = model.transformer
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(chunks), batch_size):
            ids = chunks[i:i + batch_size].to(model.device)
            hidden = base(ids).last_hidden_state
            n = ids.numel() - ids.shape[0]
            total += float(chunked_lm_loss(hidden, model.lm_head.weight.detach(), ids)) * n
            count += n
    return math.exp(total / count)


def _config_key(config) -> dict:
    return {k: getattr(config, k) for k in ("n_layer", "n_head", "hidden_size", "vocab_size")}


class _Run:
    """One pass: state shared by training, checkpointing and re-diagnosis."""

    def __init__(self, model, tokenizer, plan: Plan, baseline: HeadReport, settings: RepairSettings, out: Path,
                 chunks: torch.Tensor, eval_chunks, backend: str, prompts, progress: bool, model_dir: Path):
        self.model, self.tokenizer, self.plan, self.baseline = model, tokenizer, plan, baseline
        self.s, self.out, self.chunks, self.eval_chunks = settings, out, chunks, eval_chunks
        self.backend, self.prompts, self.progress, self.model_dir = backend, prompts, progress, model_dir
        self.ckpt_dir = out / "checkpoints"
        n_micro = len(chunks) // settings.batch_size
        if n_micro == 0:
            raise UsageError(f"the corpus has {len(chunks)} chunks of --seq-len {settings.seq_len}, fewer than "
                             f"one --batch-size {settings.batch_size}")
        self.n_micro = n_micro
        self.steps_per_epoch = math.ceil(n_micro / settings.grad_accum)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.history: list[dict] = []
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
        tmp = self.ckpt_dir / f".tmp-{name}"
        try:
            with writing(final, "checkpoint"):
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                self.model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                _test_pause("save", position["step"])
                state = opt.state_dict()
                tensors = {k: state[k].contiguous().cpu() for k in ("exp_avg", "exp_avg_sq", "master")
                           if state[k] is not None}
                save_file(tensors, str(tmp / OPT_FILE))
                meta = {"position": position, "optimizer": {k: v for k, v in state.items() if k not in tensors and
                                                            k not in ("exp_avg", "exp_avg_sq", "master")},
                        "has_master": state["master"] is not None, "plan": self.plan.to_dict(),
                        "settings": dataclasses.asdict(self.s), "model": _config_key(self.model.config),
                        "history": self.history}
                atomic_write_text(tmp / STATE_FILE, json.dumps(meta, indent=1) + "\n")  # last: marks it complete
                replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing partial is left (a kill -9 can leave it: never read)
            raise
        return final

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
        eval_ppl = perplexity(self.model, self.eval_chunks, self.s.batch_size) if self.eval_chunks is not None \
            else None
        self.model.train()
        entry = {"step": step, "epoch": round(epoch, 4), "checkpoint": None if ckpt is None else ckpt.name,
                 "train_ppl": train_ppl, "eval_ppl": eval_ppl, "comparison": cmp.to_dict(),
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
    completion marker not). There the process writes its pid to ``$ALIBI_SURGERY_TEST_PAUSE_FILE`` and sleeps
    until the test kills it, or deletes that file (then the run goes on)."""
    if os.environ.get(PAUSE_ENV) != f"{point}:{step}":
        return
    flag = Path(os.environ[f"{PAUSE_ENV}_FILE"])
    flag.write_text(str(os.getpid()))
    while flag.exists():
        time.sleep(0.05)


def _newest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob(f"{CKPT_PREFIX}*") if (p / STATE_FILE).is_file()) \
        if ckpt_dir.is_dir() else []
    return done[-1] if done else None


def _train(run: _Run, resume_from: Path | None, stop_after_steps: int | None = None) -> None:
    """The training loop of one pass (resumable)."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    s, model = run.s, run.model
    slices = HeadSlices(model, run.plan.selection)
    opt = HeadSlicedAdamW(slices, lr=s.lr, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
                          stochastic_rounding=s.stochastic_rounding, seed=s.seed)
    position = {"step": 0, "epoch": 0, "step_in_epoch": 0}
    best = {"eval_ppl": None, "checkpoint": None, "stale": 0}
    if resume_from is not None:
        meta = json.loads((resume_from / STATE_FILE).read_text())
        tensors = load_file(str(resume_from / OPT_FILE))
        state = dict(meta["optimizer"], exp_avg=tensors["exp_avg"].to(slices.grad.device),
                     exp_avg_sq=tensors["exp_avg_sq"].to(slices.grad.device),
                     master=tensors["master"].to(slices.grad.device) if meta["has_master"] else None)
        state["betas"] = tuple(state["betas"])
        opt.load_state_dict(state)
        position = meta["position"]
        run.history = meta["history"]
        best = position.get("best", best)
    model.train()
    if s.checkpointing:
        enable_checkpointing(model)
    bar = tqdm(total=run.total_steps, initial=position["step"], desc="surgery", unit="step",
               disable=not run.progress)
    window_loss, window_n = 0.0, 0
    try:
        for epoch in range(position["epoch"], s.epochs):
            for step_in_epoch in range(position["step_in_epoch"], run.steps_per_epoch):
                batches = list(run.micro_batches(epoch, step_in_epoch))
                for ids in batches:
                    ids = ids.to(model.device)
                    hidden = model.transformer(ids).last_hidden_state
                    loss = chunked_lm_loss(hidden, model.lm_head.weight, causal_lm_labels(ids))
                    if not torch.isfinite(loss):
                        last = _newest_checkpoint(run.ckpt_dir)
                        raise UsageError(f"the loss is {float(loss.detach())} at step {position['step'] + 1}: stopped; "
                                         f"the last good checkpoint is {last or 'none (nothing was saved yet)'}")
                    (loss / len(batches)).backward()
                    _test_pause("train", position["step"] + 1)
                    window_loss += float(loss.detach())
                    window_n += 1
                opt.step(lr=lr_at(position["step"] + 1, run.total_steps, s.lr, s.warmup))
                opt.zero_grad()
                position = {"step": position["step"] + 1, "epoch": epoch, "step_in_epoch": step_in_epoch + 1}
                bar.update(1)
                epoch_end = step_in_epoch + 1 == run.steps_per_epoch
                if epoch_end:
                    position = {"step": position["step"], "epoch": epoch + 1, "step_in_epoch": 0}
                periodic = s.save_every_steps and position["step"] % s.save_every_steps == 0
                if epoch_end or periodic:
                    train_ppl = math.exp(window_loss / window_n) if window_n else None
                    window_loss, window_n = 0.0, 0
                    entry = run.evaluate(position["step"], position["step"] / run.steps_per_epoch, train_ppl, None)
                    improved = entry["eval_ppl"] is not None and (best["eval_ppl"] is None
                                                                  or entry["eval_ppl"] < best["eval_ppl"])
                    name = f"{CKPT_PREFIX}{position['step']:08d}"
                    entry["checkpoint"] = name
                    if improved:
                        best = {"eval_ppl": entry["eval_ppl"], "checkpoint": name, "stale": 0}
                    elif epoch_end and entry["eval_ppl"] is not None:
                        best = dict(best, stale=best["stale"] + 1)
                    position["best"] = best
                    run.save(slices, opt, position)
                    bar.set_postfix(recovered=entry["recovered"], eval_ppl=entry["eval_ppl"])
                    if s.patience and best["stale"] >= s.patience:
                        return
                if stop_after_steps is not None and position["step"] >= stop_after_steps:
                    raise KeyboardInterrupt  # tests: a kill at a step boundary
            position = dict(position, step_in_epoch=0)
    finally:
        bar.close()
        slices.remove()
        run.best = best


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (reentrant would drop the lowest selected layer's gradients)."""
    import warnings

    kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5.2x; the old name works in 5.17
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_budget(memory: dict, budget: int | None, device: torch.device) -> None:
    """Refuse a surgery whose predicted peak exceeds ``budget`` bytes, with the planner's figures. Without a budget
    on CUDA, only warn when it exceeds what the card has free (the model already loaded counts as free)."""
    import sys

    from .memory_plan import format_bytes

    total = memory["total"]
    parts = ", ".join(f"{label} {format_bytes(memory[key])}" for key, label in (
        ("weights", "weights"), ("grads", "slice gradients"), ("optimizer", "optimizer"),
        ("activations", "activations"), ("loss_chunk", "loss chunk")))
    advice = "train fewer heads, shorten --seq-len or --batch-size" + (
        "" if memory["stochastic_rounding"] or memory["dtype"] != "bfloat16" else ", or add --stochastic-rounding")
    if budget is not None:
        if total > budget:
            raise UsageError(f"the planned surgery needs {format_bytes(total)} ({parts}), more than --budget "
                             f"{format_bytes(budget)}: {advice}")
    elif device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
        if total > available:
            print(f"warning: the planned surgery is predicted to need {format_bytes(total)} ({parts}), more than "
                  f"the {format_bytes(available)} this GPU has free: {advice}", file=sys.stderr)


def plan_surgery(model_dir, **options) -> Plan:
    """The plan :func:`repair` would follow (``--dry-run``), as a :class:`~alibi_surgery.plan.Plan`; the predicted
    memory is in ``plan.memory``. Takes repair's plan, diagnosis and settings options."""
    data = repair_pass(model_dir, ".", dry_run=True, **options)
    memory = data.pop("memory")
    result = Plan.from_dict(data)
    result.memory = memory
    return result


def repair(model_dir, out, *, passes: int = 1, resume: bool = False, overwrite: bool = False, dry_run: bool = False,
           **options) -> dict:
    """Run surgery on the BLOOM model in ``model_dir``; results go to ``out``. Returns the report dict (also in
    ``OUT/report.json``), or the plan dict when ``dry_run``. ``options`` are those of :func:`repair_pass`.

    With ``passes > 1``, pass k runs in ``OUT/pass-k`` on pass k-1's final model, with a fresh diagnosis that
    targets the heads still collapsed (``include`` applies to pass 1 only); when a later pass finds nothing left to
    repair the run stops there. ``OUT/final`` is the last pass's final model; ``OUT/report.json`` and
    ``OUT/report.md`` summarise the passes. ``OUT`` is locked for the whole run (:class:`~alibi_surgery.lock.DirLock`).
    Resuming a finished run does nothing and returns its report, with ``already_complete`` set."""
    if passes < 1:
        raise UsageError(f"--passes must be >= 1, got {passes}")
    model_path = resolve_model_dir(str(model_dir))
    if dry_run or passes == 1:
        return repair_pass(model_path, out, resume=resume, overwrite=overwrite, dry_run=dry_run, **options)
    out = check_out_dir(out, model_path, resume=resume, overwrite=overwrite)
    with DirLock(out):
        done = _completed(out) if resume else None
        if done is not None:
            return done
        try:
            return _run_passes(model_path, out, passes, resume, overwrite, options)
        except (KeyboardInterrupt, WriteError) as exc:
            if not hasattr(exc, "last_checkpoint"):
                mark_resumable(exc, None)
            raise


def _completed(out: Path) -> dict | None:
    """The report of a finished run in ``out`` (report.json and final/ both there), marked ``already_complete``."""
    if (out / "report.json").is_file() and (out / "final").is_dir():
        return dict(json.loads(read_text(out / "report.json", what="report")), already_complete=True)
    return None


def _run_passes(model_path: Path, out: Path, passes: int, resume: bool, overwrite: bool, options: dict) -> dict:
    if overwrite and not resume:
        clear_dir(out)
    source, reports, stopped = model_path, [], None
    for k in range(1, passes + 1):
        pass_out = out / f"pass-{k}"
        if (pass_out / "report.json").is_file():
            reports.append(json.loads(read_text(pass_out / "report.json", what="report")))
        else:
            first = {"report": options.get("report"), "include": options.get("include")} if k == 1 else \
                {"report": None, "include": None}
            try:
                reports.append(repair_pass(source, pass_out, resume=resume and pass_out.exists(),
                                           **dict(options, **first)))
            except NothingToRepair as exc:
                if k == 1:
                    raise
                stopped = f"pass {k} found nothing left to repair: {exc}"
                break
        source = pass_out / "final"
    final, tmp = out / "final", out / ".tmp-final"
    with writing(final, "final model"):
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(source, tmp)
    replace_dir(tmp, final)
    summary = {"input": str(model_path), "final": str(final), "passes_asked": passes, "stopped": stopped,
               "eval_ppl_before": reports[0].get("eval_ppl_before"), "passes": reports}
    atomic_write_text(out / "report.json", json.dumps(summary, indent=1) + "\n")
    write_passes_markdown(out, summary)
    return summary


def repair_pass(model_dir, out, *, corpus=None, eval_text=None, report: HeadReport | str | None = None,
                heads: str | None = "auto", band: str | None = None, layers: str | None = None,
                freeze: str | None = None, include: str | None = None, settings: RepairSettings | None = None,
                device: str | None = None, dtype: str | None = None, backend: str = "auto", prompts=None,
                save_dtype: str | None = None, resume: bool = False, overwrite: bool = False, dry_run: bool = False,
                progress: bool = False, allow_empty: bool = False, budget: int | None = None,
                _stop_after_steps: int | None = None) -> dict:
    """One pass of surgery (see the module docstring). ``budget``: bytes the surgery step may use; a plan whose
    predicted peak (:func:`~alibi_surgery.plan.predict_memory`) exceeds it is refused before anything is written.
    ``save_dtype``: the dtype of ``OUT/final`` (default: the input checkpoint's). ``OUT`` is locked while the pass
    runs; a write failure or an interrupt carries ``last_checkpoint`` (see :func:`~alibi_surgery.errors.mark_resumable`).
    """
    settings = settings or RepairSettings()
    settings.check()
    model_path = resolve_model_dir(str(model_dir))
    final_dtype = parse_dtype(save_dtype, torch.device("cpu")) if save_dtype else stored_dtype(model_path)
    if dry_run:
        return _plan_pass(model_path, Path(out), report, heads, band, layers, freeze, include, settings, device,
                          dtype, backend, prompts, progress, allow_empty, budget)
    out = check_out_dir(out, model_path, resume=resume, overwrite=overwrite)
    with DirLock(out):
        done = _completed(out) if resume else None
        if done is not None:
            return done
        run, resume_from = _prepare(model_path, out, corpus, eval_text, report, heads, band, layers, freeze, include,
                                    settings, device, dtype, backend, prompts, resume, overwrite, progress,
                                    allow_empty, budget)
        try:
            if run.total_steps == 0 or not run.plan.selection:
                run.best = {"checkpoint": None}
            else:
                _train(run, resume_from, _stop_after_steps)
            return _finish(run, final_dtype)
        except (KeyboardInterrupt, WriteError) as exc:
            mark_resumable(exc, _newest_checkpoint(run.ckpt_dir))
            raise


def _check_resume(model_path: Path, out: Path, settings: RepairSettings) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from (None: start again; the input is unchanged) and its metadata."""
    resume_from = _newest_checkpoint(out / "checkpoints")
    if resume_from is None:
        return None, None
    from transformers import BloomConfig  # the checkpoint holds the model: read only the input's config

    meta = json.loads(read_text(resume_from / STATE_FILE, what="checkpoint state"))
    expected = _config_key(BloomConfig.from_pretrained(model_path, local_files_only=True))
    if meta["model"] != expected:
        raise UsageError(f"--resume: {resume_from.name} is a checkpoint of a different model "
                         f"({meta['model']} vs {expected})")
    if meta["settings"] != dataclasses.asdict(settings):
        raise UsageError(f"--resume: {resume_from.name} was made with different settings; resume with the same")
    return resume_from, meta


def _make_plan(model, tokenizer, report, heads, band, layers, freeze, include, settings, backend, prompts, progress,
               allow_empty, budget):
    """Baseline diagnosis (or ``report``), the plan, and its predicted memory checked against ``budget``."""
    cfg = model.config
    if isinstance(report, (str, Path)):
        report = HeadReport.from_json(report)
    baseline = report if report is not None else diagnose(
        model, tokenizer, prompts, backend=backend, max_length=settings.diag_max_length, progress=progress)
    plan = make_plan(n_layer=cfg.n_layer, n_head=cfg.n_head, head_dim=cfg.hidden_size // cfg.n_head,
                     hidden=cfg.hidden_size, report=baseline, heads=heads, band=band, layers=layers,
                     freeze=freeze, include=include, allow_empty=allow_empty)
    memory = predict_memory(plan, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                            seq_len=settings.seq_len, batch=settings.batch_size, vocab=cfg.vocab_size,
                            n_params_total=sum(p.numel() for p in model.parameters()),
                            stochastic_rounding=settings.stochastic_rounding)
    check_budget(memory, budget, model.device)
    return baseline, plan, memory


def _plan_pass(model_path, out, report, heads, band, layers, freeze, include, settings, device, dtype, backend,
               prompts, progress, allow_empty, budget) -> dict:
    """``--dry-run``: the plan and its predicted memory; nothing is written."""
    model, tokenizer = load_bloom(str(model_path), dtype=dtype, device=device)
    patch_bloom(model, backend)
    _, plan, memory = _make_plan(model, tokenizer, report, heads, band, layers, freeze, include, settings, backend,
                                 list(prompts or DEFAULT_PROMPTS), progress, allow_empty, budget)
    return dict(plan.to_dict(), memory=memory)


def _prepare(model_path, out, corpus, eval_text, report, heads, band, layers, freeze, include, settings, device,
             dtype, backend, prompts, resume, overwrite, progress, allow_empty, budget):
    """Everything before training: inputs checked, model loaded, plan made (or read back on resume), OUT's first
    files written, the selected heads re-initialised. Returns the :class:`_Run` and the checkpoint to resume from."""
    prompts = list(prompts or DEFAULT_PROMPTS)
    resume_from, meta = _check_resume(model_path, out, settings) if resume else (None, None)
    model, tokenizer = load_bloom(str(resume_from or model_path), dtype=dtype, device=device)
    patch_bloom(model, backend)
    if corpus is None:  # the cheap input checks come before the diagnosis
        raise UsageError("--corpus is required (files, directories or globs of training text)")
    chunks, files = load_corpus(corpus, tokenizer, settings.seq_len)
    eval_chunks = None
    if eval_text is not None:
        eval_chunks = pack_text(read_documents(eval_text, what="--eval-text"), tokenizer, settings.seq_len,
                                what="--eval-text")
    if resume_from is not None:
        plan = Plan.from_dict(meta["plan"])
        baseline = HeadReport.from_json(out / "baseline.json")
    else:
        baseline, plan, _ = _make_plan(model, tokenizer, report, heads, band, layers, freeze, include, settings,
                                       backend, prompts, progress, allow_empty, budget)
        ppl_before = perplexity(model, eval_chunks, settings.batch_size) if eval_chunks is not None else None
        if overwrite or resume:
            clear_dir(out)
        baseline.to_json(out / "baseline.json")
        plan.to_json(out / "plan.json")
        atomic_write_text(out / "run.json", json.dumps(
            {"input": str(model_path), "corpus": [str(f) for f in files], "settings": dataclasses.asdict(settings),
             "eval_ppl_before": ppl_before, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")
        if plan.selection:
            reinit_heads(model, plan.selection, seed=settings.seed, init=settings.init)
    run = _Run(model, tokenizer, plan, baseline, settings, out, chunks, eval_chunks, backend, prompts, progress,
               model_path)
    return run, resume_from


def _finish(run: _Run, final_dtype: torch.dtype | None) -> dict:
    """Write OUT/final (best checkpoint, else the last, else the re-initialised model; in ``final_dtype``), the
    report and plots."""
    out = run.out
    final = out / "final"
    tmp = out / ".tmp-final"
    newest = _newest_checkpoint(run.ckpt_dir)
    best = run.best.get("checkpoint") or (newest.name if newest else None)
    with writing(final, "final model"):
        if tmp.exists():
            shutil.rmtree(tmp)
        if best is not None:
            shutil.copytree(run.ckpt_dir / best, tmp, ignore=shutil.ignore_patterns(OPT_FILE, STATE_FILE))
        else:
            run.model.save_pretrained(tmp, safe_serialization=True)
            run.tokenizer.save_pretrained(tmp)
        if final_dtype is not None:
            cast_checkpoint(tmp, final_dtype)
    replace_dir(tmp, final)
    if not run.history:
        run.evaluate(0, 0.0, None, None)
    if run.latest is None:  # resumed after the last checkpoint: diagnose the model as it now is, for the plots
        run.rediagnose()
    started = json.loads(read_text(out / "run.json", what="run record"))
    report = {"input": str(run.model_dir), "final": str(final), "final_checkpoint": best,
              "final_dtype": str(final_dtype or next(run.model.parameters()).dtype).replace("torch.", ""),
              "eval_ppl_before": started.get("eval_ppl_before"), "plan": run.plan.to_dict(),
              "checkpoints": run.history}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_markdown(run, report)
    write_plots(run)
    return report

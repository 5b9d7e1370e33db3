"""Surgery: plan, re-initialise, train the selected heads, checkpoint, re-diagnose, report.

``repair(model_dir, out, corpus=..., ...)`` runs the paper's procedure with the head-sliced machinery
(:class:`HeadSlices`, :class:`HeadSlicedAdamW`, :func:`chunked_lm_loss`, fused attention, gradient checkpointing):

1. diagnose the input model (or take ``report``) and make a :class:`~alibi_surgery.surgery.plan.Plan`; with an
   ``eval_text``, measure the input's held-out perplexity;
2. re-initialise the selected heads (:func:`~alibi_surgery.surgery.reinit.reinit_heads`, seeded);
3. train on the packed corpus (:mod:`~alibi_surgery.surgery.trainer`): AdamW (lr 5e-5, no weight decay, clip 1.0),
   linear warm-up then cosine decay, ``batch_size`` x ``grad_accum`` sequences per step, ``epochs`` epochs, early stop
   on held-out perplexity;
4. checkpoint at the end of every epoch (and every ``save_every_steps``), atomically; ``resume=True`` continues
   from the newest complete one, bit-identically, and does nothing for a finished run;
5. re-diagnose at every checkpoint against the baseline: recovered / still sick targets, iatrogenic heads, drift
   per zone, training and held-out perplexity, written to ``report.json``, ``report.md`` and PNGs;
6. write ``OUT/final/``, a complete model directory (the best checkpoint by held-out perplexity, else the last)
   that stock transformers loads, in the input checkpoint's dtype unless ``save_dtype`` says otherwise.

The input directory is only read. Before anything is written: the checkpoint's headers and weights are checked
(:mod:`~alibi_surgery.io.checkpoint`), and with ``budget`` the plan's predicted peak memory. ``OUT`` is locked for the
run (:mod:`~alibi_surgery.io.lock`): a second run into it is refused, naming the first. A write failure is a one-line
:class:`~alibi_surgery.errors.WriteError`; it and Ctrl-C carry the newest complete checkpoint (``last_checkpoint``).
``passes > 1`` runs :mod:`~alibi_surgery.surgery.passes` (later passes target every head still collapsed, from the
previous pass's best checkpoint). ``settings.reinit=False`` trains the selected heads from their current values (the
paper's gradient-only control) and ``settings.control`` runs a control arm instead of the treatment
(:mod:`~alibi_surgery.surgery.controls`; the arm is ``report.json``'s ``arm``); ``settings.optimizer_precision`` and
``settings.schedule`` choose the paper's optimizer and schedule. Limits: the registered ALiBi families only; the corpus is read into memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from ..io.corpus import CorpusSpec, load_corpus
from ..distributed import barrier, is_main, rank_device, rank_guard, replicated
from ..diagnosis.dormancy import checkpoint_dormancy
from ..diagnosis.diagnose import diagnose
from ..errors import UsageError, WriteError, mark_resumable
from ..families import family_for
from ..io.files import atomic_write_text, read_text, staged_dir
from ..io.checkpoint import cast_checkpoint, stored_dtype
from ..io.loading import (dtype_name, load_model, load_config, parse_device, parse_dtype, quiet_transformers,
                          resolve_model_dir)
from ..io.lock import DirLock
from ..io.outdir import check_out_dir, clear_dir
from ..attention.patch import patch
from .memory_plan import predict_memory
from .plan import Plan, make_plan, plan_shape
from .repair_report import write_markdown, write_plots
from ..diagnosis.report import HeadReport
from .controls import apply_arm, random_healthy_plan
from .fingerprint import differences, fingerprint
from . import functional
from .settings import RepairJob, RepairSettings, same_settings, settings_differences
from .trainer import (OPT_FILE, STATE_FILE, Run, TrainingData, config_key, enable_checkpointing, lr_at,
                      newest_checkpoint, prompts_perplexity, train)
from ..analysis.perplexity import chunks_perplexity, encode_texts

__all__ = ["RepairSettings", "RepairJob", "plan_surgery", "repair", "repair_pass", "check_out_dir", "clear_dir",
           "check_budget", "same_settings", "lr_at", "enable_checkpointing"]


def check_budget(memory: dict, budget: int | None, device: torch.device) -> None:
    """Refuse a surgery whose predicted peak exceeds ``budget`` bytes, with the planner's figures. Without a budget
    on CUDA, only warn when it exceeds what the card has free (the model already loaded counts as free)."""
    import warnings

    from .memory_plan import format_bytes

    total = memory["total"]
    parts = ", ".join(f"{label} {format_bytes(memory[key])}" for key, label in (
        ("weights", "weights"), ("grads", "slice gradients"), ("optimizer", "optimizer"),
        ("activations", "activations"), ("loss_chunk", "loss chunk")))
    advice = f"train fewer heads, lower seq_len={memory['seq_len']} or batch_size={memory['batch']}" + (
        "" if memory["stochastic_rounding"] or memory["dtype"] != "bfloat16" else ", or pass stochastic_rounding=True")
    if budget is not None:
        if total > budget:
            raise UsageError(f"the planned surgery needs {format_bytes(total)} ({parts}), more than budget={budget} "
                             f"({format_bytes(budget)}): {advice}")
    elif device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
        if total > available:
            warnings.warn(f"the planned surgery is predicted to need {format_bytes(total)} ({parts}), more than "
                          f"the {format_bytes(available)} this GPU has free: {advice}", stacklevel=2)


def plan_surgery(model_dir, **options) -> Plan:
    """The plan :func:`repair` would follow (``--dry-run``), as a :class:`~alibi_surgery.surgery.plan.Plan`; the
    predicted memory is in ``plan.memory``. Takes repair's plan, diagnosis and settings options."""
    data = repair_pass(model_dir, ".", dry_run=True, **options)
    memory = data.pop("memory")
    result = Plan.from_dict(data)
    result.memory = memory
    return result


def repair(model_dir, out, *, passes: int = 1, resume: bool = False, overwrite: bool = False, dry_run: bool = False,
           **options) -> dict:
    """Run surgery on the model in ``model_dir`` (any registered family); results go to ``out``. Returns the report dict
    (also in ``OUT/report.json``), or the plan dict when ``dry_run``. ``options`` are those of :func:`repair_pass`.

    With ``passes > 1``, pass k runs in ``OUT/pass-k`` on pass k-1's best checkpoint, with a fresh diagnosis that
    targets every head still collapsed anywhere, minus ``freeze`` (``heads``, ``band``, ``layers``, ``include`` and
    ``report`` apply to pass 1 only); when a later pass finds nothing left to repair the run stops there.
    ``OUT/final`` is the last pass's final model; ``OUT/report.json`` (with ``learning_rates``, one list per pass,
    and per pass ``drift_vs_previous`` / ``drift_vs_original``) and ``OUT/report.md`` summarise the passes. ``OUT`` is locked for the whole run
    (:class:`~alibi_surgery.io.lock.DirLock`). Resuming a finished run does nothing and returns its report, with
    ``already_complete`` set."""
    if passes < 1:
        raise UsageError(f"passes={passes}: must be >= 1")
    if passes > 1 and options.get("distributed") == "fsdp":
        raise UsageError(f"distributed='fsdp' runs one pass, not passes={passes}")
    # the cheap checks first (settings, unknown keywords): before the model is read
    RepairJob.from_options(**{k: v for k, v in options.items() if k != "_stop_after_steps"})
    model_path = _repairable(model_dir)
    if dry_run or passes == 1:
        return repair_pass(model_path, out, resume=resume, overwrite=overwrite, dry_run=dry_run, **options)
    out = check_out_dir(out, model_path, resume=resume, overwrite=overwrite)
    with DirLock(out):
        if resume:  # a finished run of this model and these settings: nothing to do
            job = RepairJob.from_options(**{k: v for k, v in options.items() if k != "_stop_after_steps"})
            _check_resume(model_path, out / "pass-1", job)
            done = _completed(out)
            if done is not None:
                return done
        try:
            from .passes import run_passes

            return run_passes(repair_pass, model_path, out, passes, (resume, overwrite), options)
        except (KeyboardInterrupt, WriteError) as exc:
            if not hasattr(exc, "last_checkpoint"):  # after the passes: the newest checkpoint of the last pass
                passes_done = sorted(out.glob("pass-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
                mark_resumable(exc, next(filter(None, (newest_checkpoint(p / "checkpoints") for p in passes_done)),
                                         None))
            raise


def _repairable(model_dir) -> Path:
    """The model directory, after checking that its family allows surgery (one-line UsageError otherwise)."""
    from ..families import check_surgery, family_for

    model_path = resolve_model_dir(str(model_dir))
    check_surgery(family_for(load_config(str(model_path)), str(model_dir)))
    return model_path


def _completed(out: Path) -> dict | None:
    """The report of a finished run in ``out`` (report.json and final/ both there), marked ``already_complete``."""
    if (out / "report.json").is_file() and (out / "final").is_dir():
        return dict(json.loads(read_text(out / "report.json", what="report")), already_complete=True)
    return None


def repair_pass(model_dir, out, *, resume: bool = False, overwrite: bool = False, dry_run: bool = False,
                _stop_after_steps: int | None = None, **options) -> dict:
    """One pass of surgery (see the module docstring). ``options`` are the keywords of
    :meth:`~alibi_surgery.surgery.settings.RepairJob.from_options`: ``settings`` (a :class:`RepairSettings`), the plan
    options ``report``, ``heads``, ``band``, ``layers``, ``freeze``, ``include``, ``prompts``, ``allow_empty``,
    ``budget``, and the run options ``corpus``, ``eval_text``, ``eval_prompts``, ``device``, ``dtype``, ``backend``,
    ``save_dtype``, ``progress``, ``distributed`` (``"fsdp"``: every rank together, :mod:`.sharded_train`).

    ``budget``: bytes the surgery step may use; a plan whose predicted peak
    (:func:`~alibi_surgery.surgery.memory_plan.predict_memory`) exceeds it is refused before anything is written.
    ``save_dtype``: the dtype of ``OUT/final`` (default: the input checkpoint's). ``OUT`` is locked while the pass
    runs; a write failure or an interrupt carries ``last_checkpoint`` (see
    :func:`~alibi_surgery.errors.mark_resumable`). ``eval_prompts``: held-out texts, each scored alone at every
    checkpoint (:mod:`alibi_surgery.analysis.perplexity`, ``settings.eval_convention``, truncated at
    ``settings.seq_len``); with no ``eval_text`` their perplexity picks ``OUT/final``.
    """
    job = RepairJob.from_options(**options)
    model_path = _repairable(model_dir)
    save_dtype = job.run.save_dtype
    final_dtype = parse_dtype(save_dtype, torch.device("cpu")) if save_dtype else stored_dtype(model_path)
    if dry_run:
        return _plan_pass(model_path, job)
    with rank_guard("repair"):  # every rank checks OUT before rank 0 writes into it
        out = check_out_dir(out, model_path, resume=resume, overwrite=overwrite)
    with DirLock(out) if is_main() else contextlib.nullcontext():
        resume_from, meta = _check_resume(model_path, out, job) if resume else (None, None)
        done = _completed(out) if resume else None  # a finished run of this model and these settings
        if done is not None:
            return done
        try:
            run = _prepare(model_path, out, job, (resume_from, meta), overwrite or resume)
            if run.total_steps == 0 or not run.plan.selection:
                run.best = {"checkpoint": None}
            else:
                train(run, resume_from, _stop_after_steps)
            return _finish(run, final_dtype)
        except (KeyboardInterrupt, WriteError) as exc:
            mark_resumable(exc, newest_checkpoint(out / "checkpoints"))
            raise


def _check_resume(model_path: Path, out: Path, job: RepairJob) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from (None: start again; the input is unchanged) and its metadata; refuses a run
    started from other inputs (:mod:`~alibi_surgery.surgery.fingerprint`), from another model or with other
    settings."""
    settings = job.settings
    record = out / "run.json"
    saved = json.loads(read_text(record, what="run record")) if record.is_file() else None
    if saved is not None:
        changed = differences(saved.get("fingerprint"), fingerprint(model_path, job))
        if changed:
            raise UsageError(f"resume=True: {out} was started from other inputs ({changed[0]}); resume with the "
                             f"same, or start again with overwrite=True")
    resume_from = newest_checkpoint(out / "checkpoints")
    if resume_from is None:  # a run without checkpoints (not started, or an arm that does not train): its record
        if saved is not None and settings_differences(saved["settings"], settings):
            raise UsageError(f"resume=True: {out} was started with different settings "
                             f"({settings_differences(saved['settings'], settings)[0]}); resume with the same")
        return None, None
    meta = json.loads(read_text(resume_from / STATE_FILE, what="checkpoint state"))
    expected = config_key(load_config(str(model_path)))  # the checkpoint holds the model: read the input's config
    if meta["model"] != expected:
        raise UsageError(f"resume=True: {resume_from.name} is a checkpoint of a different model "
                         f"({meta['model']} vs {expected})")
    if not same_settings(meta["settings"], settings):
        raise UsageError(f"resume=True: {resume_from.name} was made with different settings "
                         f"({settings_differences(meta['settings'], settings)[0]}); resume with the same")
    return resume_from, meta


def _make_plan(model, tokenizer, job: RepairJob):
    """Baseline diagnosis (or ``job.plan.report``), the plan, and its predicted memory checked against
    ``job.plan.budget``."""
    settings, opts = job.settings, job.plan
    layout = family_for(model.config).layout(model.config)
    weights = next(model.parameters()).dtype
    if settings.optimizer_precision == "bf16" and weights != torch.bfloat16:
        raise UsageError(f"optimizer_precision='bf16' rounds every update into bfloat16 weights, but the model runs "
                         f"in {dtype_name(weights)}: pass dtype='bfloat16', or use optimizer_precision='master'")
    if settings.train == "full":
        from .full import check_full

        check_full(model)
    report = opts.report
    if isinstance(report, (str, Path)):
        report = HeadReport.from_json(report)
    baseline = report if report is not None else diagnose(
        model, tokenizer, job.prompts(), backend=job.run.backend, max_length=settings.diag_max_length,
        progress=job.run.progress)
    plan = make_plan(**plan_shape(model.config), report=baseline, heads=opts.heads, band=opts.band,
                     layers=opts.layers, freeze=opts.freeze, include=opts.include, allow_empty=opts.allow_empty)
    if settings.control == "random-healthy":
        plan = random_healthy_plan(plan, baseline, settings.seed)
    memory = predict_memory(plan, dtype=dtype_name(next(model.parameters()).dtype),
                            seq_len=settings.seq_len, batch=settings.batch_size, vocab=layout.vocab,
                            n_params_total=sum(p.numel() for p in model.parameters()),
                            stochastic_rounding=settings.stochastic_rounding,
                            bf16_moments=settings.optimizer_precision == "bf16", full=settings.train == "full")
    check_budget(memory, opts.budget, model.device)
    return baseline, plan, memory


def _plan_pass(model_path: Path, job: RepairJob) -> dict:
    """``--dry-run``: the plan and its predicted memory; nothing is written."""
    model, tokenizer = load_model(str(model_path), dtype=job.run.dtype, device=job.run.device)
    patch(model, job.run.backend)
    _, plan, memory = _make_plan(model, tokenizer, job)
    return dict(plan.to_dict(), memory=memory)


def _prepare(model_path: Path, out: Path, job: RepairJob, resumed: tuple, clear: bool) -> Run:
    """Everything before training: inputs checked, model loaded (from the checkpoint of ``resumed = (resume_from,
    meta)`` when there is one), plan made (or read back from ``meta``), OUT emptied (``clear``) and its first files
    written, the selected heads re-initialised. Under FSDP2 the model is always the input's (its checkpoints hold
    the heads only)."""
    resume_from, meta = resumed
    settings, opts = job.settings, job.run
    sharded = opts.distributed == "fsdp"  # its checkpoints hold the heads only: the model is the input's
    device = str(rank_device(parse_device(opts.device))) if sharded else opts.device  # cuda:LOCAL_RANK per rank
    model, tokenizer = load_model(str(model_path if sharded else resume_from or model_path),
                                  dtype=opts.dtype or ("float32" if sharded else None), device=device)
    patch(model, opts.backend)
    if opts.corpus is None and settings.trains:  # the cheap input checks come before the diagnosis
        raise UsageError("--corpus is required (files, directories or globs of training text)")
    chunks, files = load_corpus(opts.corpus, tokenizer, settings.seq_len) if opts.corpus is not None else (None, [])
    eval_chunks = None
    if opts.eval_text is not None:
        eval_chunks = load_corpus(opts.eval_text, tokenizer, settings.seq_len, what="--eval-text", walk=False)[0]
    eval_ids = None
    if opts.eval_prompts is not None:
        eval_ids = encode_texts(tokenizer, opts.eval_prompts, settings.seq_len,
                                name=lambda i: f"--eval-prompts line {i + 1}")
    data = TrainingData(chunks, eval_chunks, eval_ids)
    if resume_from is not None:
        plan = Plan.from_dict(meta["plan"])
        baseline = HeadReport.from_json(out / "baseline.json")
    else:
        baseline, plan, _ = _make_plan(model, tokenizer, job)
        ablation_before = functional.measure(model, functional.held_out_ids(
            tokenizer, opts, data, job.prompts(), settings.diag_max_length), functional.target_heads(plan), opts,
            settings.seed)
        ppl_before = chunks_perplexity(model, eval_chunks, settings.batch_size) if eval_chunks is not None else None
        prompts_before = prompts_perplexity(model, eval_ids, settings.eval_convention, opts.backend)
        with rank_guard("repair"):  # rank 0 writes; a failure there reaches every rank
            _record(out, clear and is_main(), baseline, plan, ablation_before, is_main() and {
                "input": str(model_path), "arm": settings.arm, "corpus": [str(f) for f in files],
                "corpus_options": None if opts.corpus is None else CorpusSpec.of(opts.corpus).options(),
                "fingerprint": fingerprint(model_path, job), "settings": dataclasses.asdict(settings),
                "eval_ppl_before": ppl_before, "eval_prompts_ppl_before": prompts_before,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        apply_arm(model, plan, settings)
    return Run(model, tokenizer, plan, baseline, job, out, model_path, data)


def _record(out: Path, clear: bool, baseline, plan, ablation_before, record: dict) -> None:
    """OUT's first files: emptied when ``clear``, then the baseline, the plan, the functional measurement before
    surgery and ``run.json`` (``record``; nothing without one: not rank 0)."""
    if not record:
        return
    if clear:
        clear_dir(out)
    baseline.to_json(out / "baseline.json")
    plan.to_json(out / "plan.json")
    functional.save_before(out, ablation_before)
    atomic_write_text(out / "run.json", json.dumps(record, indent=1) + "\n")


def _finish(run: Run, final_dtype: torch.dtype | None) -> dict:
    """Write OUT/final (best checkpoint, else the last, else the re-initialised model; in ``final_dtype``), the
    report and plots."""
    out = run.out
    final = out / "final"
    newest = newest_checkpoint(run.ckpt_dir)
    best = run.best.get("checkpoint") or (newest.name if newest else None)
    state = getattr(run, "state", None)
    sharded = state is not None and hasattr(state, "write_final")  # FSDP2: final/ is gathered, not copied
    if sharded:
        if best is not None and newest is not None and best != newest.name:
            state.load(run.ckpt_dir / best)
        state.write_final(final, run.tokenizer, final_dtype)
    elif is_main():
        with staged_dir(final, "final model") as tmp:
            if best is not None:
                shutil.copytree(run.ckpt_dir / best, tmp, ignore=shutil.ignore_patterns(OPT_FILE, STATE_FILE))
            else:
                with quiet_transformers():
                    run.model.save_pretrained(tmp, safe_serialization=True)
                    run.tokenizer.save_pretrained(tmp)
            if final_dtype is not None:
                cast_checkpoint(tmp, final_dtype)
    barrier()
    with state.gathered() if sharded else contextlib.nullcontext():  # every rank runs the same forwards
        if not run.history:
            run.evaluate(0, 0.0, None, None)
        if run.latest is None:  # resumed after the last checkpoint: diagnose the model as it now is, for the plots
            run.rediagnose()
    with replicated() if sharded else contextlib.nullcontext():  # the ablation reads whole weights: final/ loaded
        recovered = _functional(run, final, reuse=not sharded and (best is None or (
            newest is not None and best == newest.name)))
    started = json.loads(read_text(out / "run.json", what="run record"))
    report = {"input": str(run.model_dir), "arm": run.s.arm, "settings": dataclasses.asdict(run.s), "final": str(final),
              "final_checkpoint": best,
              "final_dtype": dtype_name(final_dtype or next(run.model.parameters()).dtype),
              "eval_ppl_before": started.get("eval_ppl_before"),
              "eval_prompts_ppl_before": started.get("eval_prompts_ppl_before"), "plan": run.plan.to_dict(),
              "learning_rates": run.learning_rates, "checkpoints": run.history, "functional": recovered,
              "mlp_dormancy": {"before": checkpoint_dormancy(run.model_dir), "after": checkpoint_dormancy(final)}}
    if not is_main():
        return report
    if run.s.objective == "sparsify":
        from .sparsify_report import sparsity_summary

        report["sparsity"] = sparsity_summary(report)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_markdown(run, report)
    if run.s.objective == "sparsify":
        from .sparsify_report import write_sparsity

        write_sparsity(out, report)
    write_plots(run)
    return report


def _functional(run: Run, final: Path, reuse: bool) -> dict:
    """report.json's ``functional`` entry (:mod:`~alibi_surgery.surgery.functional`), measured on OUT/final: the
    model in memory when it is what final holds (the last checkpoint, or no training), else final loaded beside
    it in the run's dtype and device (for that while, twice the weights in memory)."""
    opts = run.job.run
    heads = functional.target_heads(run.plan)
    model = run.model
    if not reuse:
        param = next(run.model.parameters())
        model, _ = load_model(str(final), dtype=dtype_name(param.dtype), device=str(param.device))
        patch(model, opts.backend)
    after = diagnose(model, run.tokenizer, run.prompts, backend=opts.backend, max_length=run.s.diag_max_length)
    ids = functional.held_out_ids(run.tokenizer, opts, run.data, run.prompts, run.s.diag_max_length)
    return functional.functional_report(heads, run.baseline, after, functional.load_before(run.out),
                                        functional.measure(model, ids, heads, opts, run.s.seed))

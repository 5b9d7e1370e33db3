"""The paper's experiments, reproduced on the demo testbed (docs/reproduction.md).

    python -m alibi_surgery.demo.reproduce OUT                 # 3 seeds, 2 parallel jobs of one thread each (CPU)
    python -m alibi_surgery.demo.reproduce OUT --seeds 1 --docs-dir docs

Five experiments of Schallon (2026), each run with every seed (the seed draws the surgery corpus, the
re-initialisation and the data order). Every run is a ``repair`` output directory under ``OUT/runs/``:

* ``band-<s>``: the collapse band re-initialised and retrained, then a second pass on every head still collapsed
  (``passes=2``). Its pass 1 is the re-initialisation arm of experiment 1, pass 1 of experiment 2, and the
  structured-corpus arm of experiment 4.
* ``noreinit-<s>``: the same plan trained from the heads' current values (the gradient-only control, experiment 1).
* ``extended-<s>``: the band plus the mostly-healthy column next to it (the paper's H5 experiment, experiment 3).
* ``noisy-<s>``: the band on a noisy corpus, the structured documents with their bytes shuffled (experiment 4).
* ``paper-<s>`` / ``ours-<s>``: bf16 weights, the paper's optimizer and schedule (pure-bf16 AdamW,
  ``--schedule paper``) against ours (fp32 master copy, ``--schedule default``) (experiment 5).

All runs share one baseline diagnosis (the model's training context as ``max_length``), one schedule length and one
checkpoint spacing, so arms compare at matched steps. The surgery settings are the demo's, scaled to the budget
(``--docs``, ``--epochs``, ``--save-every``); the paper's figures come from bloom-1b7 and are quoted, not rerun.
A finished run (its ``report.json`` present) is reused, so an interrupted reproduction continues where it stopped.
Results: ``OUT/results.json`` and ``OUT/reproduction.md`` with its figures in ``OUT/img/`` (or in ``--docs-dir``).
``OUT`` is locked for the whole reproduction (a second one into it is refused). Limits: runs on the CPU; the
corpora are the demo's bigram-recall data, so another ``--model`` must use the demo's byte-level tokenizer; the
testbed is a 4-layer byte-level model, not a language model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

__all__ = ["Job", "plan_jobs", "run_jobs", "reproduce", "healthy_column", "write_corpora"]


@dataclasses.dataclass(frozen=True)
class Job:
    """One repair run: ``name`` (its directory under ``OUT/runs``), the seed, the corpus (``structured`` or
    ``noisy``), ``passes``, the plan options and the RepairSettings fields that differ from the shared ones."""

    name: str
    seed: int
    corpus: str = "structured"
    passes: int = 1
    include: str | None = None
    dtype: str | None = None
    settings: tuple = ()  # (field, value) pairs over the shared settings


def plan_jobs(seeds: int, band: tuple[int, int], n_layer: int, column: int | None) -> list[Job]:
    """The runs of the five experiments (module docstring) for seeds ``0..seeds-1``. ``column``: the healthy
    column experiment 3 adds (None: experiment 3 is skipped, said so in the report)."""
    jobs = []
    for s in range(seeds):
        jobs.append(Job(f"band-{s}", s, passes=2))
        jobs.append(Job(f"noreinit-{s}", s, settings=(("reinit", False),)))
        if column is not None:
            jobs.append(Job(f"extended-{s}", s, include=f"0-{n_layer - 1}:{column}"))
        jobs.append(Job(f"noisy-{s}", s, corpus="noisy"))
        jobs.append(Job(f"paper-{s}", s, dtype="bfloat16",
                        settings=(("optimizer_precision", "bf16"), ("schedule", "paper"))))
        jobs.append(Job(f"ours-{s}", s, dtype="bfloat16"))
    return jobs


def healthy_column(report, band: tuple[int, int]) -> int | None:
    """The column next to the band (below it, else above) whose heads are mostly healthy (fewer than half
    collapsed): the analogue of the paper's H5 beside bloom-1b7's band H9-H15. None when neither neighbour is."""
    sick = report.sick_mask()
    for h in (band[0] - 1, band[1] + 1):
        if 0 <= h < report.n_head and sum(row[h] for row in sick) < report.n_layer / 2:
            return h
    return None


def write_corpora(directory: Path, seed: int, n_docs: tuple[int, int], seq_len: int) -> dict:
    """The structured corpus (fresh bigram-recall documents, :func:`alibi_surgery.demo.write_corpus`), its noisy twin
    (each training document's bytes shuffled: the same bytes, no bigram or recall structure) and the held-out text,
    as paths. Idempotent: existing files are kept."""
    from ..io.files import atomic_write_text
    from . import write_corpus

    directory.mkdir(parents=True, exist_ok=True)
    train, held_out = directory / "train.jsonl", directory / "eval.jsonl"
    if not (train.is_file() and held_out.is_file()):
        write_corpus(directory, seed=1000 + seed, seq_len=seq_len, docs=n_docs)
    noisy = directory / "noisy-train.jsonl"
    if not noisy.is_file():
        rng = random.Random(seed)
        lines = []
        for line in train.read_text().splitlines():
            chars = list(json.loads(line)["text"])
            rng.shuffle(chars)
            lines.append(json.dumps({"text": "".join(chars)}) + "\n")
        atomic_write_text(noisy, "".join(lines))
    return {"structured": train, "noisy": noisy, "eval": held_out}


def _run_job(args: tuple) -> tuple[str, float]:
    """Run one job in a worker process (one thread); returns (name, seconds). A finished run is left as it is."""
    job, out, model, baseline, shared, band, corpora, threads = args
    import torch

    from ..surgery.repair import RepairSettings, repair

    torch.set_num_threads(threads)
    run_dir = out / "runs" / job.name
    if (run_dir / "report.json").is_file():
        return job.name, 0.0
    shared.pop("docs")  # the corpora's size, not a repair setting
    settings = RepairSettings(**dict(shared, seed=job.seed, **dict(job.settings)))
    t0 = time.perf_counter()
    from . import corpus_spec  # the demo's framing: <s> + bytes, no </s>, as pre-training

    repair(model, run_dir, passes=job.passes, overwrite=True, corpus=corpus_spec(corpora[job.corpus]),
           eval_text=corpus_spec(corpora["eval"]), report=str(baseline), band=f"{band[0]}-{band[1]}", include=job.include,
           settings=settings, dtype=job.dtype, device="cpu")
    return job.name, time.perf_counter() - t0


def run_jobs(jobs: list[Job], out: Path, model: Path, baseline: Path, shared: dict, band: tuple[int, int],
             corpora: dict[int, dict], *, workers: int = 2, progress: bool = True, log=print) -> dict:
    """Run ``jobs`` on ``workers`` processes of one thread each (spawned, so each has its own torch); ``corpora``:
    each seed's :func:`write_corpora` paths, written before. Returns ``{name: seconds}`` (0 for a run found
    finished)."""
    from tqdm.auto import tqdm

    seconds = {}
    threads = 1 if workers > 1 else max(1, os.cpu_count() or 1)
    tasks = [(job, out, model, baseline, dict(shared), band, corpora[job.seed], threads) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool, \
            tqdm(total=len(jobs), desc="reproduce", unit="run", disable=not progress) as bar:
        for name, secs in pool.map(_run_job, tasks):
            seconds[name] = round(secs, 1)
            bar.update()
            log(f"{name}: {'already finished' if secs == 0 else f'{secs:.0f} s'}")
    return seconds


def reproduce(out, *, model=None, seeds: int = 3, workers: int = 2, docs: tuple[int, int] = (512, 64),
              epochs: int = 4, save_every: int = 16, batch_size: int = 8, lr: float = 1e-3, seq_len: int = 128,
              docs_dir=None, progress: bool = True, log=print) -> dict:
    """Run the five experiments (module docstring) into ``out`` and write the report; returns ``results.json``'s
    dict. ``model``: a model directory (default: the demo testbed); its config's ``seq_length`` is the context, at
    which every diagnosis is made. ``seq_len``: the surgery documents' length (at most the context; the paper
    trained bloom-1b7, context 2,048, on 512-token sequences)."""
    from ..diagnosis.diagnose import diagnose
    from ..diagnosis.prompts import DEFAULT_PROMPTS
    from ..errors import UsageError
    from ..families import training_context
    from ..io.loading import load_model
    from ..io.lock import DirLock
    from . import model_dir
    from .reproduction_report import summarise, write_report

    t0 = time.perf_counter()
    out = Path(out)
    model = Path(model) if model else model_dir()
    net, tokenizer = load_model(str(model))
    context = training_context(net.config)
    if context is None:
        raise UsageError(f"{model} records no training context (config.json seq_length): the diagnoses need one")
    ctx = context[0]
    with DirLock(out, "OUT"):  # one reproduction per OUT; each run also locks its own directory
        baseline_path = out / "baseline.json"
        baseline = diagnose(net, tokenizer, DEFAULT_PROMPTS, max_length=ctx)
        baseline.to_json(baseline_path)
        del net
        band = baseline.band()
        if band is None:
            raise UsageError(f"{model} has no collapse band at {ctx} tokens: nothing to reproduce on")
        column = healthy_column(baseline, band)
        jobs = plan_jobs(seeds, band, baseline.n_layer, column)
        shared = dict(seq_len=min(seq_len, ctx), diag_max_length=ctx, batch_size=batch_size, grad_accum=1, lr=lr,
                      epochs=epochs, warmup=0.1, checkpointing=False, save_every_steps=save_every, docs=list(docs))
        log(f"testbed {model}: {baseline.n_layer} x {baseline.n_head} heads, context {ctx}; band "
            f"H{band[0]}-H{band[1]}, {sum(map(len, baseline.sick_heads().values()))} collapsed; {len(jobs)} runs on "
            f"{workers} workers")
        # once, here: two workers running jobs of one seed would otherwise both write them
        corpora = {s: write_corpora(out / "corpus" / f"seed-{s}", s, tuple(docs), shared["seq_len"])
                   for s in range(seeds)}
        seconds = run_jobs(jobs, out, model, baseline_path, shared, band, corpora, workers=workers,
                           progress=progress, log=log)
        results = summarise(out, baseline, jobs, seeds, band, column, model, shared["seq_len"])
        results.update(seconds=seconds, wall_seconds=round(time.perf_counter() - t0, 1), workers=workers,
                       settings={k: v for k, v in shared.items()}, context=ctx, demo=model == model_dir())
        write_report(results, out, docs_dir=docs_dir)
        return results


if __name__ == "__main__":  # the command line lives in alibi_surgery.cli.reproduce
    from alibi_surgery.cli.reproduce import main

    sys.exit(main())

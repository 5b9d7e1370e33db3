"""The paper's experiments, reproduced on pre-trained testbeds, every arm beside its controls (docs/reproduction.md).

    python -m alibi_surgery.demo.reproduce OUT                               # testbed A (the demo model), 5 seeds
    python -m alibi_surgery.demo.reproduce OUT --testbed A=alibi_surgery/demo/model --testbed B=/path/to/b \\
        --seeds 5 --docs-dir docs

For each testbed ``T`` (a model directory with the demo's byte-level tokenizer and a recorded training context) and
each seed ``s`` (it draws the surgery corpus, the re-initialisation, the random-healthy heads and the data order),
nine ``repair`` runs under ``OUT/runs/T-<kind>-s`` (:data:`KINDS`):

* ``treatment``: the collapse band re-initialised and retrained, then a second pass on every head still collapsed
  (``passes=2``). Its pass 1 is the treatment arm of claims 1 and 5, pass 1 and 2 of claim 2, the band-only control
  of claim 3 and the structured corpus of claim 4.
* ``gradient-only``, ``reinit-only``, ``random-healthy``, ``ablate``: pass 1's plan under each control arm
  (:mod:`alibi_surgery.surgery.controls`).
* ``extended``: the band plus the mostly-healthy column next to it (claim 3); ``noisy``: the band on the structured
  documents with their bytes shuffled (claim 4); ``paper`` / ``ours``: bf16 weights, the paper's optimizer and
  schedule against ours (claim 6).

Then the functional measurements (``OUT/functional/``), one per testbed on the stock model and one per run of
:data:`FUNCTIONAL_KINDS` on its final model: each pass-1 target's mean-ablation effect, noise floor and interval
(:func:`~alibi_surgery.analysis.ablation.ablate_heads`, ``--ablation-draws`` floor draws, the first
``--ablation-texts`` held-out documents) and a diagnosis at the testbed's context. Every run scores the same
held-out documents (one set for all seeds). Claims, intervals and verdicts: :mod:`.reproduction_report`.

A finished run or measurement is reused, so an interrupted reproduction continues where it stopped; ``OUT`` is
locked for the whole reproduction. Limits: CPU only; the corpora are the demo's bigram-recall data, so a testbed
must use the demo's byte-level tokenizer; the testbeds are 4-layer byte-level models, not language models.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

__all__ = ["Job", "Testbed", "KINDS", "FUNCTIONAL_KINDS", "plan_jobs", "run_jobs", "reproduce", "healthy_column",
           "write_corpora", "HELD_OUT_SEED"]

KINDS = ("treatment", "gradient-only", "reinit-only", "random-healthy", "ablate", "extended", "noisy", "paper",
         "ours")
FUNCTIONAL_KINDS = ("treatment", "gradient-only", "reinit-only", "random-healthy", "ablate")
HELD_OUT_SEED = 999  # the held-out documents' seed (training documents use 1000 + s)


@dataclasses.dataclass(frozen=True)
class Testbed:
    """A testbed: its short ``name`` (A, B, ...), model directory, context, diagnosis path, band and column."""

    name: str
    model: str
    context: int
    baseline: str
    band: tuple[int, int]
    column: int | None
    n_layer: int


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work. ``kind`` one of :data:`KINDS` (a repair run) or ``functional`` (``arm`` names the run it
    measures, None: the stock model)."""

    testbed: str
    kind: str
    seed: int | None = None
    arm: str | None = None

    @property
    def name(self) -> str:
        if self.kind == "functional":
            return f"{self.testbed}-{self.arm}-{self.seed}" if self.arm else f"{self.testbed}-stock"
        return f"{self.testbed}-{self.kind}-{self.seed}"

    @property
    def key(self) -> str:
        """Unique over every job (a run and the functional measurement of it share a name): the name, under
        ``functional/`` for a measurement (its path in OUT)."""
        return f"functional/{self.name}" if self.kind == "functional" else self.name


def _repair_options(job: Job, bed: Testbed) -> dict:
    """The keywords of ``repair`` that make ``job`` its kind: passes, corpus, plan and settings overrides."""
    opts: dict = {"passes": 1, "corpus": "structured", "include": None, "dtype": None, "settings": {}}
    if job.kind == "treatment":
        opts["passes"] = 2
    elif job.kind == "gradient-only":
        opts["settings"] = {"reinit": False}
    elif job.kind in ("reinit-only", "random-healthy", "ablate"):
        opts["settings"] = {"control": job.kind}
    elif job.kind == "extended":
        opts["include"] = f"0-{bed.n_layer - 1}:{bed.column}"
    elif job.kind == "noisy":
        opts["corpus"] = "noisy"
    elif job.kind == "paper":
        opts.update(dtype="bfloat16", settings={"optimizer_precision": "bf16", "schedule": "paper"})
    elif job.kind == "ours":
        opts["dtype"] = "bfloat16"
    else:
        raise ValueError(f"unknown kind {job.kind!r}")
    return opts


def plan_jobs(testbeds: list[Testbed], seeds: int, kinds: tuple = KINDS) -> tuple[list[Job], list[Job]]:
    """(repair runs, functional measurements) of ``kinds``, seed by seed so that a stopped reproduction has whole
    seeds. A testbed without a healthy column (``column`` None) has no ``extended`` run (the report says so)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or "treatment" not in kinds:
        from ..errors import UsageError

        raise UsageError(f"kinds: {', '.join(unknown) or 'treatment is missing'}; the kinds are {', '.join(KINDS)} "
                         f"(treatment always runs)")
    runs, functional = [], []
    for bed in testbeds:
        functional.append(Job(bed.name, "functional"))
    for s in range(seeds):
        for bed in testbeds:
            runs += [Job(bed.name, k, s) for k in KINDS if k in kinds and (k != "extended" or bed.column is not None)]
            functional += [Job(bed.name, "functional", s, k) for k in FUNCTIONAL_KINDS if k in kinds]
    return runs, functional


def healthy_column(report, band: tuple[int, int]) -> int | None:
    """The column next to the band (below it, else above) whose heads are mostly healthy (fewer than half
    collapsed): the analogue of the paper's H5 beside bloom-1b7's band H9-H15. None when neither neighbour is."""
    sick = report.sick_mask()
    for h in (band[0] - 1, band[1] + 1):
        if 0 <= h < report.n_head and sum(row[h] for row in sick) < report.n_layer / 2:
            return h
    return None


def write_corpora(directory: Path, seeds: int, n_docs: tuple[int, int], seq_len: int) -> dict:
    """``{"eval": path, s: {"structured": path, "noisy": path}}``: the held-out documents (one set, seed
    :data:`HELD_OUT_SEED`), and per seed fresh bigram-recall training documents and their noisy twin (each
    document's bytes shuffled: the same bytes, no bigram or recall structure). Existing files are kept."""
    from ..io.files import atomic_write_text
    from . import write_corpus

    held = directory / "held-out"
    if not (held / "eval.jsonl").is_file():
        write_corpus(held, seed=HELD_OUT_SEED, seq_len=seq_len, docs=(0, n_docs[1]))
    corpora: dict = {"eval": held / "eval.jsonl"}
    for s in range(seeds):
        d = directory / f"seed-{s}"
        train, noisy = d / "train.jsonl", d / "noisy-train.jsonl"
        if not train.is_file():
            write_corpus(d, seed=1000 + s, seq_len=seq_len, docs=(n_docs[0], 0))
        if not noisy.is_file():
            rng = random.Random(s)
            lines = []
            for line in train.read_text().splitlines():
                chars = list(json.loads(line)["text"])
                rng.shuffle(chars)
                lines.append(json.dumps({"text": "".join(chars)}) + "\n")
            atomic_write_text(noisy, "".join(lines))
        corpora[s] = {"structured": train, "noisy": noisy}
    return corpora


def run_dir(out: Path, job: Job) -> Path:
    return Path(out) / "runs" / f"{job.testbed}-{job.kind}-{job.seed}"


def functional_path(out: Path, job: Job) -> Path:
    return Path(out) / "functional" / f"{job.name}.json"


def _run_repair(job: Job, bed: Testbed, out: Path, shared: dict, corpora: dict) -> None:
    from ..surgery.repair import RepairSettings, repair
    from . import corpus_spec  # the demo's framing: <s> + bytes, no </s>, as pre-training

    opts = _repair_options(job, bed)
    settings = RepairSettings(**dict(shared, seed=job.seed, **opts["settings"]))
    repair(bed.model, run_dir(out, job), passes=opts["passes"], overwrite=True,
           corpus=corpus_spec(corpora[job.seed][opts["corpus"]]), eval_text=corpus_spec(corpora["eval"]),
           report=bed.baseline, band=f"{bed.band[0]}-{bed.band[1]}", include=opts["include"], settings=settings,
           dtype=opts["dtype"], device="cpu", ablation_draws=0)


def _measured_model(out: Path, job: Job, bed: Testbed) -> Path:
    if job.arm is None:
        return Path(bed.model)
    base = run_dir(out, Job(job.testbed, job.arm, job.seed))
    return base / "pass-1" / "final" if job.arm == "treatment" else base / "final"


def _run_functional(job: Job, bed: Testbed, out: Path, shared: dict, corpora: dict, ablation: dict) -> None:
    """Measure pass 1's targets (the baseline's collapsed band heads) on the job's model (module docstring)."""
    from ..analysis.ablation import ablate_heads
    from ..diagnosis.diagnose import diagnose
    from ..diagnosis.prompts import DEFAULT_PROMPTS
    from ..diagnosis.report import HeadReport
    from ..io.corpus import load_corpus
    from ..io.files import atomic_write_text
    from ..io.loading import load_model
    from . import corpus_spec

    baseline = HeadReport.from_json(bed.baseline)
    sick = baseline.sick_heads()
    heads = sorted((int(layer), h) for layer, hs in sick.items() for h in hs if bed.band[0] <= h <= bed.band[1])
    net, tokenizer = load_model(str(_measured_model(out, job, bed)))
    net.eval()
    chunks = load_corpus(corpus_spec(corpora["eval"]), tokenizer, shared["seq_len"])[0]
    ids = [row.tolist() for row in chunks][:ablation["texts"]]
    result = ablate_heads(net, ids, heads, mode="mean", floor_draws=ablation["draws"], seed=job.seed or 0,
                          bootstrap=ablation["bootstrap"], backend="auto")
    report = diagnose(net, tokenizer, DEFAULT_PROMPTS, max_length=bed.context)
    path = functional_path(out, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"job": dataclasses.asdict(job), "model": str(_measured_model(out, job, bed)),
                                        "ablation": result.to_dict(), "diagnosis": report.to_dict()}) + "\n")


def _done(out: Path, job: Job) -> bool:
    if job.kind == "functional":
        return functional_path(out, job).is_file()
    return (run_dir(out, job) / "report.json").is_file()


def _work(args: tuple) -> tuple[str, float]:
    """Run one job in a worker process; returns (key, seconds), 0 for a job found finished."""
    job, bed, out, shared, corpora, ablation, threads = args
    import torch

    torch.set_num_threads(threads)
    if _done(out, job):
        return job.key, 0.0
    t0 = time.perf_counter()
    if job.kind == "functional":
        _run_functional(job, bed, out, shared, corpora, ablation)
    else:
        _run_repair(job, bed, out, shared, corpora)
    return job.key, time.perf_counter() - t0


def run_jobs(jobs: list[Job], out: Path, testbeds: dict, shared: dict, corpora: dict, ablation: dict, *,
             workers: int = 2, progress: bool = True, log=print) -> dict:
    """Run ``jobs`` on ``workers`` spawned processes of one thread each (one worker: the caller's torch thread count,
    which follows ``OMP_NUM_THREADS``); returns ``{key: seconds}`` (:attr:`Job.key`)."""
    import torch
    from tqdm.auto import tqdm

    seconds = {}
    threads = 1 if workers > 1 else torch.get_num_threads()
    tasks = [(job, testbeds[job.testbed], out, dict(shared), corpora, ablation, threads) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool, \
            tqdm(total=len(jobs), desc="reproduce", unit="job", disable=not progress) as bar:
        for name, secs in pool.map(_work, tasks):
            seconds[name] = round(secs, 1)
            bar.update()
            log(f"{name}: {'already finished' if secs == 0 else f'{secs:.0f} s'}")
    return seconds


def _testbed(name: str, model: str, out: Path, log) -> Testbed:
    from ..diagnosis.diagnose import diagnose
    from ..diagnosis.prompts import DEFAULT_PROMPTS
    from ..errors import UsageError
    from ..families import training_context
    from ..io.loading import load_model

    net, tokenizer = load_model(str(model))
    context = training_context(net.config)
    if context is None:
        raise UsageError(f"{model} records no training context (config.json seq_length): the diagnoses need one")
    ctx = context[0]
    path = out / f"baseline-{name}.json"
    report = diagnose(net, tokenizer, DEFAULT_PROMPTS, max_length=ctx)
    report.to_json(path)
    band = report.band()
    if band is None:
        raise UsageError(f"testbed {name} ({model}) has no collapse band at {ctx} tokens: nothing to reproduce on")
    bed = Testbed(name, str(Path(model).resolve()), ctx, str(path), tuple(band), healthy_column(report, band),
                  report.n_layer)
    log(f"testbed {name} ({model}): {report.n_layer} x {report.n_head} heads, context {ctx}; "
        f"{sum(map(len, report.sick_heads().values()))} collapsed; band H{band[0]}-H{band[1]}; healthy column "
        f"{'none' if bed.column is None else f'H{bed.column}'}")
    return bed


def parse_testbeds(specs: list[str] | None) -> list[tuple[str, str]]:
    """``NAME=DIR`` pairs (default: ``A`` = the demo model); names must be distinct words."""
    from ..errors import UsageError
    from . import model_dir

    if not specs:
        return [("A", str(model_dir()))]
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.isalnum() or not path:
            raise UsageError(f"--testbed {spec!r}: write NAME=DIR (NAME letters and digits), e.g. B=/models/b")
        if not Path(path).is_dir():
            raise UsageError(f"--testbed {spec!r}: {path} is not a directory")
        pairs.append((name, path))
    if len({n for n, _ in pairs}) != len(pairs):
        raise UsageError("--testbed: each testbed needs its own NAME")
    return pairs


def reproduce(out, *, testbeds: list[str] | None = None, seeds: int = 5, workers: int = 2,
              docs: tuple[int, int] = (512, 64), epochs: int = 4, save_every: int = 32, batch_size: int = 8,
              lr: float = 1e-3, seq_len: int = 128, ablation: dict | None = None, kinds: tuple = KINDS,
              docs_dir=None, progress: bool = True, log=print) -> dict:
    """Run every testbed's jobs (module docstring) into ``out`` and write the report; returns ``results.json``'s
    dict. ``testbeds``: ``NAME=DIR`` strings (:func:`parse_testbeds`). ``ablation``: ``draws``, ``texts``,
    ``bootstrap`` of the functional measurements (default 10, 32, 1000). ``kinds``: the runs to make (default all
    of :data:`KINDS`; a claim whose runs are left out is reported as not run)."""
    from ..io.lock import DirLock
    from .reproduction_report import summarise, write_report

    t0 = time.perf_counter()
    out = Path(out)
    pairs = parse_testbeds(testbeds)
    ablation = dict({"draws": 10, "texts": 32, "bootstrap": 1000}, **(ablation or {}))
    out.mkdir(parents=True, exist_ok=True)
    with DirLock(out, "OUT"):  # one reproduction per OUT; each run also locks its own directory
        beds = {name: _testbed(name, path, out, log) for name, path in pairs}
        shared = dict(seq_len=min([seq_len] + [b.context for b in beds.values()]),
                      diag_max_length=min(b.context for b in beds.values()), batch_size=batch_size, grad_accum=1,
                      lr=lr, epochs=epochs, warmup=0.1, checkpointing=False, save_every_steps=save_every)
        runs, functional = plan_jobs(list(beds.values()), seeds, tuple(kinds))
        log(f"{len(runs)} runs, then {len(functional)} functional measurements, on {workers} workers")
        corpora = write_corpora(out / "corpus", seeds, tuple(docs), shared["seq_len"])
        seconds = run_jobs(runs, out, beds, shared, corpora, ablation, workers=workers, progress=progress, log=log)
        seconds.update(run_jobs(functional, out, beds, shared, corpora, ablation, workers=workers,
                                progress=progress, log=log))
        results = summarise(out, list(beds.values()), seeds, shared["seq_len"])
        results.update(seconds=seconds, wall_seconds=round(time.perf_counter() - t0, 1), workers=workers,
                       settings=dict(shared, docs=list(docs)), ablation=ablation, kinds=list(kinds),
                       testbeds=[dataclasses.asdict(b) for b in beds.values()])
        write_report(results, out, docs_dir=docs_dir)
        return results


if __name__ == "__main__":  # the command line lives in alibi_surgery.cli.reproduce
    from alibi_surgery.cli.reproduce import main

    sys.exit(main())

"""The paper's protocol on a real BLOOM, one call: ``paper(model, paper_repo, out, PaperOptions(corpus=...))``.

The paper's texts, maps and settings come from a local copy of its repository (:mod:`.paper_repo`); the experiments
are the project's building blocks (``diagnose``, ``repair``, ``prompt_perplexity``, the comparisons and drift):

* ``diagnosis``: the input model diagnosed over the paper's one diagnostic text (``OUT/baseline.json``); every run's
  comparisons are against it;
* ``pass1``: the paper's pass-1 map (its ``reinit`` heads trained, its ``freeze`` heads frozen in-band); with
  ``pass1="auto"`` the model's own collapse band instead (its collapsed heads in the band, over the layers that hold
  them; the band's healthy heads frozen), for a model of another shape than the map's;
* ``pass2``: every head still collapsed after pass 1's treatment, from its ``final/`` (a fresh diagnosis);
* ``column``: pass 1 plus the healthy column (head ``column``, the paper's H5, over pass 1's layers), with a
  checkpoint every ``column_save_every_steps`` steps (the paper's sub-epoch sweep);
* ``c4``: pass 1 on the ``c4`` corpus instead of ``corpus`` (the corpus comparison), skipped without one.

Each experiment runs once per arm of ``arms`` (:data:`ARMS`): ``treatment``; ``gradient-only`` (the paper's control:
``settings.reinit=False``); ``reinit-only``, ``random-healthy`` and ``ablate`` through repair's ``control`` option
(:func:`arm_options`, the one place it is passed). Training: the paper's settings (epochs, lr, batch x accumulation, sequence length,
seed of its C4 run), its schedule, its bf16 optimizer on bfloat16 weights (else the exact fp32 one); the best
checkpoint by the paper's training perplexity (its ``PPL_TEXTS``, the paper's convention) becomes ``final/``; the
held-out figure is its ``PPL_PROMPTS`` scored on every ``final/`` (paper convention, 512 tokens). Every run is a
``repair`` directory under ``OUT/runs/<experiment>-<arm>``; a finished one is reused. ``OUT/paper.md`` and
``OUT/paper.json`` hold the paper's tables with its numbers beside ours (:mod:`.paper_report`).

``dry_run=True`` returns (and the CLI prints) the plan, predicted memory and time per device
(:mod:`.paper_estimate`) from the config alone (a directory or a shape name such as ``bloom-7b1``); nothing is
written. Limits: BLOOM-family models (the maps index BLOOM's heads); the paper's curated corpus is not published with
its code, so ``corpus`` is whatever you give; runs are sequential, on one device.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..errors import UsageError
from .paper_repo import freeze_spec, map_heads, map_spec, read_paper_repo

__all__ = ["ARMS", "EXPERIMENTS", "PaperOptions", "PlannedRun", "arm_options", "plan_runs", "paper"]

ARMS = ("treatment", "gradient-only", "reinit-only", "random-healthy", "ablate")
EXPERIMENTS = ("pass1", "pass2", "column", "c4")
PAPER_COLUMN = 5  # the healthy column of the paper's extended surgery (section 4.6: H5 over layers 5-22)
PAPER_SUB_EPOCH = 14  # its sub-epoch sweep resolved step 42 of a 140-step epoch (section 4.6): a tenth of an epoch


@dataclasses.dataclass
class PaperOptions:
    """Everything but the model, the repository and OUT. ``None`` training values take the paper's."""

    corpus: list | None = None
    c4: list | None = None
    arms: tuple = ARMS
    experiments: tuple = EXPERIMENTS
    pass1: str = "paper"
    column: int = PAPER_COLUMN
    column_save_every_steps: int | None = PAPER_SUB_EPOCH
    epochs: int | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    lr: float | None = None
    dtype: str = "bfloat16"
    device: str | None = None
    backend: str = "auto"
    text_field: str = "text"
    split: str | None = None
    ablation_draws: int = 20  # functional recovery's floor draws per target (repair's; 0: not measured)
    corpus_tokens: int = 541_000  # dry-run only: the paper's C4 corpus, about 541K tokens (section 4.2)
    progress: bool = True

    def check(self) -> None:
        for name, values, allowed in (("arms", self.arms, ARMS), ("experiments", self.experiments, EXPERIMENTS)):
            if isinstance(values, str) or not values:
                raise UsageError(f"{name}={values!r}: give a list of {', '.join(allowed)}")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise UsageError(f"{name}={','.join(values)}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")
        if self.pass1 not in ("paper", "auto"):
            raise UsageError(f"pass1={self.pass1!r}: must be 'paper' (the paper's map) or 'auto' (the model's band)")
        for name in ("epochs", "seq_len", "batch_size", "grad_accum", "column_save_every_steps", "corpus_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name}={value!r}: must be an integer >= 1")
        if self.lr is not None and not (self.lr >= 0 and self.lr < float("inf")):
            raise UsageError(f"lr={self.lr}: must be a finite number >= 0")
        from ..surgery.settings import RunOptions

        RunOptions(ablation_draws=self.ablation_draws).check()  # repair's rule, before any run starts


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One repair run: ``experiment`` x ``arm``; head specs; which corpus; ``skipped`` says why it does not run."""

    experiment: str
    arm: str
    heads: str | None = None
    freeze: str | None = None
    include: str | None = None
    corpus: str = "corpus"
    save_every_steps: int | None = None
    skipped: str | None = None

    @property
    def name(self) -> str:
        return f"{self.experiment}-{self.arm}"


def arm_options(arm: str) -> dict:
    """The :class:`~alibi_surgery.surgery.settings.RepairSettings` fields an arm sets (docs/surgery.md, "Control
    arms")."""
    if arm == "treatment":
        return {}
    if arm == "gradient-only":
        return {"reinit": False}
    return {"control": arm}


def _layers_spec(selection: dict) -> str:
    return f"{min(selection)}-{max(selection)}"


def plan_runs(pass1_map: dict, options: PaperOptions, has_c4: bool) -> list[PlannedRun]:
    """Every experiment x arm of ``options`` (see the module docstring); ``pass1_map`` is the map pass 1 uses (the
    paper's or one made from the model's diagnosis)."""
    heads, freeze = map_spec(pass1_map), freeze_spec(pass1_map)
    layers = map_heads(pass1_map)
    column = options.column
    clash = [layer for layer, entry in pass1_map.items() if column in entry.get("freeze", [])]
    runs = []
    for experiment in options.experiments:
        for arm in options.arms:
            skipped = None
            if experiment == "pass1":
                run = PlannedRun("pass1", arm, heads, freeze)
            elif experiment == "pass2":
                run = PlannedRun("pass2", arm, "auto")
                if "pass1" not in options.experiments or "treatment" not in options.arms:
                    skipped = skipped or "pass 2 starts from pass 1's treatment, which is not in this plan"
            elif experiment == "column":
                run = PlannedRun("column", arm, heads, freeze, f"{_layers_spec(layers)}:{column}" if layers else None,
                                 save_every_steps=options.column_save_every_steps)
                if clash:
                    skipped = skipped or f"column H{column} is frozen in-band at layer {clash[0]} by the map"
            else:
                run = PlannedRun("c4", arm, heads, freeze, corpus="c4")
                if not has_c4:
                    skipped = skipped or "no c4 corpus given (--c4)"
            runs.append(dataclasses.replace(run, skipped=skipped))
    return runs


def check_map_fits(head_map: dict, n_layer: int, n_head: int, what: str) -> None:
    """Refuse, in one line, a map that names a layer or head the model lacks."""
    top_layer = max(head_map)
    top_head = max(h for e in head_map.values() for key in ("reinit", "freeze") for h in e.get(key, []))
    if top_layer >= n_layer or top_head >= n_head:
        raise UsageError(f"{what} names layer {top_layer} / head {top_head}, but the model has {n_layer} layers x "
                         f"{n_head} heads: use pass1=auto (the model's own collapse band)")


def auto_map(report) -> dict:
    """A pass-1 map from a diagnosis: in the collapse band, over the layers holding its collapsed heads, re-initialise
    the collapsed heads and freeze the healthy ones (the paper's rule, drawn on this model)."""
    band = report.band()
    if band is None:
        raise UsageError("pass1='auto': the diagnosis finds no collapsed head: nothing to repair")
    sick = report.sick_mask()
    layers = [layer for layer in range(report.n_layer) if any(sick[layer][band[0]:band[1] + 1])]
    cols = range(band[0], band[1] + 1)
    return {layer: {"reinit": [h for h in cols if sick[layer][h]], "freeze": [h for h in cols if not sick[layer][h]]}
            for layer in range(layers[0], layers[-1] + 1)}


def repair_settings(facts, options: PaperOptions, run: PlannedRun):
    """The RepairSettings of one run: the paper's training settings, our overrides, the arm's."""
    from ..surgery.repair import RepairSettings

    s = facts.settings
    bf16 = options.dtype in ("bfloat16", "bf16")
    fields = dict(seq_len=options.seq_len or s["max_length"], batch_size=options.batch_size or s["batch_size"],
                  grad_accum=options.grad_accum or s["grad_accum"], lr=s["lr"] if options.lr is None else options.lr,
                  epochs=options.epochs or s["epochs"], seed=s["seed"], schedule="paper",
                  optimizer_precision="bf16" if bf16 else "master", eval_convention="paper",
                  diag_max_length=None, save_every_steps=run.save_every_steps)  # the paper's text, whole
    fields.update(arm_options(run.arm))
    return RepairSettings(**fields)


def paper(model, paper_repo, out, options: PaperOptions | None = None, *, dry_run: bool = False, log=print) -> dict:
    """Run the paper's protocol (module docstring) into ``out``; returns ``OUT/paper.json``'s dict, or with
    ``dry_run`` the plan (nothing written)."""
    options = options or PaperOptions()
    options.check()
    facts = read_paper_repo(paper_repo)
    if dry_run:
        from .paper_estimate import dry_run_plan

        return dry_run_plan(str(model), facts, options)
    if not options.corpus:
        raise UsageError("corpus is required (the training text of pass 1 and pass 2; --corpus)")
    from ..io.corpus import CorpusSpec
    from ..io.lock import DirLock

    spec = dict(text_field=options.text_field, split=options.split)
    corpora = {"corpus": CorpusSpec(tuple(map(str, options.corpus)), **spec),
               "c4": CorpusSpec(tuple(map(str, options.c4)), **spec) if options.c4 else None}
    out = Path(out)
    t0 = time.perf_counter()
    with DirLock(out, "OUT"):
        baseline, stock, pass1_map = _baseline(model, facts, options, out)
        runs = plan_runs(pass1_map, options, corpora["c4"] is not None)
        results = {}
        for run in runs:
            results[run.name] = _run_one(model, run, facts, options, out, corpora, results)
            log(f"{run.name}: {results[run.name].get('status')}")
        from .paper_report import write_report

        data = {"model": str(model), "paper_repo": facts.to_dict(), "pass1_map": {str(k): v for k, v in
                pass1_map.items()}, "pass1_source": options.pass1, "stock": stock,
                "baseline": baseline.summary(), "runs": results,
                "plan": [dict(dataclasses.asdict(r), name=r.name) for r in runs],
                "options": {k: v for k, v in dataclasses.asdict(options).items() if k not in ("corpus", "c4")}
                | {"corpus": [str(c) for c in options.corpus], "c4": [str(c) for c in options.c4 or []]},
                "wall_seconds": round(time.perf_counter() - t0, 1)}
        write_report(data, out)
        return data


def _score(model_or_dir, facts, options: PaperOptions) -> dict:
    """The paper's training and held-out perplexities (paper convention, its 512-token truncation) of a model."""
    from ..analysis.perplexity import prompt_perplexity
    from ..io.loading import load_model

    net, tok = load_model(str(model_or_dir), dtype=options.dtype, device=options.device) \
        if isinstance(model_or_dir, (str, Path)) else model_or_dir
    length = facts.settings["max_length"]
    return {key: prompt_perplexity(net, tok, texts, convention="paper", max_length=length,
                                   backend=options.backend).perplexity
            for key, texts in (("train_ppl", facts.train_texts), ("held_out_ppl", facts.held_out))}


def _baseline(model, facts, options: PaperOptions, out: Path):
    """The stock diagnosis over the paper's text (``OUT/baseline.json``), the stock perplexities and pass 1's map."""
    from ..diagnosis.diagnose import diagnose
    from ..diagnosis.report import HeadReport
    from ..io.files import atomic_write_text
    from ..io.loading import load_model

    path = out / "baseline.json"
    net, tok = load_model(str(model), dtype=options.dtype, device=options.device)
    if path.is_file():
        baseline = HeadReport.from_json(path)
    else:
        baseline = diagnose(net, tok, [facts.diag_text], backend=options.backend)  # the whole text, as the paper
    if options.pass1 == "paper":
        check_map_fits(facts.pass1, baseline.n_layer, baseline.n_head, f"the paper's pass-1 map ({facts.source})")
        pass1_map = facts.pass1
    else:
        pass1_map = auto_map(baseline)
    stock_path = out / "stock.json"
    if stock_path.is_file():
        stock = json.loads(stock_path.read_text())
    else:
        stock = _score((net, tok), facts, options)
        baseline.to_json(path)
        atomic_write_text(stock_path, json.dumps(stock, indent=1) + "\n")
    return baseline, stock, pass1_map


def _run_one(model, run: PlannedRun, facts, options: PaperOptions, out: Path, corpora: dict, done: dict) -> dict:
    """One repair run (reused when finished), summarised for the report."""
    from ..io.files import atomic_write_text, read_text
    from ..surgery.plan import NothingToRepair
    from ..surgery.repair import repair

    if run.skipped:
        return {"status": "skipped", "note": run.skipped}
    run_dir = out / "runs" / run.name
    source = model
    if run.experiment == "pass2":
        first = done.get("pass1-treatment", {})
        if first.get("status") != "done":
            return {"status": "skipped", "note": "pass 1's treatment did not finish"}
        source = Path(first["final"])
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(read_text(summary_path, what="run summary"))
    report_arg = str(out / "baseline.json") if run.experiment != "pass2" else None
    try:
        report = repair(source, run_dir, overwrite=True, corpus=corpora[run.corpus], eval_prompts=facts.train_texts,
                        report=report_arg, heads=run.heads, freeze=run.freeze, include=run.include,
                        settings=repair_settings(facts, options, run), prompts=[facts.diag_text],
                        device=options.device, dtype=options.dtype, backend=options.backend,
                        progress=options.progress, ablation_draws=options.ablation_draws)
    except NothingToRepair as exc:
        return {"status": "nothing to repair", "note": str(exc)}
    from .paper_report import summarise_run

    summary = dict(summarise_run(report, run), status="done", final=str(run_dir / "final"),
                   **_score(run_dir / "final", facts, options))
    atomic_write_text(summary_path, json.dumps(summary, indent=1) + "\n")
    return summary

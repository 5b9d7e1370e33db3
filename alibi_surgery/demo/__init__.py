"""The embedded demonstration model and ``alibi-surgery demo``: the whole job, offline, in a few CPU minutes.

The package ships a tiny BLOOM (``alibi_surgery/demo/model``: safetensors, config, byte-level tokenizer that
prefixes ``<s>``, ``SHA256SUMS``, ``recipe.json``) pre-trained from scratch by :mod:`alibi_surgery.demo.pretrain` on
bigram-recall text (:mod:`alibi_surgery.demo.recall_data`). Its first-token collapse was learned, not planted;
docs/demo-model.md has the recipe and the curves. :func:`model_dir` verifies the checksums before handing out the path.

:func:`run_demo` (the ``demo`` command): diagnose → plan (``--heads auto``) → repair on a freshly generated
bigram-recall corpus → re-diagnose (``compare``) → a before/after summary, with the report and heatmaps in ``OUT``.

Framing: the surgery corpus and the held-out text are framed exactly as pre-training framed its rows, ``<s>`` and
``seq_len - 1`` bytes, never ``</s>`` (:func:`corpus_spec` packs them with ``eos=False``), so surgery teaches the
model no token it has not seen and the held-out perplexity scores only bytes it was trained to predict.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ..errors import UsageError

__all__ = ["model_dir", "load_model", "recipe", "write_corpus", "corpus_spec", "run_demo", "install_model",
           "DEMO_SETTINGS"]

_DIR = Path(__file__).with_name("model")
CHECKSUMS = "SHA256SUMS"

# Surgery settings of the demo: the paper's optimiser and schedule, scaled to a 3M-parameter model and a
# five-minute CPU budget (a larger learning rate than the paper's 5e-5, 128-token documents as the paper's 512 are a
# quarter of BLOOM's context).
DEMO_SETTINGS = dict(seq_len=128, batch_size=8, grad_accum=1, lr=1e-3, epochs=4, warmup=0.1, checkpointing=False,
                     save_every_steps=16)
# Functional recovery in the demo: 8 held-out documents and 5 noise-floor draws per target, before and after
# (repair's defaults, 64 and 20, cost about 30 times as much: tens of CPU minutes for the demo's 21 targets).
DEMO_ABLATION = dict(ablation_texts=8, ablation_draws=5)
DEMO_DOCS = (256, 64)  # training and held-out documents, one sequence each


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(directory) -> Path:
    """Write ``SHA256SUMS`` (atomically) for every file of ``directory`` (used when the demo model is installed)."""
    from ..io.files import atomic_write_text

    directory = Path(directory)
    lines = [f"{_sha256(p)}  {p.name}" for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUMS]
    atomic_write_text(directory / CHECKSUMS, "\n".join(lines) + "\n")
    return directory / CHECKSUMS


def install_model(run_dir, *, target=None) -> Path:
    """Install a :mod:`alibi_surgery.demo.pretrain` run (``RUN/last`` + ``RUN/recipe.json``) as the demo model: the
    model files (the config's ``seq_length`` set to the recipe's context when the run did not record it), the recipe
    and fresh ``SHA256SUMS`` replace ``target`` (default: the package's ``demo/model``) in one
    step: they are gathered in a directory beside it that then takes its place
    (:func:`~alibi_surgery.io.files.staged_dir`), so an interrupted install leaves the old model whole."""
    import shutil

    from ..io.files import staged_dir

    run_dir, target = Path(run_dir), Path(target or _DIR)
    files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    missing = [f for f in files if not (run_dir / "last" / f).is_file()]
    if missing or not (run_dir / "recipe.json").is_file():
        raise UsageError(f"{run_dir} is not a finished pre-training run "
                         f"(missing {', '.join(missing) or 'recipe.json'})")
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(target, "demo model") as tmp:
        tmp.mkdir()
        for f in [*(Path("last") / f for f in files), Path("recipe.json")]:
            shutil.copy2(run_dir / f, tmp / f.name)
        config = json.loads((tmp / "config.json").read_text())
        if "seq_length" not in config:  # a run from before pre-training recorded it: the recipe's context
            config["seq_length"] = json.loads((run_dir / "recipe.json").read_text())["seq_len"]
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_checksums(tmp)
    return target


def verify_checksums(directory) -> None:
    """Raise a one-line :class:`UsageError` when a file listed in ``SHA256SUMS`` is missing or differs."""
    directory = Path(directory)
    sums = directory / CHECKSUMS
    if not sums.is_file():
        raise UsageError(f"the demo model has no {CHECKSUMS} in {directory}: reinstall alibi-surgery")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = directory / name
        if not path.is_file():
            raise UsageError(f"the demo model file {name} is missing from {directory}: reinstall alibi-surgery")
        if _sha256(path) != digest:
            raise UsageError(f"the demo model file {name} fails its sha256 check: reinstall alibi-surgery")


def model_dir(*, verify: bool = True) -> Path:
    """The demo model's directory (package data), checksums verified."""
    if verify:
        verify_checksums(_DIR)
    return _DIR


def recipe() -> dict:
    """How the demo model was trained (``recipe.json``: the pre-training arguments, versions and wall time)."""
    return json.loads((model_dir(verify=False) / "recipe.json").read_text())


def load_model(*, dtype: str | None = None, device: str | None = None):
    """``(model, tokenizer)`` of the demo model, checksums verified; fp32 on CPU by default."""
    from ..io.loading import load_model

    return load_model(str(model_dir()), dtype=dtype, device=device)


def write_corpus(directory, *, seed: int = 1, seq_len: int | None = None,
                 docs: tuple[int, int] = DEMO_DOCS) -> tuple[Path, Path]:
    """Generate the demo's surgery corpus (``train.jsonl``) and held-out text (``eval.jsonl``) in ``directory``:
    ``docs`` (training, held-out) fresh bigram-recall documents of ``seq_len - 1`` bytes (default ``seq_len``: the
    demo's surgery length), so that each, packed by :func:`corpus_spec` (``<s>`` + bytes, no ``</s>``), is exactly
    one ``seq_len`` chunk framed as a pre-training row. The seed differs from pre-training's, so these sequences are
    new to the model. Each file is written atomically; a count of 0 writes no file (its path is still returned)."""
    from ..io.files import atomic_write_text
    from .recall_data import RecallData, python_docs_text

    r = recipe()
    seq_len = seq_len or DEMO_SETTINGS["seq_len"]
    data = RecallData(python_docs_text(), trigger_p=r["trigger_p"])
    gen = torch.Generator().manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in zip(("train.jsonl", "eval.jsonl"), docs):
        path = directory / name
        paths.append(path)
        if n == 0:
            continue
        texts = data.texts(n, seq_len - 1, gen)
        atomic_write_text(path, "".join(json.dumps({"text": d}) + "\n" for d in texts))
    return paths[0], paths[1]


def corpus_spec(path):
    """A demo corpus file (:func:`write_corpus`) as the demo packs it: each document ``<s>`` + its bytes, joined
    without ``</s>`` (``CorpusSpec(eos=False)``), as pre-training framed its rows."""
    from ..io.corpus import CorpusSpec

    return CorpusSpec((str(path),), eos=False)


def trained_steps(r: dict) -> int:
    """Pre-training steps of a recipe, its earlier stages (``init_from``) included."""
    stage = r.get("init_from") or {}
    return r["steps_run"] + (trained_steps(stage["recipe"]) if stage.get("recipe") else 0)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def run_demo(out="alibi-surgery-demo", *, overwrite: bool = False, epochs: int | None = None, seed: int = 0,
             progress: bool = False, ablation: dict | None = None, log=print) -> dict:
    """Diagnose, plan, repair, re-diagnose and compare the demo model; everything goes to ``out``. Returns the
    summary dict (also ``OUT/summary.json``). ``ablation`` overrides :data:`DEMO_ABLATION`'s entries."""
    from ..io.lock import DirLock
    from ..io.outdir import check_out_dir, clear_dir

    from ..surgery.settings import RunOptions

    t0 = time.perf_counter()
    ablation = dict(DEMO_ABLATION, **(ablation or {}))
    unknown = set(ablation) - set(DEMO_ABLATION)
    if unknown:
        raise UsageError(f"ablation={sorted(unknown)}: the demo takes {' and '.join(sorted(DEMO_ABLATION))}")
    RunOptions(**ablation).check()  # before anything is written
    src = model_dir()
    out = check_out_dir(out, src, resume=False, overwrite=overwrite, can_resume=False)
    with DirLock(out):
        if overwrite:
            clear_dir(out)
        return _run_demo(out, src, epochs, seed, progress, log, t0, ablation)


def _run_demo(out: Path, src: Path, epochs, seed, progress, log, t0, ablation: dict) -> dict:
    from ..analysis.compare import compare
    from ..viz.comparison_figures import save_delta_heatmap
    from ..diagnosis.diagnose import diagnose
    from ..viz.heatmap import save_heatmap
    from ..io.files import atomic_write_text
    from ..diagnosis.prompts import DEFAULT_PROMPTS
    from ..surgery.repair import RepairSettings, repair_pass

    r = recipe()
    max_length = r["diag_max_length"]
    model, tokenizer = load_model()

    log(f"demo model: {r['layers']} layers x {r['heads']} heads, trained {trained_steps(r)} steps from scratch "
        f"(docs/demo-model.md); diagnosing with the built-in prompts, first {max_length} tokens each")
    before = diagnose(model, tokenizer, DEFAULT_PROMPTS, max_length=max_length, progress=progress)
    before.metadata["model"] = "demo model"  # not the install path, in titles and summaries
    before.to_json(out / "before.json")
    save_heatmap(before, out / "before.png")
    log(before.format_summary())

    train, held_out = write_corpus(out / "corpus", seed=seed + 1)
    del model
    settings = RepairSettings(diag_max_length=max_length, seed=seed,
                              **dict(DEMO_SETTINGS, epochs=epochs or DEMO_SETTINGS["epochs"]))
    report = repair_pass(src, out / "surgery", corpus=corpus_spec(train), eval_text=corpus_spec(held_out),
                         report=before, settings=settings, progress=progress, **ablation)
    final = out / "surgery" / "final"
    ppl_before = report["eval_ppl_before"]
    cmp = compare(before, final, targets=report["plan"]["selection"], max_length=max_length)
    cmp.after.metadata["model"] = "demo model after surgery"
    cmp.to_json(out / "comparison.json")
    save_heatmap(cmp.after, out / "after.png")
    save_delta_heatmap(cmp, out / "delta.png")
    last = report["checkpoints"][-1]
    best = next(c for c in report["checkpoints"] if c["checkpoint"] == report["final_checkpoint"])
    n_targets = sum(len(h) for h in report["plan"]["selection"].values())
    recovered = sum(len(h) for h in cmp.recovered().values())
    revived = (report["functional"]["recovery"] or {}).get("revived")
    summary = {
        "collapsed_before": before.summary()["bos_sink"] + before.summary()["dead"],
        "n_heads": before.n_layer * before.n_head, "targeted": n_targets, "recovered": recovered, "revived": revived,
        "still_sick": sum(len(h) for h in cmp.still_sick().values()),
        "iatrogenic": sum(len(h) for h in cmp.iatrogenic().values()),
        "drift_outside": cmp.drift("outside"), "eval_ppl_before": ppl_before, "eval_ppl_final": best["eval_ppl"],
        "train_ppl_final": best["train_ppl"], "steps": last["step"], "seconds": round(time.perf_counter() - t0, 1),
        "out": str(out),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    log(cmp.format_summary())
    log(f"targeted {n_targets} collapsed heads; not collapsed after surgery {recovered}/{n_targets} "
        f"({100 * recovered / max(1, n_targets):.0f}%), revived (does work, docs/metrics.md) "
        f"{'n/a' if revived is None else revived}/{n_targets}; still sick {summary['still_sick']}, "
        f"newly sick elsewhere {summary['iatrogenic']}")
    log(f"held-out perplexity: {_fmt(ppl_before)} before surgery -> {_fmt(best['eval_ppl'])} after "
        f"({report['final_checkpoint']}, the best of {len(report['checkpoints'])} checkpoints); "
        f"{summary['steps']} steps, {summary['seconds']:.0f} s in all")
    log(f"wrote {out}/: before.png after.png delta.png, comparison.json, summary.json, surgery/report.md, "
        f"surgery/final/ (a stock-transformers model)")
    return summary

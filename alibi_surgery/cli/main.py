"""The ``alibi-surgery`` command line.

    alibi-surgery diagnose MODEL [--prompt TEXT ...] [--prompts-file F] [--json OUT] [--csv OUT] [--heatmap PNG]
    alibi-surgery random-model DIR [--shape tiny|bloom-560m|...] [--layers N] [--vocab N]
    alibi-surgery repair MODEL --out DIR --corpus TEXT... [--heads auto|SPEC] [--band A-B --layers C-D] [...]
    alibi-surgery compare A B [--json OUT] [--heatmap PNG] [--table]
    alibi-surgery demo [--out DIR] [--overwrite]
    alibi-surgery family DIR... [--json OUT] [--heatmap PNG] [--markdown OUT.md] [--stream]
    alibi-surgery plan-memory MODEL|SHAPE [--heads N|auto] [--seq-len T] [--batch-size B] [--budget 24GiB]

Every bad input ends with a one-line ``error: ...`` on stderr and exit status 2, before anything is written; a
write failure (a full disk, a file-size limit) with one line naming the path and exit status 1; Ctrl-C with status
130. A stopped ``repair`` names its last complete checkpoint and the ``--resume`` command that continues it.
``--debug`` (before or after the command) shows the traceback instead. Output files are written before anything is
printed, and a closed standard output (``| head``) costs nothing but the text. Warnings are one ``warning:`` line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .console import resume_hint, setup_console
from ..errors import UsageError, WriteError
from .options import add_model_options, add_prompt_options

__all__ = ["main", "build_parser"]


def _add_diagnose(sub) -> None:
    p = sub.add_parser("diagnose", help="classify every attention head of a BLOOM model",
                       description="Per-head first-token mass and entropy over a prompt set, with the paper's "
                                   "classes (dead, bos-sink, low-entropy, healthy).")
    p.add_argument("model", help="local Hugging Face model directory (config, safetensors, tokenizer) or cached hub id")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--csv", metavar="OUT", help="write one row per head as CSV")
    p.add_argument("--heatmap", metavar="OUT.png", help="write a layer x head heatmap of first-token mass")
    _add_diagnosis_options(p)


def _add_diagnosis_options(p) -> None:
    """--overwrite, prompts, model, thresholds, --stream and --quiet: shared by diagnose and family."""
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    add_prompt_options(p)
    add_model_options(p)
    p.add_argument("--dead-threshold", type=float, default=0.95, help="bos_mass above this is dead (0.95)")
    p.add_argument("--sink-threshold", type=float, default=0.50, help="bos_mass above this is a bos-sink (0.50)")
    p.add_argument("--low-entropy-threshold", type=float, default=0.50,
                   help="entropy below this is low-entropy (0.50)")
    p.add_argument("--stream", action="store_true",
                   help="read and run one block at a time from the safetensors files (one block in memory); "
                        "chosen automatically when the whole model would not fit in free memory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_family(sub) -> None:
    p = sub.add_parser("family", help="diagnose several BLOOM models: cross-scale table, multi-panel heatmap, JSON",
                       description="The paper's Table 1 and Figure 2: per model, parameters, layers x heads, "
                                   "collapsed share, collapse band and per-index collapse rate.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model directories (or cached hub ids)")
    p.add_argument("--json", metavar="OUT", help="write every model's figures and report as JSON")
    p.add_argument("--heatmap", metavar="OUT.png", help="write one heatmap panel per model")
    p.add_argument("--markdown", metavar="OUT.md", help="write the table as Markdown")
    _add_diagnosis_options(p)


def _add_random_model(sub) -> None:
    from ..io.random_model import SHAPES

    p = sub.add_parser("random-model", help="write a random-weight BLOOM model directory (for trying things out)")
    p.add_argument("out", help="directory to create (must be new or empty)")
    p.add_argument("--shape", default="tiny", choices=list(SHAPES))
    p.add_argument("--layers", type=int, help="fewer layers than the shape has")
    p.add_argument("--vocab", type=int, help="smaller vocabulary than 250,880")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exist-ok", action="store_true", help="keep DIR if it already holds a BLOOM model")


def _add_repair(sub) -> None:
    from ..surgery.repair import RepairSettings
    from ..surgery.reinit import INITS

    d = RepairSettings()
    p = sub.add_parser("repair", help="re-initialise and retrain collapsed heads (the paper's surgery)",
                       description="Plan, re-initialise, train only the selected heads' slices, checkpoint, "
                                   "re-diagnose and report. The input directory is never written to.")
    p.add_argument("model", help="local BLOOM model directory (config, safetensors, tokenizer) or cached hub id")
    p.add_argument("--out", required=True, help="output directory (new or empty, unless --resume/--overwrite)")
    p.add_argument("--corpus", nargs="+", metavar="PATH", help="training text: files, directories or globs")
    p.add_argument("--eval-text", metavar="FILE", help="held-out text for perplexity and early stopping")
    g = p.add_argument_group("plan")
    g.add_argument("--heads", default="auto", help="'auto' (dead and bos-sink heads) or a list like '5:14,15;6:9-15'")
    g.add_argument("--from-report", metavar="JSON", help="plan from this diagnosis instead of a fresh one")
    g.add_argument("--band", metavar="A-B", help="the sick heads with index in A..B (with --layers)")
    g.add_argument("--layers", metavar="C-D", help="restrict --band to these layers")
    g.add_argument("--freeze", metavar="SPEC", help="heads that must stay untouched")
    g.add_argument("--include", metavar="SPEC", help="healthy heads to re-initialise as well")
    g.add_argument("--passes", type=int, default=1, help="repeat on the heads still collapsed (default 1)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and predicted memory, then stop")
    g.add_argument("--budget", metavar="SIZE", help="refuse up front a plan whose predicted peak memory exceeds "
                                                    "this, e.g. 24GiB (see plan-memory)")
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
    t.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    t.add_argument("--warmup", type=float, default=d.warmup, help="fraction of steps in linear warm-up")
    t.add_argument("--epochs", type=int, default=d.epochs, help="passes over the corpus")
    t.add_argument("--patience", type=int, help="stop after this many epochs without held-out improvement")
    t.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping norm")
    t.add_argument("--init", choices=INITS, default=d.init, help="re-initialisation of the selected heads")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of the re-initialisation and the data order")
    t.add_argument("--save-every-steps", type=int, help="also checkpoint every N optimizer steps")
    t.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    t.add_argument("--stochastic-rounding", action="store_true", help="bf16 without an fp32 master copy")
    p.add_argument("--prompts-file", metavar="FILE", help="diagnosis prompts, one per line (default: built-in set)")
    add_model_options(p, backends="auto, triton or torch")
    p.add_argument("--save-dtype", choices=("float32", "float16", "bfloat16"),
                   help="dtype of OUT/final (default: the input checkpoint's)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds and start again")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_repair(args) -> None:
    from ..surgery.repair import RepairSettings, repair

    settings = RepairSettings(seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                              lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, epochs=args.epochs,
                              patience=args.patience, max_grad_norm=args.max_grad_norm, init=args.init,
                              seed=args.seed, save_every_steps=args.save_every_steps,
                              checkpointing=not args.no_checkpointing, stochastic_rounding=args.stochastic_rounding)
    if args.backend not in ("auto", "triton", "torch"):
        raise UsageError(f"--backend must be auto, triton or torch for repair, got {args.backend!r}")
    from ..diagnosis.report import read_report

    from_report = read_report(args.from_report, "--from-report") if args.from_report else None
    from ..surgery.memory_plan import parse_bytes

    budget = parse_bytes(args.budget) if args.budget else None
    prompts = None
    if args.prompts_file:
        args.prompt = []
        prompts = _read_prompts(args)
    result = repair(args.model, args.out, corpus=args.corpus, eval_text=args.eval_text, report=from_report,
                    heads=args.heads, band=args.band, layers=args.layers, freeze=args.freeze, include=args.include,
                    passes=args.passes, settings=settings, device=args.device, dtype=args.dtype,
                    backend=args.backend, prompts=prompts, save_dtype=args.save_dtype, resume=args.resume,
                    overwrite=args.overwrite, dry_run=args.dry_run, progress=not args.quiet, budget=budget)
    if args.dry_run:
        from ..surgery.plan import Plan

        memory = result.pop("memory")
        print(Plan.from_dict(result).format(memory))
        return
    _print_repair_result(result, Path(args.out))


def _print_repair_result(result: dict, out: Path) -> None:
    """What a finished repair says: its held-out perplexity before and after, and the files it wrote."""
    from ..surgery.repair_report import format_ppl

    last = result["passes"][-1] if "passes" in result else result
    best = next((c for c in last["checkpoints"] if c["checkpoint"] == last["final_checkpoint"]), None)
    if result.get("stopped"):
        print(f"stopped after pass {len(result['passes'])}: {result['stopped']}")
    if result.get("eval_ppl_before") is not None:
        print(f"held-out perplexity: {format_ppl(result['eval_ppl_before'])} before surgery -> "
              f"{format_ppl(best and best['eval_ppl'])} after ({last['final_checkpoint'] or 'no training'})")
    if result.get("already_complete"):
        print(f"nothing to resume: {out} holds a finished run ({result['final']}, {out / 'report.md'})")
    else:
        print(f"wrote {result['final']} and {out / 'report.md'}")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole job on the embedded demo model (offline, a few CPU minutes)",
                       description="Diagnose the shipped tiny BLOOM (learned first-token collapse), repair its "
                                   "collapsed heads on a generated corpus, re-diagnose and compare.")
    p.add_argument("--out", default="alibi-surgery-demo", help="output directory (default ./alibi-surgery-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--epochs", type=int, help="surgery epochs (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_demo(args) -> None:
    from ..demo import run_demo

    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    run_demo(args.out, overwrite=args.overwrite, epochs=args.epochs, progress=not args.quiet)


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already gives it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not action.option_strings or hidden or "default" in text:
            return text
        return f"{text} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="alibi-surgery", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"alibi-surgery {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_diagnose(sub)
    _add_random_model(sub)
    _add_repair(sub)
    from ..analysis.compare import add_compare_parser

    add_compare_parser(sub)
    _add_demo(sub)
    _add_family(sub)
    _add_plan_memory(sub)
    for p in sub.choices.values():  # --debug after the command too; defaults in every --help
        p.formatter_class = _HelpFormatter
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _add_plan_memory(sub) -> None:
    p = sub.add_parser("plan-memory", help="predict peak memory of diagnosis and surgery; does it fit a budget?",
                       description="Predicted peak device memory, by part, for an in-memory and a streamed "
                                   "diagnosis and for one surgery step (see docs/scale.md).")
    p.add_argument("model", help="model directory, cached hub id, or a family shape (bloom-560m ... bloom)")
    p.add_argument("--heads", default="auto", help="heads to train: a number, or auto (the paper's collapse share)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompts", type=int, default=8, help="prompts a diagnosis keeps hidden states for (8)")
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16 (default bfloat16)")
    p.add_argument("--stochastic-rounding", action="store_true", help="bf16 surgery without an fp32 master copy")
    p.add_argument("--budget", help="memory to check against, e.g. 24GiB or 16GB")
    p.add_argument("--device", default="cuda", help="cuda (a card; default) or cpu (adds the loading cost there)")
    p.add_argument("--json", metavar="OUT", help="write the prediction as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def _read_prompts(args) -> list[str]:
    from ..diagnosis.prompts import DEFAULT_PROMPTS, read_prompts

    return read_prompts(args.prompt, args.prompts_file) or list(DEFAULT_PROMPTS)


def _diagnose_each(args, models: list[str]) -> list:
    """Check the shared diagnosis options, then diagnose each model (streamed when asked or when it won't fit)."""
    from ..attention.backends import check_backend
    from ..io.loading import parse_device, parse_dtype, resolve_model_dir
    from ..diagnosis.report import Thresholds
    from ..diagnosis.stream import diagnose_path

    check_backend(args.backend)
    try:
        thresholds = Thresholds(args.dead_threshold, args.sink_threshold, args.low_entropy_threshold)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    prompts = _read_prompts(args)
    for model in models:  # every path checked before the first (possibly long) diagnosis
        resolve_model_dir(model)
    options = dict(batch_size=args.batch_size, max_length=args.max_length, backend=args.backend,
                   exclude_first_query=args.exclude_first_query, normalize_entropy=args.normalize_entropy,
                   thresholds=thresholds, progress=not args.quiet)
    device = parse_device(args.device)
    return [diagnose_path(m, prompts, device=device, dtype=parse_dtype(args.dtype, device), stream=args.stream,
                          announce=lambda msg: print(msg, file=sys.stderr), **options) for m in models]


def _cmd_family(args) -> None:
    from ..analysis.scale_table import family_entry, family_table, save_family_heatmap, save_family_json
    from ..io.files import atomic_write_text, check_output_paths

    outputs = check_output_paths({"json": args.json, "heatmap": args.heatmap, "markdown": args.markdown},
                                 overwrite=args.overwrite)
    reports = _diagnose_each(args, args.models)
    entries = [family_entry(m, r) for m, r in zip(args.models, reports)]
    table = family_table(entries)
    if "json" in outputs:  # files first, then the terminal: a closed pipe can never cost a file
        save_family_json(entries, outputs["json"])
    if "heatmap" in outputs:
        save_family_heatmap(entries, outputs["heatmap"])
    if "markdown" in outputs:
        atomic_write_text(outputs["markdown"], table + "\n")
    print(table)
    for path in outputs.values():
        print(f"wrote {path}")


def _cmd_plan_memory(args) -> None:
    import json

    from ..io.files import atomic_write_text, check_output_paths
    from ..surgery.memory_plan import format_plan, parse_bytes, plan_memory

    out = check_output_paths({"json": args.json}, overwrite=args.overwrite).get("json")
    budget = parse_bytes(args.budget) if args.budget else None
    prediction = plan_memory(args.model, heads=args.heads, seq_len=args.seq_len, batch=args.batch_size,
                             dtype=args.dtype, budget=budget, n_prompts=args.prompts,
                             stochastic_rounding=args.stochastic_rounding, device=args.device)
    if out:
        atomic_write_text(out, json.dumps(prediction, indent=2) + "\n")
    print(format_plan(prediction))
    if out:
        print(f"wrote {out}")


def _cmd_diagnose(args) -> None:
    from ..io.files import check_output_paths

    outputs = check_output_paths({"json": args.json, "csv": args.csv, "heatmap": args.heatmap},
                                 overwrite=args.overwrite)
    report = _diagnose_each(args, [args.model])[0]
    if "json" in outputs:  # files first, then the terminal: a closed pipe can never cost a file
        report.to_json(outputs["json"])
    if "csv" in outputs:
        report.to_csv(outputs["csv"])
    if "heatmap" in outputs:
        from ..viz.heatmap import save_heatmap

        save_heatmap(report, outputs["heatmap"])
    print(report.format_summary())
    for path in outputs.values():
        print(f"wrote {path}")


def _cmd_random_model(args) -> None:
    from ..io.lock import DirLock
    from ..io.random_model import write_random_bloom

    out = Path(args.out)
    if args.exist_ok and (out / "config.json").is_file():
        from ..io.loading import resolve_model_dir

        resolve_model_dir(args.out)  # it must really be a BLOOM safetensors directory
        print(f"keeping the model already in {args.out}")
        return
    _check_new_dir(out)
    with DirLock(out, what="random-model"):
        write_random_bloom(out, args.shape, n_layer=args.layers, vocab_size=args.vocab, seed=args.seed)
    print(f"wrote a random {args.shape} BLOOM to {out}")


def _check_new_dir(out: Path) -> None:
    """A directory about to be created or filled: not a file, not under a file, and writable."""
    import os

    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    parent = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir():
        raise UsageError(f"{out} is not writable: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{out} is not writable: no write permission on {parent}")


def _quiet_transformers() -> None:
    """Our own progress bar and one-line errors only: no transformers warnings or loading bars on the terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_console()
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    from ..analysis.compare import run_compare

    commands = {"diagnose": _cmd_diagnose, "random-model": _cmd_random_model, "repair": _cmd_repair,
                "compare": run_compare, "demo": _cmd_demo, "family": _cmd_family, "plan-memory": _cmd_plan_memory}
    try:
        commands[args.command](args)
    except (UsageError, WriteError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}{resume_hint(exc, argv)}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        print(f"error: interrupted{resume_hint(exc, argv)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

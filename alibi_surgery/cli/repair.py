"""``alibi-surgery repair MODEL --out DIR``: plan, re-initialise and retrain the collapsed heads (the paper's
surgery), then say what it wrote."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .options import add_corpus_options, add_model_options, corpus_spec, prompts_from_args

__all__ = ["add_parser", "run", "ARGUMENT_NAMES"]

# repair's arguments named otherwise here (errors name the Python argument; the CLI prints the option)
ARGUMENT_NAMES = {"report": "from_report"}


# --recipe paper: the paper's training settings (RepairSettings fields); each is also its own option
PAPER_RECIPE = {"optimizer_precision": "bf16", "schedule": "paper", "epochs": 15, "lr": 5e-5, "batch_size": 1,
                "grad_accum": 8, "max_grad_norm": 1.0, "seq_len": 512}


def add_parser(sub) -> None:
    build_parser(sub, "repair", help="re-initialise and retrain collapsed heads (the paper's surgery)",
                 description="Plan, re-initialise, train only the selected heads' slices, checkpoint, re-diagnose "
                             "and report. The input directory is never written to.")


def build_parser(sub, name: str, **texts):
    """The parser of ``repair`` (and of ``sparsify``, which adds its own options to it): every option of a run."""
    from ..surgery.optim import PRECISIONS
    from ..surgery.repair import RepairSettings
    from ..surgery.reinit import INITS
    from ..surgery.schedule import SCHEDULES
    from ..surgery.settings import CONTROLS

    d = RepairSettings()
    p = sub.add_parser(name, **texts)
    p.add_argument("model", help="local model directory (config, safetensors, tokenizer) or cached hub id")
    p.add_argument("--out", required=True, help="output directory (new or empty, unless --resume/--overwrite)")
    p.add_argument("--corpus", nargs="+", metavar="PATH", help="training text: files, directories or globs")
    p.add_argument("--eval-text", metavar="FILE", help="held-out text for perplexity and early stopping")
    p.add_argument("--eval-prompts", metavar="FILE", help="held-out texts (one per line; .jsonl/.json: texts with "
                                                          "newlines), each scored alone at every checkpoint (picks "
                                                          "final/ when there is no --eval-text)")
    p.add_argument("--eval-convention", default="tokens", help="how --eval-prompts' losses combine: tokens "
                                                               "(per predicted token) or paper (the paper's)")
    p.add_argument("--text-field", default="text", help="the field holding each text in .jsonl/.json files and the "
                   "column in datasets (save_to_disk directories, .parquet/.arrow files, cached dataset ids), for "
                   "every text option")
    p.add_argument("--split", help="the split of a dataset with several (default: train, or the only one)")
    add_corpus_options(p)
    f = p.add_argument_group("functional recovery (docs/metrics.md: revived = not collapsed and does work)")
    f.add_argument("--ablation-draws", type=int, default=20, metavar="R",
                   help="noise-floor draws per target head, before and after surgery (0: not measured)")
    f.add_argument("--ablation-texts", type=int, default=64, metavar="N",
                   help="at most N held-out texts for it (--eval-prompts, else --eval-text rows, else the prompts)")
    f.add_argument("--ablation-bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples of its intervals (0: the point estimate must clear the floor)")
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
    t = p.add_argument_group("training (defaults: ours; --recipe paper sets the paper's, explicit options win)")
    t.add_argument("--recipe", metavar="paper", help="the paper's recipe: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in PAPER_RECIPE.items()) + "; a checkpoint every epoch")
    t.add_argument("--seq-len", type=int, help=f"tokens per training sequence (default: {d.seq_len})")
    t.add_argument("--batch-size", type=int, help=f"sequences per micro-batch (default: {d.batch_size})")
    t.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {d.grad_accum})")
    t.add_argument("--lr", type=float, help=f"peak learning rate; 0 trains nothing (default: {d.lr:g})")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    t.add_argument("--warmup", type=float, default=d.warmup, help="fraction of steps in linear warm-up "
                                                                  "(--schedule default)")
    t.add_argument("--schedule", metavar="|".join(SCHEDULES), help="default: linear warm-up over --warmup, cosine to 0; "
                                                         "paper: the paper's LambdaLR (first step at lr 0)")
    t.add_argument("--epochs", type=int, help=f"passes over the corpus (default: {d.epochs})")
    t.add_argument("--patience", type=int, help="stop after this many epochs without held-out improvement")
    t.add_argument("--max-grad-norm", type=float, help=f"gradient clipping norm (default: {d.max_grad_norm})")
    t.add_argument("--init", choices=INITS, help=f"re-initialisation of the selected heads (default: {d.init})")
    t.add_argument("--no-reinit", action="store_true", help="train the selected heads from their current values "
                                                            "(the paper's gradient-only control: arm gradient-only)")
    t.add_argument("--control", metavar="|".join(CONTROLS),
                   help="run a control arm instead of the treatment (docs/surgery.md, 'Control arms'): reinit-only "
                        "(re-initialise the targets, no training), random-healthy (re-initialise and train as many "
                        "random healthy heads of the same layers instead, seeded by --seed), ablate (zero the "
                        "targets' output columns, no training); the arms without training need no --corpus")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of the re-initialisation and the data order")
    t.add_argument("--save-every-steps", type=int, help="also checkpoint every N optimizer steps")
    t.add_argument("--save-every-epochs", type=int, default=d.save_every_epochs, metavar="N",
                   help="checkpoint (and re-diagnose) at the end of every N-th epoch and of the last (default 1)")
    t.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    t.add_argument("--optimizer-precision", metavar="|".join(PRECISIONS),
                   help="master: fp32 master copy of bf16/fp16 slices (default); stochastic: bf16, stochastically "
                        "rounded; bf16: bf16 moments, updates rounded into bf16 weights (the paper's)")
    t.add_argument("--stochastic-rounding", action="store_true", help="same as --optimizer-precision stochastic")
    t.add_argument("--sink-penalty", type=float, default=d.sink_penalty, metavar="LAMBDA",
                   help="add LAMBDA times the target heads' mean first-token mass to the loss, so that repaired heads "
                        "do not fall back onto the first token (computed in the fused kernels; default 0: none)")
    p.add_argument("--prompts-file", metavar="FILE", help="diagnosis prompts, one per line, or .jsonl/.json "
                                                          "(default: built-in set)")
    add_model_options(p, backends="auto, triton or torch")
    p.add_argument("--save-dtype", choices=("float32", "float16", "bfloat16"),
                   help="dtype of OUT/final (default: the input checkpoint's)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds and start again")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--distributed", choices=("none", "fsdp"), default="none",
                   help="fsdp: train over every rank of torchrun with FSDP2 (float32, the language-model loss, one "
                        "pass; docs/scale.md); without torchrun, one rank")
    return p


def DISTRIBUTED(args) -> bool:
    """Whether this invocation may run as ranks of torchrun: with ``--distributed fsdp``."""
    return getattr(args, "distributed", "none") == "fsdp"


def run(args) -> None:
    from ..surgery.repair import RepairSettings, repair

    if args.init is not None and (args.no_reinit or args.control == "ablate"):
        what = "--no-reinit trains the heads from their current values" if args.no_reinit else \
            "--control ablate zeroes the heads' output columns"
        raise UsageError(f"--init {args.init} chooses how the heads are re-initialised, but {what}: give one of the "
                         f"two")
    settings = RepairSettings(weight_decay=args.weight_decay, warmup=args.warmup, patience=args.patience,
                              init=args.init or RepairSettings.init, seed=args.seed, save_every_steps=args.save_every_steps,
                              checkpointing=not args.no_checkpointing, stochastic_rounding=args.stochastic_rounding,
                              reinit=not args.no_reinit, eval_convention=args.eval_convention,
                              control=args.control, save_every_epochs=args.save_every_epochs,
                              sink_penalty=args.sink_penalty, **_sparsify_options(args), **_training_options(args))
    settings.check()
    if getattr(args, "recipe_warning", None):  # after the settings' own checks: a refusal stays one line
        import sys

        print(args.recipe_warning, file=sys.stderr)
    if args.backend not in ("auto", "triton", "torch"):
        raise UsageError(f"--backend must be auto, triton or torch for repair, got {args.backend!r}")
    from ..diagnosis.report import read_report

    from_report = read_report(args.from_report, "--from-report") if args.from_report else None
    from ..surgery.memory_plan import parse_bytes

    budget = parse_bytes(args.budget) if args.budget else None
    prompts = None
    if args.prompts_file:
        args.prompt = []
        prompts = prompts_from_args(args)
    corpus = corpus_spec(args, args.corpus)
    eval_text = corpus_spec(args, [args.eval_text] if args.eval_text else None, capped=False)
    from ..io.texts import read_texts

    eval_prompts = read_texts(args.eval_prompts, field=args.text_field) if args.eval_prompts else None
    if corpus is None and settings.trains and not (args.dry_run or args.resume):  # up front; a finished run
        # resumes without one, and the arms that do not train need none
        raise UsageError("--corpus is required (files, directories or globs of training text)")
    result = repair(args.model, args.out, corpus=corpus, eval_text=eval_text, eval_prompts=eval_prompts,
                    report=from_report,
                    heads=args.heads, band=args.band, layers=args.layers, freeze=args.freeze, include=args.include,
                    passes=args.passes, settings=settings, device=args.device, dtype=args.dtype,
                    backend=args.backend, prompts=prompts, save_dtype=args.save_dtype, resume=args.resume,
                    overwrite=args.overwrite, dry_run=args.dry_run, progress=not args.quiet, budget=budget,
                    ablation_draws=args.ablation_draws, ablation_texts=args.ablation_texts,
                    ablation_bootstrap=args.ablation_bootstrap, distributed=args.distributed)
    if args.dry_run:
        from ..surgery.plan import Plan

        memory = result.pop("memory")
        print(Plan.from_dict(result).format(memory))
        return
    _print_result(result, Path(args.out))


def _sparsify_options(args) -> dict:
    """The settings ``sparsify`` adds (its objective and constraint); none for ``repair``."""
    if getattr(args, "command", None) != "sparsify":
        return {}
    return dict(objective="sparsify", loss_slack=args.loss_slack, geco_rate=args.geco_rate, train=args.train)


def _training_options(args) -> dict:
    """The options --recipe presets: explicit values, else the recipe's, else RepairSettings' defaults (absent).
    A paper recipe on weights that are not bf16 trains with the master-copy path instead; the warning that says so
    is left in ``args.recipe_warning`` for :func:`run` to print."""
    import torch

    from ..io.loading import dtype_name, parse_device, parse_dtype

    if args.recipe not in (None, "paper"):
        raise UsageError(f"unknown --recipe {args.recipe!r}; the one recipe is 'paper'")
    given = {k: getattr(args, k) for k in PAPER_RECIPE if getattr(args, k) is not None}
    if args.stochastic_rounding and "optimizer_precision" not in given:
        given["optimizer_precision"] = "stochastic"
    if args.recipe != "paper":
        return given
    chosen = {**PAPER_RECIPE, **given}
    weights = parse_dtype(args.dtype, parse_device(args.device))
    if "optimizer_precision" not in given and weights != torch.bfloat16:
        chosen["optimizer_precision"] = "master"
        args.recipe_warning = (
            f"warning: --recipe paper on {dtype_name(weights)} weights: its bf16 optimizer (bf16 moments, every "
            f"update rounded into bf16 weights) needs bfloat16 weights, so the slices train with exact "
            f"{dtype_name(weights)} AdamW instead (--optimizer-precision master); add --dtype bfloat16 to train as "
            f"the paper did")
    return chosen


def _print_result(result: dict, out: Path) -> None:
    """What a finished repair says: its held-out perplexity before and after, and the files it wrote."""
    from ..surgery.functional import format_recovery
    from ..surgery.repair_report import format_ppl

    last = result["passes"][-1] if "passes" in result else result
    if result.get("arm"):  # a run finished before arms were recorded has none
        print(f"arm: {result['arm']}")
    best = next((c for c in last["checkpoints"] if c["checkpoint"] == last["final_checkpoint"]), None)
    if result.get("stopped"):
        print(f"stopped after pass {len(result['passes'])}: {result['stopped']}")
    for key, label in (("eval_ppl", "held-out perplexity"), ("eval_prompts_ppl", "held-out prompts perplexity")):
        before = result.get(f"{key}_before")
        if before is not None:
            print(f"{label}: {format_ppl(before)} before surgery -> {format_ppl(best and best.get(key))} after "
                  f"({last['final_checkpoint'] or 'no training'})")
    if "functional" in last:  # a run finished before functional recovery was measured has none
        for p, entry in enumerate(result.get("passes", [result]), 1):
            print(("" if "passes" not in result else f"pass {p}: ") + format_recovery(entry.get("functional")))
    if result.get("already_complete"):
        print(f"nothing to resume: {out} holds a finished run ({result['final']}, {out / 'report.md'})")
    else:
        print(f"wrote {result['final']} and {out / 'report.md'}")

"""``alibi-surgery paper MODEL --paper-repo DIR --out OUT``: the paper's protocol on a BLOOM, its tables beside ours."""

from __future__ import annotations

__all__ = ["add_parser", "run", "ARGUMENT_NAMES"]

# paper()'s arguments named otherwise here (errors name the Python argument; the CLI prints the option)
ARGUMENT_NAMES = {"pass1": "pass1_heads"}


def _names(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_parser(sub) -> None:
    from ..demo.paper_protocol import ARMS, EXPERIMENTS, PaperOptions

    d = PaperOptions()
    p = sub.add_parser("paper", help="run the paper's experiments on a BLOOM and put its tables beside ours",
                       description="Diagnosis with the paper's text, pass 1 with its head map, pass 2, the band + "
                                   "healthy column, the corpus comparison, each for every arm; then the paper's "
                                   "tables with its numbers beside ours (OUT/paper.md, OUT/paper.json). The paper's "
                                   "texts, maps and settings are read from --paper-repo (parsed, never run). See "
                                   "docs/surgery.md.")
    p.add_argument("model", help="BLOOM model directory or cached hub id (with --dry-run also a shape: bloom-1b7 ...)")
    p.add_argument("--paper-repo", required=True, metavar="DIR",
                   help="a checkout of the paper's repository (or its bare git directory)")
    p.add_argument("--out", required=True, help="output directory (one protocol per OUT; finished runs are reused)")
    p.add_argument("--corpus", nargs="+", metavar="PATH", help="training text of the passes (files, globs, datasets)")
    p.add_argument("--c4", nargs="+", metavar="PATH", help="the corpus of the comparison run (e.g. a local C4 "
                                                          "validation split); without it that experiment is skipped")
    p.add_argument("--text-field", default=d.text_field, help="the documents' column in dataset corpora")
    p.add_argument("--split", help="the split of a dataset corpus with several")
    p.add_argument("--arms", default=",".join(d.arms), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--experiments", default=",".join(d.experiments), help=f"comma-separated, of "
                                                                          f"{', '.join(EXPERIMENTS)}")
    p.add_argument("--pass1-heads", default=d.pass1, metavar="paper|auto",
                   help="paper: the paper's pass-1 map; auto: this model's collapse band (another shape)")
    p.add_argument("--column", type=int, default=d.column, help="the healthy column added to the band (the paper's H5)")
    p.add_argument("--column-save-every-steps", type=int, default=d.column_save_every_steps,
                   help="checkpoint spacing of the band + column run (the paper's sub-epoch sweep)")
    t = p.add_argument_group("training (default: the paper's, read from --paper-repo)")
    for flag, kind in (("--epochs", int), ("--seq-len", int), ("--batch-size", int), ("--grad-accum", int),
                       ("--lr", float)):
        t.add_argument(flag, type=kind)
    p.add_argument("--dtype", default=d.dtype, help="float32, bfloat16 (the paper's; its bf16 optimizer) or float16")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--backend", default=d.backend, help="auto, triton or torch")
    p.add_argument("--dry-run", action="store_true", help="print the plan, predicted memory and time; write nothing")
    p.add_argument("--corpus-tokens", type=int, default=d.corpus_tokens,
                   help="--dry-run: tokens of the corpus assumed for steps and time (the paper's C4: ~541K)")
    p.add_argument("--ablation-draws", type=int, default=d.ablation_draws, metavar="R",
                   help="functional recovery's noise-floor draws per target in every run (repair's; 0: not measured)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> None:
    from ..demo.paper_protocol import PaperOptions, paper

    options = PaperOptions(corpus=args.corpus, c4=args.c4, arms=_names(args.arms),
                           experiments=_names(args.experiments), pass1=args.pass1_heads, column=args.column,
                           column_save_every_steps=args.column_save_every_steps, epochs=args.epochs,
                           seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                           dtype=args.dtype, device=args.device, backend=args.backend, text_field=args.text_field,
                           split=args.split, corpus_tokens=args.corpus_tokens, progress=not args.quiet,
                           ablation_draws=args.ablation_draws)
    result = paper(args.model, args.paper_repo, args.out, options, dry_run=args.dry_run)
    if args.dry_run:
        print(result["text"])
        return
    print(f"wrote {args.out}/paper.md and {args.out}/paper.json ({len(result['runs'])} runs)")

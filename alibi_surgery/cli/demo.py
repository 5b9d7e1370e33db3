"""``alibi-surgery demo``: the whole job on the embedded demo model (:func:`alibi_surgery.demo.run_demo`)."""

from __future__ import annotations

from ..errors import UsageError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    from ..demo import DEMO_ABLATION, DEMO_SETTINGS

    p = sub.add_parser("demo", help="the whole job on the embedded demo model (offline, a few CPU minutes)",
                       description="Diagnose the shipped tiny BLOOM (learned first-token collapse), repair its "
                                   "collapsed heads on a generated corpus, re-diagnose and compare.")
    p.add_argument("--out", default="alibi-surgery-demo", help="output directory (default ./alibi-surgery-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--epochs", type=int, help=f"surgery epochs (default {DEMO_SETTINGS['epochs']})")
    p.add_argument("--ablation-draws", type=int, metavar="R",
                   help=f"functional recovery's noise-floor draws per target head (default "
                        f"{DEMO_ABLATION['ablation_draws']}; 0: not measured)")
    p.add_argument("--ablation-texts", type=int, metavar="N",
                   help=f"held-out documents it scores (default {DEMO_ABLATION['ablation_texts']})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> None:
    from ..demo import run_demo

    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    for flag, value, least in (("--ablation-draws", args.ablation_draws, 0),
                               ("--ablation-texts", args.ablation_texts, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    ablation = {k: v for k, v in (("ablation_draws", args.ablation_draws), ("ablation_texts", args.ablation_texts))
                if v is not None}
    run_demo(args.out, overwrite=args.overwrite, epochs=args.epochs, progress=not args.quiet, ablation=ablation)

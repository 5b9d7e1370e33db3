"""``alibi-surgery demo``: the whole job on the embedded demo model (:func:`alibi_surgery.demo.run_demo`)."""

from __future__ import annotations

from ..errors import UsageError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    from ..demo import DEMO_SETTINGS

    p = sub.add_parser("demo", help="the whole job on the embedded demo model (offline, a few CPU minutes)",
                       description="Diagnose the shipped tiny BLOOM (learned first-token collapse), repair its "
                                   "collapsed heads on a generated corpus, re-diagnose and compare.")
    p.add_argument("--out", default="alibi-surgery-demo", help="output directory (default ./alibi-surgery-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--epochs", type=int, help=f"surgery epochs (default {DEMO_SETTINGS['epochs']})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> None:
    from ..demo import run_demo

    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    run_demo(args.out, overwrite=args.overwrite, epochs=args.epochs, progress=not args.quiet)

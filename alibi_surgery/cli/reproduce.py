"""The reproduction's command line: ``python -m alibi_surgery.demo.reproduce OUT [...]`` (docs/reproduction.md). A
developer's tool, not an ``alibi-surgery`` command; the work is :func:`alibi_surgery.demo.reproduce.reproduce`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from ..demo import reproduce

    p = argparse.ArgumentParser(description=reproduce.__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--testbed", action="append", metavar="NAME=DIR",
                   help="a testbed, repeatable (default: A=the demo model)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="parallel runs, one thread each")
    p.add_argument("--docs", type=int, nargs=2, default=(512, 64), metavar=("TRAIN", "HELD_OUT"))
    p.add_argument("--seq-len", type=int, default=128, help="surgery document length (at most the context)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--save-every", type=int, default=32, help="optimizer steps between checkpoints")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ablation-draws", type=int, default=10, help="noise-floor draws per head")
    p.add_argument("--ablation-texts", type=int, default=32, help="held-out documents the ablation scores")
    p.add_argument("--ablation-bootstrap", type=int, default=1000, help="bootstrap resamples over those texts")
    p.add_argument("--skip", action="append", default=[], metavar="KIND",
                   choices=[k for k in reproduce.KINDS if k != "treatment"],
                   help="leave out one kind of run (repeatable); its claim is reported as not run")
    p.add_argument("--docs-dir", help="also write reproduction.md and its figures (img/) there")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    from ..demo.reproduce import KINDS, reproduce
    from ..errors import UsageError
    from .console import flag_wording, setup_console

    parser = build_parser()
    a = parser.parse_args(argv)
    setup_console()
    try:
        r = reproduce(a.out, testbeds=a.testbed, seeds=a.seeds, workers=a.workers, docs=tuple(a.docs), epochs=a.epochs,
                      save_every=a.save_every, batch_size=a.batch_size, lr=a.lr, seq_len=a.seq_len,
                      ablation={"draws": a.ablation_draws, "texts": a.ablation_texts,
                                "bootstrap": a.ablation_bootstrap},
                      kinds=tuple(k for k in KINDS if k not in a.skip), docs_dir=a.docs_dir, progress=not a.quiet)
    except UsageError as exc:
        print(f"error: {flag_wording(str(exc), parser)}", file=sys.stderr)
        return 2
    print(f"wrote {Path(a.out) / 'reproduction.md'} ({r['wall_seconds'] / 60:.1f} min)")
    return 0

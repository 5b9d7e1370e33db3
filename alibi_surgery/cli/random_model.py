"""``alibi-surgery random-model DIR``: write a random-weight model directory (for trying things out)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    from ..io.random_model import SHAPES

    p = sub.add_parser("random-model",
                       help="write a random-weight model directory of a named shape (for trying things out)")
    p.add_argument("out", help="directory to create (must be new or empty)")
    p.add_argument("--shape", default="tiny", choices=list(SHAPES))
    p.add_argument("--layers", type=int, help="fewer layers than the shape has")
    p.add_argument("--vocab", type=int, help="smaller vocabulary than 250,880")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exist-ok", action="store_true", help="keep DIR if it already holds a model")


def run(args) -> None:
    from ..io.lock import DirLock
    from ..io.random_model import SHAPES, write_random_model

    out = Path(args.out)
    if args.exist_ok and (out / "config.json").is_file():
        from ..io.loading import resolve_model_dir

        resolve_model_dir(args.out)  # it must really be a safetensors model directory of a known family
        print(f"keeping the model already in {args.out}")
        return
    _check_new_dir(out)
    with DirLock(out, what="random-model"):
        write_random_model(out, args.shape, n_layer=args.layers, vocab_size=args.vocab, seed=args.seed)
    print(f"wrote a random-weight {SHAPES[args.shape][0]} model ({args.shape}) to {out}")


def _check_new_dir(out: Path) -> None:
    """A directory about to be created or filled: not a file, not under a file, and writable."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    parent = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir():
        raise UsageError(f"{out} is not writable: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{out} is not writable: no write permission on {parent}")

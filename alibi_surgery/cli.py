"""The ``alibi-surgery`` command line.

    alibi-surgery diagnose MODEL [--prompt TEXT ...] [--prompts-file F] [--json OUT] [--csv OUT] [--heatmap PNG]
    alibi-surgery random-model DIR [--shape tiny|bloom-560m|...] [--layers N] [--vocab N]

Every bad input ends with a one-line ``error: ...`` on stderr and exit status 2, before anything is written
(``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UsageError

__all__ = ["main", "build_parser"]


def _add_diagnose(sub) -> None:
    p = sub.add_parser("diagnose", help="classify every attention head of a BLOOM model",
                       description="Per-head first-token mass and entropy over a prompt set, with the paper's "
                                   "classes (dead, bos-sink, low-entropy, healthy).")
    p.add_argument("model", help="local Hugging Face model directory (config, safetensors, tokenizer) or cached hub id")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="a file with one prompt per line")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--csv", metavar="OUT", help="write one row per head as CSV")
    p.add_argument("--heatmap", metavar="OUT.png", help="write a layer x head heatmap of first-token mass")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backend", default="auto", help="auto, triton, torch or eager (default: auto)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="truncate prompts to this many tokens")
    p.add_argument("--exclude-first-query", action="store_true",
                   help="leave query row 0 (whose first-token mass is always 1) out of the averages")
    p.add_argument("--normalize-entropy", action="store_true", help="divide each row's entropy by ln(visible keys)")
    p.add_argument("--dead-threshold", type=float, default=0.95, help="bos_mass above this is dead (0.95)")
    p.add_argument("--sink-threshold", type=float, default=0.50, help="bos_mass above this is a bos-sink (0.50)")
    p.add_argument("--low-entropy-threshold", type=float, default=0.50,
                   help="entropy below this is low-entropy (0.50)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_random_model(sub) -> None:
    from .random_model import SHAPES

    p = sub.add_parser("random-model", help="write a random-weight BLOOM model directory (for trying things out)")
    p.add_argument("out", help="directory to create (must be new or empty)")
    p.add_argument("--shape", default="tiny", choices=list(SHAPES))
    p.add_argument("--layers", type=int, help="fewer layers than the shape has")
    p.add_argument("--vocab", type=int, help="smaller vocabulary than 250,880")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exist-ok", action="store_true", help="keep DIR if it already holds a BLOOM model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alibi-surgery", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_diagnose(sub)
    _add_random_model(sub)
    return parser


def _read_prompts(args) -> list[str]:
    from .prompts import DEFAULT_PROMPTS

    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts file does not exist: {path}")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise UsageError(f"prompts file is empty: {path}")
        prompts += lines
    for i, p in enumerate(prompts):
        if not p.strip():
            raise UsageError(f"prompt {i} is empty")
    return prompts or list(DEFAULT_PROMPTS)


def _cmd_diagnose(args) -> None:
    from .backends import check_backend
    from .diagnose import diagnose
    from .io_utils import check_output_path
    from .loading import load_bloom
    from .report import Thresholds

    outputs = {k: check_output_path(v, overwrite=args.overwrite, what=f"--{k}")
               for k, v in (("json", args.json), ("csv", args.csv), ("heatmap", args.heatmap)) if v}
    check_backend(args.backend)
    try:
        thresholds = Thresholds(args.dead_threshold, args.sink_threshold, args.low_entropy_threshold)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    prompts = _read_prompts(args)
    model, tokenizer = load_bloom(args.model, dtype=args.dtype, device=args.device)
    report = diagnose(model, tokenizer, prompts, batch_size=args.batch_size, max_length=args.max_length,
                      backend=args.backend, exclude_first_query=args.exclude_first_query,
                      normalize_entropy=args.normalize_entropy, thresholds=thresholds, progress=not args.quiet)
    print(report.format_summary())
    if "json" in outputs:
        report.to_json(outputs["json"])
    if "csv" in outputs:
        report.to_csv(outputs["csv"])
    if "heatmap" in outputs:
        from .heatmap import save_heatmap

        save_heatmap(report, outputs["heatmap"])
    for path in outputs.values():
        print(f"wrote {path}")


def _cmd_random_model(args) -> None:
    from .random_model import write_random_bloom

    if args.exist_ok and (Path(args.out) / "config.json").is_file():
        from .loading import resolve_model_dir

        resolve_model_dir(args.out)  # it must really be a BLOOM safetensors directory
        print(f"keeping the model already in {args.out}")
        return
    out = write_random_bloom(args.out, args.shape, n_layer=args.layers, vocab_size=args.vocab, seed=args.seed)
    print(f"wrote a random {args.shape} BLOOM to {out}")


def _quiet_transformers() -> None:
    """Our own progress bar and one-line errors only: no transformers warnings or loading bars on the terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    commands = {"diagnose": _cmd_diagnose, "random-model": _cmd_random_model}
    try:
        commands[args.command](args)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``alibi-surgery ablate MODEL --heads SPEC (--prompts-file F | --text F)``: each head's ablation effect on held-out
texts against its noise floor, one table (and ``--json``). The work is :mod:`alibi_surgery.analysis.ablation`'s; the
rule is in docs/metrics.md ("Functional recovery")."""

from __future__ import annotations

import json

from ..errors import UsageError
from .options import TEXT_FIELD_HELP, add_model_options, add_output_options, add_texts_file_option

__all__ = ["add_parser", "run"]

_DESCRIPTION = ("For each head of --heads: its output norm and the increase of held-out loss (mean next-token NLL, "
                "nats, each text scored alone) when its output is removed: zero-ablation (its slice of the output "
                "projection's input set to 0) and mean-ablation (set to its mean over the texts' scored tokens); "
                "the noise floor (95th percentile over --floor-draws seeded draws of the increase when the same "
                "write, rotated into a random direction, is removed instead); a paired bootstrap 95% interval over "
                "texts (--bootstrap resamples, 0 skips). A head does work when the mean-ablation effect's lower "
                "bound (its point estimate with --bootstrap 0) exceeds its floor.")


def add_parser(sub) -> None:
    from ..analysis.ablation import DEFAULT_BOOTSTRAP, DEFAULT_FLOOR_DRAWS

    p = sub.add_parser("ablate", description=_DESCRIPTION,
                       help="each head's ablation effect on held-out texts, against a noise floor")
    p.add_argument("model", metavar="MODEL", help="a model directory (or a cached hub id)")
    p.add_argument("--heads", required=True, metavar="SPEC", help="heads to ablate, e.g. '2:12-15;3:*' or '*:*'")
    add_texts_file_option(p, "--prompts-file", "held-out texts, each scored alone")
    p.add_argument("--text", metavar="FILE", help="held-out documents: a .jsonl/.json of documents, or any other file "
                                                  "as one text")
    p.add_argument("--text-field", default="text", metavar="NAME", help=TEXT_FIELD_HELP)
    p.add_argument("--mode", default="both", help="zero, mean or both (default: both)")
    p.add_argument("--floor-draws", type=int, default=DEFAULT_FLOOR_DRAWS, metavar="N",
                   help="random-direction draws for the noise floor")
    p.add_argument("--seed", type=int, default=0, help="seed of the floor's draws and of the bootstrap")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, metavar="N",
                   help="bootstrap resamples over texts (0 skips the interval)")
    p.add_argument("--max-length", type=int, metavar="N", help="truncate each text to N tokens")
    p.add_argument("--rows-per-pass", type=int, default=64, metavar="N",
                   help="variant rows per forward pass through the blocks above a head's layer (memory)")
    add_output_options(p, json=("OUT", "write every head's figures as JSON"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    add_model_options(p, backends="auto, triton or torch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _check(args) -> None:
    """Every cheap check, before the model is loaded."""
    from ..analysis.ablation import check_mode
    from ..attention.backends import check_backend
    from ..diagnosis.selection import parse_spec
    from ..io.loading import parse_device, parse_dtype, resolve_model_dir

    if (args.prompts_file is None) == (args.text is None):
        raise UsageError("give exactly one of --prompts-file (texts scored alone) and --text (a documents file)")
    check_mode(args.mode)
    for option, value, low in (("--floor-draws", args.floor_draws, 1), ("--bootstrap", args.bootstrap, 0),
                               ("--seed", args.seed, 0), ("--rows-per-pass", args.rows_per_pass, 2)):
        if value < low:
            raise UsageError(f"{option} {value}: must be a whole number >= {low}")
    if args.max_length is not None and args.max_length < 2:
        raise UsageError(f"--max-length {args.max_length}: must be at least 2 (a text of 1 token predicts nothing)")
    try:
        parse_spec(args.heads)
    except UsageError as exc:
        raise UsageError(f"--heads {args.heads}: {exc}") from None
    check_backend(args.backend)
    if args.backend == "eager":
        raise UsageError("--backend eager: ablation runs the blocks one at a time and needs a fused backend "
                         "(auto, torch or triton)")
    parse_dtype(args.dtype, parse_device(args.device))
    resolve_model_dir(args.model)


def run(args) -> None:
    from ..analysis.ablation import ablate_heads
    from ..io.corpus import read_documents
    from ..io.texts import read_texts
    from ..io.files import atomic_write_text, check_output_paths
    from ..io.loading import load_model

    _check(args)
    inputs = {"--prompts-file": args.prompts_file, "--text": args.text}
    outputs = check_output_paths({"json": args.json}, overwrite=args.overwrite, inputs=inputs)
    if args.prompts_file:
        texts = read_texts(args.prompts_file, field=args.text_field)
        where = texts.origin
    else:
        texts = [t for t in read_documents(args.text, what="--text", field=args.text_field) if t.strip()]
        where = lambda i: f"{args.text} text {i + 1}"  # noqa: E731
        if not texts:
            raise UsageError(f"--text {args.text}: holds no text")
    net, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    result = ablate_heads(net, texts, args.heads, tokenizer=tokenizer, max_length=args.max_length, mode=args.mode,
                          floor_draws=args.floor_draws, seed=args.seed, bootstrap=args.bootstrap,
                          backend=args.backend, rows_per_pass=args.rows_per_pass, progress=not args.quiet,
                          name=where)
    result.model = args.model
    if "json" in outputs:  # files first, then the terminal: a closed pipe can never cost a file
        report = {"source": args.prompts_file or args.text, "max_length": args.max_length, **result.to_dict()}
        atomic_write_text(outputs["json"], json.dumps(report, indent=1) + "\n")
    print(f"ablation of {args.model}: {result.format_summary()}")
    print(result.format_table())
    for path in outputs.values():
        print(f"wrote {path}")

"""``alibi-surgery perplexity MODEL... (--prompts-file FILE | --text FILE)``: perplexity of one or more models, one
table. The work is :mod:`alibi_surgery.analysis.perplexity`'s."""

from __future__ import annotations

import json

from ..errors import UsageError
from .options import TEXT_FIELD_HELP, add_model_options, add_output_options, add_texts_file_option

__all__ = ["add_parser", "run"]


_DESCRIPTION = ("With --prompts-file, every text (a line of a .txt file; a JSON line's --text-field of a .jsonl file; an item of "
                "a .json list, texts with newlines whole) is scored alone (no padding, truncated only at --max-length) "
                "and combined by --convention: 'tokens' is exp(sum NLL / sum (T_i - 1)), the per-token figure; "
                "'paper' is exp(sum loss_i T_i / sum T_i), the paper's (loss_i the mean next-token loss of text i, "
                "T_i its token count). A blank line, or a text of fewer than 2 tokens, is refused. With --text, "
                "repair's held-out figure: the file packed into --seq-len rows (both conventions agree there). "
                "Every figure also comes without special tokens (</s>, <s>, pad, unk as predicted targets left out; "
                "as context kept), with a seeded bootstrap 95% interval over texts (packed rows with --text); "
                "with several models, the paired interval of each one's perplexity over the first's, and a warning "
                "when one token id carries more than 25% of the change of summed loss (its absolute change over every "
                "id's).")


def add_parser(sub) -> None:
    p = sub.add_parser("perplexity", description=_DESCRIPTION,
                       help="perplexity of one or more models over a prompts file (each text alone) or a packed text")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model directories (or cached hub ids)")
    add_texts_file_option(p, "--prompts-file", "the texts, each scored alone")
    p.add_argument("--text", metavar="FILE", help="a text file (or .jsonl/.json of documents) packed into rows")
    p.add_argument("--text-field", default="text", metavar="NAME", help=TEXT_FIELD_HELP)
    p.add_argument("--convention", default="tokens", help="tokens or paper (default: tokens)")
    p.add_argument("--max-length", type=int, metavar="N", help="truncate each prompt to N tokens (--prompts-file)")
    p.add_argument("--seq-len", type=int, metavar="T", help="tokens per packed row (--text; default: repair's, 512)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="packed rows per forward pass (--text; default: repair's, 1)")
    add_output_options(p, json=("OUT", "write every model's figures as JSON"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--breakdown", action="store_true",
                   help="also a per-token-class table: each special token, letters, digits, whitespace, "
                        "punctuation, partial-bytes, other (tokens, summed loss, mean loss, share)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples over texts for the 95%% intervals (default 1000; 0 skips them)")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default 0)")
    add_model_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _check(args) -> None:
    """Every cheap check, before any model is loaded."""
    from ..analysis.perplexity import check_bootstrap, check_convention
    from ..attention.backends import check_backend
    from ..io.loading import parse_device, parse_dtype, resolve_model_dir

    if (args.prompts_file is None) == (args.text is None):
        raise UsageError("give exactly one of --prompts-file (each line scored alone) and --text (packed rows)")
    check_convention(args.convention)
    check_bootstrap(args.bootstrap, args.seed)
    source, other = ("--prompts-file", "--text") if args.prompts_file else ("--text", "--prompts-file")
    for option, value, only in (("--max-length", args.max_length, "--prompts-file"),
                                ("--seq-len", args.seq_len, "--text"), ("--batch-size", args.batch_size, "--text")):
        if value is not None and only != source:
            raise UsageError(f"{option} applies to {only} only, not to {source}")
    if args.seq_len is not None and args.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_backend(args.backend)
    parse_dtype(args.dtype, parse_device(args.device))
    for model in args.models:  # every path checked before the first (possibly long) load
        resolve_model_dir(model)


def _measure(args, model: str, texts):
    from ..analysis.perplexity import packed_perplexity, prompt_perplexity
    from ..io.corpus import pack_text
    from ..io.loading import load_model

    net, tokenizer = load_model(model, dtype=args.dtype, device=args.device)
    stats = dict(bootstrap=args.bootstrap, seed=args.seed, breakdown=args.breakdown, backend=args.backend,
                 convention=args.convention)
    if args.prompts_file:
        result = prompt_perplexity(net, tokenizer, texts, max_length=args.max_length, progress=not args.quiet,
                                   name=texts.origin, **stats)
    else:
        chunks = pack_text(texts, tokenizer, args.seq_len, what="--text")
        result = packed_perplexity(net, chunks, batch_size=args.batch_size, tokenizer=tokenizer,
                                   progress=not args.quiet, **stats)
    result.model = model
    return result, tokenizer


def _columns(header, rows) -> str:
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]
    return "\n".join("  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))])
                     for row in [header, *rows])


def _ci(interval) -> str:
    return "-" if interval is None else f"{interval[0]:.4f}-{interval[1]:.4f}"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _table(results, packed: bool) -> str:
    unit = "chunks" if packed else "prompts"
    rows = [(r.model, f"{r.perplexity:.4f}", _ci(r.interval), _num(r.without_specials),
             _ci(r.interval_without_specials), str(r.chunks if packed else len(r.texts)), str(r.tokens))
            for r in results]
    return _columns(("model", "perplexity", "95% CI", "w/o specials", "95% CI", unit, "tokens"), rows)


def _ratios(comparisons) -> str:
    rows = [(c["model"], f"{c['ratio']:.4f}", _ci(c["interval"]), _num(c["ratio_without_specials"]),
             _ci(c["interval_without_specials"])) for c in comparisons]
    return _columns(("model / " + comparisons[0]["base"], "ratio", "95% CI", "w/o specials", "95% CI"), rows)


def _breakdown(result) -> str:
    rows = [(c.name, str(c.tokens), f"{c.loss:.2f}", f"{c.mean:.4f}", f"{c.share:.1%}") for c in result.breakdown]
    return _columns(("class", "tokens", "loss (nats)", "mean loss", "share"), rows)


def run(args) -> None:
    from ..analysis.perplexity import read_texts
    from ..io.corpus import read_documents
    from ..io.files import atomic_write_text, check_output_paths

    _check(args)
    if args.text:  # repair's defaults, so that the figure is the one repair --eval-text reports
        from ..surgery.repair import RepairSettings

        defaults = RepairSettings()
        args.seq_len, args.batch_size = args.seq_len or defaults.seq_len, args.batch_size or defaults.batch_size
    inputs = {"--prompts-file": args.prompts_file, "--text": args.text}
    outputs = check_output_paths({"json": args.json}, overwrite=args.overwrite, inputs=inputs)
    texts = read_texts(args.prompts_file, field=args.text_field) if args.prompts_file else \
        read_documents(args.text, what="--text", field=args.text_field)
    from ..analysis.perplexity import compare_perplexities

    measured = [_measure(args, model, texts) for model in args.models]
    results = [r for r, _ in measured]
    comparisons = compare_perplexities(results, tokenizer=measured[0][1], bootstrap=args.bootstrap, seed=args.seed)
    if "json" in outputs:  # files first, then the terminal: a closed pipe can never cost a file
        report = {"convention": args.convention, "bootstrap": args.bootstrap, "seed": args.seed, "level": 0.95}
        if args.text:
            report.update(text=args.text, seq_len=args.seq_len, batch_size=args.batch_size)
        else:
            report.update(prompts_file=args.prompts_file, max_length=args.max_length)
        report["models"] = [r.to_dict() for r in results]
        report["comparisons"] = comparisons
        atomic_write_text(outputs["json"], json.dumps(report, indent=1) + "\n")
    print(f"perplexity ({'packed --text' if args.text else args.convention + ' convention'}; w/o specials: "
          f"{', '.join(results[0].specials.values()) or 'none'} left out as predicted tokens)")
    print(_table(results, packed=bool(args.text)))
    if comparisons:
        print(_ratios(comparisons))
    for result in results if args.breakdown else []:
        print(f"breakdown of {result.model}")
        print(_breakdown(result))
    for path in outputs.values():
        print(f"wrote {path}")

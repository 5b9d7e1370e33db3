"""``alibi-surgery diagnose MODEL``: classify every attention head of one model; :func:`diagnose_each` is shared with
``family``. Under ``torchrun`` the prompt batches are split over the ranks (:mod:`alibi_surgery.distributed`) and
rank 0 writes and prints."""

from __future__ import annotations

import sys

from ..errors import UsageError
from .options import add_diagnosis_options, add_healthy_option, add_output_options, prompts_from_args

__all__ = ["add_parser", "run", "diagnose_each", "DISTRIBUTED"]

DISTRIBUTED = True  # runs under torchrun: each rank diagnoses its share of the prompts


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="classify every attention head of an ALiBi model (BLOOM, MPT, Falcon-RW...)",
                       description="Per-head first-token mass and entropy over a prompt set, with the paper's "
                                   "classes (dead, bos-sink, low-entropy, healthy).")
    p.add_argument("model", help="local Hugging Face model directory (config, safetensors, tokenizer) or cached hub id")
    add_output_options(p, json=("OUT", "write the report as JSON"), csv=("OUT", "write one row per head as CSV"),
                       heatmap=("OUT.png", "write a layer x head heatmap of first-token mass, and beside it "
                                           "OUT.extremes.png: value_ratio, output_norm (dormant heads) and "
                                           "residual_peak"),
                       histogram=("OUT.png", "write the distribution of first-token mass with the class thresholds"))
    add_diagnosis_options(p)
    add_healthy_option(p)
    p.add_argument("--sinks", type=int, metavar="N",
                   help="also list, per head, the N positions (and tokens) that draw the most attention by Gu et "
                        "al.'s per-position score, each prompt run alone (docs/metrics.md); in the JSON as key_sinks")


def diagnose_each(args, models: list[str]) -> list:
    """Check the shared diagnosis options, then diagnose each model (streamed when asked or when it won't fit)."""
    from ..attention.backends import check_backend
    from ..io.loading import parse_device, parse_dtype, resolve_model_dir
    from ..diagnosis.report import Thresholds
    from ..diagnosis.stream import diagnose_path
    from ..diagnosis.dormancy import check_threshold
    from ..diagnosis.extremes import check_dormant_fraction
    from ..diagnosis.sinks import check_sink_epsilon
    from ..distributed import is_main, rank_device

    check_backend(args.backend)
    check_threshold(args.dormancy_threshold)
    check_dormant_fraction(args.dormant_fraction)
    check_sink_epsilon(args.sink_epsilon)
    try:
        thresholds = Thresholds(args.dead_threshold, args.sink_threshold, args.low_entropy_threshold)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    prompts = prompts_from_args(args)
    for model in models:  # every path checked before the first (possibly long) diagnosis
        resolve_model_dir(model)
    options = dict(batch_size=args.batch_size, max_length=args.max_length, backend=args.backend,
                   exclude_first_query=args.exclude_first_query, normalize_entropy=args.normalize_entropy,
                   thresholds=thresholds, progress=not args.quiet, dormancy_threshold=args.dormancy_threshold,
                   dormant_fraction=args.dormant_fraction, sink_epsilon=args.sink_epsilon)
    device = rank_device(parse_device(args.device))  # cuda: this rank's own GPU under torchrun
    return [diagnose_path(m, prompts, device=device, dtype=parse_dtype(args.dtype, device), stream=args.stream,
                          announce=lambda msg: is_main() and print(msg, file=sys.stderr), **options) for m in models]


def run(args) -> None:
    from ..diagnosis.healthy import check_healthy_definition
    from ..distributed import is_main
    from ..io.files import check_output_paths
    from ..viz.extremes import companion_path

    healthy = check_healthy_definition(args.healthy)

    extremes = companion_path(args.heatmap) if args.heatmap else None  # the extreme-token figure beside it
    outputs = check_output_paths({"json": args.json, "csv": args.csv, "heatmap": args.heatmap,
                                  "heatmap (extremes)": extremes, "histogram": args.histogram},
                                 overwrite=args.overwrite, figures=("heatmap", "heatmap (extremes)", "histogram"))
    _check_sinks(args)
    report = diagnose_each(args, [args.model])[0]
    if not is_main():  # rank 0 writes and prints the report every rank holds
        return
    sinks = _key_sinks(args) if args.sinks else None
    if sinks is not None:
        report.metadata["key_sinks"] = sinks.to_dict(args.sinks)
    if "json" in outputs:  # files first, then the terminal: a closed pipe can never cost a file
        report.to_json(outputs["json"], healthy=healthy)
    if "csv" in outputs:
        report.to_csv(outputs["csv"])
    if "heatmap" in outputs:
        from ..viz.heatmap import save_heatmap

        save_heatmap(report, outputs["heatmap"])
    if "heatmap (extremes)" in outputs:
        from ..viz.extremes import save_extremes

        save_extremes(report, outputs["heatmap (extremes)"])
    if "histogram" in outputs:
        from ..viz.histogram import save_histogram

        save_histogram(report, outputs["histogram"])
    print(report.format_summary(healthy))
    if sinks is not None:
        print(sinks.format(args.sinks))
    for path in outputs.values():
        print(f"wrote {path}")


def _check_sinks(args) -> None:
    """``--sinks N``: N >= 1, in one process, on a model held in memory (not ``--stream``), fused backends."""
    from ..distributed import world

    if args.sinks is None:
        return
    if args.sinks < 1:
        raise UsageError(f"--sinks {args.sinks}: must be >= 1")
    if args.stream:
        raise UsageError("--sinks needs the model in memory; it cannot be combined with --stream")
    if world()[1] > 1:
        raise UsageError("--sinks runs in one process, not under torchrun")
    if args.backend == "eager":
        raise UsageError("--sinks comes from the fused kernels: use --backend auto, triton or torch")


def _key_sinks(args):
    """The per-position sink scores of ``--sinks`` (:func:`~alibi_surgery.diagnosis.key_sinks.key_sinks`)."""
    from ..diagnosis.key_sinks import key_sinks
    from ..io.loading import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    return key_sinks(model, tokenizer, prompts_from_args(args), backend=args.backend, max_length=args.max_length,
                     epsilon=args.sink_epsilon, progress=not args.quiet)

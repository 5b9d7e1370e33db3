"""``alibi-surgery family DIR...``: diagnose several models of one family; the cross-scale table, a multi-panel
heatmap and JSON. Under ``torchrun`` each model's prompt batches are split over the ranks and rank 0 writes and
prints."""

from __future__ import annotations

from .diagnose import diagnose_each
from .options import add_diagnosis_options, add_output_options

__all__ = ["add_parser", "run", "DISTRIBUTED"]

DISTRIBUTED = True  # runs under torchrun (see diagnose_each)


def add_parser(sub) -> None:
    p = sub.add_parser("family",
                       help="diagnose several models of a family: cross-scale table, multi-panel heatmap, JSON",
                       description="The paper's Table 1 and Figure 2: per model, parameters, layers x heads, "
                                   "collapsed share, collapse band and per-index collapse rate.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model directories (or cached hub ids)")
    add_output_options(p, json=("OUT", "write every model's figures and report as JSON"),
                       heatmap=("OUT.png", "write one heatmap panel per model"),
                       markdown=("OUT.md", "write the table as Markdown"))
    add_diagnosis_options(p)


def run(args) -> None:
    from ..analysis.scale_table import family_entry, family_table, save_family_heatmap, save_family_json
    from ..distributed import is_main
    from ..io.files import atomic_write_text, check_output_paths

    outputs = check_output_paths({"json": args.json, "heatmap": args.heatmap, "markdown": args.markdown},
                                 overwrite=args.overwrite)
    reports = diagnose_each(args, args.models)
    if not is_main():
        return
    entries = [family_entry(m, r) for m, r in zip(args.models, reports)]
    table = family_table(entries)
    if "json" in outputs:  # files first, then the terminal: a closed pipe can never cost a file
        save_family_json(entries, outputs["json"])
    if "heatmap" in outputs:
        save_family_heatmap(entries, outputs["heatmap"])
    if "markdown" in outputs:
        atomic_write_text(outputs["markdown"], table + "\n")
    print(table)
    for path in outputs.values():
        print(f"wrote {path}")

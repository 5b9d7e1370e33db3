"""``alibi-surgery compare A B``: per-head change between two diagnoses (before/after surgery): recovered,
iatrogenic, drift; ``compare STOCK A B ... --panels OUT.png``: one delta panel per condition. The work is
:func:`alibi_surgery.analysis.compare.run_compare`'s."""

from __future__ import annotations

from .options import add_healthy_option, add_model_options, add_output_options, add_prompt_options

__all__ = ["add_parser", "run", "ARGUMENT_NAMES"]

# Python arguments named otherwise here (errors name the Python argument; the CLI prints the option)
ARGUMENT_NAMES = {"scale": "panel_scale"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare two diagnoses (before/after surgery), or several conditions with one stock model "
                        "(--panels)",
        description="Per-head change in first-token mass between two diagnoses, with the heads surgery recovered, "
                    "the ones still sick, the non-targets it made sick, and drift (|delta| > threshold) per zone: "
                    "targets, in-band (the zone minus the targets) and outside. A and B are diagnosis JSON files "
                    "(diagnose --json) or model directories, diagnosed here like diagnose does. With --panels, A is "
                    "the stock model and B, C, ... conditions, each drawn as a delta panel against A.")
    p.add_argument("a", metavar="A", help="before (with --panels: the stock model): a diagnosis .json or a model "
                                          "directory")
    p.add_argument("b", metavar="B", nargs="?", help="after: a diagnosis .json or a model directory")
    p.add_argument("more", metavar="C", nargs="*",
                   help="with --panels, more conditions compared with A (each a diagnosis .json or a model directory)")
    p.add_argument("--targets", action="append", metavar="SPEC",
                   help="heads re-initialised by surgery: LAYERS:HEADS such as 5-22:9-15 (';'-separated groups, "
                        "'*' for all, repeatable) or a JSON file {layer: [heads]}")
    p.add_argument("--zone", action="append", metavar="SPEC",
                   help="the collapse band, same syntax; its non-target heads count as in-band")
    p.add_argument("--plan", metavar="PLAN.json",
                   help="take --targets (its selection) and --zone from a surgery plan file; explicit --targets / "
                        "--zone win")
    p.add_argument("--drift-threshold", type=float, default=0.05, metavar="T",
                   help="|delta bos_mass| above this counts as drift (0.05)")
    add_output_options(p, json=("OUT", "write the comparison as JSON"),
                       heatmap=("OUT.png", "write a layer x head heatmap of delta first-token mass"))
    p.add_argument("--panels", metavar="OUT.png",
                   help="write one delta panel per condition (B, C, ...) against A on one fixed colour scale, heads "
                        "over --annotate-threshold labelled, a statistics box per panel")
    p.add_argument("--panel-scale", type=float, default=0.4, metavar="S",
                   help="the panels' colour scale runs from -S to +S (0.4)")
    p.add_argument("--annotate-threshold", type=float, default=0.15, metavar="T",
                   help="label heads whose |delta| exceeds this on the panels (0.15)")
    p.add_argument("--table", action="store_true", help="print the per-head table, largest |delta| first")
    p.add_argument("--table-rows", type=int, default=30, metavar="N",
                   help="rows of the --table output (default 30; 0 = every head)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    p.add_argument("--force", action="store_true",
                   help="compare even when A and B were measured differently (another prompt set or --max-length); "
                        "a warning names the difference")
    add_healthy_option(p)
    g = p.add_argument_group("diagnosing a model directory (ignored for .json inputs)")
    add_prompt_options(g, exclude_help="leave query row 0 out of the averages (must match the other input's setting)")
    add_model_options(g)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> None:
    from ..analysis.compare import run_compare

    run_compare(args)

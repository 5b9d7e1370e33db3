"""``alibi-surgery drift RUN_DIR``: how the frozen heads drifted over a repair run's checkpoints, against the
original model. The work is :mod:`alibi_surgery.analysis.drift`'s; the figures
:mod:`alibi_surgery.viz.drift_figures`'s."""

from __future__ import annotations

from .options import add_healthy_option, add_output_options

__all__ = ["add_parser", "run"]


DESCRIPTION = ("Reads every checkpoint's diagnosis from a repair output directory and reports, against the original "
               "model: each head's delta first-token mass per checkpoint, per head-index column the mean |delta| of "
               "its frozen heads and its trend (spreading, stable, receding) by two rules (fitted: the least-squares "
               "change over every checkpoint of every frozen head; paper: last minus first epoch checkpoint of the "
               "in-band frozen heads, as the paper's analyze_frozen_drift.py), cascade counts (heads newly over the "
               "drift threshold), healthy heads per checkpoint and the correlation between columns' trajectories.")


def add_parser(sub) -> None:
    p = sub.add_parser("drift", help="drift of the frozen heads over a repair run's checkpoints",
                       description=DESCRIPTION)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a repair --out directory (one pass or pass-1, pass-2, ...)")
    add_output_options(p, json=("OUT", "write the analysis as JSON"),
                       heatmap=("OUT.png", "write the frozen heads' drift per column over checkpoints as a heatmap"),
                       trajectories=("OUT.png", "write the columns' trajectories and cascade counts"))
    p.add_argument("--drift-threshold", type=float, default=0.05, metavar="T",
                   help="|delta first-token mass| above this counts as drift, for the cascade (0.05)")
    p.add_argument("--column-rule", default="fitted", metavar="RULE",
                   help="the rule whose verdict (spreading columns) the report leads with: fitted (default) or paper; "
                        "both are computed and printed (docs/surgery.md)")
    p.add_argument("--trend-threshold", type=float, metavar="T",
                   help="a column whose rise under --column-rule exceeds this is spreading (default 0.01 for fitted, "
                        "0.02 for paper)")
    add_healthy_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")


def run(args) -> None:
    from ..analysis.drift import drift_over_training, format_drift, read_run, write_drift_json
    from ..io.files import check_output_paths

    outputs = check_output_paths({"json": args.json, "heatmap": args.heatmap, "trajectories": args.trajectories},
                                 overwrite=args.overwrite, figures=("heatmap", "trajectories"))
    result = drift_over_training(read_run(args.run_dir), drift_threshold=args.drift_threshold,
                                 trend_threshold=args.trend_threshold, column_rule=args.column_rule,
                                 healthy=args.healthy)
    if "json" in outputs:  # files first, then the terminal
        write_drift_json(result, outputs["json"])
    if "heatmap" in outputs:
        from ..viz.drift_figures import save_drift_heatmap

        save_drift_heatmap(result, outputs["heatmap"])
    if "trajectories" in outputs:
        from ..viz.drift_figures import save_trajectories

        save_trajectories(result, outputs["trajectories"])
    print(format_drift(result))
    for path in outputs.values():
        print(f"wrote {path}")

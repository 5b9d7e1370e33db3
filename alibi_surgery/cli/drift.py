"""``alibi-surgery drift RUN_DIR``: how the frozen heads drifted over a repair run's checkpoints, against the
original model. The work is :mod:`alibi_surgery.analysis.drift`'s; the figures
:mod:`alibi_surgery.viz.drift_figures`'s."""

from __future__ import annotations

from .options import add_output_options

__all__ = ["add_parser", "run"]


DESCRIPTION = ("Reads every checkpoint's diagnosis from a repair output directory and reports, against the original "
               "model: each head's delta first-token mass per checkpoint, per head-index column the mean |delta| of "
               "its frozen heads and its trend (spreading, stable, receding), cascade counts (heads newly over the "
               "drift threshold) and the correlation between columns' trajectories.")


def add_parser(sub) -> None:
    p = sub.add_parser("drift", help="drift of the frozen heads over a repair run's checkpoints",
                       description=DESCRIPTION)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a repair --out directory (one pass or pass-1, pass-2, ...)")
    add_output_options(p, json=("OUT", "write the analysis as JSON"),
                       heatmap=("OUT.png", "write the frozen heads' drift per column over checkpoints as a heatmap"),
                       trajectories=("OUT.png", "write the columns' trajectories and cascade counts"))
    p.add_argument("--drift-threshold", type=float, default=0.05, metavar="T",
                   help="|delta first-token mass| above this counts as drift, for the cascade (0.05)")
    p.add_argument("--trend-threshold", type=float, default=0.01, metavar="T",
                   help="a column whose least-squares fitted rise over the run exceeds this is spreading (0.01)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")


def run(args) -> None:
    from ..analysis.drift import drift_over_training, format_drift, read_run, write_drift_json
    from ..io.files import check_output_paths

    outputs = check_output_paths({"json": args.json, "heatmap": args.heatmap, "trajectories": args.trajectories},
                                 overwrite=args.overwrite, figures=("heatmap", "trajectories"))
    result = drift_over_training(read_run(args.run_dir), drift_threshold=args.drift_threshold,
                                 trend_threshold=args.trend_threshold)
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

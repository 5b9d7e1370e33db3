"""The human-readable side of a surgery run: ``report.md`` and the PNGs of one pass, and the summary of several.

Everything here reads what :mod:`~alibi_surgery.surgery.repair` measured (the run's history, its baseline and latest
diagnosis); nothing is measured here. Every file goes through the atomic writer.
"""

from __future__ import annotations

from pathlib import Path

from ..viz.comparison_figures import save_delta_heatmap
from ..viz.heatmap import save_heatmap
from ..io.files import atomic_savefig, atomic_write_text
from .functional import format_recovery

__all__ = ["write_markdown", "write_plots", "write_passes_markdown", "format_ppl", "format_dormancy"]


def format_ppl(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_dormancy(dormancy: dict) -> str:
    """One line: the share of dormant MLP neurons before and after surgery (report.json's ``mlp_dormancy``)."""
    before, after = dormancy["before"], dormancy["after"]
    share = lambda d: f"{100 * d['total']:.2f}% ({sum(d['dormant'])}/{sum(d['neurons'])})"  # noqa: E731
    return (f"MLP dormancy (neurons with ||up row|| x ||down column|| < {before['threshold']:g}): {share(before)} "
            f"before surgery, {share(after)} after.")


def write_markdown(run, report: dict) -> None:
    """OUT/report.md of one pass: the plan's size and a row per checkpoint."""
    lines = ["# Surgery report", "", f"- input: `{report['input']}`", f"- arm: {report['arm']}",
             f"- final model: `{report['final']}` "
             f"(from {report['final_checkpoint'] or 'no training step: the model as the arm prepared it'})",
             f"- targeted heads: {run.plan.n_heads}",
             *([f"- sink penalty: {run.s.sink_penalty:g} x the targets' mean first-token mass, added to the loss"]
               if run.s.sink_penalty else []),
             f"- held-out perplexity before surgery: {format_ppl(report.get('eval_ppl_before'))}"]
    prompts = report.get("eval_prompts_ppl_before") is not None
    if prompts:
        conv = run.s.eval_convention
        lines.append(f"- held-out prompts perplexity ({conv} convention) before surgery: "
                     f"{format_ppl(report['eval_prompts_ppl_before'])}")
    lines += ["", "| step | epoch | train ppl | held-out ppl | " + ("prompts ppl | " if prompts else "")
              + "recovered | still sick | iatrogenic | in-band drift (count/n, mean abs Δ) | outside drift |",
              "|---" * (10 if prompts else 9) + "|"]
    for e in report["checkpoints"]:
        drift = e["comparison"]["summary"]["drift"]
        zone = lambda z: "-" if not drift[z]["n"] else f"{drift[z]['count']}/{drift[z]['n']}, {drift[z]['mean_abs']:.3f}"  # noqa: E731
        cell = f"{format_ppl(e.get('eval_prompts_ppl'))} | " if prompts else ""
        lines.append(f"| {e['step']} | {e['epoch']} | {format_ppl(e['train_ppl'])} | {format_ppl(e['eval_ppl'])} | "
                     f"{cell}{e['recovered']} | {e['still_sick']} | {e['iatrogenic']} | {zone('in-band')} | "
                     f"{zone('outside')} |")
    if report["checkpoints"]:
        last = report["checkpoints"][-1]["comparison"]["summary"]["drift"]
        worst = [f"{z}: L{w['layer']}H{w['head']} {w['delta']:+.3f}" for z in ("target", "in-band", "outside")
                 if (w := last[z]["worst"]) is not None]
        lines += ["", "Largest change of first-token mass at the last checkpoint, per zone: " + "; ".join(worst) + "."]
    if "functional" in report:
        lines += ["", f"Functional recovery ({report.get('arm', 'treatment')}): "
                      f"{format_recovery(report['functional'])}.", "", *_functional_table(report["functional"])]
    if "mlp_dormancy" in report:
        lines += ["", format_dormancy(report["mlp_dormancy"])]
    lines += ["", "Drift counts heads whose first-token mass moved by more than 0.05 from the baseline diagnosis.",
              "Plots: `before.png`, `after.png`, `delta.png`, `trajectory.png`.", ""]
    atomic_write_text(run.out / "report.md", "\n".join(lines))


def write_plots(run) -> None:
    """OUT/before.png, after.png, delta.png (the latest re-diagnosis) and trajectory.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report, cmp = run.latest
    save_heatmap(run.baseline, run.out / "before.png")
    save_heatmap(report, run.out / "after.png")
    save_delta_heatmap(cmp, run.out / "delta.png")
    steps = [e["step"] for e in run.history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("train_ppl", "train ppl"), ("eval_ppl", "held-out ppl")):
        ys = [e[key] for e in run.history]
        if any(y is not None for y in ys):
            ax.plot(steps, [float("nan") if y is None else y for y in ys], marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("perplexity")
    ax2 = ax.twinx()
    ax2.plot(steps, [e["recovered"] for e in run.history], color="tab:green", marker="s", label="recovered")
    ax2.set_ylabel("recovered heads")
    ax2.set_ylim(0, max(1, run.plan.n_heads) + 0.5)  # out of all targets, whole heads
    ax2.yaxis.get_major_locator().set_params(integer=True)
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, run.out / "trajectory.png", dpi=110)


def _drift(drift: dict | None) -> str:
    if not drift or not drift["all"]["n"]:
        return "-"
    return f"{drift['all']['count']}/{drift['all']['n']}, {drift['all']['mean_abs']:.3f}"


def write_passes_markdown(out: Path, summary: dict) -> None:
    """OUT/report.md of a multi-pass run: one row per pass, with links to each pass's own report."""
    lines = ["# Surgery report", "", f"- input: `{summary['input']}`", f"- arm: {summary.get('arm') or 'not recorded'}",
             f"- final model: `{summary['final']}`",
             f"- passes run: {len(summary['passes'])} of {summary['passes_asked']}"
             + (f" ({summary['stopped']})" if summary.get("stopped") else ""), "",
             "| pass | targeted | recovered | still sick | iatrogenic | held-out ppl before | held-out ppl after | "
             "drift vs previous pass | drift vs original | report |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, rep in enumerate(summary["passes"], 1):
        targeted = sum(len(h) for h in rep["plan"]["selection"].values())
        best = next((c for c in rep["checkpoints"] if c["checkpoint"] == rep["final_checkpoint"]),
                    rep["checkpoints"][-1] if rep["checkpoints"] else {})
        last = rep["checkpoints"][-1] if rep["checkpoints"] else {}
        lines.append(f"| {k} | {targeted} | {last.get('recovered', '-')} | {last.get('still_sick', '-')} | "
                     f"{last.get('iatrogenic', '-')} | {format_ppl(rep.get('eval_ppl_before'))} | "
                     f"{format_ppl(best.get('eval_ppl'))} | {_drift(rep.get('drift_vs_previous'))} | "
                     f"{_drift(rep.get('drift_vs_original'))} | [pass-{k}/report.md](pass-{k}/report.md) |")
    lines += ["", "Pass 1 follows the plan options; every later pass starts from the previous pass's best checkpoint "
              "and targets every head still collapsed, anywhere (minus --freeze). Drift: heads of every zone with "
              "|Δ first-token mass| > 0.05 (count/n, mean |Δ|), of the pass's best checkpoint against the model the "
              "pass started from and against the original model.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def _functional_table(functional: dict) -> list[str]:
    """A row per target: class, first-token mass, output norm and mean-ablation effect (floor) before and after."""
    if not functional.get("heads") or functional.get("recovery") is None:
        return []

    def cell(side: dict) -> str:
        mean = side.get("mean")
        effect = "-" if mean is None else f"{mean['effect']:+.4f} (floor {mean['floor']:.4f})"
        norm = side.get("output_norm")
        return (f"{side['class']}, {side['bos_mass']:.2f} | {'-' if norm is None else f'{norm:.3g}'} | {effect} | "
                f"{'-' if side.get('does_work') is None else 'yes' if side['does_work'] else 'no'}")

    lines = ["| head | before: class, first-token mass | output norm | mean-ablation effect, nats | does work "
             "| after: class, first-token mass | output norm | mean-ablation effect, nats | does work |",
             "|---" * 9 + "|"]
    lines += [f"| L{h['layer']} H{h['head']} | {cell(h['before'])} | {cell(h['after'])} |" for h in functional["heads"]]
    return lines + ["", "Does work: the mean-ablation effect's 95% lower bound exceeds its noise floor "
                        "(docs/metrics.md); revived: not collapsed after surgery and does work."]

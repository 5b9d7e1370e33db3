"""What ``sparsify`` adds to a run's report (``objective="sparsify"``): the selected heads' mean attention entropy
before and after and at every checkpoint, the loss constraint (the model's own loss, the target, the GECO
multiplier), a per-head table, and ``sparsity.png`` (the entropy and held-out loss curves; each head's entropy
before against after). Entropies are the diagnosis's (natural log, on the diagnosis prompts)."""

from __future__ import annotations

import math

from ..io.files import atomic_savefig, atomic_write_text

__all__ = ["mean_entropy", "sparsity_summary", "write_sparsity"]


def mean_entropy(heads: list[dict], selection: dict, key: str) -> float:
    """The mean of ``key`` over the comparison's head entries that ``selection`` holds (layer keys int or str)."""
    chosen = [h[key] for h in heads if h["head"] in selection.get(str(h["layer"]), selection.get(h["layer"], []))]
    return sum(chosen) / len(chosen) if chosen else float("nan")


def sparsity_summary(report: dict) -> dict:
    """``report.json``'s ``sparsity`` section, from the run's checkpoint history."""
    selection = report["plan"]["selection"]
    history = report["checkpoints"]
    heads = history[-1]["comparison"]["heads"] if history else []
    geco = next((e["geco"] for e in reversed(history) if e.get("geco")), None)
    curve = [{"step": e["step"], "entropy": mean_entropy(e["comparison"]["heads"], selection, "entropy_after"),
              "eval_loss": None if e.get("eval_ppl") is None else math.log(e["eval_ppl"]),
              "lambda": (e.get("geco") or {}).get("lam")} for e in history]
    return {"entropy_before": mean_entropy(heads, selection, "entropy_before"),
            "entropy_after": mean_entropy(heads, selection, "entropy_after"),
            "eval_loss_before": None if report.get("eval_ppl_before") is None else math.log(report["eval_ppl_before"]),
            "base_loss": None if geco is None else geco["base"], "target_loss": None if geco is None else geco["target"],
            "lambda": None if geco is None else geco["lam"], "curve": curve,
            "heads": [{"layer": h["layer"], "head": h["head"], "entropy_before": h["entropy_before"],
                       "entropy_after": h["entropy_after"]} for h in heads
                      if h["head"] in selection.get(str(h["layer"]), [])]}


def write_sparsity(out, report: dict) -> None:
    """Append the sparsity section to ``OUT/report.md`` and write ``OUT/sparsity.png``."""
    s = report["sparsity"]
    full = (report.get("settings") or {}).get("train") == "full"
    trained = "every parameter of the model (--train full)" if full else "the selected heads' slices"
    fmt = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"  # noqa: E731
    lines = ["", "## Sparsity", "",
             f"Mean attention entropy of the {len(s['heads'])} selected heads (nats, diagnosis prompts): "
             f"{fmt(s['entropy_before'])} before, {fmt(s['entropy_after'])} after. Loss constraint: the model's own "
             f"training loss {fmt(s['base_loss'])}, target {fmt(s['target_loss'])} (+ the slack), GECO multiplier "
             f"{fmt(s['lambda'])} at the end; held-out loss {fmt(s['eval_loss_before'])} before. Trained: "
             f"{trained}.", "",
             "| step | mean entropy | held-out loss | multiplier |", "|---|---|---|---|"]
    lines += [f"| {c['step']} | {fmt(c['entropy'])} | {fmt(c['eval_loss'])} | {fmt(c['lambda'])} |" for c in s["curve"]]
    lines += ["", "| head | entropy before | after |", "|---|---|---|"]
    lines += [f"| L{h['layer']} H{h['head']} | {h['entropy_before']:.4f} | {h['entropy_after']:.4f} |"
              for h in s["heads"]]
    path = out / "report.md"
    atomic_write_text(path, path.read_text() + "\n".join(lines) + "\n")
    _plot(out / "sparsity.png", s)


def _plot(path, s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [c["step"] for c in s["curve"]]
    left.plot(steps, [c["entropy"] for c in s["curve"]], marker="o", label="mean entropy (selected heads)")
    left.set_xlabel("optimizer step")
    left.set_ylabel("entropy (nats)")
    twin = left.twinx()
    twin.plot(steps, [float("nan") if c["eval_loss"] is None else c["eval_loss"] for c in s["curve"]],
              color="tab:red", marker="s", label="held-out loss")
    if s["target_loss"] is not None:
        twin.axhline(s["target_loss"], color="tab:red", linestyle=":", label="training-loss target")
    twin.set_ylabel("loss (nats/token)")
    fig.legend(loc="upper center", fontsize=8, ncol=3)
    before = [h["entropy_before"] for h in s["heads"]]
    after = [h["entropy_after"] for h in s["heads"]]
    right.scatter(before, after, s=12)
    top = max(before + after + [1e-3])
    right.plot([0, top], [0, top], color="grey", linewidth=0.8)
    right.set_xlabel("entropy before")
    right.set_ylabel("entropy after")
    right.set_title("each selected head")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    atomic_savefig(fig, path, dpi=110)

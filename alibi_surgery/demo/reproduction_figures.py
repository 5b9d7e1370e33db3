"""The figures of a reproduction (:mod:`alibi_surgery.demo.reproduce`), drawn from ``results.json``'s dict.

* ``repro-outcomes.png``: recovered targets per arm (experiments 1 and 5) and healthy heads per pass (experiment 2),
  one dot per seed;
* ``repro-extended.png``: held-out and training perplexity over the stock model's, by step, for the band plus a
  healthy column and for the band alone (experiment 3), one line per seed;
* ``repro-drift.png``: mean |delta first-token mass| of the frozen heads of each head-index column by step,
  structured against noisy corpus (experiment 4), seeds averaged.
"""

from __future__ import annotations

__all__ = ["save_figures"]


def _outcomes(r: dict, path) -> None:
    import matplotlib.pyplot as plt

    from ..viz.heatmap import save_figure

    rows = r["per_seed"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    arms = [("gradient-only", lambda x: x["exp1"]["noreinit"]), ("re-init", lambda x: x["exp1"]["reinit"]),
            ("paper recipe\n(bf16)", lambda x: x["exp5"]["paper"]["recovered"]),
            ("ours\n(bf16 + master)", lambda x: x["exp5"]["ours"]["recovered"])]
    for i, (name, get) in enumerate(arms):
        values = [100 * get(x) / x["targets"] for x in rows]
        a.scatter([i] * len(values), values, color="tab:blue")
        a.bar(i, sum(values) / len(values), color="tab:blue", alpha=0.3)
    a.set_xticks(range(len(arms)), [n for n, _ in arms])
    a.set(ylabel="targets recovered (%)", ylim=(0, 105), title="recovery at the last checkpoint")
    n = rows[0]["n_heads"]
    for x in rows:
        b.plot([0, 1, 2], [x["exp2"]["baseline"], x["exp2"]["pass1"], x["exp2"]["pass2"]], marker="o",
               label=f"seed {x['seed']}")
    b.axhline(n, color="grey", lw=0.8, ls="--")
    b.set_xticks([0, 1, 2], ["stock", "after pass 1", "after pass 2"])
    b.set(ylabel=f"healthy heads (of {n})", title="two passes")
    b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _extended(r: dict, path) -> None:
    import matplotlib.pyplot as plt

    from ..viz.heatmap import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=False)
    for x in r["per_seed"]:
        e = x["exp3"]
        for key, ax, stock in (("eval", a, e["stock_eval"]), ("train", b, e["stock_train"])):
            steps = [c["step"] for c in e["curve"] if c[key] is not None]
            ax.plot(steps, [c[key] / stock for c in e["curve"] if c[key] is not None], color="tab:red", lw=1,
                    label=f"band + H{e['column']}" if x["seed"] == 0 else None)
            steps = [c["step"] for c in e["control"] if c[key] is not None]
            ax.plot(steps, [c[key] / stock for c in e["control"] if c[key] is not None], color="tab:blue", lw=1,
                    label="band only" if x["seed"] == 0 else None)
    for ax, what in ((a, "held-out"), (b, "training (window mean)")):
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="optimizer step", ylabel=f"{what} perplexity / stock", title=what)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _drift(r: dict, path) -> None:
    import matplotlib.pyplot as plt

    from ..viz.heatmap import save_figure

    n_head = r["n_head"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, arm in zip(axes, ("structured", "noisy")):
        runs = [x["exp4"][arm] for x in r["per_seed"]]
        steps = runs[0]["steps"]
        for h in range(n_head):
            series = [c["columns"][h]["mean_abs"] for c in runs]
            if any(s is None for s in series):
                continue
            mean = [sum(v) / len(v) for v in zip(*series)]
            ax.plot(steps, mean, color=cmap(h / max(1, n_head - 1)), lw=1.2 if h == n_head - 1 else 0.7,
                    label=f"H{h}" if h in (0, n_head // 2, n_head - 1) else None)
        ax.set(xlabel="optimizer step", title=f"{arm} corpus", ylabel="frozen heads' mean |Δ first-token mass|")
        ax.legend(fontsize=8, title="column (slope falls →)")
    fig.tight_layout()
    save_figure(fig, path)


def save_figures(r: dict, directory) -> list[str]:
    """Write the figures (module docstring) into ``directory``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    names = ["repro-outcomes.png"] + (["repro-extended.png"] if r["column"] is not None else []) + ["repro-drift.png"]
    _outcomes(r, directory / names[0])
    if r["column"] is not None:
        _extended(r, directory / "repro-extended.png")
    _drift(r, directory / names[-1])
    return names

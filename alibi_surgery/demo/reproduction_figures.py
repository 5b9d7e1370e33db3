"""The figures of a reproduction (:mod:`alibi_surgery.demo.reproduce`), drawn from ``results.json``'s dict.

* ``repro-arms.png``: per arm, the pass-1 targets not collapsed and revived (pooled, Clopper-Pearson 95% error
  bars), and held-out perplexity at the last checkpoint over the stock model's (mean over runs, bootstrap 95% error
  bars, one dot per run);
* ``repro-extended.png``: held-out perplexity over the stock model's by step, the band plus a healthy column against
  the band alone (claim 3), one thin line per run, testbeds in their own colours.
"""

from __future__ import annotations

__all__ = ["save_figures"]

ARM_COLOURS = {"treatment": "tab:blue", "gradient-only": "tab:orange", "reinit-only": "tab:gray",
               "random-healthy": "tab:green", "ablate": "tab:red"}


def _arms(r: dict, path) -> None:
    import matplotlib.pyplot as plt

    from ..viz.heatmap import save_figure

    arms = r["claims"]["arms"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(arms)
    for i, arm in enumerate(names):
        for j, (key, label) in enumerate((("not_collapsed", "not collapsed"), ("revived", "revived"))):
            p = arms[arm][key]
            x = i + (j - 0.5) * 0.38
            err = [[100 * (p["p"] - p["cp"][0])], [100 * (p["cp"][1] - p["p"])]]
            a.bar(x, 100 * p["p"], width=0.36, color=ARM_COLOURS.get(arm, "tab:purple"), alpha=0.35 + 0.55 * j,
                  yerr=err, capsize=3, label=label if i == 0 else None)
    a.set_xticks(range(len(names)), names, rotation=20)
    a.set_ylabel("% of pass-1 targets")
    a.set_ylim(0, 105)
    a.legend(title="pale: not collapsed, dark: revived", fontsize=8, title_fontsize=8)
    a.set_title("Targets after surgery, by arm (95% CP)")
    for i, arm in enumerate(names):
        m = arms[arm]["ppl_last_over_stock"]
        dots = [u["eval"][arm]["last"] / u["eval"][arm]["stock"] for u in r["units"] if arm in u["eval"]]
        b.scatter([i] * len(dots), dots, s=10, color=ARM_COLOURS.get(arm, "tab:purple"), alpha=0.6)
        b.errorbar(i + 0.15, m["mean"], yerr=[[m["mean"] - m["ci"][0]], [m["ci"][1] - m["mean"]]], fmt="o",
                   color="black", capsize=4)
    b.axhline(1.0, color="black", lw=0.8, ls="--")
    b.set_xticks(range(len(names)), names, rotation=20)
    b.set_ylabel("held-out ppl / stock (last checkpoint)")
    b.set_title("Perplexity by arm (dots: runs; bars: mean, 95% bootstrap)")
    fig.tight_layout()
    save_figure(fig, path)


def _extended(r: dict, path) -> None:
    import matplotlib.pyplot as plt

    from ..viz.heatmap import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {}
    for u in r["units"]:
        if "extended" not in u:
            continue
        colour = colours.setdefault(u["testbed"], f"C{len(colours)}")
        stock = u["eval"]["extended"]["stock"]
        for key, style in (("curve", "-"), ("band_only", ":")):
            steps = [s for s, _ in u["extended"][key]]
            ax.plot(steps, [p / stock for _, p in u["extended"][key]], style, color=colour, lw=0.8, alpha=0.7)
    for name, colour in colours.items():
        ax.plot([], [], color=colour, label=f"testbed {name}")
    ax.plot([], [], "-", color="black", label="band + healthy column")
    ax.plot([], [], ":", color="black", label="band only")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out ppl / stock")
    ax.set_title("Claim 3: re-initialising a healthy column with the band")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_figures(r: dict, directory) -> list[str]:
    """Write the figures into ``directory``; returns their file names."""
    from pathlib import Path

    names = []
    if r.get("claims"):
        _arms(r, Path(directory) / "repro-arms.png")
        names.append("repro-arms.png")
    if any("extended" in u for u in r.get("units", [])):
        _extended(r, Path(directory) / "repro-extended.png")
        names.append("repro-extended.png")
    return names

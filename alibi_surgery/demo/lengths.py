"""Collapse against prompt length: how many heads a diagnosis classes dead or bos-sink when the prompts are cut to
each length from 2 tokens to the longest prompt (docs/demo-model.md's figure).

    python -m alibi_surgery.demo.lengths OUT.png [NAME=MODEL_DIR ...]   # default: the demo model; counts in OUT.png.json

One forward per prompt, with transformers' eager attention probabilities (the paper's way): under causal attention
query row ``r`` is the same whatever follows it, so the rows of one full-length run give the statistics of every
truncation (a prompt shorter than the cut contributes all of its rows, as ``diagnose --max-length`` does). Classes
use the default thresholds on the token-weighted first-token mass. Limits: models that return attention maps
(the ALiBi families' eager attention; not Falcon's SDPA-only path); one prompt at a time, so memory is one prompt's
``n_layer x n_head x T x T`` maps.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["collapse_by_length", "plot_collapse_by_length"]


def collapse_by_length(model, tokenizer, prompts) -> dict[int, int]:
    """``{length: collapsed heads}`` for every cut from 2 tokens to the longest prompt (module docstring)."""
    from ..diagnosis.report import Thresholds, classify

    thresholds = Thresholds()
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    longest = max(map(len, encoded))
    sums = None
    for ids in encoded:
        with torch.no_grad():
            maps = model(torch.tensor([ids]), output_attentions=True, use_cache=False).attentions
        first = torch.stack(maps).double()[:, 0, :, :, 0]  # [layers, heads, rows]: each row's first-token mass
        first = torch.nn.functional.pad(first, (0, longest - first.shape[-1]))
        sums = first.cumsum(-1) if sums is None else sums + first.cumsum(-1)
    lengths = torch.tensor([len(e) for e in encoded])
    result = {}
    for n in range(2, longest + 1):
        mass = sums[..., n - 1] / int(lengths.clamp(max=n).sum())
        result[n] = sum(classify(float(b), 1.0, thresholds) in ("dead", "bos-sink") for b in mass.flatten())
    return result


def plot_collapse_by_length(curves: dict, n_heads: dict, path, contexts: dict | None = None) -> None:
    """One line per model (share of heads collapsed against the cut), its training context dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz.heatmap import save_figure

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, curve in curves.items():
        line, = ax.plot(list(curve), [100 * v / n_heads[name] for v in curve.values()], label=name)
        if contexts and contexts.get(name):
            ax.axvline(contexts[name], color=line.get_color(), ls=":", lw=1)
    ax.axhline(25, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="prompt length (tokens; built-in prompts cut there)", ylabel="heads dead or bos-sink (%)",
           title="collapse against prompt length (dotted: training context)", ylim=(0, None))
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":  # the command line lives in alibi_surgery.cli.lengths
    from alibi_surgery.cli.lengths import main

    sys.exit(main())

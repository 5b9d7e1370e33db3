"""The length curve's command line: ``python -m alibi_surgery.demo.lengths OUT.png [NAME=MODEL_DIR ...]``
(docs/demo-model.md); the work is :mod:`alibi_surgery.demo.lengths`."""

from __future__ import annotations

import argparse
import json

__all__ = ["main"]


def main(argv=None) -> int:
    from ..demo.lengths import collapse_by_length, plot_collapse_by_length
    from ..diagnosis.prompts import DEFAULT_PROMPTS
    from ..families import training_context
    from ..io.files import atomic_write_text
    from ..io.loading import load_model
    from ..demo import model_dir

    parser = argparse.ArgumentParser(prog="python -m alibi_surgery.demo.lengths",
                                     description="Collapsed heads (bos-sink + dead) against prompt length, on the "
                                                 "built-in prompts cut at every length: a plot and a JSON beside it.")
    parser.add_argument("out", metavar="OUT.png", help="the plot; the numbers go to OUT.png.json")
    parser.add_argument("models", nargs="*", metavar="NAME=MODEL_DIR", help="models to compare (default: the demo model)")
    a = parser.parse_args(argv)
    out, specs = a.out, a.models or [f"demo model={model_dir()}"]
    curves, heads, contexts = {}, {}, {}
    for spec in specs:
        name, _, path = spec.rpartition("=")
        model, tokenizer = load_model(path, dtype="float32")
        curves[name or path] = collapse_by_length(model, tokenizer, DEFAULT_PROMPTS)
        heads[name or path] = model.config.n_layer * model.config.n_head
        context = training_context(model.config)
        contexts[name or path] = context[0] if context else None
    plot_collapse_by_length(curves, heads, out, contexts)
    atomic_write_text(str(out) + ".json", json.dumps({"curves": curves, "n_heads": heads, "contexts": contexts}))
    for name, curve in curves.items():
        marks = [n for n in (32, 64, 128, 256, max(curve)) if n in curve]
        print(name + ": " + ", ".join(f"{curve[n]} at {n}" for n in marks) + f" of {heads[name]} heads")
    return 0

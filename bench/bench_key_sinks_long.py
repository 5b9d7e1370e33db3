"""Gu et al.'s per-position sink scores at a length where their way (storing ``[layers, heads, T, T]`` attention
maps) does not fit: ``diagnose --sinks``'s key-side pass on the CPU with the torch backend, its time and peak RSS.

    python bench/bench_key_sinks_long.py --length 16384 --layers 8 [--shape tiny] [--out bench/results/key_sinks_long.json]

A random-weight model of the named shape (cut or grown to ``--layers``) scores one prompt of ``--length`` byte
tokens. Printed and written: wall time, peak RSS of the process (``ru_maxrss``) and its RSS before the run, and the
memory the dense way needs: the maps of every layer as their code stores them (float32 ``L x H x T x T``), and one
layer's eager attention matrix (``H x T x T``).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    from alibi_surgery.diagnosis.key_sinks import key_sinks
    from alibi_surgery.io.loading import load_model
    from alibi_surgery.io.random_model import write_random_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_model(Path(tmp) / "m", args.shape, n_layer=args.layers, seed=0)
        model, tokenizer = load_model(str(path), dtype="float32", device="cpu")
        text = "".join("abcdefgh ,.\n"[i * 7 % 12] for i in range(args.length * 2))
        ids = tokenizer(text)["input_ids"][:args.length]
        prompt = tokenizer.decode(ids, skip_special_tokens=True)
        before = rss_mib()
        t0 = time.perf_counter()
        result = key_sinks(model, tokenizer, [prompt], backend="torch", max_length=args.length)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scores = result.scores[0]
    n_layer, n_head, length = scores.shape
    dense_maps = n_layer * n_head * length * length * 4 / 2**30
    row = {"shape": args.shape, "layers": n_layer, "heads": n_head, "tokens": length, "seconds": round(seconds, 1),
           "rss_before_mib": round(before), "peak_rss_mib": round(peak),
           "dense_maps_gib": round(dense_maps, 2), "dense_one_layer_gib": round(dense_maps / n_layer, 2),
           "first_token_score_mean": float(scores[..., 0].mean()),
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(row, indent=1))
    if args.out:
        args.out.write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

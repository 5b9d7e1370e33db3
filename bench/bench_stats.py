"""Statistics overhead: the fused forward with and without per-head first-token mass and entropy.

    python bench/bench_stats.py [--shapes ...] [--seqs ...] [--providers triton torch]

The same kernel (triton) or blocked loop (torch) is timed with statistics off and on; the overhead is
``ms(stats) / ms(plain) - 1``. Rows (one per variant, the overhead on the stats row) go to
bench/results/stats_overhead.csv.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from attention import DTYPES, FAMILY, SEQS, Case, batch_for, measure  # noqa: E402
from common import append_rows  # noqa: E402


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", nargs="+", default=None, choices=list(FAMILY))
    p.add_argument("--seqs", type=int, nargs="+", default=None)
    p.add_argument("--providers", nargs="+", default=None, choices=["triton", "torch"],
                   help="default: triton on CUDA, torch on CPU")
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda"
    providers = args.providers or (["triton"] if on_gpu else ["torch"])
    shapes = args.shapes or ([s for s in FAMILY if s != "bloom-176b"] if on_gpu else ["bloom-560m"])
    seqs = args.seqs or (SEQS if on_gpu else (512,))
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    rows, lines = [], ["| provider | shape | T | batch | plain | with statistics | overhead |", "|---" * 7 + "|"]
    for provider in providers:
        for shape in shapes:
            for seq in seqs:
                case = Case(shape, seq, batch_for(seq), dtype, args.device)
                plain = measure(provider, case, backward=False, with_stats=False, rep_ms=200, cpu_repeats=5)
                stats = measure(provider, case, backward=False, with_stats=True, rep_ms=200, cpu_repeats=5)
                stats["overhead_pct"] = round(100 * (stats["ms"] / plain["ms"] - 1), 2)
                rows += [plain, stats]
                print(json.dumps(stats), flush=True)
                lines.append(f"| {provider} | {shape} | {seq} | {case.batch} | {plain['ms']:.3f} ms | "
                             f"{stats['ms']:.3f} ms | {stats['overhead_pct']:+.1f}% |")
    append_rows("stats_overhead", rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

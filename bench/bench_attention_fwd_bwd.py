"""Causal ALiBi attention forward + backward: eager, torch, triton, and on CUDA sdpa and flex (see attention.py).

    python bench/bench_attention_fwd_bwd.py [--shapes bloom-7b1 ...] [--seqs 2048 ...] [--providers ...]

Times with do_bench (median) on CUDA, the median of 3 calls on CPU; rows go to bench/results/attention_fwd_bwd.csv.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from attention import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli("attention_fwd_bwd", backward=True, doc=__doc__))

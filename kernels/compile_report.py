"""AOT compile report: ``python -m alibi_surgery.kernels.compile_report [--arch 89 ...] [--jobs N]``.

Compiles every forward-kernel configuration the launcher picks (head_dim 64/80/96/128, fp32/fp16/bf16, with and
without statistics) for sm_80/86/89/90 without a GPU, and prints registers, spills and shared memory against each
architecture's per-block limit. Exit status 1 if any configuration spills or exceeds shared memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from .aot import ARCHS, CompileResult, compile_fwd
from .attention_fwd import interpreting

HEAD_DIMS = (64, 80, 96, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def launcher_configs(archs=ARCHS):
    """(arch, head_dim, dtype, with_stats) for every configuration the forward launcher can pick."""
    return list(itertools.product(archs, HEAD_DIMS, DTYPES, (False, True)))


def _compile(args) -> CompileResult:
    import warnings

    warnings.filterwarnings("ignore")
    return compile_fwd(*args)


def compile_all(configs, jobs: int = 2) -> list[CompileResult]:
    if jobs <= 1:
        return [_compile(c) for c in configs]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile, configs))


def format_table(results: list[CompileResult]) -> str:
    head = f"{'kernel':<18}{'arch':>5}{'dtype':>10}{'d':>5}{'stats':>6}{'tile':>14}{'regs':>6}{'spill':>7}" \
           f"{'smem KB':>9}{'limit':>7}  ok"
    lines = [head, "-" * len(head)]
    for r in results:
        c = r.config
        tile = f"{c['BLOCK_M']}x{c['BLOCK_N']}/w{c['num_warps']}s{c['num_stages']}"
        lines.append(f"{r.kernel:<18}{r.arch:>5}{r.dtype_name:>10}{c['HEAD_DIM']:>5}{'yes' if c['WITH_STATS'] else 'no':>6}"
                     f"{tile:>14}{r.registers:>6}{r.spill_stores + r.spill_loads:>7}{r.shared_bytes / 1024:>9.1f}"
                     f"{r.smem_limit // 1024:>7}  {'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only these architectures")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compiles (default 2)")
    parser.add_argument("--json", metavar="OUT", help="also write every result as JSON")
    args = parser.parse_args(argv)
    if interpreting():  # interpreted kernels cannot be compiled: run again with the JIT
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execvpe(sys.executable, [sys.executable, "-m", "alibi_surgery.kernels.compile_report", *argv], env)
    results = compile_all(launcher_configs(tuple(args.arch or ARCHS)), args.jobs)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([dict(dataclasses.asdict(r), ok=r.ok, smem_limit=r.smem_limit) for r in results], fh, indent=1)
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} configurations compile with 0 spills within shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

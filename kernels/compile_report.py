"""AOT compile report: ``python -m alibi_surgery.kernels.compile_report [--arch 89 ...] [--bias ...] [--jobs N]``.

Compiles every forward-kernel configuration the launcher picks (head_dim 64/80/96/128, fp32/fp16/bf16, with and
without statistics), both backward passes (dK/dV and dQ) and the delta kernel for the same head dims and dtypes, each with BLOOM's bias
and with Falcon-RW's bf16-rounded one (the constexpr ``ALIBI_BF16``, variant ``alibi-bf16``; ``softmax_scale`` and
``bias_scale`` are runtime values and compile nothing), the forward with a sliding window (``--bias window``: the
constexpr ``HAS_WINDOW`` with BLOOM's bias, variant ``window``; the window's length and grouped-query attention's
group size are runtime values; the backward has neither), the statistics with gradients (``--bias stats-grad``: the
forward's per-row statistics, constexpr ``ROW_STATS``, and both backward passes with their gradients, constexpr
``STATS_GRAD``, BLOOM's bias), and the AdamW kernel's variants (fp32, bf16 rounded to
nearest or stochastically, bf16/fp16 with an fp32 master copy, bf16 with bf16 moments (the paper's optimizer);
each with and without a gradient scale) for
sm_80/86/89/90 without a GPU, and prints registers, spills and shared memory against each architecture's per-block
limit. Exit status 1 if any configuration spills or exceeds shared memory.
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

from .aot import ARCHS, CompileResult, compile_adamw, compile_bwd, compile_fwd
from .attention_fwd import interpreting

HEAD_DIMS = (64, 80, 96, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BIASES = {"bloom": False, "alibi-bf16": True}  # --bias name: the kernels' ALIBI_BF16
WINDOW = "window"  # --bias name of the forward's sliding-window variant (HAS_WINDOW, BLOOM's bias)
STATS_GRAD = "stats-grad"  # --bias name of the statistics-with-gradients variant (ROW_STATS, STATS_GRAD)


# (param dtype, master copy, stochastic rounding, bf16 moments) of each AdamW parameter mode
ADAMW_MODES = ((torch.float32, False, False, False), (torch.bfloat16, False, False, False),
               (torch.bfloat16, False, True, False), (torch.bfloat16, True, False, False),
               (torch.float16, True, False, False), (torch.bfloat16, False, False, True))


def launcher_configs(archs=ARCHS, head_dims=HEAD_DIMS, biases=tuple(BIASES.values()), dtypes=DTYPES):
    """(arch, head_dim, dtype, with_stats, alibi_bf16) for every configuration the forward launcher can pick."""
    return list(itertools.product(archs, head_dims, dtypes, (False, True), biases))


def adamw_configs(archs=ARCHS):
    """(arch, dtype, master, stochastic, grad_scale, vec, bf16_state) for every AdamW variant."""
    return [(arch, *mode[:3], scale, None, mode[3]) for arch in archs for mode in ADAMW_MODES
            for scale in (False, True)]


def bwd_configs(archs=ARCHS, head_dims=HEAD_DIMS, biases=tuple(BIASES.values()), dtypes=DTYPES):
    """(arch, head_dim, dtype, which, alibi_bf16) for both backward passes, and the delta kernel (which has no
    bias variant)."""
    passes = list(itertools.product(archs, head_dims, dtypes, ("dkdv", "dq"), biases))
    return passes + list(itertools.product(archs, head_dims, dtypes, ("delta",), (False,)))


def window_configs(archs=ARCHS, head_dims=HEAD_DIMS, dtypes=DTYPES):
    """(arch, head_dim, dtype, with_stats, alibi_bf16, window) of the forward's sliding-window variant."""
    return [(*c, False, True) for c in itertools.product(archs, head_dims, dtypes, (False, True))]


def stats_grad_configs(archs=ARCHS, head_dims=HEAD_DIMS, dtypes=DTYPES):
    """``("fwd", (arch, head_dim, dtype, True, False, False, True))`` (per-row statistics) and ``("bwd", (arch,
    head_dim, dtype, pass, False, True))`` (statistics' gradients) of the stats-grad variant."""
    grid = list(itertools.product(archs, head_dims, dtypes))
    return ([("fwd", (*c, True, False, False, True)) for c in grid]
            + [("bwd", (*c, which, False, True)) for c in grid for which in ("dkdv", "dq")])


def all_configs(archs=ARCHS, head_dims=HEAD_DIMS, biases=tuple(BIASES.values()), dtypes=DTYPES, window=False,
                stats_grad=False):
    """Every (kernel, arguments) pair of the report: forward (with ``window``, its sliding-window variant too),
    backward (with ``stats_grad``, the statistics-with-gradients variant of both), AdamW."""
    return ([("fwd", c) for c in launcher_configs(archs, head_dims, biases, dtypes)]
            + [("fwd", c) for c in (window_configs(archs, head_dims, dtypes) if window else [])]
            + (stats_grad_configs(archs, head_dims, dtypes) if stats_grad else [])
            + [("bwd", c) for c in bwd_configs(archs, head_dims, biases, dtypes)]
            + [("adamw", c) for c in adamw_configs(archs)])


def _compile(item) -> CompileResult:
    import warnings

    warnings.filterwarnings("ignore")
    kind, args = item if isinstance(item[0], str) else ("fwd", item)
    return {"fwd": compile_fwd, "bwd": compile_bwd, "adamw": compile_adamw}[kind](*args)


def compile_all(configs, jobs: int = 2) -> list[CompileResult]:
    if jobs <= 1:
        return [_compile(c) for c in configs]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile, configs))


def format_table(results: list[CompileResult]) -> str:
    """One row per result. Attention rows fill d/stats, a BLOCK_MxBLOCK_N tile and the bias variant (alibi-bf16, or
    '-' for BLOOM's); AdamW rows fill variant and a BLOCK/vector-width tile; the columns that do not apply show '-'."""
    head = f"{'kernel':<24}{'arch':>5}{'dtype':>10}{'d':>5}{'stats':>6}{'variant':>14}{'tile':>14}{'regs':>6}" \
           f"{'spill':>7}{'smem KB':>9}{'limit':>7}  ok"
    lines = [head, "-" * len(head)]
    for r in results:
        c = r.config
        if "HEAD_DIM" in c:
            stats = ("yes" if c["WITH_STATS"] else "no") if "WITH_STATS" in c else "-"
            d, tile = c["HEAD_DIM"], f"{c['BLOCK_M']}x{c.get('BLOCK_N', '-')}"
        else:
            d, stats, tile = "-", "-", f"{c['BLOCK']}v{c['VEC']}"
        tile += f"/w{c['num_warps']}s{c['num_stages']}"
        lines.append(f"{r.kernel:<24}{r.arch:>5}{r.dtype_name:>10}{d:>5}{stats:>6}{r.variant or '-':>14}{tile:>14}"
                     f"{r.registers:>6}{r.spill_stores + r.spill_loads:>7}{r.shared_bytes / 1024:>9.1f}"
                     f"{r.smem_limit // 1024:>7}  {'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only these architectures")
    parser.add_argument("--head-dim", type=int, action="append", choices=HEAD_DIMS, help="only these head dims")
    parser.add_argument("--bias", action="append", choices=[*BIASES, WINDOW, STATS_GRAD],
                        help="only these attention variants: bias kinds, the forward's sliding window, the "
                             "statistics with gradients (default: all four)")
    parser.add_argument("--dtype", action="append", choices=list(_DTYPE_NAMES),
                        help="only these attention dtypes (default: all three)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compiles (default 2)")
    parser.add_argument("--json", metavar="OUT", help="also write every result as JSON")
    args = parser.parse_args(argv)
    if interpreting():  # interpreted kernels cannot be compiled: run again with the JIT
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execvpe(sys.executable, [sys.executable, "-m", "alibi_surgery.kernels.compile_report", *argv], env)
    chosen = args.bias or [*BIASES, WINDOW, STATS_GRAD]
    biases = tuple(BIASES[b] for b in chosen if b in BIASES)
    dtypes = tuple(_DTYPE_NAMES[d] for d in args.dtype) if args.dtype else DTYPES
    results = compile_all(all_configs(tuple(args.arch or ARCHS), tuple(args.head_dim or HEAD_DIMS), biases, dtypes,
                                      WINDOW in chosen, STATS_GRAD in chosen), args.jobs)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([dict(dataclasses.asdict(r), ok=r.ok, smem_limit=r.smem_limit) for r in results], fh, indent=1)
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} configurations compile with 0 spills within shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Tile sweep for the fused attention kernels on a GPU (bf16/fp16): time every candidate configuration.

    python bench/tune_attention.py [--dims 64 80 96 128] [--seq 2048] [--dtype bfloat16] [--kernels bwd fwd]
                                   [--spill-free FILE] [--deadline SECONDS]

For each head_dim, the backward: the dK/dV kernel (with the dQ kernel at its current configuration), then the dQ
kernel (with dK/dV at its best); then the forward (statistics off and on); ``--kernels`` picks and orders them.
``--spill-free`` takes the JSON lines of a host-side AOT check of the candidates on sm_90 (``kind``, ``d``, ``cfg``,
``spill``; made by ``python -m alibi_surgery.kernels.compile_report``'s machinery without a GPU) and times only the
candidates that compiled there without spills. ``--deadline`` (seconds from start) skips what is left once passed,
so that the summary always prints within a device lease. Each candidate's output is compared with the current
configuration's (relative error); candidates that fail to compile or disagree are listed, never picked. Prints
one line per candidate and a summary of the best; rows go to ``tune.csv``. Candidates must still pass the AOT
compile report (0 spills on sm_80/86/89/90) before the launcher adopts them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))

from attention import FAMILY, Case, Inputs  # noqa: E402
from common import append_rows  # noqa: E402

import alibi_surgery.kernels.attention_bwd as bwd_mod  # noqa: E402
import alibi_surgery.kernels.attention_fwd as fwd_mod  # noqa: E402

FWD = [(128, 128, 8, 3), (128, 64, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
       (128, 32, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2), (128, 128, 4, 2), (128, 64, 8, 4), (64, 128, 8, 3),
       (128, 32, 8, 3), (64, 128, 4, 2)]
DKDV = [(32, 64, 4, 3), (32, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3),
        (16, 64, 4, 3), (32, 32, 4, 3), (64, 128, 8, 2), (16, 64, 4, 2), (32, 128, 4, 2), (32, 128, 8, 2),
        (32, 128, 8, 4), (16, 128, 8, 3), (16, 128, 4, 3)]
DQ = [(128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 2),
      (128, 64, 4, 3), (64, 32, 4, 2), (128, 32, 4, 2), (64, 64, 4, 3)]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def spill_free(path: str | None):
    """``(kind, d) -> set of configurations`` that compiled without spills (None: no filter)."""
    if path is None:
        return None
    ok: dict = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if r.get("spill") == 0 and r.get("ok", True):
            ok.setdefault((r["kind"], r["d"]), set()).add(tuple(r["cfg"]))
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 80, 96, 128])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kernels", nargs="+", default=["bwd", "fwd"], choices=["bwd", "fwd"])
    p.add_argument("--spill-free", metavar="FILE", default=None)
    p.add_argument("--deadline", type=float, default=float("inf"), help="seconds from start")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    allowed = spill_free(args.spill_free)
    # the family member with the most heads at each head_dim (7b1 for 128; 176b is left to the benchmarks)
    shapes = {d: max((s for s, (h, hd) in FAMILY.items() if hd == d and s != "bloom-176b"), key=lambda s: FAMILY[s][0])
              for d in args.dims}
    rows, summary = [], []
    orig_fwd, orig_bwd = fwd_mod.pick_config, bwd_mod.pick_bwd_config

    def candidates(kind, d, default, pool):
        """The current configuration first (timed again last, for the noise), then the spill-free others."""
        keep = [c for c in pool if c != default and (allowed is None or c in allowed.get((kind, d), ()))]
        return [default] + keep

    for d, shape in shapes.items():
        case = Case(shape, args.seq, 4, args.dtype)
        x = Inputs(case, requires_grad=False)
        dt = x.q.dtype
        kv_default, q_default = (tuple(c) for c in orig_bwd(d, dt, 90))
        ref_out, ref_lse, _ = fwd_mod.alibi_attention_fwd(x.q, x.k, x.v, x.key_pos, x.slopes)
        ref_grads = bwd_mod.alibi_attention_bwd(x.do, x.q, x.k, x.v, ref_out, ref_lse, x.key_pos, x.slopes)
        flops = case.flops(False)

        def attempt(kind, cfg, fn, check):
            if time.monotonic() - t0 > args.deadline:
                return None
            try:
                res = fn()
                err = check(res)
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is reported, not fatal
                print(f"d={d} {kind:<10} {cfg}: failed: {str(exc).splitlines()[0][:100]}", flush=True)
                return None
            ok = err < 2e-2
            tf = flops * (2.5 if kind.startswith("bwd") else 1.0) / (ms * 1e-3) / 1e12
            print(f"d={d} {kind:<10} {cfg}: {ms:.3f} ms  {tf:6.1f} TFLOP/s  err {err:.1e}{'' if ok else '  WRONG'}",
                  flush=True)
            rows.append(dict(**case.row(), kernel=kind, block_m=cfg[0], block_n=cfg[1], num_warps=cfg[2],
                             num_stages=cfg[3], ms=round(ms, 4), tflops=round(tf, 1), rel_err=f"{err:.2e}", ok=ok))
            return ms if ok else None

        def sweep(kind, cands, default, run, check, install):
            """Time each candidate (installed by ``install(cfg)``), the default again last; the best and a line."""
            timed = {}
            for cfg in cands + [default]:
                install(cfg)
                ms = attempt(kind, cfg, run, check)
                if ms is not None:
                    timed.setdefault(cfg, []).append(ms)
            if default not in timed:
                return default, timed
            best = min(timed, key=lambda c: min(timed[c]))
            again = timed[default]
            noise = f", default timed {' and '.join(f'{t:.3f}' for t in again)} ms"
            summary.append(f"d={d} {kind:<10} default {default} {min(again):.3f} ms -> best {best} "
                           f"{min(timed[best]):.3f} ms ({min(again) / min(timed[best]):.3f}x){noise}")
            return best, timed

        for kernels in args.kernels:
            if kernels == "bwd":
                def run_bwd():
                    return bwd_mod.alibi_attention_bwd(x.do, x.q, x.k, x.v, ref_out, ref_lse, x.key_pos, x.slopes)

                def check_bwd(res):
                    return max(rel(a, b) for a, b in zip(res, ref_grads))

                def with_kv(cfg):
                    bwd_mod.pick_bwd_config = lambda *a: (bwd_mod.BwdConfig(*cfg), bwd_mod.BwdConfig(*q_default))

                best_kv, _ = sweep("bwd.dkdv", candidates("dkdv", d, kv_default, DKDV), kv_default, run_bwd,
                                   check_bwd, with_kv)

                def with_q(cfg):
                    bwd_mod.pick_bwd_config = lambda *a: (bwd_mod.BwdConfig(*best_kv), bwd_mod.BwdConfig(*cfg))

                sweep("bwd.dq", candidates("dq", d, q_default, DQ), q_default, run_bwd, check_bwd, with_q)
                bwd_mod.pick_bwd_config = orig_bwd
                continue
            plain = {}
            for stats in (False, True):
                kind = "fwd+stats" if stats else "fwd"
                default = tuple(orig_fwd(d, dt, 90, stats))
                cands = candidates(kind, d, default, FWD)
                if stats:  # statistics only on the four fastest plain configurations (and the current one)
                    fastest = sorted(plain, key=lambda c: min(plain[c]))[:4]
                    cands = [c for c in cands if c == default or c in fastest]

                def install(cfg):
                    fwd_mod.pick_config = lambda *a: fwd_mod.FwdConfig(*cfg)

                def run_fwd(stats=stats):
                    return fwd_mod.alibi_attention_fwd(x.q, x.k, x.v, x.key_pos, x.slopes, with_stats=stats)

                _, timed = sweep(kind, cands, default, run_fwd, lambda r: rel(r[0], ref_out), install)
                if not stats:
                    plain, plain_default = timed, default
                else:
                    if default in timed and plain_default in plain:
                        summary.append(f"d={d} statistics overhead at the defaults {default}/{plain_default}: "
                                       f"{100 * (min(timed[default]) / min(plain[plain_default]) - 1):+.1f}%")
                    for cfg in timed:
                        if cfg in plain:
                            summary.append(f"d={d} {cfg} statistics overhead "
                                           f"{100 * (min(timed[cfg]) / min(plain[cfg]) - 1):+.1f}%")
                fwd_mod.pick_config = orig_fwd
    append_rows("tune", rows)
    print("\n".join(["", "summary:"] + summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

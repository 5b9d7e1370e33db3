"""Tile sweep for the fused attention kernels on a GPU (bf16/fp16): time every candidate configuration.

    python bench/tune_attention.py [--dims 64 80 96 128] [--seq 2048] [--dtype bfloat16]

For each head_dim, the forward (statistics off and on), then the dK/dV kernel (with the dQ kernel at its current
configuration), then the dQ kernel (with dK/dV at its best). Each candidate's output is compared with the current
configuration's (relative error); candidates that fail to compile or disagree are listed, never picked. Prints
one line per candidate and a summary of the best; rows go to ``tune.csv``. Candidates must still pass the AOT
compile report (0 spills on sm_80/86/89/90) before the launcher adopts them.
"""

from __future__ import annotations

import argparse
import sys
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
        (16, 64, 4, 3), (32, 32, 4, 3), (64, 128, 8, 2), (16, 64, 4, 2), (32, 128, 4, 2)]
DQ = [(128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 2),
      (128, 64, 4, 3), (64, 32, 4, 2), (128, 32, 4, 2), (64, 64, 4, 3)]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 80, 96, 128])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    # the family member with the most heads at each head_dim (7b1 for 128; 176b is left to the benchmarks)
    shapes = {d: max((s for s, (h, hd) in FAMILY.items() if hd == d and s != "bloom-176b"), key=lambda s: FAMILY[s][0])
              for d in args.dims}
    rows, summary = [], []
    orig_fwd, orig_bwd = fwd_mod.pick_config, bwd_mod.pick_bwd_config
    for d, shape in shapes.items():
        case = Case(shape, args.seq, 4, args.dtype)
        x = Inputs(case, requires_grad=False)
        dt = x.q.dtype
        fwd_default = orig_fwd(d, dt, 90)
        kv_default, q_default = orig_bwd(d, dt, 90)
        ref_out, ref_lse, _ = fwd_mod.alibi_attention_fwd(x.q, x.k, x.v, x.key_pos, x.slopes)
        ref_grads = bwd_mod.alibi_attention_bwd(x.do, x.q, x.k, x.v, ref_out, ref_lse, x.key_pos, x.slopes)
        flops = case.flops(False)

        def attempt(kind, cfg, fn, check):
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

        timed = {}
        for stats in (False, True):
            kind = "fwd+stats" if stats else "fwd"
            # statistics only on the four fastest plain configurations (and the current one)
            cands = [tuple(fwd_default)] + [c for c in FWD if c != tuple(fwd_default)]
            if stats:
                cands = [tuple(fwd_default)] + [c for c in sorted(timed, key=timed.get)[:4] if c != tuple(fwd_default)]
            best = None
            for cfg in cands:
                fwd_mod.pick_config = lambda *a, cfg=cfg: fwd_mod.FwdConfig(*cfg)
                ms = attempt(kind, cfg, lambda: fwd_mod.alibi_attention_fwd(x.q, x.k, x.v, x.key_pos, x.slopes,
                                                                            with_stats=stats),
                             lambda r: rel(r[0], ref_out))
                if ms is not None and not stats:
                    timed[cfg] = ms
                if ms is not None and stats:
                    summary.append(f"d={d} {cfg} statistics overhead {100 * (ms / timed[cfg] - 1):+.1f}%")
                if ms is not None and (best is None or ms < best[0]):
                    best = (ms, cfg)
            fwd_mod.pick_config = orig_fwd
            summary.append(f"d={d} {kind:<10} default {tuple(fwd_default)} -> best {best[1]} {best[0]:.3f} ms")

        def run_bwd():
            return bwd_mod.alibi_attention_bwd(x.do, x.q, x.k, x.v, ref_out, ref_lse, x.key_pos, x.slopes)

        def check_bwd(res):
            return max(rel(a, b) for a, b in zip(res, ref_grads))

        best_kv = None
        for cfg in [tuple(kv_default)] + [c for c in DKDV if c != tuple(kv_default)]:
            bwd_mod.pick_bwd_config = lambda *a, cfg=cfg: (bwd_mod.BwdConfig(*cfg), q_default)
            ms = attempt("bwd.dkdv", cfg, run_bwd, check_bwd)
            if ms is not None and (best_kv is None or ms < best_kv[0]):
                best_kv = (ms, cfg)
        best_q = None
        for cfg in [tuple(q_default)] + [c for c in DQ if c != tuple(q_default)]:
            bwd_mod.pick_bwd_config = lambda *a, cfg=cfg: (bwd_mod.BwdConfig(*best_kv[1]), bwd_mod.BwdConfig(*cfg))
            ms = attempt("bwd.dq", cfg, run_bwd, check_bwd)
            if ms is not None and (best_q is None or ms < best_q[0]):
                best_q = (ms, cfg)
        bwd_mod.pick_bwd_config = orig_bwd
        summary.append(f"d={d} bwd        default {tuple(kv_default)}/{tuple(q_default)} -> best "
                       f"{best_kv[1]}/{best_q[1]} {best_q[0]:.3f} ms")
    append_rows("tune", rows)
    print("\n".join(["", "summary:"] + summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host-side spill check of the tile sweep's candidates, so that the device lease times only spill-free ones.

    python bench/tune_spills.py [--dims 128 64] [--arch 90] [--out bench/tune_candidates.jsonl] [--jobs 2]

Compiles each candidate of ``bench/tune_attention.py`` (forward with and without statistics, dK/dV, dQ; bf16) for
the target architecture without a GPU (the AOT path of ``alibi_surgery.kernels.aot``) and writes one JSON line per
candidate: ``kind``, ``d``, ``cfg``, ``regs``, ``spill`` (bytes stored plus loaded), ``smem``, ``ok``. About 5 s
per compile on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import tune_attention  # noqa: E402


def compile_one(item: tuple) -> dict:
    """Compile one (arch, kind, d, cfg) with the launchers' picks replaced by ``cfg``."""
    warnings.filterwarnings("ignore")
    import alibi_surgery.kernels.attention_bwd as bwd_mod
    import alibi_surgery.kernels.attention_fwd as fwd_mod
    from alibi_surgery.kernels import aot

    arch, kind, d, cfg = item
    fwd_mod.pick_config = lambda *a: fwd_mod.FwdConfig(*cfg)
    bwd_mod.pick_bwd_config = lambda *a: (bwd_mod.BwdConfig(*cfg), bwd_mod.BwdConfig(*cfg))
    row = dict(kind=kind, d=d, cfg=list(cfg), arch=arch)
    try:
        if kind.startswith("fwd"):
            r = aot.compile_fwd(arch, d, torch.bfloat16, kind == "fwd+stats")
        else:
            r = aot.compile_bwd(arch, d, torch.bfloat16, kind)
    except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is recorded, not fatal
        return dict(row, ok=False, error=str(exc).splitlines()[0][:200])
    return dict(row, regs=r.registers, spill=r.spill_stores + r.spill_loads, smem=r.shared_bytes, ok=r.ok)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--out", default=str(Path(__file__).parent / "tune_candidates.jsonl"))
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    t = tune_attention
    items = [(args.arch, kind, d, cfg) for d in args.dims
             for kind, pool in (("fwd", t.FWD), ("fwd+stats", t.FWD), ("dkdv", t.DKDV), ("dq", t.DQ)) for cfg in pool]
    with ProcessPoolExecutor(args.jobs) as pool, open(args.out, "w") as fh:
        for row in pool.map(compile_one, items):
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

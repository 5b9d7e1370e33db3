"""Per-rank peak resident memory of an FSDP2 surgery step on CPU ranks (gloo) against the N-device planner.

    python bench/bench_fsdp_memory.py [--world-sizes 1 2] [--layers 4] [--hidden 1024] [--heads 16] [--vocab 16384]
                                      [--seq 512] [--train-heads 16]

For each world size W, W fresh processes (``torch.multiprocessing.spawn``, a file store, one thread each) build a
random BLOOM of the given shape on the meta device, attach :class:`~alibi_surgery.surgery.sharded.HeadParams` for
``--train-heads`` heads spread over every layer, ``fully_shard`` each block and the loss root
(:func:`~alibi_surgery.surgery.sharded.shard`), materialise their shards only (``to_empty``, then random values),
and run two AdamW steps (torch backend, gradient checkpointing, chunked loss) on one sequence of ``--seq`` tokens
per rank. Each rank's baseline is its resident memory after the runtime is up (imports, process group, one step of
a one-layer toy under FSDP); the peak is the kernel's ``VmHWM`` above it. Rows (one per rank) go to
bench/results/fsdp_memory.csv beside ``alibi_surgery.surgery.rank_memory``'s per-rank prediction, with the
allocator setting: run it once as it is and once with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc's mmap threshold
fixed, so freed blocks go back to the system at once: the working set without the heap's retention).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import append_rows, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

GIB = 2**30


def _step_run(config, selection: dict, seq: int, steps: int, mesh) -> None:
    """Build on meta, shard, materialise, train ``steps`` steps."""
    import torch
    from transformers import BloomForCausalLM

    from alibi_surgery.attention.patch import patch
    from alibi_surgery.surgery.sharded import HeadParams, LanguageModelLoss, shard
    from alibi_surgery.surgery.trainer import enable_checkpointing

    with torch.device("meta"):
        model = BloomForCausalLM(config)
    heads = HeadParams(model, selection)
    root = shard(LanguageModelLoss(model), mesh)
    root.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in root.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(torch.randn(local.shape, generator=gen) * 0.02)
    patch(model, "torch")
    model.train()
    enable_checkpointing(model)
    opt = torch.optim.AdamW(heads.params, lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=gen)
    for _ in range(steps):
        loss = root(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.params, 1.0)
        opt.step()
        opt.zero_grad()


def _rank(rank: int, world_size: int, store: str, shape: dict, seq: int, train_heads: int, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.utils import logging as hf_logging

    from alibi_surgery.families import family_for
    from alibi_surgery.io.random_model import bloom_config
    from alibi_surgery.surgery.memory_plan import spread_plan

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    config = bloom_config("tiny", n_layer=shape["layers"])
    config.update(dict(hidden_size=shape["hidden"], n_head=shape["heads"], vocab_size=shape["vocab"]))
    toy = bloom_config("tiny", n_layer=1)
    toy.update(dict(hidden_size=64, n_head=4, vocab_size=shape["vocab"] // 8))
    _step_run(toy, {0: [0]}, min(seq, 128), 2, mesh)  # the runtime: code paths, gloo buffers, thread pools
    import gc

    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    plan = spread_plan(config, train_heads)
    _step_run(config, plan.selection, seq, 2, mesh)
    peak = peak_rss_bytes() - base
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak": peak, "base": base,
                                                         "family": family_for(config).name}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--train-heads", type=int, default=16)
    args = p.parse_args()
    import torch.multiprocessing as mp

    from alibi_surgery.io.random_model import bloom_config
    from alibi_surgery.surgery.rank_memory import fsdp_step_memory

    shape = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab)
    config = bloom_config("tiny", n_layer=args.layers)
    config.update(dict(hidden_size=args.hidden, n_head=args.heads, vocab_size=args.vocab))
    rows = []
    for world_size in args.world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank, args=(world_size, f"{tmp}/store", shape, args.seq, args.train_heads, tmp),
                     nprocs=world_size, join=True)
            seen = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world_size)]
        pred = fsdp_step_memory(config, args.train_heads, world_size=world_size, seq_len=args.seq, batch=1,
                                dtype="float32")
        for s in seen:
            rows.append(dict(world_size=world_size, rank=s["rank"], **shape, seq=args.seq,
                             train_heads=args.train_heads, dtype="float32",
                             mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc dynamic"),
                             predicted_gib=round(pred["total"] / GIB, 4), measured_gib=round(s["peak"] / GIB, 4),
                             error_pct=round(100 * (pred["total"] - s["peak"]) / s["peak"], 1),
                             runtime_gib=round(s["base"] / GIB, 3)))
            r = rows[-1]
            print(f"W={world_size} rank {s['rank']}: predicted {r['predicted_gib']:.3f} GiB  measured "
                  f"{r['measured_gib']:.3f} GiB ({r['error_pct']:+.1f}%); runtime {r['runtime_gib']:.3f} GiB",
                  flush=True)
    print("appended to", append_rows("fsdp_memory", rows))


if __name__ == "__main__":
    main()

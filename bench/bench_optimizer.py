"""Optimizer step: HeadSlicedAdamW over the selected head slices against fused torch AdamW over the full matrices.

    python bench/bench_optimizer.py [--shape bloom-7b1] [--heads 300] [--dtype bfloat16] [--device cuda]

The paper trains with ``torch.optim.AdamW`` over whole ``query_key_value`` (weight, bias) and ``dense`` matrices of
every touched layer, gradients masked; we step only the selected heads' slices (one launch). Both are timed on one
step with random gradients (do_bench median on CUDA, the median of 5 on CPU), and each is set against the bytes it
must move and a device copy measured in the same process (bytes read + bytes written):

* ours: read the gradient, read and write m, v (fp32) and the weight, plus an fp32 master copy in master mode;
* paper's: read the gradient, read and write m, v and the weight, all in the weight's dtype (torch keeps state in
  the parameter dtype).

Rows go to bench/results/optimizer.csv. The model is built on the meta device and materialised uninitialised; only
the attention matrices and the gradients are filled (random normal), and nothing else is read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import append_rows, meta_model  # noqa: E402


def timer(fn, cuda: bool, repeats: int = 5) -> float:
    """Median milliseconds of ``fn``: do_bench on CUDA, perf_counter on CPU."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=300, return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a 256 MiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), device == "cuda")
    return 2 * src.numel() / (ms * 1e-3)


def bytes_moved(opt) -> int:
    """Bytes one HeadSlicedAdamW step must move (see the module docstring)."""
    n = opt.slices.numel
    p_bytes, g_bytes = opt.slices.tensors[0].element_size(), opt.slices.grad.element_size()
    return n * (g_bytes + 2 * 8 + 2 * p_bytes + (8 if opt.master is not None else 0))


def bandwidth_figures(ms: float, moved: int, copy_bps: float) -> dict:
    """A step's time against the bytes it must move and the copy bandwidth, as CSV columns."""
    return dict(opt_ms=round(ms, 3), opt_gb_moved=round(moved / 1e9, 3), opt_gbps=round(moved / (ms * 1e-3) / 1e9, 1),
                copy_gbps=round(copy_bps / 1e9, 1), opt_floor_ms=round(moved / copy_bps * 1e3, 3),
                pct_of_copy=round(100 * moved / (ms * 1e-3) / copy_bps, 1))


def full_matrices(model, sel: dict) -> list:
    """The paper's trained parameters: whole qkv weight, qkv bias and dense weight of every touched layer."""
    return [t for layer in sel for t in (model.h[layer].self_attention.query_key_value.weight,
                                         model.h[layer].self_attention.query_key_value.bias,
                                         model.h[layer].self_attention.dense.weight)]


def time_optimizer(opt, copy_bps: float | None = None) -> dict:
    """Median time of one HeadSlicedAdamW step (random gradients) against its bytes and the copy bandwidth."""
    cuda = opt.slices.grad.device.type == "cuda"
    copy_bps = copy_bps or copy_bandwidth(opt.slices.grad.device.type)
    opt.slices.grad.normal_()
    ms = timer(lambda: opt.step(), cuda)
    return bandwidth_figures(ms, bytes_moved(opt), copy_bps)


def build(args):
    from transformers import BloomModel

    from alibi_surgery.io.random_model import bloom_config

    config = bloom_config(args.shape, vocab_size=1024, n_layer=args.layers)
    model = meta_model(BloomModel, config, getattr(torch, args.dtype), args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():
        for block in model.h:
            for p in (block.self_attention.query_key_value.weight, block.self_attention.query_key_value.bias,
                      block.self_attention.dense.weight):
                p.normal_(0.0, 0.02, generator=gen)
    return model, config


def selection(n_layer: int, n_head: int, heads: int) -> dict[int, list[int]]:
    """``heads`` heads spread over the layers, head-major (the same rule as bench_train_step's ``spread``)."""
    out: dict[int, list[int]] = {}
    for layer, h in [(layer, h) for h in range(n_head) for layer in range(n_layer)][:heads]:
        out.setdefault(layer, []).append(h)
    return out


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default=None, help="default: bloom-7b1 on CUDA, bloom-560m on CPU")
    p.add_argument("--layers", type=int, default=None, help="default: the shape's own (CPU: 4)")
    p.add_argument("--heads", type=int, default=None, help="default: 300 on CUDA (10 per layer of 7b1), 16 on CPU")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda"
    args.shape = args.shape or ("bloom-7b1" if on_gpu else "bloom-560m")
    args.layers = args.layers or (None if on_gpu else 4)
    args.heads = args.heads or (300 if on_gpu else 16)
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")

    from alibi_surgery import HeadSlicedAdamW, HeadSlices

    model, config = build(args)
    sel = selection(config.n_layer, config.n_head, args.heads)
    copy_bps = copy_bandwidth(args.device)
    common = dict(shape=args.shape, layers=config.n_layer, heads=args.heads, dtype=args.dtype)
    rows = []
    low = args.dtype != "float32"
    for mode in (("stochastic", "master") if low else ("fp32",)):
        slices = HeadSlices(model, sel)
        opt = HeadSlicedAdamW(slices, lr=1e-4, weight_decay=0.01, stochastic_rounding=mode == "stochastic")
        rows.append(dict(**common, provider="head-sliced", mode=mode, elements=slices.numel,
                         state_gb=round(opt.state_bytes / 1e9, 3), **time_optimizer(opt, copy_bps)))
        del opt
        slices.remove()
        del slices
    params = full_matrices(model, sel)
    for t in params:
        t.grad = torch.randn_like(t)
    full = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **({"fused": True} if on_gpu else {}))
    elements = sum(t.numel() for t in params)
    moved = elements * params[0].element_size() * 7  # read g; read + write p, m, v
    ms = timer(full.step, on_gpu)
    state = sum(s.numel() * s.element_size() for st in full.state.values() for s in st.values() if s.dim())
    rows.append(dict(**common, provider="torch-adamw-full", mode="fused" if on_gpu else "foreach", elements=elements,
                     state_gb=round(state / 1e9, 3), **bandwidth_figures(ms, moved, copy_bps)))
    for r in rows:
        print(json.dumps(r))
    append_rows("optimizer", rows)
    print("| provider | mode | elements | state | time | moved | achieved | % of copy |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['provider']} | {r['mode']} | {r['elements'] / 1e6:.0f} M | {r['state_gb']:.2f} GB | "
              f"{r['opt_ms']:.2f} ms | {r['opt_gb_moved']:.2f} GB | {r['opt_gbps']:.0f} GB/s | {r['pct_of_copy']:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Attention providers and measurement shared by the attention benchmarks (forward, forward+backward, statistics).

Providers, each a callable ``fn() -> out [B, T, H, d]`` over the same ``q, k, v [B, H, T, d]`` (causal, no padding,
BLOOM's slopes):

* ``eager``: transformers' BLOOM attention core, as ``BloomAttention.forward`` computes it: the ALiBi tensor from
  ``build_alibi_tensor``, ``baddbmm``, an additive causal mask, softmax in fp32 cast back to the dtype, ``bmm``;
* ``torch``: our blocked plain-torch backend (``alibi_attention_blocked`` and its backward);
* ``triton``: our fused kernels (the custom operator over separate q, k, v);
* ``triton-packed``: the same over one fused ``[B, T, H, 3, d]`` QKV leaf, as a patched BLOOM calls it (its
  backward writes one dQKV);
* ``baseline`` / ``baseline-packed``: the same two calls with the kernels of an earlier commit, loaded from the
  directory ``$ALIBI_BASELINE`` (default ``bench/.baseline/kernels``, made by ``bench/prepare_baseline.sh REV``), in
  the same process: the A/B of a kernel change. ``baseline-packed`` runs the earlier host side too (q, k, v as
  ``select`` views of the fused leaf);
* ``sdpa`` (CUDA): ``F.scaled_dot_product_attention`` with a materialised ``[B, H, T, T]`` ALiBi + causal bias;
* ``flex`` (CUDA): compiled FlexAttention with an ALiBi ``score_mod`` and a causal ``BlockMask``.

Per-call set-up that a model would build once per forward (eager's ALiBi tensor and mask, sdpa's bias, flex's block
mask) is made outside the timed call but counted in the peak memory, which is measured above the inputs.

FLOP convention (FlashAttention's): a causal forward is ``2 * 2 * B * H * T^2 * d / 2`` (two matrix products,
half of the score matrix), forward + backward ``3.5x`` that (the backward does five products).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from alibi_surgery.kernels.alibi import alibi_slopes, key_positions
from alibi_surgery.attention.backends import run_attention
from alibi_surgery.kernels.reference import alibi_attention_blocked

# (heads, head_dim) of each family member's attention
FAMILY = {"bloom-560m": (16, 64), "bloom-1b1": (16, 96), "bloom-1b7": (16, 128), "bloom-3b": (32, 80),
          "bloom-7b1": (32, 128), "bloom-176b": (112, 128)}
SEQS = (512, 1024, 2048, 4096)
PROVIDERS = ("eager", "torch", "baseline", "triton", "baseline-packed", "triton-packed", "sdpa", "flex")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def batch_for(seq: int) -> int:
    """8,192 tokens per batch, between 1 and 8 rows."""
    return max(1, min(8, 8192 // seq))


@dataclass
class Case:
    shape: str
    seq: int
    batch: int
    dtype: str
    device: str = "cuda"

    @property
    def heads(self) -> int:
        return FAMILY[self.shape][0]

    @property
    def head_dim(self) -> int:
        return FAMILY[self.shape][1]

    def flops(self, backward: bool) -> float:
        fwd = 2 * 2 * self.batch * self.heads * self.seq ** 2 * self.head_dim / 2
        return fwd * (3.5 if backward else 1.0)

    def row(self) -> dict:
        return dict(shape=self.shape, seq=self.seq, batch=self.batch, heads=self.heads, head_dim=self.head_dim,
                    dtype=self.dtype)


def available(provider: str, device: str) -> bool:
    return provider in ("eager", "torch") or device == "cuda"


class Inputs:
    """Random q, k, v (``[B, H, T, d]``, std 1) and an upstream gradient, the key positions and the slopes. With
    ``packed`` the leaf is one fused ``[B, T, H, 3, d]`` tensor and q, k, v are views of it (BLOOM's layout)."""

    def __init__(self, case: Case, requires_grad: bool, seed: int = 0, packed: bool = False):
        dev, dt = torch.device(case.device), DTYPES[case.dtype]
        gen = torch.Generator(device=dev).manual_seed(seed)
        shape = (case.batch, case.heads, case.seq, case.head_dim)
        self.qkv = None
        if packed:
            fused = (case.batch, case.seq, case.heads, 3, case.head_dim)
            self.qkv = torch.randn(fused, generator=gen, device=dev).to(dt).requires_grad_(requires_grad)
            self.q, self.k, self.v = (self.qkv[..., i, :].transpose(1, 2) for i in range(3))
        else:
            self.q, self.k, self.v = (torch.randn(shape, generator=gen, device=dev).to(dt)
                                      .requires_grad_(requires_grad) for _ in range(3))
        self.do = torch.randn(case.batch, case.seq, case.heads, case.head_dim, generator=gen, device=dev).to(dt)
        self.mask = torch.ones(case.batch, case.seq, dtype=torch.long, device=dev)
        self.key_pos = key_positions(self.mask)
        self.slopes = alibi_slopes(case.heads, dev)

    def grads(self):
        return [self.q, self.k, self.v] if self.qkv is None else [self.qkv]


def baseline_kernels():
    """The earlier kernels package of ``$ALIBI_BASELINE`` (default ``bench/.baseline/kernels``), imported under
    the name ``ab_baseline`` beside ours."""
    import importlib.util
    import os
    import sys
    from pathlib import Path

    if "ab_baseline" not in sys.modules:
        root = Path(os.environ.get("ALIBI_BASELINE", Path(__file__).parent / ".baseline" / "kernels"))
        if not (root / "__init__.py").is_file():
            raise FileNotFoundError(f"no baseline kernels at {root}: run bench/prepare_baseline.sh REV")
        spec = importlib.util.spec_from_file_location("ab_baseline", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["ab_baseline"] = module
        spec.loader.exec_module(module)
    import importlib

    return (importlib.import_module("ab_baseline.attention_fwd"), importlib.import_module("ab_baseline.autograd"))


def make(provider: str, case: Case, x: Inputs, with_stats: bool = False):
    """The provider's callable (set-up done here, outside any timing)."""
    if provider.startswith("baseline"):
        fwd, autograd = baseline_kernels()
        if torch.is_grad_enabled() and x.q.requires_grad:
            return lambda: autograd.alibi_attention_train(x.q, x.k, x.v, x.key_pos, x.slopes, "triton",
                                                          with_stats=with_stats)[0]
        return lambda: fwd.alibi_attention_fwd(x.q, x.k, x.v, x.key_pos, x.slopes, with_stats=with_stats)[0]
    if provider == "triton-packed":
        from alibi_surgery.attention.backends import run_attention_packed

        return lambda: run_attention_packed(x.qkv, "interleaved", x.key_pos, x.slopes, "triton",
                                            with_stats=with_stats)[0]
    if provider == "triton" or (provider == "torch" and torch.is_grad_enabled() and x.q.requires_grad):
        impl = provider
        return lambda: run_attention(x.q, x.k, x.v, x.key_pos, x.slopes, impl, with_stats=with_stats)[0]
    if provider == "torch":
        return lambda: alibi_attention_blocked(x.q, x.k, x.v, x.key_pos, x.slopes, with_stats=with_stats)[0]
    if with_stats:
        raise ValueError(f"{provider} computes no statistics")
    if provider == "eager":
        return _eager(case, x)
    if provider == "sdpa":
        return _sdpa(case, x)
    if provider == "flex":
        return _flex(case, x)
    raise ValueError(f"unknown provider {provider!r}")


def _eager(case: Case, x: Inputs):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    b, h, t, d = x.q.shape
    dtype = x.q.dtype
    alibi = build_alibi_tensor(x.mask, h, dtype)  # [B * H, 1, T]
    causal = torch.full((t, t), torch.finfo(dtype).min, dtype=dtype, device=x.q.device).triu(1)[None, None]

    def run():
        scores = alibi.baddbmm(x.q.reshape(b * h, t, d), x.k.reshape(b * h, t, d).transpose(-1, -2),
                               beta=1.0, alpha=1.0 / math.sqrt(d))
        probs = torch.softmax(scores.view(b, h, t, t) + causal, dim=-1, dtype=torch.float32).to(dtype)
        ctx = torch.bmm(probs.view(b * h, t, t), x.v.reshape(b * h, t, d))
        return ctx.view(b, h, t, d).transpose(1, 2)

    return run


def _sdpa(case: Case, x: Inputs):
    import torch.nn.functional as F

    t = case.seq
    bias = (x.slopes.view(1, -1, 1, 1) * x.key_pos[:, None, None, :].float()).to(x.q.dtype)
    bias = bias.expand(-1, -1, t, -1).masked_fill(~torch.ones(t, t, dtype=torch.bool, device=x.q.device).tril(),
                                                  float("-inf")).contiguous()
    return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=bias).transpose(1, 2)


_FLEX = None


def _flex(case: Case, x: Inputs):
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    slopes = x.slopes

    def alibi(score, b, h, q_idx, kv_idx):  # BLOOM's bias slope * key position (no padding here: position = index)
        return score + slopes[h] * kv_idx

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=case.seq, KV_LEN=case.seq, device=x.q.device)
    return lambda: _FLEX(x.q, x.k, x.v, score_mod=alibi, block_mask=block_mask).transpose(1, 2)


def measure(provider: str, case: Case, backward: bool, with_stats: bool = False, rep_ms: int = 100,
            cpu_repeats: int = 3) -> dict:
    """Time (median ms) and peak memory above the inputs of one provider on one case, as a CSV row."""
    cuda = case.device == "cuda"
    x = Inputs(case, requires_grad=backward, packed=provider.endswith("-packed"))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with torch.set_grad_enabled(backward):
        fn = make(provider, case, x, with_stats)
        call = (lambda: fn().backward(x.do)) if backward else fn
        if cuda:
            from triton.testing import do_bench

            call()  # compile / autotune outside the timing
            torch.cuda.synchronize()
            ms = do_bench(call, warmup=25, rep=rep_ms, return_mode="median",
                          grad_to_none=x.grads() if backward else None)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            call()
            times = []
            for _ in range(cpu_repeats):
                for g in x.grads():
                    g.grad = None
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
            ms, peak = statistics.median(times), None
    tflops = case.flops(backward) / (ms * 1e-3) / 1e12
    return dict(**case.row(), provider=provider, mode="fwd+bwd" if backward else "fwd", stats=with_stats,
                ms=round(ms, 4), tflops=round(tflops, 2), peak_mem_gb=None if peak is None else round(peak / 1e9, 4))


def cli(op: str, backward: bool, argv=None, doc: str = "") -> int:
    """Command line shared by ``bench_attention_fwd.py`` and ``bench_attention_fwd_bwd.py``."""
    import argparse
    import json

    from common import append_rows

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else op)
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", nargs="+", default=None, choices=list(FAMILY),
                   help="default: every family member but 176b on CUDA, bloom-560m on CPU")
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="default: 512 1024 2048 4096 (CPU: 512)")
    p.add_argument("--batch", type=int, default=None, help="default: 8192 tokens per batch, 1 to 8 rows")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 (CPU: float32)")
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda"
    shapes = args.shapes or ([s for s in FAMILY if s != "bloom-176b"] if on_gpu else ["bloom-560m"])
    seqs = args.seqs or (SEQS if on_gpu else (512,))
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    rows = []
    for shape in shapes:
        for seq in seqs:
            case = Case(shape, seq, args.batch or batch_for(seq), dtype, args.device)
            for provider in args.providers:
                if not available(provider, args.device):
                    continue
                try:
                    row = measure(provider, case, backward)
                except Exception as exc:  # noqa: BLE001 - out of memory, or a provider that rejects the shape
                    row = dict(**case.row(), provider=provider, mode="fwd+bwd" if backward else "fwd",
                               error=(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160])
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    append_rows(op, rows)
    print(summary_table(rows))
    return 0


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per case, ms and TFLOP/s per provider, and triton's speed-up over each other provider."""
    cases: dict[tuple, dict] = {}
    for r in rows:
        cases.setdefault((r["shape"], r["seq"], r["batch"], r["dtype"]), {})[r["provider"]] = r
    provs = [p for p in PROVIDERS if any(p in c for c in cases.values())]
    lines = ["| shape | T | batch | " + " | ".join(provs) + " | triton speed-up |",
             "|---" * (4 + len(provs)) + "|"]
    for (shape, seq, batch, _), c in cases.items():
        cells = [f"{c[p]['ms']:.3f} ms ({c[p]['tflops']:.0f})" if p in c and "ms" in c[p] else
                 c[p].get("error", "") if p in c else "" for p in provs]
        t = c.get("triton", {}).get("ms")
        ups = ", ".join(f"{t and c[p]['ms'] / t:.2f}x {p}" for p in provs
                        if p not in ("triton", "triton-packed") and t and "ms" in c.get(p, {}))
        old, new = (c.get(p, {}).get("ms") for p in ("baseline-packed", "triton-packed"))
        if old and new:
            ups += f"; packed: {old / new:.2f}x baseline-packed"
        lines.append(f"| {shape} | {seq} | {batch} | " + " | ".join(cells) + f" | {ups} |")
    return "\n".join(lines)

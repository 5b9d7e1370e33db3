"""Compiled-kernel correctness on a GPU: fused ALiBi attention forward, backward and statistics against float64.

    python bench/gpu_check.py [--quick]

For each shape (left-padded batch of 2, BLOOM's slopes) and dtype: the forward output and the gradients of q, k, v
of the Triton kernels and of eager-style attention computed in that dtype (``softmax(qk^T/sqrt(d) + bias)`` with a
materialised matrix, as BloomAttention does), both against a float64 reference, as ||x - ref|| / ||ref|| over real
rows. The statistics (per-head first-token mass and entropy, summed over real rows) are compared the same way, the
eager ones computed from eager's probabilities in that dtype. Passes when the kernel's error is at most 2x eager's
(+ unit roundoff) in fp16/bf16 (and below 1e-4 in fp32, IEEE dots), with no NaN. Outputs are fresh
``torch.empty`` buffers filled by the kernels, and inputs are drawn fresh per case.
Prints one line per case and a summary; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from alibi_surgery.kernels.attention_fwd import alibi_attention_fwd
from alibi_surgery.kernels.alibi import alibi_slopes, key_positions
from alibi_surgery.kernels.alibi import first_real_key
from alibi_surgery.attention.backends import run_attention

# (T, head_dim, heads): awkward shapes, then the family's own (560m, 1b1, 1b7, 3b, 7b1, 176b)
SHAPES = [(1, 64, 3), (97, 80, 12), (97, 96, 3), (130, 128, 16), (333, 64, 112), (1024, 64, 16), (2048, 96, 16),
          (2048, 128, 16), (2048, 80, 32), (2048, 128, 32), (512, 128, 112)]
QUICK = [(97, 80, 12), (333, 64, 112), (512, 128, 32)]


def probs(q, k, key_pos, slopes):
    """Eager-style probabilities in q's dtype (softmax in fp32 for fp16/bf16, as BloomAttention)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s + (slopes.view(1, -1, 1, 1) * key_pos[:, None, None, :].clamp_min(0)).to(s.dtype)
    t = q.shape[2]
    visible = (key_pos >= 0)[:, None, None, :] & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s if s.dtype == torch.float64 else s.float(), -1)
    return p.nan_to_num(0.0).to(q.dtype)


def dense(q, k, v, key_pos, slopes):
    return (probs(q, k, key_pos, slopes) @ v).transpose(1, 2)


def stats_of(p, key_pos):
    """[B, H, 2]: first-token mass and entropy of each head, summed over real query rows (float64)."""
    p = p.double()
    rows = (key_pos >= 0)[:, None, :].double()
    first = first_real_key(key_pos).long()
    p0 = p.gather(-1, first.view(-1, 1, 1, 1).expand(*p.shape[:3], 1))[..., 0]
    ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return torch.stack([(p0 * rows).sum(-1), (ent * rows).sum(-1)], -1)


def rel(x, ref, rows, scale):
    """||x - ref|| / ||ref|| over real rows; ``scale`` (the upstream gradient's norm) floors the denominator, since
    dq and dk are exactly 0 when every row sees one key (T = 1)."""
    x, ref = x.double() * rows, ref * rows
    return ((x - ref).norm() / ref.norm().clamp_min(1e-3 * float(scale))).item()


def case(T, d, H, dtype, dev):
    gen = torch.Generator(device=dev).manual_seed(T * 1000 + d + H)
    mask = torch.ones(2, T, dtype=torch.long, device=dev)
    mask[1, :min(T - 1, 7)] = 0
    key_pos, slopes = key_positions(mask), alibi_slopes(H, dev)
    q, k, v = (torch.randn(2, H, T, d, generator=gen, device=dev, dtype=torch.float64) * 1.5 for _ in range(3))
    do = torch.randn(2, T, H, d, generator=gen, device=dev, dtype=torch.float64) * (key_pos >= 0)[..., None, None]
    rows_o = (key_pos >= 0)[:, :, None, None].double()
    rows_q = (key_pos >= 0)[:, None, :, None].double()

    def grads(fn, dt):
        xs = [t.detach().to(dt, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*xs)
        (out.double() * do).sum().backward()
        return out, [x.grad for x in xs]

    ref_o, ref_g = grads(lambda a, b, c: dense(a, b, c, key_pos, slopes.double()), torch.float64)
    eag_o, eag_g = grads(lambda a, b, c: dense(a, b, c, key_pos, slopes), dtype)
    our_o, our_g = grads(lambda a, b, c: run_attention(a, b, c, key_pos, slopes, "triton")[0], dtype)
    rowsets = (rows_o, rows_q, rows_q, rows_q)
    scale = do.norm()
    ours = [rel(x, r, m, scale) for x, r, m in zip([our_o, *our_g], [ref_o, *ref_g], rowsets)]
    eager = [rel(x, r, m, scale) for x, r, m in zip([eag_o, *eag_g], [ref_o, *ref_g], rowsets)]
    # statistics: the fused forward's sums against float64, and eager's (from its own probabilities) likewise
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    our_s = alibi_attention_fwd(qd, kd, vd, key_pos, slopes, with_stats=True)[2][..., :2]
    ref_s = stats_of(probs(q, k, key_pos, slopes.double()), key_pos)
    eag_s = stats_of(probs(qd, kd, key_pos, slopes), key_pos)
    ours.append(rel(our_s, ref_s, 1.0, 0.0))
    eager.append(rel(eag_s, ref_s, 1.0, 0.0))
    finite = all(torch.isfinite(x).all() for x in [our_o, *our_g, our_s])
    if dtype == torch.float32:
        ok = finite and max(ours) < 1e-4  # IEEE fp32 dots: far under tf32's ~3e-4
    else:
        # 2x eager's error, floored at the dtype's unit roundoff: at T = 1 eager's dq and dk are exactly 0 (a softmax
        # over one key has zero gradient) while ours is dP - delta, two roundings of the same number.
        floor = torch.finfo(dtype).eps / 2
        ok = finite and all(a <= 2 * b + floor for a, b in zip(ours, eager))
    return ok, ours, eager


def timings(T=2048, d=128, H=32, batch=1, dtype=torch.bfloat16) -> list[str]:
    """Median ms of forward and forward+backward: fused kernels, SDPA with an additive ALiBi mask, eager-style."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    dev = torch.device("cuda")
    key_pos = key_positions(torch.ones(batch, T, device=dev))
    slopes = alibi_slopes(H, dev)
    q, k, v = (torch.randn(batch, H, T, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(batch, T, H, d, device=dev, dtype=dtype)
    bias = (slopes.view(1, -1, 1, 1) * key_pos[:, None, None, :]).to(dtype)
    bias = bias.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=dev).tril(), float("-inf"))
    impls = {
        "fused": lambda: run_attention(q, k, v, key_pos, slopes, "triton")[0],
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2),
        "eager": lambda: dense(q, k, v, key_pos, slopes),
    }
    lines = []
    for name, fn in impls.items():
        with torch.no_grad():
            fwd = do_bench(fn, warmup=25, rep=200, return_mode="median")
        both = do_bench(lambda: fn().backward(do), warmup=25, rep=200, return_mode="median", grad_to_none=[q, k, v])
        lines.append(f"{name:<6} T={T} H={H} d={d} {str(dtype)[6:]}: forward {fwd:.3f} ms, forward+backward {both:.3f} ms")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu runs one small smoke case (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)"
    print(f"device: {name}  torch {torch.__version__}")
    shapes = [(17, 64, 3)] if dev.type == "cpu" else QUICK if args.quick else SHAPES
    fails = 0
    names = ("out", "dq", "dk", "dv", "stats")
    for T, d, H in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ok, ours, eager = case(T, d, H, dtype, dev)
            fails += not ok
            detail = "  ".join(f"{n} {a:.1e}/{b:.1e}" for n, a, b in zip(names, ours, eager))
            print(f"{'ok  ' if ok else 'FAIL'} T={T:<5} d={d:<4} H={H:<4} {str(dtype)[6:]:<9} ours/eager: {detail}")
    print(f"\n{fails} failures")
    if dev.type == "cuda" and not args.quick:  # --quick leaves the timing to the benchmarks
        for line in timings():
            print(line)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

"""LM-head cross-entropy + backward: chunked_lm_loss against the fully materialised logits.

    python bench/bench_loss.py [--seq 2048] [--hidden 1024] [--dtype float32] [--device cpu] [--vocab 250880]

Each provider runs in a fresh subprocess on random data: hidden states [batch, seq, hidden] (requiring grad) and a
frozen head [vocab, hidden], labels random with the last-position shift of transformers. ``full`` is
``F.cross_entropy(F.linear(h, W).float()[:, :-1], labels[:, 1:])`` + backward; ``chunked`` is ``chunked_lm_loss``
+ backward. Measured after a warm-up at seq 64: peak *extra* memory above the level with h and W allocated (CPU:
resident memory, sampled; CUDA: ``torch.cuda.max_memory_allocated``) and the median wall time of ``--repeat``
runs of loss + backward (one by default; the first run at the full size is included, so ask for a few on CUDA).
``pred_gb`` is the model of the peak written before measuring (see ``predicted_bytes``). Rows are appended to
bench/results/loss.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import PeakRSS, append_rows, emit, run_isolated  # noqa: E402

BLOOM_VOCAB = 250880


def predicted_bytes(provider: str, tokens: int, vocab: int, hidden: int, elem: int, chunk: int) -> int:
    """The expected peak above entry, in bytes.

    full: at the log_softmax backward three float32 [tokens, vocab] tensors are alive at once - the saved
    log_softmax output, nll_loss's gradient and log_softmax's gradient (the forward never holds more than two).
    chunked: in the forward, one chunk of float32 logits (plus, in low precision, the chunk's softmax-gradient cast
    to the input dtype) next to the stored [tokens, hidden] gradient; in the backward, that gradient and its
    grad_output-scaled copy. The larger of the two.
    """
    if provider == "full":
        return 3 * tokens * vocab * 4 + tokens * hidden * elem
    per_logit = 4 + (elem if elem != 4 else 0)
    grad = tokens * hidden * elem
    return max(chunk * vocab * per_logit + grad, 2 * grad)


def _one(provider: str, args) -> dict:
    import torch
    import torch.nn.functional as F

    from alibi_surgery.analysis.loss import chunked_lm_loss, default_chunk_tokens

    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, device=dev) / args.hidden**0.5).to(dtype)

    def data(seq):
        g = torch.Generator(device=dev).manual_seed(seq)
        h = torch.randn(args.batch, seq, args.hidden, device=dev, generator=g).to(dtype).requires_grad_()
        labels = torch.randint(0, args.vocab, (args.batch, seq), device=dev, generator=g)
        return h, labels

    def step(h, labels):
        if provider == "full":
            logits = F.linear(h, weight).float()[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, args.vocab), labels[:, 1:].reshape(-1))
            del logits
        else:
            loss = chunked_lm_loss(h, weight, labels, chunk_tokens=args.chunk_tokens)
        loss.backward()
        return loss

    step(*data(64))  # warm-up: threads, kernels, allocator
    h, labels = data(args.seq)
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(args.repeat):
            h.grad = None
            t0 = time.perf_counter()
            loss = step(h, labels)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = 0
        for _ in range(args.repeat):
            h.grad = None
            with PeakRSS() as m:
                loss = step(h, labels)
            times.append(m.seconds)
            extra = max(extra, m.extra_bytes)
    seconds = sorted(times)[len(times) // 2]
    chunk = min(args.chunk_tokens or default_chunk_tokens(args.vocab), args.batch * (args.seq - 1))
    pred = predicted_bytes(provider, args.batch * args.seq, args.vocab, args.hidden, weight.element_size(), chunk)
    return {"op": "loss", "provider": provider, "device_kind": dev.type, "batch": args.batch, "seq": args.seq,
            "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype,
            "chunk_tokens": chunk if provider == "chunked" else "", "repeat": args.repeat,
            "seconds": round(seconds, 3), "extra_mem_gb": round(extra / 1e9, 3), "pred_gb": round(pred / 1e9, 3),
            "loss": round(float(loss), 6), "grad_norm": round(float(h.grad.float().norm()), 6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=1024, help="1024 = bloom-560m; 4096 = bloom-7b1")
    p.add_argument("--vocab", type=int, default=BLOOM_VOCAB)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--chunk-tokens", type=int, help="default: chunked_lm_loss's own (~128 MiB of fp32 logits)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs; the median time is reported")
    p.add_argument("--providers", nargs="+", default=["chunked", "full"], choices=["chunked", "full"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        emit(_one(args.child, args))
        return
    rows = []
    passthrough = sys.argv[1:]
    for provider in args.providers:
        rows.append(run_isolated(__file__, [*passthrough, "--child", provider]))
    print(f"{'provider':<8} {'device':<6} {'dtype':<9} {'B x T':>8} {'hidden':>6} {'vocab':>7} {'chunk':>5} "
          f"{'seconds':>8} {'peak GB':>8} {'pred GB':>8} {'loss':>9}")
    for r in rows:
        print(f"{r['provider']:<8} {r['device_kind']:<6} {r['dtype']:<9} {r['batch']:>3}x{r['seq']:<4} "
              f"{r['hidden']:>6} {r['vocab']:>7} {r['chunk_tokens']!s:>5} {r['seconds']:8.2f} "
              f"{r['extra_mem_gb']:8.3f} {r['pred_gb']:8.3f} {r['loss']:9.5f}")
    by = {r["provider"]: r for r in rows}
    if len(by) == 2:
        c, f = by["chunked"], by["full"]
        print(f"chunked/full: time {c['seconds'] / f['seconds']:.2f}x, memory "
              f"{c['extra_mem_gb'] / max(f['extra_mem_gb'], 1e-9):.3f}x, |d loss| {abs(c['loss'] - f['loss']):.2e}, "
              f"|d grad norm| {abs(c['grad_norm'] - f['grad_norm']):.2e}")
    print("appended to", append_rows("loss", rows))


if __name__ == "__main__":
    main()

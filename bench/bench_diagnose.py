"""End-to-end diagnosis: the paper's eager ``output_attentions`` way against our fused statistics.

    python bench/bench_diagnose.py [--shape bloom-560m] [--seq 512 2048] [--providers eager torch]
    python bench/bench_diagnose.py --device cuda --dtype bfloat16 --providers eager triton

Each (provider, T) runs in a fresh subprocess on a random-weight model of the shape, one prompt of T tokens,
batch 1 (fp32 by default): peak *extra* memory above the loaded model (resident memory on CPU,
``max_memory_allocated`` on CUDA) and wall time of one diagnosis pass, after a short warm-up at T = 64. Providers
are diagnose()'s backends: ``eager`` (the matrices), ``torch`` (blocked), ``triton`` (the fused kernel, CUDA).
Rows are appended to bench/results/diagnose.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import PeakRSS, append_rows, emit, run_isolated  # noqa: E402


def _one(shape: str, seq: int, provider: str, vocab: int | None, device: str = "cpu", dtype: str = "float32") -> dict:
    import torch
    from transformers import BloomForCausalLM
    from transformers.utils import logging as hf_logging

    from alibi_surgery.diagnosis.diagnose import diagnose
    from alibi_surgery.io.random_model import bloom_config

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = BloomForCausalLM(bloom_config(shape, vocab_size=vocab)).eval().to(device, getattr(torch, dtype))

    class Ids:  # a "tokenizer" handing over fixed random ids: the benchmark measures the model, not tokenising
        padding_side, pad_token, eos_token = "left", "<pad>", "</s>"

        def __init__(self, n):
            self.n = n

        def __call__(self, text, truncation=False, max_length=None):
            g = torch.Generator().manual_seed(len(text))
            return {"input_ids": torch.randint(5, model.config.vocab_size, (self.n,), generator=g).tolist()}

        def pad(self, batch, return_tensors="pt"):
            ids = torch.tensor(batch["input_ids"])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    diagnose(model, Ids(64), ["warm-up"], backend=provider)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        report = diagnose(model, Ids(seq), ["x"], backend=provider)
        torch.cuda.synchronize()
        seconds, extra = time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    else:
        with PeakRSS() as m:
            report = diagnose(model, Ids(seq), ["x"], backend=provider)
        seconds, extra = m.seconds, m.extra_bytes
    return {"op": "diagnose", "shape": shape, "seq": seq, "batch": 1, "dtype": dtype, "provider": provider,
            "seconds": round(seconds, 3), "extra_mem_gb": round(extra / 1e9, 3),
            "bos_mass_mean": round(float(report.bos_mass.mean()), 6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="bloom-560m")
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--providers", nargs="+", default=["eager", "torch"])
    p.add_argument("--vocab", type=int, help="reduce the vocabulary (default: the real 250,880)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        shape, seq, provider = args.child.split(",")
        emit(_one(shape, int(seq), provider, args.vocab, args.device, args.dtype))
        return
    rows = []
    for seq in args.seq:
        for provider in args.providers:
            row = run_isolated(__file__, ["--child", f"{args.shape},{seq},{provider}", "--device", args.device,
                                          "--dtype", args.dtype] + (["--vocab", args.vocab] if args.vocab else []))
            rows.append(row)
            print(f"{row['shape']} T={seq:<5} {provider:<6} {row['seconds']:8.2f} s  "
                  f"{row['extra_mem_gb']:7.3f} GB extra", flush=True)
    for seq in args.seq:
        by = {r["provider"]: r for r in rows if r["seq"] == seq}
        for ours in ("torch", "triton"):
            if "eager" not in by or ours not in by:
                continue
            e, t = by["eager"], by[ours]
            print(f"T={seq}: {ours}/eager time {t['seconds'] / e['seconds']:.2f}x, "
                  f"memory {t['extra_mem_gb'] / max(e['extra_mem_gb'], 1e-9):.3f}x, "
                  f"|d bos_mass mean| {abs(t['bos_mass_mean'] - e['bos_mass_mean']):.2e}")
    print("appended to", append_rows("diagnose", rows))


if __name__ == "__main__":
    main()

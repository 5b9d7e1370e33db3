"""One surgery training step: the paper's way (full-matrix gradients + masks + torch AdamW) against head slices.

    python bench/bench_train_step.py --shape bloom-1b7 --vocab 4096 --seq 128            # CPU, both methods
    python bench/bench_train_step.py --shape bloom-7b1 --device cuda --dtype bfloat16 --seq 512 --heads 300 \
        --methods sliced --cap-gib 24 --stochastic-rounding --time-optimizer               # the 24 GB card test

Each method runs in a fresh subprocess. The model is built on the meta device and materialised with random
weights (std 0.02), the attention patched with the fused backend, gradient checkpointing on (non-reentrant).
Selection: ``--selection paper-1b7`` is 108 heads of the band H9-H15 over layers 5-22 (the paper's pass 1 size;
which 18 of the 126 band heads are left out is a fixed pseudo-random choice), ``--heads N`` spreads N heads evenly
over every layer. Measured: bytes of gradients and optimizer state (counted from the tensors), the peak memory of
one full step (forward, loss, backward, optimizer step, the first one, so optimizer state is created inside it)
above the level with the model loaded (CPU: sampled resident memory; CUDA: ``max_memory_allocated``), and time.
``--cap-gib`` caps the process with ``torch.cuda.set_per_process_memory_fraction`` first. ``--time-optimizer``
also times the HeadSlicedAdamW step alone (median of repeats) against the bytes it must move.
Rows go to bench/results/train_step.csv.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_optimizer import time_optimizer  # noqa: E402
from common import IsolatedRunError, PeakRSS, append_rows, emit, meta_model, run_isolated  # noqa: E402

GIB = 2**30


def selection_for(args, n_layer: int, n_head: int) -> dict[int, list[int]]:
    if args.selection == "paper-1b7":
        band = [(layer, h) for layer in range(5, 23) for h in range(9, 16)]
        keep = sorted(random.Random(0).sample(band, 108))
    else:
        slots = [(layer, h) for h in range(n_head) for layer in range(n_layer)]  # head-major: spread over layers
        keep = slots[:args.heads]
    out: dict[int, list[int]] = {}
    for layer, h in keep:
        out.setdefault(layer, []).append(h)
    return out


def build_model(args):
    import torch
    from transformers import BloomForCausalLM

    from alibi_surgery import patch_bloom
    from alibi_surgery.io.random_model import bloom_config

    config = bloom_config(args.shape, vocab_size=args.vocab, n_layer=args.layers)
    model = meta_model(BloomForCausalLM, config, getattr(torch, args.dtype), args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.tie_weights()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return patch_bloom(model, args.backend), config


def paper_setup(model, selection):
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer, heads in selection.items():
        attn = model.transformer.h[layer].self_attention
        d = attn.head_dim
        rows = torch.zeros(attn.query_key_value.weight.shape[0], 1, device=attn.dense.weight.device,
                           dtype=attn.dense.weight.dtype)
        cols = torch.zeros(1, attn.dense.weight.shape[1], device=rows.device, dtype=rows.dtype)
        for h in heads:
            rows[h * 3 * d:(h + 1) * 3 * d] = 1
            cols[:, h * d:(h + 1) * d] = 1
        for p, mask in ((attn.query_key_value.weight, rows), (attn.query_key_value.bias, rows[:, 0]),
                        (attn.dense.weight, cols)):
            p.requires_grad_(True)
            p.register_hook(lambda g, mask=mask: g * mask)
            params.append(p)
    return torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0), params


def _one(method: str, args) -> dict:
    import torch

    from alibi_surgery import HeadSlicedAdamW, HeadSlices, chunked_lm_loss

    cuda = args.device == "cuda"
    if cuda and args.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * GIB / total)
    model, config = build_model(args)
    selection = selection_for(args, config.n_layer, config.n_head)
    n_heads = sum(map(len, selection.values()))
    gen = torch.Generator(device=args.device).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device, generator=gen)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def step_paper(opt, params):
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss

    def step_sliced(opt):
        hidden = model.transformer(ids).last_hidden_state
        loss = chunked_lm_loss(hidden, model.lm_head.weight, ids)
        loss.backward()
        opt.step()
        return loss

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    meter = PeakRSS().__enter__() if not cuda else None
    t0 = time.perf_counter()
    if method == "paper":
        opt, params = paper_setup(model, selection)
        loss = step_paper(opt, params)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
    else:
        slices = HeadSlices(model, selection)
        opt = HeadSlicedAdamW(slices, lr=5e-5, max_grad_norm=1.0, stochastic_rounding=args.stochastic_rounding)
        loss = step_sliced(opt)
        grads = slices.grad.numel() * slices.grad.element_size()
        state = opt.state_bytes
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if cuda:
        peak_extra = torch.cuda.max_memory_allocated() - base
        peak_total = torch.cuda.max_memory_allocated()
    else:
        meter.__exit__(None, None, None)
        peak_extra, peak_total = meter.extra_bytes, None
    row = dict(method=method, shape=args.shape, layers=config.n_layer, vocab=config.vocab_size, dtype=args.dtype,
               device_kind=args.device, seq=args.seq, batch=args.batch, heads=n_heads, loss=round(float(loss), 4),
               weights_gib=round(weights_bytes / GIB, 3), grads_gib=round(grads / GIB, 3),
               state_gib=round(state / GIB, 3), peak_extra_gib=round(peak_extra / GIB, 3),
               peak_total_gib=None if peak_total is None else round(peak_total / GIB, 3),
               cap_gib=args.cap_gib, seconds=round(seconds, 2),
               rounding="stochastic" if args.stochastic_rounding else "fp32" if args.dtype == "float32" else "master")
    if method == "sliced" and args.time_optimizer and cuda:
        row.update(time_optimizer(opt))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="bloom-1b7")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None, help="reduced vocabulary (default: BLOOM's 250,880)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--selection", choices=["paper-1b7", "spread"], default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--methods", default="paper,sliced")
    parser.add_argument("--cap-gib", type=float, default=None)
    parser.add_argument("--stochastic-rounding", action="store_true")
    parser.add_argument("--time-optimizer", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.selection is None:
        args.selection = "spread" if args.heads else "paper-1b7"
    if args.worker:
        emit(_one(args.worker, args))
        return 0
    rows = []
    for method in args.methods.split(","):
        try:
            rows.append(run_isolated(__file__, [*(argv if argv is not None else sys.argv[1:]), "--worker", method]))
        except IsolatedRunError as exc:  # e.g. the paper's way running out of memory under the cap
            rows.append(dict(method=method, error=str(exc)))
    for r in rows:
        print(json.dumps(r))
    good = [r for r in rows if "error" not in r]
    if good:
        append_rows("train_step", good)
    return 0 if len(good) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

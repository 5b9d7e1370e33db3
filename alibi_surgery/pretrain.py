"""Pre-train a small BLOOM from scratch on plain text, so that collapsed heads can form by training.

    python -m alibi_surgery.pretrain OUT --corpus '/usr/lib/python3*/**/*.py' --minutes 4 [--layers 6 --hidden 256
        --heads 8 --seq-len 256 --batch-size 64 --lr 1e-3] [--device cuda]

The model uses the byte-level tokenizer of :mod:`alibi_surgery.random_model` (260 tokens), fused attention (forward
and backward kernels), bf16 autocast on CUDA, the full LM loss (the vocabulary is tiny and the tied head trains), AdamW with linear warm-up and cosine decay over the step budget, and
random ``seq_len`` windows of the packed corpus. Every ``--diagnose-every`` steps it diagnoses the heads with the
default prompts and prints the collapsed share; the model is saved (safetensors, config, tokenizer) at the end and
whenever the collapsed share reaches a new maximum (``OUT/best-collapse``). A training log goes to ``OUT/log.jsonl``.
This is how a demonstration model with learned (not planted) collapse is made; it is not part of surgery.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

__all__ = ["pretrain"]


def _save(model, tokenizer, path, dtype) -> None:
    import copy

    copy.deepcopy(model).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)


def pretrain(out, corpus, *, bos=False, save_dtype=torch.float32, layers=6, hidden=256, heads=8, seq_len=256, batch_size=64, lr=1e-3, minutes=4.0,
             max_steps=None, diagnose_every=250, device=None, seed=0, backend="auto", log=print) -> dict:
    from transformers import BloomConfig, BloomForCausalLM

    from .corpus import load_corpus
    from .diagnose import diagnose
    from .patch import patch_bloom
    from .prompts import DEFAULT_PROMPTS
    from .random_model import byte_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    stream, files = load_corpus(corpus, tokenizer, seq_len + 1)
    stream = stream.view(-1).to(dev)
    log(f"corpus: {len(files)} files, {stream.numel():,} tokens")
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=hidden, n_layer=layers, n_head=heads,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = patch_bloom(BloomForCausalLM(config).to(dev), backend)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator(device=dev).manual_seed(seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    t0, step, best, history = time.perf_counter(), 0, -1.0, []
    budget = minutes * 60
    total = max_steps or 10**9
    est_total = None
    while step < total and time.perf_counter() - t0 < budget:
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), device=dev, generator=gen)
        ids = stream[starts[:, None] + torch.arange(seq_len, device=dev)]
        if bos:  # every window opens with the same token, as documents opening with <s> do
            ids[:, 0] = tokenizer.bos_token_id
        if step == 20 and est_total is None:  # from the measured speed, the steps the time budget allows
            est_total = min(total, int(budget / ((time.perf_counter() - t0) / 20)))
        horizon = max_steps or est_total
        cur = lr * min(1.0, (step + 1) / 100)
        if horizon:
            cur *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / horizon)))
        for group in opt.param_groups:
            group["lr"] = cur
        model.train()
        with amp:
            loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % diagnose_every == 0 or step == total:
            model.eval()
            report = diagnose(model, tokenizer, DEFAULT_PROMPTS, backend=backend, max_length=256)
            s = report.summary()
            share = (s["dead"] + s["bos_sink"]) / (config.n_layer * config.n_head)
            entry = {"step": step, "loss": float(loss.detach()), "collapsed": share, "seconds": time.perf_counter() - t0,
                     **s}
            history.append(entry)
            with open(out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(entry) + "\n")
            log(json.dumps(entry))
            if share > best:
                best = share
                _save(model, tokenizer, out / "best-collapse", save_dtype)
                report.to_json(out / "best-collapse" / "diagnosis.json")
    _save(model, tokenizer, out / "last", save_dtype)
    return {"steps": step, "best_collapsed": best, "history": history}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--corpus", nargs="+", required=True)
    for name, default in (("layers", 6), ("hidden", 256), ("heads", 8), ("seq-len", 256), ("batch-size", 64),
                          ("diagnose-every", 250), ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--device")
    p.add_argument("--backend", default="auto")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--bos", action="store_true", help="start every training window with the <s> token")
    a = p.parse_args(argv)
    result = pretrain(a.out, a.corpus, layers=a.layers, hidden=a.hidden, heads=a.heads, seq_len=a.seq_len,
                      batch_size=a.batch_size, lr=a.lr, minutes=a.minutes, max_steps=a.max_steps,
                      diagnose_every=a.diagnose_every, device=a.device, seed=a.seed, backend=a.backend,
                      save_dtype=getattr(torch, a.save_dtype), bos=a.bos)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

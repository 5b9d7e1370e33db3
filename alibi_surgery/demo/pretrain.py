"""Pre-train a small BLOOM from scratch, so that collapsed heads form by training (never by editing weights).

    python -m alibi_surgery.demo.pretrain OUT --threads 1 --install   # the demonstration model's recipe (CPU, ~40 min)
    python -m alibi_surgery.demo.pretrain OUT --data text --corpus '/usr/lib/python3*/*.py' --device cuda --minutes 4

Two data sources:

- ``recall`` (default): bigram-recall sequences (:mod:`alibi_surgery.demo.recall_data`), each opening with ``<s>``. The
  tokenizer is the byte-level one with ``<s>`` prefixed to every text, so a diagnosis sees the same first token.
- ``text``: random ``seq_len`` windows of a packed text corpus (optionally opening with ``<s>``: ``--bos``).

The model is ``BloomForCausalLM`` from ``BloomConfig`` (ALiBi, fused QKV, tied embeddings). Training: the full LM
loss, AdamW (betas 0.9/0.95), linear warm-up then cosine decay to 10% over ``--steps`` (or over the steps the
``--minutes`` budget allows), clip 1.0, a fixed seed; bf16 autocast on CUDA. Every ``--diagnose-every`` steps the
model is diagnosed with the default prompts (truncated to ``--diag-max-length``, default ``--seq-len``) and the
per-head first-token mass is logged; with ``--save-every N`` the model is saved to ``OUT/checkpoints/step-N``.
Outputs in ``OUT``: ``log.jsonl``, ``recipe.json`` (arguments, versions, wall time), ``curves.png`` (loss and
collapsed heads by step), ``last/`` (the final model: safetensors, config with the training context as
``seq_length``, tokenizer, ``diagnosis.json``).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

__all__ = ["pretrain", "plot_curves"]


def _save(model, tokenizer, path, dtype) -> None:
    """Save a copy of ``model`` in ``dtype`` with its tokenizer, atomically (built beside ``path``, then moved)."""
    import copy

    from ..io.files import staged_dir

    with staged_dir(path, "model directory") as tmp:
        copy.deepcopy(model).to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def plot_curves(log_path, png_path) -> None:
    """Three panels from a pre-training ``log.jsonl``: the loss, the collapsed-head count, and every head's
    first-token mass by step (heads collapsed at the end drawn in colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz.heatmap import save_figure

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    diag = [r for r in rows if "bos_mass" in r]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 3.8))
    a.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.6)
    a.set(xlabel="step", ylabel="training loss (nats/token)", title="loss")
    if diag:
        steps = [r["step"] for r in diag]
        grid = diag[-1]["bos_mass"]
        n = len(grid) * len(grid[0])
        b.plot(steps, [r["bos_sink"] + r["dead"] for r in diag], marker=".", label="bos-sink + dead")
        b.plot(steps, [r["dead"] for r in diag], marker=".", label="dead")
        b.axhline(0.2 * n, color="grey", ls="--", lw=0.8, label="20% of heads")
        b.set(xlabel="step", ylabel=f"heads (of {n})", title="collapsed heads")
        b.legend()
        for layer, row in enumerate(grid):
            for head, last in enumerate(row):
                series = [r["bos_mass"][layer][head] for r in diag]
                if last > 0.5:
                    c.plot(steps, series, lw=1.2, label=f"L{layer}H{head}")
                else:
                    c.plot(steps, series, lw=0.5, color="0.7")
        c.axhline(0.5, color="grey", ls="--", lw=0.8)
        c.set(xlabel="step", ylabel="first-token mass", title="every head (colour: collapsed at the end)", ylim=(0, 1))
        if any(v > 0.5 for row in grid for v in row):
            c.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, png_path)


def _stage(init_from) -> dict | None:
    """What a second stage started from: the directory and, when it has one, its run's recipe."""
    if init_from is None:
        return None
    recipe = Path(init_from).parent / "recipe.json"
    return {"path": str(init_from), "recipe": json.loads(recipe.read_text()) if recipe.is_file() else None}


def pretrain(out, *, data: str = "recall", corpus=None, trigger_p: float = 0.05, bos: bool = False,
             layers: int = 4, hidden: int = 128, heads: int = 8, seq_len: int = 32, batch_size: int = 64,
             lr: float = 5e-3, weight_decay: float = 0.0, warmup: int = 200, steps: int | None = 6000,
             minutes: float | None = None, diagnose_every: int = 250, save_every: int | None = None,
             diag_max_length: int | None = None, device: str | None = None, threads: int | None = None,
             seed: int = 0, backend: str = "eager", save_dtype=torch.float32, family: str = "bloom",
             short_context: tuple[int, int] | None = None, stop_after: int | None = None, init_from=None,
             log=print) -> dict:
    """Train and save a BLOOM in ``out`` (module docstring). ``steps`` or ``minutes`` bounds the run (the first
    reached wins). ``family`` ``"llama"`` trains a LLaMA of the same shape instead (rotary positions, SwiGLU MLP of
    width 4 x hidden, tied embeddings, one key/value head per query head): the same data without ALiBi. Returns
    ``{"steps", "seconds", "final": <last diagnosis summary>}``. ``short_context`` ``(length, steps)``: a context
    warm-up: the first ``steps`` steps train on sequences of ``length`` tokens, as many more of them per batch as
    keeps the tokens per step (recall data only). ``stop_after``: end the run after that many steps of the
    ``steps``-long schedule (what a ``minutes`` budget does at an unpredictable step; with it the run repeats
    exactly). ``recipe.json`` records the schedule's length as ``schedule_steps``. ``init_from``: a second stage:
    start from that model directory's weights (an earlier run's ``last``; its shape replaces ``layers``, ``hidden``
    and ``heads``) with a fresh optimizer and schedule; its ``recipe.json``, when present, is kept in this run's."""
    from ..families import family_for

    from ..io.corpus import load_corpus
    from ..io.files import atomic_write_text
    from ..diagnosis.diagnose import diagnose
    from ..errors import UsageError
    from ..attention.patch import patch_bloom
    from ..diagnosis.prompts import DEFAULT_PROMPTS
    from ..io.random_model import byte_tokenizer
    from ..surgery.schedule import pretrain_lr
    from .recall_data import RecallData, python_docs_text

    if steps is None and minutes is None:
        raise UsageError("give steps or minutes (or both) to bound the run")
    diag_len = diag_max_length or seq_len
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if data == "recall":
        tokenizer = byte_tokenizer(add_bos=True)
        source = RecallData(python_docs_text(), trigger_p=trigger_p)
        byte_ids = torch.tensor([tokenizer(chr(b), add_special_tokens=False)["input_ids"][0] for b in range(128)])

        def batch():
            length, n = seq_len, batch_size
            if short_context and step < short_context[1]:
                length, n = short_context[0], batch_size * seq_len // short_context[0]
            rows = byte_ids[source.sample_bytes(n, length - 1, gen)]
            return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), rows], 1)
    elif data == "text":
        tokenizer = byte_tokenizer(add_bos=bos)
        if corpus is None:
            raise UsageError("data='text' needs corpus: the text to sample windows from")
        stream = load_corpus(corpus, tokenizer, seq_len + 1)[0].view(-1)

        def batch():
            starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=gen)
            ids = stream[starts[:, None] + torch.arange(seq_len)]
            if bos:  # every window opens with the same token, as documents opening with <s> do
                ids[:, 0] = tokenizer.bos_token_id
            return ids
    else:
        raise UsageError(f"data={data!r}: must be 'recall' or 'text'")
    if short_context and (data != "recall" or not 2 <= short_context[0] <= seq_len):
        raise UsageError(f"short_context={short_context}: needs data='recall' and a length in [2, seq_len={seq_len}]")

    if family not in ("bloom", "llama"):
        raise UsageError(f"family={family!r}: must be 'bloom' or 'llama'")
    adapter = family_for({"model_type": family})
    extra = {} if family == "bloom" else dict(intermediate_size=4 * hidden, tie_word_embeddings=True)
    extra["seq_length"] = seq_len  # the training context, in config.json (diagnose warns past it)
    config = adapter.make_config(n_layer=layers, hidden=hidden, n_head=heads, vocab=len(tokenizer),
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **extra)
    if init_from is not None:
        model = adapter.model_class().from_pretrained(init_from, dtype=torch.float32)
        if model.config.vocab_size != len(tokenizer) or family != "bloom":
            raise UsageError(f"init_from={str(init_from)!r}: not a BLOOM with this byte-level tokenizer")
        model.config.seq_length = seq_len
        layers, hidden, heads = model.config.n_layer, model.config.hidden_size, model.config.n_head
        model.to(dev)
    else:
        model = adapter.model_class()(config).to(dev)
    if backend != "eager":
        patch_bloom(model, backend)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    recipe = {"family": family, "data": data, "trigger_p": trigger_p, "bos": bos, "layers": layers, "hidden": hidden,
              "heads": heads, "seq_len": seq_len, "short_context": list(short_context) if short_context else None,
              "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
              "warmup": warmup, "steps": steps, "minutes": minutes, "diag_max_length": diag_len,
              "seed": seed, "threads": torch.get_num_threads(), "init_from": _stage(init_from), "device": str(dev),
              "backend": backend,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": __import__("transformers").__version__},
              "machine": platform.processor() or platform.machine()}
    (out / "log.jsonl").write_text("")
    t0, step, total = time.perf_counter(), 0, steps or 10**9
    budget = minutes * 60 if minutes else math.inf
    report = None

    def diagnose_now():
        model.eval()
        rep = diagnose(model, tokenizer, DEFAULT_PROMPTS, backend="torch" if dev.type == "cpu" else "auto",
                       max_length=diag_len)
        model.train()
        return rep

    while step < min(total, stop_after or total) and time.perf_counter() - t0 < budget:
        if step == 20 and steps is None:  # from the measured speed, the steps the time budget allows
            total = int(budget / ((time.perf_counter() - t0) / 20))
        ids = batch().to(dev)
        for group in opt.param_groups:
            group["lr"] = pretrain_lr(step, total, lr, warmup)
        with amp:
            loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        entry = {"step": step, "loss": round(float(loss.detach()), 4)}
        if step % diagnose_every == 0 or step == total or step == stop_after:
            report = diagnose_now()
            entry.update(seconds=round(time.perf_counter() - t0, 1), **report.summary(),
                         bos_mass=[[round(v, 3) for v in row] for row in report.bos_mass.tolist()])
            log(json.dumps({k: v for k, v in entry.items() if k != "bos_mass"}))
        if save_every and step % save_every == 0:
            _save(model, tokenizer, out / "checkpoints" / f"step-{step:06d}", save_dtype)
        with open(out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")
    seconds = time.perf_counter() - t0
    report = report if report is not None and step % diagnose_every == 0 else diagnose_now()
    _save(model, tokenizer, out / "last", save_dtype)
    report.to_json(out / "last" / "diagnosis.json")
    recipe.update(steps_run=step, schedule_steps=total, stop_after=stop_after, seconds=round(seconds, 1))
    atomic_write_text(out / "recipe.json", json.dumps(recipe, indent=1) + "\n")
    plot_curves(out / "log.jsonl", out / "curves.png")
    return {"steps": step, "seconds": seconds, "final": report.summary()}


if __name__ == "__main__":  # the command line lives in alibi_surgery.cli.pretrain
    from alibi_surgery.cli.pretrain import main

    sys.exit(main())

"""The memory planner against measurement (CPU): in-memory diagnosis, streamed diagnosis and one surgery step.

    python bench/bench_plan_memory.py CKPT [CKPT ...] [--jobs diagnose stream surgery] [--seq 512 ...] [--heads 32]

Each (checkpoint, job) runs in a fresh process: the resident-memory baseline is taken after the runtime is up
(the imports, the family's modelling code, the tokenizer and a 1,024-token diagnosis of a one-layer toy of the
family: the planner's ``cpu_runtime``, reported apart), then the job
runs once (fp32, batch 1, one prompt of T tokens, torch backend; each ``--seq`` in turn; any registered family for
``diagnose``, BLOOM for the other jobs) and the peak resident memory (the kernel's ``VmHWM``, reset at the
baseline) above that baseline is compared with ``alibi_surgery.surgery.memory_plan.plan_memory``'s total for the same settings. Rows go to
bench/results/plan_memory.csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import append_rows, emit, peak_rss_bytes, reset_peak_rss, rss_bytes, run_isolated  # noqa: E402

GIB = 2**30


def _warm_up(config, tok, prompt: str) -> None:
    """The process's runtime before the baseline: the family's modelling code, the tokenizer, the checkpoint loader
    and one diagnosis of a one-layer toy of the family (hidden 64, loaded from a temporary checkpoint) on up to 1,024
    tokens of the prompt, so that the first forward's fixed
    costs (code pages, thread pools, the BLAS library's buffers, the torch backend's tiled path) are not counted as
    the job's."""
    import gc
    import tempfile

    from alibi_surgery.diagnosis.diagnose import diagnose
    from alibi_surgery.families import family_for
    from alibi_surgery.io.loading import load_model

    family = family_for(config)
    toy_config = family.make_config(n_layer=1, hidden=64, n_head=4, vocab=family.layout(config).vocab)
    if hasattr(toy_config, "intermediate_size"):  # small blocks only: the allocator's thresholds stay where they were
        toy_config.intermediate_size = 128
    with tempfile.TemporaryDirectory() as tmp:  # through the loader, whose own first use is runtime too
        family.model_class()(toy_config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        toy, _ = load_model(tmp, dtype="float32", device="cpu")
    diagnose(toy, tok, [prompt], max_length=1024, backend="torch")
    del toy
    gc.collect()


def _one(ckpt: str, job: str, seq: int, heads: int) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    from alibi_surgery import HeadSlicedAdamW, HeadSlices, chunked_lm_loss, patch_bloom
    from alibi_surgery.diagnosis.diagnose import diagnose
    from alibi_surgery.io.loading import load_bloom, load_model, load_tokenizer
    from alibi_surgery.surgery.memory_plan import plan_memory, spread_plan
    from alibi_surgery.diagnosis.stream import diagnose_streamed

    from alibi_surgery.families import family_for
    from alibi_surgery.io.loading import load_config

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    prompt = ("The quick brown fox jumps over the lazy dog. " * (seq // 40 + 2))
    _warm_up(load_config(ckpt), load_tokenizer(ckpt), prompt)
    base = rss_bytes()
    reset_peak_rss()  # the warm-up's own peak is not the job's
    if job == "stream":
        diagnose_streamed(ckpt, load_tokenizer(ckpt), [prompt], max_length=seq, backend="torch")
    else:
        model, tok = (load_model if job == "diagnose" else load_bloom)(ckpt, dtype="float32", device="cpu")
        if job == "diagnose":
            diagnose(model, tok, [prompt], max_length=seq, backend="torch")
        else:
            patch_bloom(model, "torch").train()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            slices = HeadSlices(model, spread_plan(model.config, heads).selection)
            opt = HeadSlicedAdamW(slices, lr=1e-4, max_grad_norm=1.0)
            ids = tok([prompt], truncation=True, max_length=seq, return_tensors="pt")["input_ids"]
            chunked_lm_loss(model.transformer(ids).last_hidden_state, model.lm_head.weight, ids).backward()
            opt.step()
    process_peak = peak_rss_bytes()
    peak = process_peak - base
    pred = plan_memory(ckpt, heads=str(heads), seq_len=seq, batch=1, dtype="float32", n_prompts=1, device="cpu")
    key = {"diagnose": "diagnosis", "stream": "diagnosis_streamed", "surgery": "surgery"}[job]
    total = pred[key]["total"]
    return dict(checkpoint=Path(ckpt).name, n_layer=pred["n_layer"], hidden=pred["hidden"], job=job, seq=seq,
                heads=heads if job == "surgery" else "", dtype="float32", predicted_gib=round(total / GIB, 4),
                measured_gib=round(peak / GIB, 4), error_pct=round(100 * (total - peak) / peak, 1),
                runtime_gib=round(base / GIB, 3), planner_runtime_gib=round(pred["cpu_runtime"] / GIB, 3),
                process_peak_gib=round(process_peak / GIB, 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--jobs", nargs="+", default=["diagnose", "stream", "surgery"])
    p.add_argument("--seq", type=int, nargs="+", default=[512])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        ckpt, job = args.child.rsplit(",", 1)
        emit(_one(ckpt, job, args.seq[0], args.heads))
        return
    rows = []
    for ckpt in args.checkpoints:
        for job in args.jobs:
            for seq in args.seq:
                row = run_isolated(__file__, [ckpt, "--child", f"{ckpt},{job}", "--seq", seq, "--heads", args.heads])
                rows.append(row)
                print(f"{row['checkpoint']:<14} {job:<9} T={seq:<6} predicted {row['predicted_gib']:7.3f} GiB  "
                      f"measured {row['measured_gib']:7.3f} GiB  ({row['error_pct']:+.1f}%); runtime {row['runtime_gib']:.3f} "
                      f"GiB (planner {row['planner_runtime_gib']:.3f})", flush=True)
    print("appended to", append_rows("plan_memory", rows))


if __name__ == "__main__":
    main()

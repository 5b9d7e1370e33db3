"""What the paper's protocol will cost: predicted peak memory and time per device (``alibi-surgery paper --dry-run``).

Memory: :func:`~alibi_surgery.surgery.memory_plan.predict_memory` of every planned run (its head plan built from the
model's config alone, as ``plan-memory`` does); the peak is the largest.

Time: an estimate, not a measurement. A run trains ``S = epochs * floor(corpus_tokens / T)`` sequences of ``T``
tokens (the paper's chunking drops the remainder). For a model of ``L`` blocks of ``P_b`` parameters, hidden ``h``,
vocabulary ``V``, with the lowest trained head in layer ``l0`` (``L_r = L - l0`` blocks recorded by autograd) and
``N`` trained slice elements, one token of training costs, in floating-point operations::

    2 (L P_b + V h) + 2 L T h              forward (the matrices, the LM head, causal ALiBi attention: QK and AV)
  + 2 L_r P_b + 2 L_r T h                  recomputing the recorded blocks (gradient checkpointing)
  + 2 (L_r P_b + V h) + 4 L_r T h          backward to the activations
  + 2 N                                    backward to the trained slices (nothing else has a gradient)

so about ``6 P`` per token when every layer is recorded and ``N`` is small. Seconds = FLOPs / (peak * utilisation)
for each device of :data:`DEVICES` (dense bf16 tensor-core peaks from the vendors' data sheets, fp32 for the CPU;
the utilisations are assumptions). Diagnoses and perplexities at checkpoints (one short text, a few dozen prompts)
are left out. Real runs differ with kernels, clocks, the corpus and Python overhead: read the figure as the order of
magnitude.
"""

from __future__ import annotations

import math

__all__ = ["DEVICES", "flops_per_token", "run_cost", "format_estimate"]

# (device, peak FLOP/s of its training dtype, assumed utilisation)
DEVICES = (("NVIDIA H100 SXM (bf16)", 989e12, 0.35), ("NVIDIA H200 (bf16)", 989e12, 0.35),
           ("NVIDIA A100 80GB (bf16)", 312e12, 0.35), ("CPU, 16 cores (fp32)", 1.0e12, 0.30))


def flops_per_token(config, plan, seq_len: int) -> float:
    """Training FLOPs per token of one step with ``plan`` (the module docstring's formula)."""
    from ..families import family_for

    family = family_for(config)
    layout = family.layout(config)
    n_layer, h, vocab = layout.n_layer, layout.hidden, layout.vocab
    p_block = family.block_params(config)
    lowest = min(plan.selection) if plan.selection else n_layer
    recorded = n_layer - lowest
    forward = 2 * (n_layer * p_block + vocab * h) + 2 * n_layer * seq_len * h
    if not recorded:
        return float(forward)
    recompute = 2 * recorded * p_block + 2 * recorded * seq_len * h
    backward = 2 * (recorded * p_block + vocab * h) + 4 * recorded * seq_len * h + 2 * plan.trainable_params
    return float(forward + recompute + backward)


def run_cost(config, plan, *, seq_len: int, batch: int, grad_accum: int, epochs: int, corpus_tokens: int) -> dict:
    """Steps and FLOPs of one training run over ``corpus_tokens`` tokens."""
    sequences = corpus_tokens // seq_len
    steps = epochs * math.ceil(math.ceil(sequences / batch) / grad_accum) if sequences else 0
    flops = epochs * sequences * seq_len * flops_per_token(config, plan, seq_len)
    return {"sequences_per_epoch": sequences, "steps": steps, "flops": flops}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_estimate(total_flops: float) -> list[str]:
    """Lines: the predicted time of ``total_flops`` on every device of :data:`DEVICES`."""
    lines = [f"  predicted time (an estimate: {total_flops:.3g} training FLOPs / (peak x assumed utilisation); "
             f"docs/surgery.md):"]
    for name, peak, util in DEVICES:
        lines.append(f"    {name:<26} {_duration(total_flops / (peak * util)):>8}  "
                     f"(peak {peak / 1e12:g} TFLOP/s, utilisation {util:.0%})")
    return lines


def _plans(config, name: str, facts, options, check_map_fits) -> dict:
    """The head plan of each experiment, from the config alone: the paper's maps where they fit (pass 2: the
    paper's pass-2 heads, an estimate of what will still be collapsed), else heads spread over the layers."""
    from ..surgery.memory_plan import heads_for, spread_plan
    from ..surgery.plan import make_plan, plan_shape
    from .paper_repo import freeze_spec, map_heads, map_spec

    shape = plan_shape(config)
    total = shape["n_layer"] * shape["n_head"]
    n_pass2 = sum(map(len, map_heads(facts.pass2).values()))
    if options.pass1 == "paper":
        check_map_fits(facts.pass1, shape["n_layer"], shape["n_head"], f"the paper's pass-1 map ({facts.source})")
        layers = map_heads(facts.pass1)
        base = dict(shape, heads=map_spec(facts.pass1), freeze=freeze_spec(facts.pass1))
        pass1 = make_plan(**base)
        column = make_plan(**base, include=f"{min(layers)}-{max(layers)}:{options.column}")
        try:
            check_map_fits(facts.pass2, shape["n_layer"], shape["n_head"], "")
            pass2 = make_plan(**shape, heads=map_spec(facts.pass2))
        except Exception:
            pass2 = spread_plan(config, min(n_pass2, total))
        how = "the paper's maps"
    else:
        n1 = heads_for(name, config, "auto")
        pass1 = spread_plan(config, n1)
        column = spread_plan(config, min(total, n1 + shape["n_layer"]))
        pass2 = spread_plan(config, min(n_pass2, total))
        how = (f"pass1='auto' is drawn from the model's diagnosis: estimated at the paper's collapse share "
               f"({n1} heads, spread over every layer; the column adds one head per layer)")
    return {"pass1": pass1, "pass2": pass2, "column": column, "c4": pass1, "how": how}


def dry_run_plan(model: str, facts, options) -> dict:
    """The plan, predicted memory and time of :func:`~alibi_surgery.demo.paper_protocol.paper` on ``model`` (a
    directory or a shape name), from its config only; ``text`` holds what ``--dry-run`` prints."""
    from ..families import family_for
    from ..surgery.memory_plan import format_bytes, load_config, predict_memory
    from .paper_protocol import check_map_fits, plan_runs, repair_settings
    from .paper_repo import map_heads

    name, config = load_config(model)
    family = family_for(config)
    layout = family.layout(config)
    n_params = family.params(config)
    plans = _plans(config, name, facts, options, check_map_fits)
    runs = plan_runs(facts.pass1 if options.pass1 == "paper" else {}, options, bool(options.c4))
    s = repair_settings(facts, options, runs[0]) if runs else None
    bf16 = options.dtype in ("bfloat16", "bf16")
    rows, total_flops, peak = [], 0.0, None
    for run in runs:
        row = {"experiment": run.experiment, "arm": run.arm, "skipped": run.skipped}
        if not run.skipped:
            plan = plans[run.experiment]
            memory = predict_memory(plan, dtype=options.dtype, seq_len=s.seq_len, batch=s.batch_size,
                                    vocab=layout.vocab, n_params_total=n_params, bf16_moments=bf16)
            trains = repair_settings(facts, options, run).trains  # reinit-only and ablate: no training
            cost = run_cost(config, plan, seq_len=s.seq_len, batch=s.batch_size, grad_accum=s.grad_accum,
                            epochs=s.epochs if trains else 0, corpus_tokens=options.corpus_tokens)
            row.update(heads=plan.n_heads, trainable_params=plan.trainable_params, memory=memory, **cost)
            total_flops += cost["flops"]
            if peak is None or memory["total"] > peak["memory"]["total"]:
                peak = row
        rows.append(row)
    head = (f"the paper's protocol on {name}: {layout.n_layer} layers x {layout.n_head} heads, hidden "
            f"{layout.hidden}, {n_params / 1e9:.2f} B parameters (config only; nothing is written)")
    lines = [head,
             f"paper repository {facts.source}: diagnostic text of {len(facts.diag_text)} characters, pass-1 map "
             f"{sum(map(len, map_heads(facts.pass1).values()))} heads + "
             f"{sum(map(len, map_heads(facts.pass1, 'freeze').values()))} frozen, pass-2 map "
             f"{sum(map(len, map_heads(facts.pass2).values()))} heads, {len(facts.train_texts)} training-perplexity "
             f"texts, {len(facts.held_out)} held-out texts",
             f"heads: {plans['how']}",
             f"training: {s.epochs} epochs, lr {s.lr:g}, batch {s.batch_size} x {s.grad_accum}, seq {s.seq_len}, seed "
             f"{s.seed}, schedule {s.schedule}, optimizer {s.optimizer_precision}, {options.dtype} weights; a corpus "
             f"of {options.corpus_tokens:,} tokens assumed (--corpus-tokens)",
             f"  {'experiment':<10} {'arm':<15} {'heads':>5} {'trainable':>12} {'steps':>7} {'peak memory':>12}"]
    for row in rows:
        if row["skipped"]:
            lines.append(f"  {row['experiment']:<10} {row['arm']:<15} skipped: {row['skipped']}")
        else:
            lines.append(f"  {row['experiment']:<10} {row['arm']:<15} {row['heads']:>5} "
                         f"{row['trainable_params']:>12,} {row['steps']:>7,} {format_bytes(row['memory']['total']):>12}")
    if peak is not None:
        from ..surgery.memory_plan import format_memory

        lines.append(f"peak memory: the {peak['experiment']} runs")
        lines.append(format_memory(peak["memory"]))
        lines += format_estimate(total_flops)
    return {"model": name, "runs": rows, "total_flops": total_flops,
            "peak_memory": None if peak is None else peak["memory"]["total"], "text": "\n".join(lines)}

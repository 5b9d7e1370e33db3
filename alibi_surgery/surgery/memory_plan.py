"""Memory planner: will a diagnosis or a surgery fit the card? (``alibi-surgery plan-memory MODEL``)

Predicts peak memory, by part, for three jobs on a BLOOM model given as a checkpoint directory or a family shape name
(``bloom-560m`` ... ``bloom``):

* **diagnosis, in memory**: ``weights`` (every base-model parameter in the compute dtype) + ``activations``
  (``DIAG_WORKING_SET`` hidden-sized values per token of one batch: the block's qkv, context, MLP 4h and GELU 4h
  outputs, residuals; the fused attention adds only O(T) per head);
* **diagnosis, streamed** (:mod:`alibi_surgery.diagnosis.stream`): ``block`` (one block in the compute dtype, plus its largest
  tensor once more while it is converted) + ``hidden states`` (every prompt's, all batches, kept between blocks)
  + ``activations`` of one batch;
* **surgery step**: :func:`alibi_surgery.surgery.plan.predict_memory` (weights, slice gradients, AdamW state, activations
  under gradient checkpointing, loss chunk), with the heads spread over every layer (the most activations).

``--heads auto`` uses the share of collapsed heads the paper measured for that family size (31-44%; 40% for other
models): an estimate before any diagnosis. ``device="cpu"`` adds what loading costs there (the checkpoint's file
pages stay mapped while tensors are converted: the whole file for an in-memory load, one block's for a streamed
one that converts); the process's own runtime (about 0.4 GiB for torch and transformers) is reported separately, not added.
"""

from __future__ import annotations

import re

import torch

from ..errors import UsageError
from ..io.loading import parse_dtype
from .plan import Plan, format_bytes, predict_memory
from ..io.random_model import SHAPES, bloom_config
from ..diagnosis.stream import block_bytes, model_bytes

__all__ = ["parse_bytes", "format_bytes", "load_config", "heads_for", "spread_plan", "diagnosis_memory", "plan_memory",
           "format_plan"]

GIB = 2**30
DIAG_WORKING_SET = 12  # hidden-sized values per token alive at a block's peak in inference (see module docstring)
CPU_RUNTIME = int(0.4 * GIB)
PAPER_COLLAPSE_SHARE = {"bloom-560m": 0.44, "bloom-1b7": 0.36, "bloom-3b": 0.38, "bloom-7b1": 0.31}
DEFAULT_COLLAPSE_SHARE = 0.40


def parse_bytes(text: str) -> int:
    """``24GiB``, ``16GB``, ``512MiB`` or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.I)
    if not m:
        raise UsageError(f"cannot read {text!r} as a memory size: use e.g. 24GiB, 16GB or 512MiB")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) or not m.group(2) else 1000) ** power)


def load_config(model: str):
    """``(name, BloomConfig)`` of a family shape name or a checkpoint directory."""
    if model in SHAPES:
        return model, bloom_config(model)
    from ..io.loading import load_config as read_config

    return model, read_config(model)


def heads_for(name: str, config, heads: str) -> int:
    """The number of heads a surgery trains: an integer, or ``auto`` (the paper's collapse share for the size)."""
    total = config.n_layer * config.n_head
    if heads == "auto":
        share = PAPER_COLLAPSE_SHARE.get(name.rstrip("/").split("/")[-1], DEFAULT_COLLAPSE_SHARE)
        return max(1, round(share * total))
    try:
        n = int(heads)
    except ValueError:
        raise UsageError(f"--heads must be a number of heads or auto, got {heads!r}") from None
    if not 1 <= n <= total:
        raise UsageError(f"--heads must be between 1 and the model's {total} heads, got {n}")
    return n


def spread_plan(config, n_heads: int) -> Plan:
    """A plan of ``n_heads`` heads spread head-major over every layer (so the lowest selected layer is 0)."""
    selection: dict[int, list[int]] = {}
    for i in range(n_heads):
        selection.setdefault(i % config.n_layer, []).append(i // config.n_layer)
    d = config.hidden_size // config.n_head
    return Plan(selection=selection, zone=selection, frozen={}, included={}, source="plan-memory",
                n_layer=config.n_layer, n_head=config.n_head, head_dim=d, hidden=config.hidden_size)


def diagnosis_memory(config, dtype: torch.dtype, seq_len: int, batch: int, n_prompts: int, streamed: bool,
                     storage_dtype: torch.dtype = torch.bfloat16, cpu: bool = False) -> dict:
    """Predicted peak bytes of a diagnosis, by part (see the module docstring)."""
    w = torch.finfo(dtype).bits // 8
    h = config.hidden_size
    act = DIAG_WORKING_SET * batch * seq_len * h * w
    if not streamed:
        out = {"weights": model_bytes(config, dtype), "activations": act,
               "loading": model_bytes(config, storage_dtype) if cpu else 0}
        out["total"] = out["weights"] + max(out["activations"], out["loading"])
        return out
    # the block in the compute dtype, and the block as read when it must be converted (on CPU the source copies
    # stay resident while the block loads: measured; with no conversion the read tensors are used as they are;
    # on a GPU only the largest tensor, an MLP matrix, is staged at a time)
    if cpu:
        staged = block_bytes(config, storage_dtype) if storage_dtype != dtype else 0
    else:
        staged = 4 * h * h * torch.finfo(storage_dtype).bits // 8
    out = {"block": block_bytes(config, dtype) + staged, "hidden_states": n_prompts * seq_len * h * w,
           "activations": act}
    out["total"] = sum(out.values())
    return out


def plan_memory(model: str, *, heads: str = "auto", seq_len: int = 512, batch: int = 1, dtype: str = "bfloat16",
                budget: int | None = None, n_prompts: int = 8, stochastic_rounding: bool = False,
                device: str = "cuda") -> dict:
    """Every prediction for ``model`` as a dict (bytes), with ``fits`` flags when a ``budget`` is given.
    ``device="cpu"`` adds what loading costs there: the checkpoint's file pages, mapped while they are converted."""
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    cpu = device == "cpu"
    for label, v in (("--seq-len", seq_len), ("--batch-size", batch), ("prompts", n_prompts)):
        if v < 1:
            raise UsageError(f"{label} must be >= 1, got {v}")
    name, config = load_config(model)
    dt = parse_dtype(dtype, torch.device(device))
    n_heads = heads_for(name, config, heads)
    plan = spread_plan(config, n_heads)
    n_params = model_bytes(config, torch.float32) // 4
    surgery = predict_memory(plan, dtype=dtype, seq_len=seq_len, batch=batch, vocab=config.vocab_size,
                             n_params_total=n_params, stochastic_rounding=stochastic_rounding)
    storage = _storage_dtype(config)
    if cpu:  # loading (weights + mapped file) can peak above the step itself
        surgery["loading"] = model_bytes(config, storage)
        surgery["total"] = max(surgery["total"], surgery["weights"] + surgery["loading"])
    out = {"model": name, "n_layer": config.n_layer, "n_head": config.n_head, "hidden": config.hidden_size,
           "params": n_params, "dtype": dtype, "seq_len": seq_len, "batch": batch, "heads": n_heads,
           "device": device,
           "diagnosis": diagnosis_memory(config, dt, seq_len, batch, n_prompts, False, storage, cpu),
           "diagnosis_streamed": diagnosis_memory(config, dt, seq_len, batch, n_prompts, True, storage, cpu),
           "surgery": surgery, "budget": budget, "cpu_runtime": CPU_RUNTIME if cpu else 0}
    if budget is not None:
        out["fits"] = {job: out[job]["total"] <= budget for job in ("diagnosis", "diagnosis_streamed", "surgery")}
    return out


def _storage_dtype(config) -> torch.dtype:
    """The checkpoint's dtype from its config (bf16 when unstated, as BLOOM ships)."""
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return {"float32": torch.float32, "float16": torch.float16}.get(name.replace("torch.", ""), torch.bfloat16)


def format_plan(p: dict) -> str:
    def g(x):
        return f"{x / GIB:.2f} GiB"

    d, s, m = p["diagnosis"], p["diagnosis_streamed"], p["surgery"]
    fits = p.get("fits", {})

    def verdict(job):
        if job not in fits:
            return ""
        return f"  -> {'fits' if fits[job] else 'does NOT fit'} {g(p['budget'])}"

    return "\n".join([
        f"{p['model']}: {p['n_layer']} layers x {p['n_head']} heads, hidden {p['hidden']}, "
        f"{p['params'] / 1e9:.2f} B parameters; {p['dtype']}, batch {p['batch']} x {p['seq_len']} tokens",
        f"  diagnosis, in memory : {g(d['total'])} = weights {g(d['weights'])} + activations "
        f"{g(d['activations'])}" + (f" (loading: + {g(d['loading'])} of mapped checkpoint)" if d["loading"] else "")
        + verdict("diagnosis"),
        f"  diagnosis, streamed  : {g(s['total'])} = one block {g(s['block'])} + hidden states "
        f"{g(s['hidden_states'])} + activations {g(s['activations'])}{verdict('diagnosis_streamed')}",
        f"  surgery step, {p['heads']} heads: {g(m['total'])} = weights {g(m['weights'])} + slice grads "
        f"{g(m['grads'])} + optimizer {g(m['optimizer'])} + activations {g(m['activations'])} + loss chunk "
        f"{g(m['loss_chunk'])}{verdict('surgery')}",
    ] + ([f"  (a CPU process adds about {g(p['cpu_runtime'])} of runtime)"] if p["cpu_runtime"] else []))

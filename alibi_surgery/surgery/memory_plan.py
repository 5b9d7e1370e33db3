"""Memory planner: will a diagnosis or a surgery fit the card? (``alibi-surgery plan-memory MODEL``)

Predicts peak memory, by part, for three jobs on a model of any registered family, given as a checkpoint directory or
a shape name (``bloom-560m``, ``mpt-7b``, ``falcon-rw-1b`` ...):

* **diagnosis, in memory**: ``weights`` (every base-model parameter in the compute dtype) + ``activations``
  (:func:`diagnosis_working_set`: hidden-sized values per token of one batch at the MLP's or the attention's peak,
  the larger; on CPU the attention's adds the torch backend's three ``[B, H, 256, 512]`` float32 score tiles, the
  Triton kernel keeps its tiles on chip);
* **diagnosis, streamed** (:mod:`alibi_surgery.diagnosis.stream`): ``block`` (one block in the compute dtype, plus its
  largest tensor once more while it is converted) + ``hidden states`` (every prompt's, all batches, kept between blocks)
  + ``activations`` of one batch;
* **surgery step**: :func:`predict_memory` (weights, slice gradients, AdamW state, activations
  under gradient checkpointing, loss chunk), with the heads spread over every layer (the most activations).

``--heads auto`` uses the share of collapsed heads the paper measured for that family size (31-44%; 40% for other
models): an estimate before any diagnosis. ``device="cpu"`` adds what loading costs there (the checkpoint's file
pages stay mapped while tensors are converted: the whole file for an in-memory load, one block's for a streamed
one that converts); the process's own runtime (about 0.4 GiB for torch and transformers) is reported separately, not
added.
"""

from __future__ import annotations

import re

import torch

from ..errors import UsageError
from ..families import family_for
from ..io.loading import DTYPES, dtype_name, parse_dtype
from ..io.random_model import SHAPES, shape_config
from ..diagnosis.stream import block_bytes, model_bytes
from ..analysis.loss import default_chunk_tokens
from .plan import Plan, meta_block, plan_shape

__all__ = ["parse_bytes", "format_bytes", "load_config", "heads_for", "spread_plan", "diagnosis_memory", "plan_memory",
           "format_plan", "diagnosis_working_set", "predict_memory", "format_memory"]

GIB = 2**30
# Activation working set of one recomputed block in training, in units of hidden values per token: input and
# post-attention LayerNorm outputs (2), fused qkv (3), attention context (1), output projection (1), residual (1),
# MLP up-projection and activation output (4 + 4). See predict_memory.
BLOCK_WORKING_SET = 16
RESIDENT_HIDDEN = 4  # hidden-sized tensors alive through a block in inference (see diagnosis_working_set)
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


def load_config(model: str, surgery: bool = True):
    """``(name, config)`` of a shape name (:data:`~alibi_surgery.io.random_model.SHAPES`: ``bloom-7b1``,
    ``mpt-7b``, ``falcon-rw-1b`` ...) or a checkpoint directory; with ``surgery`` a family surgery refuses is a
    UsageError."""
    if model in SHAPES:
        return model, shape_config(model)
    from ..families import check_surgery, family_for
    from ..io.loading import load_config as read_config

    config = read_config(model)
    family = family_for(config, model)
    if surgery:
        check_surgery(family)
    return model, config


def heads_for(name: str, config, heads: str) -> int:
    """The number of heads a surgery trains: an integer, or ``auto`` (the paper's collapse share for the size)."""
    total = family_for(config).layout(config).n_heads
    if heads == "auto":
        share = PAPER_COLLAPSE_SHARE.get(name.rstrip("/").split("/")[-1], DEFAULT_COLLAPSE_SHARE)
        return max(1, round(share * total))
    try:
        n = int(heads)
    except ValueError:
        raise UsageError(f"heads={heads!r}: must be a number of heads or 'auto'") from None
    if not 1 <= n <= total:
        raise UsageError(f"heads={n}: must be between 1 and the model's {total} heads")
    return n


def spread_plan(config, n_heads: int) -> Plan:
    """A plan of ``n_heads`` heads spread head-major over every layer (so the lowest selected layer is 0)."""
    shape = plan_shape(config)
    n_layer = shape["n_layer"]
    selection: dict[int, list[int]] = {}
    for i in range(n_heads):
        selection.setdefault(i % n_layer, []).append(i // n_layer)
    return Plan(selection=selection, zone=selection, frozen={}, included={}, source="plan-memory", **shape)


def diagnosis_working_set(config) -> tuple[float, float]:
    """Hidden-sized values per token alive at the two peaks of one block in an inference forward (a diagnosis),
    ``(MLP, attention)``, counted from the modelling code (eager torch ops, each temporary freed when its last
    reference goes):

    * :data:`RESIDENT_HIDDEN` = 4 through the block: the embedding output, the block's input, the residual and the
      normalised input; rotary models add their cos and sin (``2 * head_dim / hidden``);
    * the MLP adds ``Family.mlp_live_tensors`` tensors of its width (BLOOM's tanh-GELU expression 5 of 4h: 20; a
      one-op GELU 2; a gated MLP 3 of ``intermediate_size``);
    * the attention adds ``2 * (n_head + 2 * n_kv) * head_dim / hidden + 1``: the projected query/key/value, the
      backend's contiguous copies of them, its output and the context the output norms read
      (:data:`~alibi_surgery.diagnosis.extremes.OUTPUT_NORM_ROWS` bounds their float64 steps); on CPU the torch
      backend's score tiles come on top (:func:`diagnosis_memory`).

    ``tests/analysis/test_scale.py`` checks the prediction against the live tensor storages of a real diagnosis
    (tiny BLOOM and Llama); resident memory adds the allocator's own retention (docs/scale.md)."""
    family, block = meta_block(config)
    layout = family.layout(config)
    h = layout.hidden
    resident = RESIDENT_HIDDEN + (2 * layout.head_dim / h if family.interface else 0.0)
    up, _ = family.mlp_weights(block)
    mlp = family.mlp_live_tensors(block) * up.shape[0] / h
    attention = 2 * (layout.n_head + 2 * family.kv_heads(config)) * layout.head_dim / h + 1
    return resident + mlp, resident + attention


def _tiles(config, batch: int, seq_len: int) -> int:
    """Bytes of the torch backend's forward score tiles (two matmul outputs and their exp2, float32)."""
    from ..kernels.reference import BLOCK_K, BLOCK_Q

    n_head = family_for(config).layout(config).n_head
    return 3 * batch * n_head * min(seq_len, BLOCK_Q) * min(seq_len, BLOCK_K) * 4


def diagnosis_memory(config, dtype: torch.dtype, seq_len: int, batch: int, n_prompts: int, streamed: bool,
                     storage_dtype: torch.dtype = torch.bfloat16, cpu: bool = False) -> dict:
    """Predicted peak bytes of a diagnosis, by part (see the module docstring)."""
    w = torch.finfo(dtype).bits // 8
    h = family_for(config).layout(config).hidden
    mlp, attention = (v * batch * seq_len * h * w for v in diagnosis_working_set(config))
    act = round(max(mlp, attention + (_tiles(config, batch, seq_len) if cpu else 0)))
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
        staged = _largest_tensor(config) * torch.finfo(storage_dtype).bits // 8
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
        raise UsageError(f"device={device!r}: must be 'cpu' or 'cuda'")
    cpu = device == "cpu"
    for label, v in (("seq_len", seq_len), ("batch", batch), ("n_prompts", n_prompts)):
        if v < 1:
            raise UsageError(f"{label}={v}: must be >= 1")
    name, config = load_config(model, surgery=False)
    dt = parse_dtype(dtype, torch.device(device))
    n_heads = heads_for(name, config, heads)
    family = family_for(config)
    layout = family.layout(config)
    n_params = family.params(config)
    storage = _storage_dtype(config)
    surgery = None  # a family surgery refuses (an interface model) gets its diagnosis only
    if not family.surgery_refusal:
        surgery = predict_memory(spread_plan(config, n_heads), dtype=dtype, seq_len=seq_len, batch=batch,
                                 vocab=layout.vocab, n_params_total=n_params, stochastic_rounding=stochastic_rounding)
    if cpu and surgery:  # loading (weights + mapped file) can peak above the step itself
        surgery["loading"] = model_bytes(config, storage)
        surgery["total"] = max(surgery["total"], surgery["weights"] + surgery["loading"])
    out = {"model": name, "family": family.name, "n_layer": layout.n_layer, "n_head": layout.n_head,
           "hidden": layout.hidden,
           "params": n_params, "dtype": dtype, "seq_len": seq_len, "batch": batch, "heads": n_heads,
           "device": device,
           "diagnosis": diagnosis_memory(config, dt, seq_len, batch, n_prompts, False, storage, cpu),
           "diagnosis_streamed": None if family.interface else  # loaded whole: no block runner (stream.py)
           diagnosis_memory(config, dt, seq_len, batch, n_prompts, True, storage, cpu),
           "surgery": surgery, "surgery_refusal": family.surgery_refusal, "budget": budget,
           "cpu_runtime": CPU_RUNTIME if cpu else 0}
    if budget is not None:
        out["fits"] = {job: out[job]["total"] <= budget for job in ("diagnosis", "diagnosis_streamed", "surgery")
                       if out[job] is not None}
    return out


def _largest_tensor(config) -> int:
    """Elements of a block's largest parameter (an MLP matrix), counted on a meta-device block."""
    return max(p.numel() for p in meta_block(config)[1].parameters())


def _storage_dtype(config) -> torch.dtype:
    """The checkpoint's dtype from its config (bf16 when unstated, as BLOOM ships)."""
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return DTYPES.get(name.removeprefix("torch."), torch.bfloat16)


def _count(n: int) -> str:
    """``1.72 B``, ``560.2 M``, ``48.6 K`` or ``312``: a parameter count at a readable scale."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "B" else f"{n / size:.1f} {unit}"
    return str(int(n))


def does_not_fit(p: dict) -> list[str]:
    """The jobs of a prediction with a budget that cannot run in it: the surgery step, and diagnosis when neither
    its in-memory nor its streamed form fits (either will do). Empty without a budget."""
    fits = p.get("fits", {})
    if not fits:
        return []
    jobs = [] if fits.get("surgery", True) else ["the surgery step"]
    if not (fits.get("diagnosis", True) or fits.get("diagnosis_streamed", False)):
        jobs.insert(0, "diagnosis (in memory or streamed)")
    return jobs


def format_plan(p: dict) -> str:
    g = format_bytes

    d, s, m = p["diagnosis"], p["diagnosis_streamed"], p["surgery"]
    fits = p.get("fits", {})

    def verdict(job):
        if job not in fits:
            return ""
        return f"  -> {'fits' if fits[job] else 'does NOT fit'} {g(p['budget'])}"

    return "\n".join([
        f"{p['model']}: {p['n_layer']} layers x {p['n_head']} heads, hidden {p['hidden']}, "
        f"{_count(p['params'])} parameters; {p['dtype']}, batch {p['batch']} x {p['seq_len']} tokens",
        f"  diagnosis, in memory : {g(d['total'])} = weights {g(d['weights'])} + activations "
        f"{g(d['activations'])}" + (f" (loading: + {g(d['loading'])} of mapped checkpoint)" if d["loading"] else "")
        + verdict("diagnosis"),
        f"  diagnosis, streamed  : {g(s['total'])} = one block {g(s['block'])} + hidden states "
        f"{g(s['hidden_states'])} + activations {g(s['activations'])}{verdict('diagnosis_streamed')}" if s else
        f"  diagnosis, streamed  : not available ({p['family']} models are loaded whole)",
        f"  surgery step, {p['heads']} heads: {g(m['total'])} = weights {g(m['weights'])} + slice grads "
        f"{g(m['grads'])} + optimizer {g(m['optimizer'])} + activations {g(m['activations'])} + loss chunk "
        f"{g(m['loss_chunk'])}{verdict('surgery')}" if m else
        f"  surgery step         : not available ({p['surgery_refusal']})",
    ] + ([f"  (a CPU process adds about {g(p['cpu_runtime'])} of runtime; glibc's heap may hold up to as much again "
          f"as the activations under 16k tokens, unless MALLOC_MMAP_THRESHOLD_=131072: docs/scale.md)"]
         if p["cpu_runtime"] else []))


def _dtype_bytes(dtype) -> tuple[str, int]:
    """``(canonical name, bytes per element)`` of a dtype or any spelling :data:`~alibi_surgery.io.loading.DTYPES`
    knows."""
    if not isinstance(dtype, torch.dtype):
        key = str(dtype).strip().lower().removeprefix("torch.")
        if key not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        dtype = DTYPES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UsageError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return dtype_name(dtype), torch.finfo(dtype).bits // 8


def predict_memory(plan: Plan, *, dtype: str, seq_len: int, batch: int, vocab: int, n_params_total: int,
                   stochastic_rounding: bool = False, bf16_moments: bool = False, full: bool = False) -> dict:
    """Predicted peak device memory of one surgery step, in bytes, by part. ``full`` (``sparsify --train full``):
    every parameter trains, ``N = P``, autograd records from layer 0, and ``loss_chunk`` is the whole logits
    (``B*T*vocab * (w + 12)``: the model-dtype logits, their fp32 copy, the saved log-softmax and its gradient).

    With ``N = plan.trainable_params`` trained elements, ``w`` bytes per weight element (4 for float32, 2 for
    bfloat16/float16), ``P = n_params_total``, ``B = batch``, ``T = seq_len``, ``h = plan.hidden``,
    ``L0`` = the lowest selected layer (autograd records nothing below it):

    * ``weights``     = P * w (the whole model, resident);
    * ``grads``       = N * w (``HeadSlices``' flat slice-gradient buffer, in the weights' dtype);
    * ``moments``     = N * 8 (AdamW ``exp_avg`` and ``exp_avg_sq``, fp32), N * 4 with ``bf16_moments`` (the
      paper's optimizer, ``--optimizer-precision bf16``);
    * ``master``      = N * 4 for bfloat16/float16 weights unless ``stochastic_rounding`` or ``bf16_moments``, else 0;
    * ``optimizer``   = moments + master;
    * ``activations`` = (n_layer - L0 + 1 + 16) * B*T*h * w: non-reentrant gradient checkpointing keeps each
      recorded block's input, plus the final hidden state, plus one block recomputed during backward
      (~16 hidden values per token: two LayerNorm outputs, fused qkv 3h, context, dense output, residual, MLP 4h +
      GELU 4h). Fused attention keeps only O(T) statistics per head: neglected;
    * ``loss_chunk``  = c * vocab * (4 + w') + B*T*h * w, with w' = w for bfloat16/float16 and 0 for float32: one
      chunk of fp32 logits (plus the chunk in the model dtype it is computed in) of
      ``c = min(default_chunk_tokens(vocab), B*T)`` tokens (133 for BLOOM's vocabulary), and the hidden-state
      gradient the chunked loss keeps for backward;
    * ``total``       = the sum: the peak, reached in the backward pass (gradients and optimizer state exist from
      the start of the step). With nothing selected there is no backward: activations and loss chunk are 0.

    bloom-7b1, 300 heads (10 per layer), bf16, seq 512, batch 1 predicts 19.40 GiB with stochastic rounding and
    21.75 GiB with the master copy; an H100 measured 19.39 and 21.73 GiB (``max_memory_allocated``). CPU resident
    memory adds a few hundred MiB of allocator overhead that this does not model.
    """
    name, w = _dtype_bytes(dtype)
    for label, v in (("seq_len", seq_len), ("batch", batch), ("vocab", vocab), ("n_params_total", n_params_total)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{label} must be a positive integer, got {v!r}")
    if stochastic_rounding and name != "bfloat16":
        raise UsageError(f"stochastic rounding is for bfloat16 weights, not {name}")
    if bf16_moments and (name != "bfloat16" or stochastic_rounding):
        raise UsageError(f"bf16 moments are for bfloat16 weights rounded to nearest, not {name}")
    n = n_params_total if full else plan.trainable_params
    tokens_hidden = batch * seq_len * plan.hidden * w
    lowest = 0 if full else min(plan.selection) if plan.selection else plan.n_layer
    recorded = plan.n_layer - lowest
    chunk = min(default_chunk_tokens(vocab), batch * seq_len)
    out = {
        "weights": n_params_total * w,
        "grads": n * w,
        "moments": n * (4 if bf16_moments else 8),
        "master": n * 4 if w == 2 and not (stochastic_rounding or bf16_moments) else 0,
        "activations": (recorded + 1 + BLOCK_WORKING_SET) * tokens_hidden if recorded else 0,
        "loss_chunk": chunk * vocab * (4 + (w if w != 4 else 0)) + tokens_hidden if recorded else 0,
    }
    if full:
        out["loss_chunk"] = batch * seq_len * vocab * (w + 12) + tokens_hidden
    out["optimizer"] = out["moments"] + out["master"]
    out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"] + out["loss_chunk"]
    out.update(dtype=name, trainable_params=n, chunk_tokens=chunk, stochastic_rounding=bool(stochastic_rounding),
               bf16_moments=bool(bf16_moments), seq_len=seq_len, batch=batch)
    return out


def format_memory(mem: dict) -> str:
    """Text lines for a :func:`predict_memory` result (binary units, see :func:`format_bytes`)."""
    def g(key):
        return format_bytes(mem[key])

    opt = f"AdamW m+v {g('moments')}" + (f" + fp32 master {g('master')}" if mem["master"] else
                                          " (stochastic rounding, no master)" if mem["stochastic_rounding"] else
                                          " (bf16, no master)" if mem.get("bf16_moments") else "")
    return (f"  predicted peak memory: {g('total')} ({mem['dtype']}, batch {mem['batch']} x {mem['seq_len']} "
            f"tokens, gradient checkpointing)\n"
            f"    = weights {g('weights')} + slice grads {g('grads')} + {opt}\n"
            f"      + activations {g('activations')} + loss chunk {g('loss_chunk')} ({mem['chunk_tokens']} tokens)")


def format_bytes(n: float) -> str:
    """``19.40 GiB``, ``312.5 MiB`` or ``48.0 KiB``: binary units, the largest that keeps the number >= 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"

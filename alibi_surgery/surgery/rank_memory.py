"""Memory per rank over N devices: data-parallel diagnosis and an FSDP2 surgery step (``plan-memory --world-size``).

**Diagnosis** under ``torchrun`` is data-parallel (:mod:`alibi_surgery.distributed`): every rank holds the whole
model (or streams it block by block) and runs its share of the prompt batches, so its peak is the single-device
prediction (:func:`~alibi_surgery.surgery.memory_plan.diagnosis_memory`) for one batch: more devices make it
faster, not smaller; streamed, a rank keeps the hidden states of its own share of the prompts only (1/W of them,
at least one batch).

**An FSDP2 surgery step** (:mod:`alibi_surgery.surgery.sharded`: each block and the loss root ``fully_shard``-ed,
the selected heads' slices as parameters of their own, AdamW on them), with ``P`` the model's parameters, ``N`` the
trained elements, ``W`` the world size, ``w`` bytes per element of the weights' dtype (the trained slices, their
gradients and the AdamW moments are kept in it too, as ``torch.optim.AdamW`` keeps them), per rank:

* ``sharded``     = (P + N) * w / W: every parameter's dim-0 shard (the trained slices exist twice: their frozen
  rows in the weights, their values in the head parameters);
* ``gathered``    = (root + 2 * block) * w: the root's parameters (embeddings, final norm, an untied head) are
  gathered for the whole step (FSDP2 does not reshard its root after forward), and up to two blocks at a time
  (the one running and the one prefetched in backward);
* ``grads``       = N * w / W + 2 * n_block * w: the sharded gradients, plus one block's whole gradients and the
  reduce-scatter's input buffer (``n_block``: the trained elements of the layer with the most selected heads);
* ``optimizer``   = 2 * N * w / W: AdamW's two moments on the local shard;
* ``activations`` and ``loss_chunk``: those of one device for the rank's own batch
  (:func:`~alibi_surgery.surgery.memory_plan.predict_memory`: gradient checkpointing, the chunked loss).

The smallest world size is the least ``W`` whose step fits ``device_memory``; the W-independent part (gathered
parameters, activations, loss chunk) can exceed a device alone, and then no ``W`` fits.

Limits: the trained slices are in the weights' dtype (no fp32 master copy on this path yet); FSDP2's own buffers
(all-gather staging for mixed dtypes, collectives' scratch) and the allocator's are not modelled; checked against
CPU ranks (gloo, fp32) by ``bench/bench_fsdp_memory.py`` (docs/scale.md).
"""

from __future__ import annotations

import math

from ..errors import UsageError
from ..families import family_for
from .memory_plan import _dtype_bytes, spread_plan, predict_memory

__all__ = ["fsdp_step_memory", "smallest_world_size", "plan_ranks", "format_ranks", "MAX_WORLD_SIZE"]

MAX_WORLD_SIZE = 4096


def _check_world_size(world_size) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise UsageError(f"world_size must be a positive integer, got {world_size!r}")


def fsdp_step_memory(config, n_heads: int, *, world_size: int, seq_len: int, batch: int = 1,
                     dtype: str = "bfloat16") -> dict:
    """Predicted peak bytes per rank of one FSDP2 surgery step on ``n_heads`` heads spread over every layer, by
    part (see the module docstring); ``batch`` is the rank's own batch."""
    _check_world_size(world_size)
    family = family_for(config)
    layout = family.layout(config)
    name, w = _dtype_bytes(dtype)
    plan = spread_plan(config, n_heads)
    n, p = plan.trainable_params, family.params(config)
    block = family.block_params(config)
    root = p - layout.n_layer * block
    n_block = max(len(h) for h in plan.selection.values()) * plan.params_per_head
    one = predict_memory(plan, dtype=name, seq_len=seq_len, batch=batch, vocab=layout.vocab, n_params_total=p)
    out = {
        "sharded": math.ceil((p + n) / world_size) * w,
        "gathered": (root + 2 * block) * w,
        "grads": math.ceil(n / world_size) * w + 2 * n_block * w,
        "optimizer": 2 * math.ceil(n / world_size) * w,
        "activations": one["activations"],
        "loss_chunk": one["loss_chunk"],
    }
    out["total"] = sum(out.values())
    out.update(world_size=world_size, dtype=name, trainable_params=n, seq_len=seq_len, batch=batch)
    return out


def smallest_world_size(config, n_heads: int, device_memory: int, **kw) -> int | None:
    """The least world size (up to :data:`MAX_WORLD_SIZE`) whose :func:`fsdp_step_memory` fits ``device_memory``
    bytes per device, or None."""
    if fsdp_step_memory(config, n_heads, world_size=MAX_WORLD_SIZE, **kw)["total"] > device_memory:
        return None
    lo, hi = 1, MAX_WORLD_SIZE  # the total falls as the world grows: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if fsdp_step_memory(config, n_heads, world_size=mid, **kw)["total"] <= device_memory:
            hi = mid
        else:
            lo = mid + 1
    return lo


def plan_ranks(model: str, *, world_size: int, device_memory: int | None = None, heads: str = "auto",
               seq_len: int = 512, batch: int = 1, dtype: str = "bfloat16", n_prompts: int = 8) -> dict:
    """Per-rank predictions for ``world_size`` devices (``plan-memory --world-size``): the data-parallel
    diagnosis (in memory and streamed: one device's), the FSDP2 surgery step, and with ``device_memory`` the
    smallest world size whose step fits and which jobs fit at ``world_size``. ``batch`` is each rank's batch."""
    import torch

    from ..io.loading import parse_dtype
    from .memory_plan import _storage_dtype, diagnosis_memory, heads_for, load_config

    _check_world_size(world_size)
    if device_memory is not None and device_memory <= 0:
        raise UsageError(f"device_memory={device_memory}: must be a positive size")
    name, config = load_config(model, surgery=False)
    family = family_for(config)
    n_heads = heads_for(name, config, heads)
    dt = parse_dtype(dtype, torch.device("cuda"))
    storage = _storage_dtype(config)
    out = {"world_size": world_size, "device_memory": device_memory, "heads": n_heads,
           "diagnosis": diagnosis_memory(config, dt, seq_len, batch, n_prompts, False, storage),
           "diagnosis_streamed": None if family.interface else  # the rank keeps its own prompts' hidden states
           diagnosis_memory(config, dt, seq_len, batch, max(batch, math.ceil(n_prompts / world_size)), True,
                            storage),
           "surgery": None if family.surgery_refusal else
           fsdp_step_memory(config, n_heads, world_size=world_size, seq_len=seq_len, batch=batch, dtype=dtype)}
    if device_memory is not None:
        out["fits"] = {job: out[job]["total"] <= device_memory for job in ("diagnosis", "diagnosis_streamed",
                                                                            "surgery") if out[job] is not None}
        out["smallest_world_size"] = None if out["surgery"] is None else smallest_world_size(
            config, n_heads, device_memory, seq_len=seq_len, batch=batch, dtype=dtype)
    return out


def format_ranks(r: dict) -> str:
    """Text lines for :func:`plan_ranks`."""
    from .memory_plan import format_bytes as g

    fits = r.get("fits", {})

    def verdict(job):
        return "" if job not in fits else f"  -> {'fits' if fits[job] else 'does NOT fit'} {g(r['device_memory'])}"

    d, s, m = r["diagnosis"], r["diagnosis_streamed"], r["surgery"]
    lines = [f"  per rank over {r['world_size']} device(s):",
             f"    diagnosis (data-parallel, each rank holds the model): {g(d['total'])} in memory"
             + verdict("diagnosis") + (f"; streamed {g(s['total'])}{verdict('diagnosis_streamed')}" if s else "")]
    if m is None:
        lines.append("    surgery step (FSDP2): not available for this family")
        return "\n".join(lines)
    lines.append(f"    surgery step (FSDP2), {r['heads']} heads: {g(m['total'])} = sharded {g(m['sharded'])} + "
                 f"gathered {g(m['gathered'])} + grads {g(m['grads'])} + optimizer {g(m['optimizer'])} + "
                 f"activations {g(m['activations'])} + loss chunk {g(m['loss_chunk'])}{verdict('surgery')}")
    if "smallest_world_size" in r:
        k = r["smallest_world_size"]
        lines.append(f"    smallest world size for the surgery step in {g(r['device_memory'])}: "
                     + (str(k) if k else f"none up to {MAX_WORLD_SIZE} (the gathered blocks, activations and loss "
                                         "chunk alone exceed it)"))
    return "\n".join(lines)

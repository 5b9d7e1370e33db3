"""Reversible swap of a model's attention forwards for the fused ALiBi kernels, for every registered family.

``patch(model, backend)`` sets an instance-level ``forward`` on every attention module of ``model`` (the family's
:meth:`~alibi_surgery.families.base.Family.patched_forward`; the class is never touched, so other models in the
process are unaffected) plus one private attribute holding the patch state. ``unpatch`` removes both, leaving each
module's ``__dict__`` as it was. Parameters and buffers are never added, so ``state_dict`` and ``save_pretrained``
are unchanged. ``patch_bloom`` / ``unpatch_bloom`` are the same functions under their first names.

A patched forward keeps its family's contract (projections, cache update, output projection) and calls
:func:`fused_attention` for the attention itself, on the packed QKV projection when there is no cached past (one
gradient buffer in the projection's layout): key validity comes from the mask the model passes, ALiBi positions from
the family's rule (computed once per model forward, :func:`attention_keys`), slopes and scales from the adapter. It falls back to the family's own forward, for that call
only, when ``output_attentions=True`` (with a warning) or when attention dropout is active (:func:`eager_fallback`);
a family whose own eager attention is wrong (Falcon) refuses instead. Padded query rows get an attention output of 0
(the fused kernels' convention; see docs/training.md for the loss).

The backend is resolved once per device for the whole model (``resolve_backend`` with the model's head_dim):
``patch(model, "triton")`` refuses a head_dim the kernels do not support up front, and ``auto`` on CUDA falls
back to ``torch`` for one, warning once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import warnings
import weakref

import torch
from torch import nn

from ..errors import UsageError
from ..kernels.alibi import first_real_key
from ..kernels.attention_fwd import interpreting
from ..kernels.ops import unpack
from .backends import (check_backend, check_triton_head_dim, resolve_backend, row_sums, run_attention,
                       run_attention_packed, run_received)

__all__ = ["first_token_sinks", "patch", "unpatch", "patched", "patch_bloom", "unpatch_bloom", "attention_modules", "current_backend",
           "head_stats", "fused_attention", "eager_fallback", "check_eager_call", "key_validity", "attention_keys",
           "patch_state", "per_mask", "set_family_lookup"]

_STATE = "_alibi_surgery_patch"


@dataclasses.dataclass
class _PatchState:
    backend: str
    family: object  # the model's Family adapter
    layer: int
    had_forward: bool  # an instance-level forward existed before patching (restored on unpatch)
    old_forward: object
    slopes: dict = dataclasses.field(default_factory=dict)
    maps: bool = False  # output_attentions of the enclosing block's call (families whose blocks keep it to themselves)
    hook: object = None  # the enclosing block's forward pre-hook that sets ``maps``
    sink: "HeadStatsSink | None" = None
    rows: object = None  # an active row_stats.TrainableStats (differentiable statistics), fed by fused_attention
    received: object = None  # an active diagnosis.key_sinks.ReceivedSink (attention received per key)
    extremes: object = None  # an active diagnosis.extremes.ExtremeSink (attention_extremes), fed by fused_attention
    shared: dict = dataclasses.field(default_factory=dict)  # resolved backends, the last keys: shared by all layers


def first_token_sinks(stats: torch.Tensor, epsilon: float, exclude_first_query: bool) -> torch.Tensor:
    """Per head, how many of the batch's sequences make it a first-token sink in Gu et al.'s sense (ICLR 2025,
    ``eval_sink_open_source.py``): the attention the first token receives, averaged over the queries that see it
    (every row of the sequence, the first included), above ``epsilon``. ``stats`` are per-sequence sums ``[B, H, 3]``
    (first-token mass, entropy, rows); without the first query, its row (all its mass on itself: 1) is added back.
    Returns float64 ``[H]``."""
    extra = 1.0 if exclude_first_query else 0.0
    stats = stats.to(device="cpu", dtype=torch.float64)
    score = (stats[..., 0] + extra) / (stats[..., 2] + extra).clamp_min(1.0)
    return (score > epsilon).sum(0, dtype=torch.float64)


@dataclasses.dataclass
class HeadStatsSink:
    """Accumulates per-head (sum first-token mass, sum entropy, rows) over every forward call, per layer, and with a
    ``sink_epsilon`` the count of sequences in which each head is a first-token sink (:func:`first_token_sinks`)."""

    n_layer: int
    n_head: int
    exclude_first_query: bool = False
    normalize_entropy: bool = False
    sink_epsilon: float | None = None

    def __post_init__(self):
        self.sums = torch.zeros(self.n_layer, self.n_head, 3, dtype=torch.float64)
        self.sinks = torch.zeros(self.n_layer, self.n_head, dtype=torch.float64)

    def add(self, layer: int, stats: torch.Tensor) -> None:
        self.sums[layer] += stats.sum(0).to(device="cpu", dtype=torch.float64)
        if self.sink_epsilon is not None:
            self.sinks[layer] += first_token_sinks(stats, self.sink_epsilon, self.exclude_first_query)


_FAMILY_OF: list = []  # [family_of_module], installed by alibi_surgery.families when it is imported


def set_family_lookup(lookup) -> None:
    """Install ``lookup(module) -> Family``, the adapter of a model (with its refusals). The families layer sits
    above this one (its adapters call :func:`fused_attention`), so it hands its lookup down when it is imported
    (``alibi_surgery/families/__init__.py``) instead of being imported from here."""
    _FAMILY_OF[:] = [lookup]


def attention_modules(model: nn.Module, family=None) -> tuple[object, list[nn.Module]]:
    """``(family, attention modules in layer order)`` of ``model`` (a causal LM, a base model or one block)."""
    if family is None:
        if not _FAMILY_OF:
            raise RuntimeError("no model families are registered: import alibi_surgery, not its attention package "
                               "alone")
        family = _FAMILY_OF[0](model)
    found = family.attention_modules(model)
    if not found:
        raise UsageError(f"{type(model).__name__} holds no {family.name} attention module")
    return family, found


def patch(model: nn.Module, backend: str = "auto", *, family=None) -> nn.Module:
    """Route every attention module of ``model`` through ``backend``. Idempotent: patching again switches backend.
    ``triton`` with a head_dim the kernels do not support is refused (UsageError) before anything changes."""
    check_backend(backend)
    family, attns = attention_modules(model, family)
    if backend == "triton":
        check_triton_head_dim(family.attention_shape(attns[0])[1])
    shared = {}
    forward = family.patched_forward()
    for layer, attn in enumerate(attns):
        state = attn.__dict__.get(_STATE)
        if state is not None:
            state.backend = backend
            continue
        had = "forward" in attn.__dict__
        attn.__dict__[_STATE] = _PatchState(backend, family, layer, had, attn.__dict__.get("forward"),
                                            shared=shared)
        if forward is not None:
            attn.forward = types.MethodType(forward, attn)
    family.on_patch(model, attns[0].__dict__[_STATE].shared)
    if family.block_keeps_output_attentions:  # read the flag off each block's call (MPT)
        block_class = family.block_class()
        for block in [m for m in model.modules() if isinstance(m, block_class)]:
            for attn in family.attention_modules(block):
                state = attn.__dict__[_STATE]
                if state.hook is None:
                    state.hook = block.register_forward_pre_hook(functools.partial(_note_maps, state),
                                                                 with_kwargs=True)
    return model


def _note_maps(state: "_PatchState", block, args, kwargs) -> None:
    state.maps = bool(kwargs.get("output_attentions", False))


def unpatch(model: nn.Module) -> nn.Module:
    """Restore every attention module of ``model`` exactly as it was before :func:`patch`."""
    family, attns = attention_modules(model)
    first = attns[0].__dict__.get(_STATE)
    if first is not None:
        family.on_unpatch(model, first.shared)
    for attn in attns:
        state = attn.__dict__.pop(_STATE, None)
        if state is None:
            continue
        if state.hook is not None:
            state.hook.remove()
        if state.had_forward:
            attn.forward = state.old_forward
        elif "forward" in attn.__dict__:
            del attn.forward
    return model


patch_bloom, unpatch_bloom = patch, unpatch


def current_backend(model: nn.Module) -> str | None:
    """The backend ``model`` is patched with, or None when it is not patched."""
    state = attention_modules(model)[1][0].__dict__.get(_STATE)
    return None if state is None else state.backend


def patch_state(module: nn.Module) -> _PatchState:
    """The patch state of one patched attention module."""
    return module.__dict__[_STATE]


@contextlib.contextmanager
def patched(model: nn.Module, backend: str = "auto"):
    """Patch ``model`` for the duration of the block, then put back whatever patch state it had before."""
    before = current_backend(model)
    patch(model, backend)
    try:
        yield model
    finally:
        if before is None:
            unpatch(model)
        else:
            patch(model, before)


@contextlib.contextmanager
def head_stats(model: nn.Module, *, exclude_first_query: bool = False, normalize_entropy: bool = False,
               sink_epsilon: float | None = None):
    """Collect fused per-head statistics from every forward pass run inside the block (model must be patched)."""
    family, attns = attention_modules(model)
    if any(_STATE not in a.__dict__ for a in attns):
        raise RuntimeError("head_stats needs a patched model: call patch(model) first")
    sink = HeadStatsSink(len(attns), family.attention_shape(attns[0])[0], exclude_first_query, normalize_entropy,
                         sink_epsilon)
    for a in attns:
        a.__dict__[_STATE].sink = sink
    try:
        yield sink
    finally:
        for a in attns:
            if _STATE in a.__dict__:
                a.__dict__[_STATE].sink = None


def key_validity(mask: torch.Tensor | None, batch: int, k_len: int, device: torch.device,
                 bool_masks_out: bool = False) -> torch.Tensor:
    """[batch, k_len] bool: which keys are real tokens, read off the last query row of a 4D mask (additive float,
    or bool with True = attend, or True = masked when ``bool_masks_out``, MPT's convention), whose last query row
    sees every real key; None means every key is real."""
    if mask is None:
        return torch.ones(batch, k_len, dtype=torch.bool, device=device)
    last = mask[:, 0, -1, :k_len]
    if last.dtype == torch.bool:
        return ~last if bool_masks_out else last
    return last > torch.finfo(last.dtype).min / 2


def attention_keys(module: nn.Module, mask: torch.Tensor | None, batch: int, k_len: int, device: torch.device,
                   bool_masks_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key_pos, kstart)`` of one patched module's call: int32 ALiBi positions ``[batch, k_len]`` (the family's
    rule, -1 for padding) and each row's first real key ``[batch]``, computed once per model forward
    (:func:`per_mask`)."""
    family = module.__dict__[_STATE].family

    def compute():
        key_pos = family.key_positions(key_validity(mask, batch, k_len, device, bool_masks_out))
        return key_pos, first_real_key(key_pos).to(torch.int32)

    return per_mask(module.__dict__[_STATE].shared, "keys", mask, (batch, k_len, device, bool_masks_out), compute)


def per_mask(shared: dict, slot: str, mask: torch.Tensor | None, key: tuple, compute):
    """``compute()``, cached in ``shared[slot]``: every layer of one model forward gets the same mask object, so
    the first layer computes and the others reuse (keyed on the mask's identity, held by weak reference, its version
    and ``key``). Computed outside inference mode, so that a later training step may save the tensors. Under
    ``torch.compile`` nothing is cached: the compiler sees plain tensor code."""
    if torch.compiler.is_compiling():
        return compute()
    key = (None if mask is None else (-1 if mask.is_inference() else mask._version), *key)
    hit = shared.get(slot)
    if hit is not None and hit[0]() is mask and hit[1] == key:
        return hit[2]
    with torch.inference_mode(False):
        found = compute()
    shared[slot] = ((lambda: None) if mask is None else weakref.ref(mask), key, found)
    return found


def eager_fallback(module: nn.Module, output_attentions: bool, dropout_on: bool):
    """The module's own forward when this call must not run fused (eager backend, ``output_attentions``, active
    attention dropout), else None. A family whose own eager attention is wrong refuses ``output_attentions``."""
    state: _PatchState = module.__dict__[_STATE]
    output_attentions = output_attentions or state.maps
    if not (state.backend == "eager" or output_attentions or dropout_on):
        return None
    check_eager_call(state, output_attentions)
    forward = state.old_forward if state.had_forward else type(module).forward.__get__(module)
    return functools.partial(_with_full_mask, forward, state.family.bool_masks_out)


def _with_full_mask(forward, true_masks: bool, hidden_states, *args, **kwargs):
    """Call a family's own attention ``forward`` with any compact mask argument made whole
    (:func:`~alibi_surgery.attention.compact_mask.full_mask`): its eager attention needs every query row's mask."""
    from .compact_mask import full_mask, is_compact

    q_len = hidden_states.shape[1]

    def whole(x):
        return full_mask(x, q_len, true_masks) if is_compact(x, q_len) else x

    return forward(hidden_states, *(whole(a) for a in args), **{k: whole(v) for k, v in kwargs.items()})


def check_eager_call(state: _PatchState, output_attentions: bool) -> None:
    """Before a patched module runs its family's own attention for one call: refuse ``output_attentions`` where that
    attention is wrong (``Family.eager_refusal``), warn that it runs, and refuse while head statistics are being
    collected (they come from the fused kernels only)."""
    if output_attentions:
        refusal = state.family.eager_refusal()
        if refusal:
            raise UsageError(refusal)
        if state.backend != "eager":
            warnings.warn(f"output_attentions=True: this call runs {state.family.name}'s eager attention",
                          stacklevel=5)
    if any(x is not None for x in (state.sink, state.extremes, state.rows, state.received)):
        raise RuntimeError("head statistics need the triton or torch backend, without output_attentions")


def fused_attention(module: nn.Module, fused: torch.Tensor, layout: str, attention_mask: torch.Tensor | None, *,
                    cache=None, bool_masks_out: bool = False) -> torch.Tensor:
    """Fused ALiBi attention of one patched module; returns the context ``[B, Tq, H, d]`` and adds the head
    statistics to the active :func:`head_stats` sink (and the extreme-token metrics to an active
    :func:`~alibi_surgery.diagnosis.extremes.attention_extremes` sink).

    ``fused`` is the module's QKV projection output viewed in ``layout`` (``"interleaved"`` ``[B, T, H, 3, d]``,
    ``"blocked"`` ``[B, T, 3, H, d]``). ``cache``, when given, is updated with this call's keys and values (as
    ``[B, H, T, d]`` views, ``module.layer_idx``); attention then runs over its past too, or, when it held none, on
    ``fused`` itself: packed, its gradient written once in its own layout. ``attention_mask`` is the 4D mask the
    model passes (see :func:`key_validity`)."""
    state: _PatchState = module.__dict__[_STATE]
    family = state.family
    query, key, value = unpack(fused, layout)  # [B, T, H, d] views
    qkv = fused
    if cache is not None:
        key, value = cache.update(key.transpose(1, 2), value.transpose(1, 2), module.layer_idx)
        if key.shape[2] != query.shape[1]:  # a cached past: attend over it (else the cache keeps its own copy)
            qkv, layout = (query.transpose(1, 2), key, value), None
    device, batch, head_dim = query.device, query.shape[0], query.shape[-1]
    k_len = key.shape[2] if layout is None else query.shape[1]
    backend = _resolved(state, device, head_dim)
    slopes = state.slopes.get(device)
    if slopes is None and torch.compiler.is_compiling():
        slopes = family.module_slopes(module).to(device=device, dtype=torch.float32)
    elif slopes is None:
        with torch.inference_mode(False):  # never an inference tensor: a later training step saves it
            slopes = state.slopes[device] = family.module_slopes(module).to(device=device, dtype=torch.float32)
    key_pos, kstart = attention_keys(module, attention_mask, batch, k_len, device, bool_masks_out)
    sink, rows = state.sink, state.rows
    options = dict(kstart=kstart, with_stats=sink is not None, row_stats=rows is not None,
                   exclude_first_query=bool(sink and sink.exclude_first_query),
                   normalize_entropy=bool(sink and sink.normalize_entropy), **family.kernel_options(module))
    if layout is None:
        context, lse, stats = run_attention(*qkv, key_pos, slopes, backend, **options)
    else:
        context, lse, stats = run_attention_packed(qkv, layout, key_pos, slopes, backend, **options)
    if state.received is not None:  # the key-side pass over this call's log-sum-exp
        state.received.add(state.layer, run_received(query.transpose(1, 2), key if layout is None else
                                                     key.transpose(1, 2), lse, key_pos, slopes, backend,
                                                     **options), key_pos)
    if rows is not None:  # per-row statistics on the autograd graph; the sink gets their sums
        rows.add(state.layer, stats, key_pos)
        stats = row_sums(stats.detach(), key_pos, sink.exclude_first_query, sink.normalize_entropy) if sink else None
    if sink is not None:
        sink.add(state.layer, stats)
    if state.extremes is not None:  # value_ratio, output_norm (diagnosis/extremes.py); value [B, Tk, H, d]
        key_valid = key_pos >= 0
        state.extremes.add_attention(state.layer, value if cache is None else value.transpose(1, 2), key_valid,
                                     context, family.out_weight(module), key_valid[:, k_len - query.shape[1]:])
    return context


def _resolved(state: "_PatchState", device: torch.device, head_dim: int) -> str:
    """The concrete backend of a patched module on ``device``, resolved once per (backend, device) for the model."""
    resolve_key = (state.backend, device, interpreting())  # every input of resolve_backend but the fixed head_dim
    backend = state.shared.get(resolve_key)
    if backend is None:
        backend = state.shared[resolve_key] = resolve_backend(state.backend, device, head_dim)
    return backend

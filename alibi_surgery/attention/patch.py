"""Reversible swap of transformers' ``BloomAttention.forward`` for the fused ALiBi kernels.

``patch_bloom(model, backend)`` sets an instance-level ``forward`` on every ``BloomAttention`` (the class is never
touched, so other models in the process are unaffected) plus one private attribute holding the patch state.
``unpatch_bloom`` removes both, leaving each module's ``__dict__`` as it was. Parameters and buffers are never
added, so ``state_dict`` and ``save_pretrained`` are unchanged.

The patched forward keeps BLOOM's contract: fused QKV projection, KV cache update, attention, ``dense``, residual
dropout-add. It reads key validity from the 4D additive mask that BloomModel passes (its last query row sees every
real key) and recomputes ALiBi positions from it, so left padding and ``generate`` work. It falls back to the eager
forward, for that call only, when ``output_attentions=True`` (with a warning) or when attention dropout is active.
Padded query rows get an attention output of 0 (the fused kernels' convention; see docs/training.md for the loss).

The backend is resolved once per device for the whole model (``resolve_backend`` with the model's head_dim):
``patch_bloom(model, "triton")`` refuses a head_dim the kernels do not support up front, and ``auto`` on CUDA falls
back to ``torch`` for one, warning once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from .backends import alibi_attention, check_backend, check_triton_head_dim, resolve_backend
from ..kernels import alibi_slopes, key_positions
from ..kernels.attention_fwd import interpreting

__all__ = ["patch_bloom", "unpatch_bloom", "patched", "bloom_attentions", "current_backend", "head_stats"]

_STATE = "_alibi_surgery_patch"


@dataclasses.dataclass
class _PatchState:
    backend: str
    layer: int
    had_forward: bool  # an instance-level forward existed before patching (restored on unpatch)
    old_forward: object
    slopes: dict = dataclasses.field(default_factory=dict)
    sink: "HeadStatsSink | None" = None
    resolved: dict = dataclasses.field(default_factory=dict)  # resolve_backend's answers, shared by all layers


@dataclasses.dataclass
class HeadStatsSink:
    """Accumulates per-head (sum first-token mass, sum entropy, rows) over every forward call, per layer."""

    n_layer: int
    n_head: int
    exclude_first_query: bool = False
    normalize_entropy: bool = False

    def __post_init__(self):
        self.sums = torch.zeros(self.n_layer, self.n_head, 3, dtype=torch.float64)

    def add(self, layer: int, stats: torch.Tensor) -> None:
        self.sums[layer] += stats.sum(0).to(device="cpu", dtype=torch.float64)


def bloom_attentions(model: nn.Module) -> list[nn.Module]:
    """Every ``BloomAttention`` in ``model``, in layer order."""
    from transformers.models.bloom.modeling_bloom import BloomAttention

    found = [m for m in model.modules() if isinstance(m, BloomAttention)]
    if not found:
        raise TypeError(f"{type(model).__name__} holds no BloomAttention module: not a BLOOM model")
    return found


def patch_bloom(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Route every BloomAttention of ``model`` through ``backend``. Idempotent: patching again switches backend.
    ``triton`` with a head_dim the kernels do not support is refused (UsageError) before anything changes."""
    check_backend(backend)
    attns = bloom_attentions(model)
    if backend == "triton":
        check_triton_head_dim(attns[0].head_dim)
    resolved = {}
    for layer, attn in enumerate(attns):
        state = attn.__dict__.get(_STATE)
        if state is not None:
            state.backend = backend
            continue
        had = "forward" in attn.__dict__
        attn.__dict__[_STATE] = _PatchState(backend, layer, had, attn.__dict__.get("forward"), resolved=resolved)
        attn.forward = types.MethodType(_patched_forward, attn)
    return model


def unpatch_bloom(model: nn.Module) -> nn.Module:
    """Restore every BloomAttention of ``model`` exactly as it was before :func:`patch_bloom`."""
    for attn in bloom_attentions(model):
        state = attn.__dict__.pop(_STATE, None)
        if state is None:
            continue
        if state.had_forward:
            attn.forward = state.old_forward
        else:
            del attn.forward
    return model


def current_backend(model: nn.Module) -> str | None:
    """The backend ``model`` is patched with, or None when it is not patched."""
    state = bloom_attentions(model)[0].__dict__.get(_STATE)
    return None if state is None else state.backend


@contextlib.contextmanager
def patched(model: nn.Module, backend: str = "auto"):
    """Patch ``model`` for the duration of the block, then put back whatever patch state it had before."""
    before = current_backend(model)
    patch_bloom(model, backend)
    try:
        yield model
    finally:
        if before is None:
            unpatch_bloom(model)
        else:
            patch_bloom(model, before)


@contextlib.contextmanager
def head_stats(model: nn.Module, *, exclude_first_query: bool = False, normalize_entropy: bool = False):
    """Collect fused per-head statistics from every forward pass run inside the block (model must be patched)."""
    attns = bloom_attentions(model)
    if any(_STATE not in a.__dict__ for a in attns):
        raise RuntimeError("head_stats needs a patched model: call patch_bloom(model) first")
    sink = HeadStatsSink(len(attns), attns[0].num_heads, exclude_first_query, normalize_entropy)
    for a in attns:
        a.__dict__[_STATE].sink = sink
    try:
        yield sink
    finally:
        for a in attns:
            if _STATE in a.__dict__:
                a.__dict__[_STATE].sink = None


def _key_validity(mask: torch.Tensor | None, batch: int, k_len: int, device: torch.device) -> torch.Tensor:
    """[batch, k_len] bool: which keys are real tokens, read off the last query row of BLOOM's 4D mask."""
    if mask is None:
        return torch.ones(batch, k_len, dtype=torch.bool, device=device)
    last = mask[:, 0, -1, :k_len]
    if last.dtype == torch.bool:
        return last
    return last > torch.finfo(last.dtype).min / 2


def _patched_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                     output_attentions=False, **kwargs):
    state: _PatchState = self.__dict__[_STATE]
    dropout_on = self.training and self.attention_dropout.p > 0
    if state.backend == "eager" or output_attentions or dropout_on:
        if output_attentions and state.backend != "eager":
            warnings.warn("output_attentions=True: this call runs BLOOM's eager attention", stacklevel=3)
        if state.sink is not None:
            raise RuntimeError("head statistics need the triton or torch backend, without output_attentions")
        eager = state.old_forward if state.had_forward else type(self).forward.__get__(self)
        return eager(hidden_states, residual, alibi, attention_mask, layer_past=layer_past, use_cache=use_cache,
                     output_attentions=output_attentions, **kwargs)

    batch, q_len, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # [B, H, T, d] views, no copies
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    device = hidden_states.device
    resolve_key = (state.backend, device, interpreting())  # every input of resolve_backend but the fixed head_dim
    backend = state.resolved.get(resolve_key)
    if backend is None:
        backend = state.resolved[resolve_key] = resolve_backend(state.backend, device, self.head_dim)
    cache_key = (device, torch.is_inference_mode_enabled())  # an inference tensor must never reach autograd
    slopes = state.slopes.get(cache_key)
    if slopes is None:
        slopes = state.slopes[cache_key] = alibi_slopes(self.num_heads, device)
    key_pos = key_positions(_key_validity(attention_mask, batch, key.shape[2], device))
    sink = state.sink
    context, _, stats = alibi_attention(
        query, key, value, key_pos, slopes, backend, with_stats=sink is not None,
        exclude_first_query=bool(sink and sink.exclude_first_query),
        normalize_entropy=bool(sink and sink.normalize_entropy))
    if sink is not None:
        sink.add(state.layer, stats)
    context = context.reshape(batch, q_len, self.hidden_size)

    if self.pretraining_tp > 1 and self.slow_but_exact:
        width = self.hidden_size / self.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(self.pretraining_tp):
            cols = slice(int(i * width), int((i + 1) * width))
            output = output + F.linear(context[:, :, cols], self.dense.weight[:, cols])
    else:
        output = self.dense(context)
    output = residual + F.dropout(output, p=self.hidden_dropout, training=self.training)
    return output, None

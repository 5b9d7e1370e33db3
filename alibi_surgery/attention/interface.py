"""The fused kernels as a transformers attention implementation (``"alibi_surgery"``), for any causal LM that routes
attention through ``AttentionInterface`` (see :mod:`alibi_surgery.families.interface`).

:func:`register` adds the attention function and, under the same name, a mask function (the one SDPA uses: a
boolean ``[B, 1, Tq, Tk]`` mask, or None for plain causal attention without padding; without a mask function
transformers would build no causal mask at all). :func:`install` switches a model's configs to the implementation
(``"eager"`` for the eager backend, the model's own reference) and :func:`uninstall` puts the old one back; the
patch module calls both (``Family.on_patch`` / ``on_unpatch``).

The attention function gets q ``[B, Hq, Tq, D]`` after the rotary embedding and k, v ``[B, Hkv, Tk, D]`` after the
cache update, **not** expanded for grouped-query attention: the kernels read key/value head ``h // (Hq / Hkv)``
in place. The softmax scale is the module's ``scaling`` argument; the ALiBi slopes are 0. What the kernels need of
the mask, :func:`mask_structure` reads off it: which keys are real (a key no query row sees is treated as padding),
each row's first real key, and the sliding window; it then checks that causal attention over those keys within that
window gives back exactly the mask, and refuses (one line) any other pattern: chunked attention, bidirectional
spans, packed sequences. The result is cached per mask object (one per layer type and model forward).

Limits: forward only (diagnosis, evaluation, generation); attention dropout and attention-logit soft-capping are
refused; padded query rows output 0 (FlashAttention's convention), which changes nothing at real positions. In a
decode step with a sliding window, keys that slid out of the window count as padding, so the first-token statistics
of such a step refer to the first key still visible (diagnosis runs whole prompts, where this never happens).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import UsageError
from ..kernels.alibi import first_real_key, key_positions
from .backends import run_attention, run_received

__all__ = ["IMPLEMENTATION", "register", "install", "uninstall", "interface_attention", "mask_structure"]

IMPLEMENTATION = "alibi_surgery"


@functools.cache
def register() -> None:
    """Register the attention function and its mask function with transformers (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, interface_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _configs(model: nn.Module) -> list:
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs.setdefault(id(config), config)
    return list(configs.values())


def install(model: nn.Module, shared: dict) -> None:
    """Point every config of ``model`` at the implementation its patch backend asks for (the first call saves the
    implementations it replaces in ``shared``)."""
    from .patch import patch_state

    register()
    backend = patch_state(next(m for m in model.modules() if _patched(m))).backend
    configs = _configs(model)
    shared.setdefault("implementations", [(c, c._attn_implementation) for c in configs])
    for config in configs:
        config._attn_implementation = "eager" if backend == "eager" else IMPLEMENTATION


def uninstall(model: nn.Module, shared: dict) -> None:
    for config, implementation in shared.pop("implementations", []):
        config._attn_implementation = implementation


def _patched(module: nn.Module) -> bool:
    from .patch import _STATE

    return _STATE in module.__dict__


def interface_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: returns ``(attn_output [B, Tq, Hq, D], None)``; with
    ``output_attentions=True`` the module's own eager attention runs instead (:func:`_eager`) and returns its maps."""
    from .patch import _resolved, patch_state

    if not _patched(module):
        raise UsageError(f"the {IMPLEMENTATION!r} attention implementation runs only on a model patched with "
                         f"alibi_surgery.patch(model)")
    if kwargs.get("output_attentions"):
        return _eager(module, query, key, value, attention_mask, scaling, dropout, softcap, kwargs)
    if softcap:
        raise UsageError(f"attention-logit soft-capping (softcap={softcap}) is not implemented by the fused kernels")
    if dropout:
        raise UsageError("attention dropout is not implemented by the fused kernels: call model.eval() first")
    state = patch_state(module)
    batch, n_head, q_len, head_dim = query.shape
    k_len = key.shape[2]
    if key.shape[1] == 0 or n_head % key.shape[1]:
        raise UsageError(f"{n_head} query heads cannot share {key.shape[1]} key/value heads evenly")
    device = query.device
    backend = _resolved(state, device, head_dim)
    key_pos, kstart, window = mask_structure(state.shared, attention_mask, batch, q_len, k_len, device)
    slopes = state.slopes.get(device)
    if slopes is None:
        with torch.inference_mode(False):
            slopes = state.slopes[device] = torch.zeros(n_head, dtype=torch.float32, device=device)
    sink = state.sink
    context, lse, stats = run_attention(
        query, key, value, key_pos, slopes, backend, kstart=kstart, window=window, softmax_scale=scaling,
        with_stats=sink is not None, exclude_first_query=bool(sink and sink.exclude_first_query),
        normalize_entropy=bool(sink and sink.normalize_entropy))
    if state.received is not None:  # the key-side pass over this call's log-sum-exp
        state.received.add(module.layer_idx, run_received(query, key, lse, key_pos, slopes, backend, kstart=kstart,
                                                          window=window, softmax_scale=scaling), key_pos)
    if sink is not None:
        sink.add(module.layer_idx, stats)
    if state.extremes is not None:  # value_ratio, output_norm (diagnosis/extremes.py), k/v heads as they are
        key_valid = key_pos >= 0
        state.extremes.add_attention(module.layer_idx, value.transpose(1, 2), key_valid, context,
                                     state.family.out_weight(module), key_valid[:, k_len - q_len:])
    return context, None


def _eager(module, query, key, value, mask, scaling, dropout, softcap, kwargs):
    """One call of the eager attention function of the module's own modeling file (``eager_attention_forward``,
    which returns the attention maps), with a warning; the mask, built by SDPA's mask function, is made the additive
    float mask eager attention adds to its scores (None, plain causal attention, made explicit)."""
    import sys

    from .patch import check_eager_call, patch_state

    check_eager_call(patch_state(module), True)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise UsageError(f"output_attentions=True: {type(module).__module__} has no eager_attention_forward to "
                         f"fall back to; call the model without output_attentions")
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is None:
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        mask = (torch.arange(k_len, device=query.device)[None, :] <= rows)[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, torch.finfo(query.dtype).min)
    extra = {} if softcap is None else {"softcap": softcap}
    return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **extra, **kwargs)


def mask_structure(shared: dict, mask: torch.Tensor | None, batch: int, q_len: int, k_len: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """``(key_pos int32 [B, Tk], kstart int32 [B], window or None)`` of one attention call's mask (None, or a
    ``[B, 1, Tq, Tk]`` boolean or additive mask), once per mask object (:func:`~.patch.per_mask`)."""
    from .patch import per_mask

    return per_mask(shared, "interface_mask", mask, (batch, q_len, k_len, device),
                    lambda: _structure(mask, batch, q_len, k_len, device))


def _structure(mask, batch, q_len, k_len, device):
    if mask is None:
        valid = torch.ones(batch, k_len, dtype=torch.bool, device=device)
        key_pos = key_positions(valid)
        return key_pos, first_real_key(key_pos).to(torch.int32), None
    if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[-2:] != (q_len, k_len):
        raise UsageError(f"the attention mask has shape {list(mask.shape)}; the fused kernels need "
                         f"[{batch}, 1, {q_len}, {k_len}]")
    seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if seen.shape[1] != 1 and not bool((seen == seen[:, :1]).all()):
        raise UsageError("the attention mask differs between heads, which the fused kernels do not express")
    seen = seen[:, 0].to(device)
    valid = seen.any(1)  # [B, Tk]: a key no query row sees is padding
    rows = torch.arange(q_len, device=device) + (k_len - q_len)  # each query row's own key index
    cols = torch.arange(k_len, device=device)
    causal = valid[:, None, :] & (cols[None, None, :] <= rows[None, :, None])  # [B, Tq, Tk]
    real = valid[:, rows]  # [B, Tq]: query rows that are real tokens
    count, full = seen.sum(-1), causal.sum(-1)
    binding = real & (count < full)
    window = int(count[binding].max()) if bool(binding.any()) else None
    expected = causal if window is None else causal & (cols[None, None, :] > rows[None, :, None] - window)
    if not bool(((expected == seen) | ~real[..., None]).all()):
        raise UsageError("the model's attention mask is not causal attention over real tokens with an optional "
                         "sliding window (chunked or bidirectional attention, packed sequences?), which the fused "
                         "kernels do not express")
    key_pos = key_positions(valid)
    return key_pos, first_real_key(key_pos).to(torch.int32), window

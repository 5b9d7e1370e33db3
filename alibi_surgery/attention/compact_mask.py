"""No ``T x T`` mask under the patch: the ALiBi families' model forwards get a ``[B, 1, 1, Tk]`` mask instead.

BLOOM, MPT and Falcon build their causal mask with ``transformers.masking_utils.create_causal_mask`` (imported into
each modeling module) before the blocks run: a ``[B, 1, T, T]`` float mask under the eager implementation, a bool one
under SDPA when there is padding (Falcon always materialises it, then adds ALiBi onto it as ``[B, H, T, T]``). A
50,068-token prompt on a 0.5 M-parameter model peaked at 12.7 GB that way. The fused kernels need only which keys are
real (:func:`~alibi_surgery.attention.patch.key_validity` reads the mask's last query row), so for a patched model
:func:`install` swaps the modeling module's ``create_causal_mask`` for :func:`_compact`, which returns that row
alone, ``[B, 1, 1, Tk]``, in the convention the original would have used (an additive float mask of the inputs' dtype
under ``eager``, else bool with True = attend). Everything the model does to its mask afterwards (MPT's
``.to(torch.bool)``, Falcon's ALiBi fold, now ``[B, H, 1, Tk]``) stays elementwise and small.

The swap is per model: other models in the process (keyed on their config object) get the original function, and
it is restored when the last patched model of that module is unpatched. A call that does not fit (a prepared 4D
mask, another attention implementation than eager or SDPA, a static cache) gets the original. When a patched module
falls back to its family's own attention for one call (``output_attentions``, attention dropout, the eager backend),
:func:`full_mask` rebuilds the causal ``[B, 1, Tq, Tk]`` mask from the compact one first; that attention materialises
``T x T`` anyway. Limits: BLOOM, MPT and Falcon only (interface models get transformers' own mask function).
"""

from __future__ import annotations

import inspect
import sys
import weakref

import torch

__all__ = ["install", "uninstall", "full_mask", "is_compact"]

_ORIGINAL = "create_causal_mask"
_PATCHED: dict = {}  # module name -> {id(config): weakref(config)} of the patched models built by that module
_SAVED: dict = {}  # module name -> the original function


def _module_of(model):
    return sys.modules.get(type(model).__module__)


def install(model) -> None:
    """Give ``model`` (a patched BLOOM, MPT or Falcon) compact masks (module docstring)."""
    module = _module_of(model)
    if module is None or not callable(getattr(module, _ORIGINAL, None)):
        return
    name = module.__name__
    if name not in _SAVED:
        original = getattr(module, _ORIGINAL)
        _SAVED[name] = original
        setattr(module, _ORIGINAL, _wrapper(name, original))
    _PATCHED.setdefault(name, {})[id(model.config)] = weakref.ref(model.config)


def uninstall(model) -> None:
    module = _module_of(model)
    if module is None or module.__name__ not in _SAVED:
        return
    name = module.__name__
    configs = _PATCHED.get(name, {})
    configs.pop(id(model.config), None)
    for key in [k for k, ref in configs.items() if ref() is None]:
        del configs[key]
    if not configs:
        setattr(module, _ORIGINAL, _SAVED.pop(name))
        _PATCHED.pop(name, None)


def _wrapper(name: str, original):
    signature = inspect.signature(original)

    def create_causal_mask(*args, **kwargs):
        call = signature.bind_partial(*args, **kwargs).arguments
        config = call.get("config")
        ref = _PATCHED.get(name, {}).get(id(config))
        if ref is None or ref() is not config:
            return original(*args, **kwargs)
        compact = _compact(config, call)
        return original(*args, **kwargs) if compact is None else compact

    create_causal_mask.__wrapped__ = original
    return create_causal_mask


def _compact(config, call: dict) -> torch.Tensor | None:
    """The mask's last query row ``[B, 1, 1, Tk]`` (module docstring), or None where the original must run."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    embeds, mask = call.get("inputs_embeds"), call.get("attention_mask")
    cache = call.get("cache", call.get("past_key_values"))
    if impl not in ("eager", "sdpa") or embeds is None or (mask is not None and mask.dim() != 2):
        return None
    if cache is not None and getattr(cache, "is_compileable", False):  # a static cache: its own mask sizes
        return None
    batch, q_len = embeds.shape[:2]
    past = cache.get_seq_length() if cache is not None else 0
    valid = (torch.ones(batch, past + q_len, dtype=torch.bool, device=embeds.device) if mask is None
             else mask.to(device=embeds.device) != 0)
    if impl == "sdpa":
        return valid[:, None, None, :]
    additive = torch.zeros(valid.shape, dtype=embeds.dtype, device=embeds.device)
    return additive.masked_fill_(~valid, torch.finfo(embeds.dtype).min)[:, None, None, :]


def is_compact(mask, q_len: int) -> bool:
    """Whether ``mask`` is a compact mask where a ``[B, *, Tq, Tk]`` one belongs (``Tq > 1``)."""
    return isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[2] == 1 and q_len > 1


def full_mask(mask: torch.Tensor, q_len: int, true_masks: bool = False) -> torch.Tensor:
    """The causal ``[B, H', Tq, Tk]`` mask of a compact ``[B, H', 1, Tk]`` one (query row i at key index
    ``i + Tk - Tq``): float additive masks get the dtype's minimum above the diagonal; bool masks are True = attend,
    or True = masked with ``true_masks`` (MPT after its ``.to(torch.bool)``)."""
    k_len = mask.shape[-1]
    rows = torch.arange(q_len, device=mask.device)[:, None] + (k_len - q_len)
    causal = torch.arange(k_len, device=mask.device)[None, :] <= rows  # [Tq, Tk], True = may attend
    if mask.dtype == torch.bool:
        return mask | ~causal if true_masks else mask & causal
    return mask.expand(*mask.shape[:2], q_len, k_len).masked_fill(~causal, torch.finfo(mask.dtype).min)

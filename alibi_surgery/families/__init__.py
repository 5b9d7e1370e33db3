"""Model families: the only code that knows a model's layout (one adapter per family, keyed by ``model_type``).

:func:`family_for` picks the adapter of a config (a ``config.json`` dict or a transformers config) and refuses any
other model in one line naming its position scheme; :func:`family_of_module` finds the adapter of a loaded model,
base model or single block. The adapter protocol is :class:`~alibi_surgery.families.base.Family`.
"""

from __future__ import annotations

from ..attention.patch import set_family_lookup
from ..errors import UsageError
from .base import Family, HeadLayout, training_context
from .bloom import BLOOM
from .falcon import FALCON
from .interface import interface_family, interface_refusal
from .mpt import MPT

__all__ = ["FAMILIES", "Family", "HeadLayout", "training_context", "family_for", "family_of_module", "family_names",
           "check_surgery"]

FAMILIES: dict[str, Family] = {fam.name: fam for fam in (BLOOM, MPT, FALCON)}  # keyed by config.model_type

_ROTARY_TYPES = ("llama", "mistral", "gpt_neox", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "olmo",
                 "olmo2", "gptj", "mixtral", "cohere", "stablelm")


def family_names() -> str:
    return ", ".join(sorted({f.name for f in FAMILIES.values()}))


def family_for(config, where: str = "the model") -> Family:
    """The adapter for ``config`` (a dict from config.json, or a transformers config); UsageError naming the
    position scheme when no registered family can handle it."""
    raw = config if isinstance(config, dict) else config.to_dict()
    model_type = raw.get("model_type") or "unknown"
    family = FAMILIES.get(model_type)
    if family is not None:
        refusal = family.refusal(raw)
        if refusal:
            raise UsageError(f"{where}: {refusal}")
        return family
    attn = raw.get("attn_config") if isinstance(raw.get("attn_config"), dict) else {}
    if raw.get("alibi", attn.get("alibi")):
        raise UsageError(f"{where} is a {model_type} model: it uses ALiBi, but alibi-surgery supports only the "
                         f"{family_names()} families")
    refusal = interface_refusal(config)
    if refusal is None:
        return interface_family(model_type)
    rotary = "rope_theta" in raw or "rotary_dim" in raw or "rope_scaling" in raw or model_type in _ROTARY_TYPES
    scheme = "rotary" if rotary else "learned or other"
    raise UsageError(f"{where} is a {model_type} model without ALiBi ({scheme} position embeddings) that "
                     f"alibi-surgery cannot diagnose: {refusal}")


def family_of_module(module) -> Family:
    """The adapter of a loaded model, base model or block: by ``config.model_type`` when the module has a config
    (with the same refusals as :func:`family_for`: a rotary or multi-query Falcon, an MPT option the port ignores,
    soft-capping... are refused in one line), else by the attention modules it holds."""
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "model_type", None) in FAMILIES:
        return family_for(config, type(module).__name__)
    for family in FAMILIES.values():
        cls = family.attention_class()
        if any(isinstance(m, cls) for m in module.modules()):
            return family
    if config is not None and getattr(config, "model_type", None):
        return family_for(config, type(module).__name__)
    raise UsageError(f"{type(module).__name__} is not a model of a supported family ({family_names()})")


def check_surgery(family: Family) -> Family:
    """``family``, or a UsageError (one line) when surgery on it is out of scope."""
    if family.surgery_refusal:
        raise UsageError(family.surgery_refusal)
    return family


set_family_lookup(family_of_module)  # patch() finds a model's adapter through it (attention sits below families)

"""Any causal LM that routes attention through transformers' ``AttentionInterface`` (Llama, Mistral, Qwen2/3, Gemma3,
OLMo, Phi, GPT-NeoX and most recent families): diagnosis only.

Such a model is accepted when transformers' causal-LM class for its ``model_type`` declares
``_supports_attention_backend`` (its attention modules call ``ALL_ATTENTION_FUNCTIONS``) and no ALiBi family claims
it. Its attention is plain causal attention, so the fused kernels run it with slopes of 0; grouped key/value heads are
read in place (query head h uses key/value head ``h // (Hq / Hkv)``), the module's own ``scaling`` is the softmax
scale, and sliding windows are read off the mask (:mod:`alibi_surgery.attention.interface`). Patching does not
replace any forward: it switches the model's ``config._attn_implementation`` to ``"alibi_surgery"`` (registered with
transformers together with its mask function) and back.

Refused in one line: models whose attention does not go through the interface (Mamba, GPT-Neo, the ALiBi families'
rotary relatives...), attention-logit soft-capping (Gemma2), multimodal configs (give the text model), and any
surgery (:attr:`Family.surgery_refusal`). Streamed diagnosis needs a per-family block runner and is refused; the
model is loaded whole. Limits: one module per layer whose class name ends in ``Attention`` and that has a
``layer_idx`` (every family listed above); the MLP dormancy figure covers the up/down (or fc1/fc2) projections it
finds and is left out when it finds none.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .base import Family, HeadLayout

__all__ = ["InterfaceFamily", "interface_family", "interface_refusal"]

_OUT_NAMES = ("o_proj", "dense", "out_proj", "c_proj")  # the output projection, by family convention
_MLP_NAMES = (("mlp.up_proj", "mlp.down_proj"), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), ("mlp.fc1", "mlp.fc2"),
              ("mlp.c_fc", "mlp.c_proj"), ("feed_forward.up_proj", "feed_forward.down_proj"), ("fc1", "fc2"))


def _causal_lm_class(config_class: type) -> type | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[config_class]
    except (KeyError, ValueError):
        return None


def _transformers_config(config):
    if not isinstance(config, dict):
        return config
    from transformers import AutoConfig

    raw = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures")}
    return AutoConfig.for_model(config.get("model_type") or "unknown", **raw)


def interface_refusal(config) -> str | None:
    """Why ``config`` (a ``config.json`` dict or a transformers config) is not a causal LM diagnosable through the
    attention interface (one line), or None when it is."""
    raw = config if isinstance(config, dict) else config.to_dict()
    model_type = raw.get("model_type") or "unknown"
    if isinstance(raw.get("text_config"), dict):
        return (f"this {model_type} config is multimodal (it holds a text_config); alibi-surgery diagnoses the text "
                f"model alone: save the language model as its own checkpoint")
    try:
        parsed = _transformers_config(config)
        cls = _causal_lm_class(type(parsed))
    except Exception:
        parsed = cls = None
    if cls is None:
        return f"transformers has no causal-LM class for model_type {model_type!r}"
    if not getattr(cls, "_supports_attention_backend", False):
        return (f"transformers' {cls.__name__} does not route its attention through the attention interface "
                f"(no _supports_attention_backend), so alibi-surgery cannot measure it")
    softcap = getattr(parsed, "attn_logit_softcapping", None)  # the config class's default when config.json omits it
    if softcap:
        return (f"this {model_type} config soft-caps attention logits (attn_logit_softcapping: {softcap}), which "
                f"the fused kernels do not implement")
    return None


class InterfaceFamily(Family):
    """The adapter of one ``model_type`` routed through the attention interface (instances from
    :func:`interface_family`)."""

    interface = True
    surgery_refusal = ("surgery on {name} models is not supported: alibi-surgery repairs ALiBi families (bloom, "
                       "falcon, mpt) and only diagnoses models that use transformers' attention interface")

    def __init__(self, model_type: str):
        self.name = model_type
        self.surgery_refusal = type(self).surgery_refusal.format(name=model_type)

    @property
    def prefix(self) -> str:
        return self.model_class().base_model_prefix + "."

    def refusal(self, config: dict) -> str | None:
        return interface_refusal(config)

    def config_class(self) -> type:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[self.name]

    def model_class(self) -> type:
        return _causal_lm_class(self.config_class())

    def make_config(self, *, n_layer: int, hidden: int, n_head: int, vocab: int, **extra):
        return self.config_class()(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layer,
                                   num_attention_heads=n_head, **extra)

    def layout(self, config) -> HeadLayout:
        n_head = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
        return HeadLayout(config.num_hidden_layers, n_head, head_dim, config.hidden_size, config.vocab_size)

    def kv_heads(self, config) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    # --- modules -------------------------------------------------------------------------------------------
    def base_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, "base_model", model)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if _is_attention(m)]

    def decoder_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers, in order: the parent of each attention module."""
        parents = {}
        for module in model.modules():
            for child in module.children():
                if _is_attention(child):
                    parents[id(child)] = module
        return [parents[id(a)] for a in self.attention_modules(model)]

    def out(self, attn: nn.Module) -> nn.Module:
        for name in _OUT_NAMES:
            if isinstance(getattr(attn, name, None), nn.Module):
                return getattr(attn, name)
        raise AttributeError(f"{type(attn).__name__} has none of the output projections {', '.join(_OUT_NAMES)}")

    def out_weight(self, attn: nn.Module) -> torch.Tensor:
        """The output projection's weight as ``[hidden, n_head * head_dim]`` (GPT-2's Conv1D stores it transposed)."""
        out = self.out(attn)
        return out.weight if isinstance(out, nn.Linear) else out.weight.t()

    def attention_shape(self, attn: nn.Module) -> tuple[int, int]:
        config = attn.config
        head_dim = getattr(attn, "head_dim", None) or self.layout(config).head_dim
        return config.num_attention_heads, head_dim

    def slopes(self, n_head: int, device=None) -> torch.Tensor:
        return torch.zeros(n_head, dtype=torch.float32, device=device)

    def mlp_weights(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        for up_name, down_name in _MLP_NAMES:
            try:
                up, down = block.get_submodule(up_name), block.get_submodule(down_name)
            except AttributeError:
                continue
            if isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
                return up.weight, down.weight
            return up.weight.t(), down.weight.t()  # Conv1D: [in, out]
        raise LookupError(f"no MLP up/down projection found in {type(block).__name__}")

    def mlp_live_tensors(self, block: nn.Module) -> int:
        """3 for a gated MLP (``act(gate(x)) * up(x)``: the activation, the up output, their product), else 2."""
        return 3 if any(name.endswith("gate_proj") for name, _ in block.named_modules()) else 2

    def patched_forward(self):
        return None  # patching switches the attention implementation instead (attention/interface.py)

    def on_patch(self, model: nn.Module, shared: dict) -> None:
        from ..attention.interface import install

        install(model, shared)

    def on_unpatch(self, model: nn.Module, shared: dict) -> None:
        from ..attention.interface import uninstall

        uninstall(model, shared)

    # --- sizes ---------------------------------------------------------------------------------------------------
    def params(self, config) -> int:
        with torch.device("meta"):
            model = self.model_class()(config)
        return sum(p.numel() for p in model.parameters())

    def block_params(self, config) -> int:
        return sum(p.numel() for p in self.meta_block(config).parameters())

    def meta_block(self, config) -> nn.Module:
        with torch.device("meta"):
            model = self.model_class()(self.with_layers(config, 1))
        return self.decoder_blocks(model)[0]

    def with_layers(self, config, n_layer: int):
        import copy

        config = copy.deepcopy(config)
        config.num_hidden_layers = n_layer
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:n_layer]
        return config


def _is_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx") \
        and hasattr(module, "config")


@functools.cache
def interface_family(model_type: str) -> InterfaceFamily:
    """The (cached) adapter of ``model_type``; the caller has checked :func:`interface_refusal`."""
    return InterfaceFamily(model_type)

"""The model-family adapter: everything the rest of the package may know about a model's layout.

Diagnosis, surgery, streaming, planning, comparison and the CLI never name a transformers class, a parameter name or
a config field; they ask the :class:`Family` of the model (see :mod:`alibi_surgery.families` for the registry).
An adapter says, for its family:

* which configs it accepts (:meth:`Family.refusal`: a one-line reason naming the position scheme of any other);
* the shape (:meth:`Family.layout` -> :class:`HeadLayout`), the parameter count and the block's parameter count;
* where the base model, the attention modules, the fused QKV and output projections are, and which rows and columns
  of those belong to one head (:meth:`Family.qkv_rows`, :meth:`Family.out_cols`);
* the ALiBi semantics the fused kernels must reproduce: slopes, softmax scale, how the bias is scaled and rounded, and
  how key positions follow from the attention mask (:meth:`Family.kernel_options`, :meth:`Family.key_positions`);
* how to install the fused attention (:meth:`Family.patched_forward`, a function set as an instance-level
  ``forward`` by :mod:`alibi_surgery.attention.patch`) and how to run one block alone for streamed diagnosis
  (:meth:`Family.embed`, :meth:`Family.block_inputs`);
* where each block's MLP up and down projections are (:meth:`Family.mlp_weights`, for the dormancy figure).

Adding a family is one subclass in its own module plus one line in the registry; docs/architecture.md walks
through it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

__all__ = ["Family", "HeadLayout", "CONTEXT_KEYS", "training_context"]

# Config fields that record the context a model was trained at, most specific first: ``seq_length`` (BLOOM's
# Megatron-DeepSpeed configs and this package's pre-trained models), ``max_seq_len`` (MPT), ``n_positions`` (GPT-2,
# OPT-style), ``max_position_embeddings`` (Falcon, Llama and most interface families).
CONTEXT_KEYS = ("seq_length", "max_seq_len", "n_positions", "max_position_embeddings")


def training_context(config) -> tuple[int, str] | None:
    """``(tokens, field)``: the training context a config records (the first of :data:`CONTEXT_KEYS` set to a
    positive integer), or None when it records none. ``config`` is a transformers config or its dict. Limits: a
    field's value is what the checkpoint's authors wrote; for the last two it is often the position table's size,
    which can exceed the context actually trained."""
    for key in CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """The attention shape of a model: ``n_layer`` layers of ``n_head`` heads of ``head_dim``; ``hidden`` is the
    residual width (``n_head * head_dim`` for every family here)."""

    n_layer: int
    n_head: int
    head_dim: int
    hidden: int
    vocab: int

    @property
    def n_heads(self) -> int:
        return self.n_layer * self.n_head


class Family:
    """One model family (subclass per family; instances are stateless singletons in the registry)."""

    name: str = ""  # e.g. "bloom": the config.model_type the adapter accepts and transformers' model folder
    prefix: str = "transformer."  # the base model's attribute name in the causal LM's state dict
    blocks: str = "h"  # the base model's attribute holding the blocks
    final_norm: str = "ln_f"  # the base model's attribute holding the norm after the last block
    block_keeps_output_attentions: bool = False  # the block does not pass output_attentions to its attention
    embedding: str = ""  # the token embedding's tensor name, without ``prefix``
    qkv_name: str = ""  # attribute names of the fused QKV and output linears on the attention module
    out_name: str = ""
    classes: tuple[str, str, str, str] = ("", "", "", "")  # config, causal LM, attention and block class names in
    # transformers.models.<name>.modeling_<name>
    layers_field: str = ""  # the config field holding the layer count
    mlp_names: tuple[str, str] = ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")  # the MLP's up and down linears,
    # as module paths inside one block (BLOOM's and Falcon's names)
    interface = False  # True: a model routed through transformers' attention interface (diagnosis only)
    mlp_live = 2  # MLP-width tensors alive at the MLP's peak in inference: the up projection's output and its
    # activation (a one-op GELU); BLOOM's tanh-GELU expression holds 5, a gated MLP 3 (the planner's working set)
    bool_masks_out = False  # the model's bool masks say True = masked (MPT), not True = attend
    surgery_refusal: str | None = None  # why surgery is refused on this family (one line), or None

    # --- configs -------------------------------------------------------------------------------------------
    def refusal(self, config: dict) -> str | None:
        """Why this adapter cannot handle the raw ``config.json`` dict (one line naming the position scheme or the
        unsupported option), or None when it can."""
        return None

    def _class(self, index: int) -> type:
        import importlib

        module = importlib.import_module(f"transformers.models.{self.name}.modeling_{self.name}")
        return getattr(module, self.classes[index])

    def config_class(self) -> type:
        return self._class(0)

    def model_class(self) -> type:
        """The transformers causal-LM class (``from_pretrained`` is only ever called on this class)."""
        return self._class(1)

    def make_config(self, *, n_layer: int, hidden: int, n_head: int, vocab: int, **extra):
        """A config of this family with the given shape (random checkpoints, tests)."""
        raise NotImplementedError

    def layout(self, config) -> HeadLayout:
        raise NotImplementedError

    # --- modules -------------------------------------------------------------------------------------------
    def attention_class(self) -> type:
        return self._class(2)

    def block_class(self) -> type:
        return self._class(3)

    def base_model(self, model: nn.Module) -> nn.Module:
        """The base model (embeddings + blocks) of a causal LM, or ``model`` itself when it is the base model."""
        return getattr(model, self.prefix.rstrip("."), model)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every attention module of ``model`` (a causal LM, a base model or one block), in layer order."""
        cls = self.attention_class()
        return [m for m in model.modules() if isinstance(m, cls)]

    def decoder_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The decoder blocks of ``model`` (a causal LM, a base model or one block) in layer order: the base model's
        ``blocks`` list when it has one, else the modules of :meth:`block_class`. A family whose blocks are of other
        classes overrides it."""
        found = getattr(self.base_model(model), self.blocks, None)
        if isinstance(found, nn.ModuleList):
            return list(found)
        cls = self.block_class()
        return [m for m in model.modules() if isinstance(m, cls)]

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        """The norm the base model applies after its last block (before the LM head)."""
        return getattr(self.base_model(model), self.final_norm)

    def qkv(self, attn: nn.Module) -> nn.Linear:
        return getattr(attn, self.qkv_name)

    def out(self, attn: nn.Module) -> nn.Linear:
        return getattr(attn, self.out_name)

    def out_weight(self, attn: nn.Module) -> torch.Tensor:
        """The output projection's weight as ``[hidden, n_head * head_dim]`` (column block h reads head h)."""
        return self.out(attn).weight

    def qkv_rows(self, head: int, layout: HeadLayout) -> list[tuple[int, int]]:
        """Row ranges ``[start, stop)`` of the fused QKV weight (and bias) that belong to ``head``, in q, k, v order.
        Default: one range, for families that interleave q, k, v per head (``[H, 3, d]`` rows, BLOOM and Falcon)."""
        d3 = 3 * layout.head_dim
        return [(head * d3, (head + 1) * d3)]

    def out_cols(self, head: int, layout: HeadLayout) -> tuple[int, int]:
        """Column range of the output projection's weight that reads ``head``'s context."""
        d = layout.head_dim
        return head * d, (head + 1) * d

    def block_names(self, layer: int, block: nn.Module) -> list[str]:
        """Checkpoint tensor names (without ``prefix``) of block ``layer``'s parameters, each of the form
        ``<blocks>.<layer>.<name inside the block>``."""
        return [f"{self.blocks}.{layer}.{name}" for name, _ in block.named_parameters()]

    def mlp_weights(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up [n_neurons, hidden], down [hidden, n_neurons])``: the weights of one block's MLP projections
        (neuron i is up row i and down column i)."""
        up, down = (block.get_submodule(name).weight for name in self.mlp_names)
        return up, down

    def mlp_live_tensors(self, block: nn.Module) -> int:
        """MLP-width tensors alive at once at the peak of ``block``'s MLP in inference (:attr:`mlp_live`)."""
        return self.mlp_live

    def mlp_tensor_names(self, layer: int) -> tuple[str, str]:
        """Checkpoint tensor names (without ``prefix``) of block ``layer``'s up and down weights."""
        up, down = (f"{self.blocks}.{layer}.{name}.weight" for name in self.mlp_names)
        return up, down

    # --- attention semantics ------------------------------------------------------------------------------------
    def kv_heads(self, config) -> int:
        """Key/value heads of ``config``'s attention (as many as query heads unless the family groups them)."""
        return self.layout(config).n_head

    def attention_shape(self, attn: nn.Module) -> tuple[int, int]:
        """``(n_head, head_dim)`` of one attention module."""
        return attn.num_heads, attn.head_dim

    def slopes(self, n_head: int, device=None) -> torch.Tensor:
        """float32 ``[n_head]``: the slopes the kernels multiply key positions by (before ``bias_scale``). Default:
        the schedule BLOOM introduced (:func:`alibi_surgery.kernels.alibi.alibi_slopes`), which Falcon uses too."""
        from ..kernels.alibi import alibi_slopes

        return alibi_slopes(n_head, device)

    def module_slopes(self, attn: nn.Module) -> torch.Tensor:
        """The slopes of one attention module (default: :meth:`slopes` of its head count)."""
        return self.slopes(self.attention_shape(attn)[0])

    def kernel_options(self, attn: nn.Module) -> dict:
        """Extra keyword options of the fused kernels (``softmax_scale``, ``bias_scale``, ``alibi_bf16``) that give
        this family's scores for one attention module; {} means BLOOM's ``q.k / sqrt(d) + slope * pos``."""
        return {}

    def eager_refusal(self) -> str | None:
        """Why this family's own eager attention (``output_attentions=True``) must not be used, or None."""
        return None

    def key_positions(self, valid: torch.Tensor) -> torch.Tensor:
        """int32 ``[batch, k_len]`` ALiBi positions from key validity (bool ``[batch, k_len]``); -1 = padded key.
        Default: the mask's cumsum (the first real key is 0, padding does not count), as BLOOM and Falcon do."""
        from ..kernels.alibi import key_positions

        return key_positions(valid)

    def on_patch(self, model: nn.Module, shared: dict) -> None:
        """Called once by :func:`~alibi_surgery.attention.patch.patch` after the modules got their patch state
        (``shared`` is the state the model's modules share); families that patch by other means than instance
        forwards act here. The ALiBi families' model forwards get compact masks
        (:mod:`~alibi_surgery.attention.compact_mask`)."""
        from ..attention.compact_mask import install

        if getattr(model, "config", None) is not None:
            install(model)

    def on_unpatch(self, model: nn.Module, shared: dict) -> None:
        """Undo :meth:`on_patch` (called by :func:`~alibi_surgery.attention.patch.unpatch`)."""
        from ..attention.compact_mask import uninstall

        if getattr(model, "config", None) is not None:
            uninstall(model)

    def patched_forward(self) -> Callable:
        """The function installed as the attention modules' instance-level ``forward`` (``self`` is the module); it
        calls :func:`alibi_surgery.attention.patch.fused_attention` for the attention itself."""
        raise NotImplementedError

    # --- streamed diagnosis --------------------------------------------------------------------------------------
    def embed(self, tensors: Callable, ids: torch.Tensor, config, device, dtype) -> torch.Tensor:
        """The hidden states entering block 0 for token ``ids``; ``tensors(names)`` loads checkpoint tensors and
        ``tensors.rows(name, ids)`` gathers embedding rows without loading the whole table."""
        raise NotImplementedError

    def block_inputs(self, mask: torch.Tensor, config, dtype) -> tuple[tuple, dict]:
        """``(args, kwargs)`` after the hidden states with which the family's model calls one block, for a batch
        with 0/1 ``mask [batch, T]`` (no cache)."""
        raise NotImplementedError

    # --- sizes ---------------------------------------------------------------------------------------------------
    def block_params(self, config) -> int:
        """Parameters of one block (counted on a meta-device instance: no memory)."""
        return sum(p.numel() for p in self.meta_block(config).parameters())

    def meta_block(self, config) -> nn.Module:
        """One block of ``config`` built on the meta device (shapes only, no memory)."""
        with torch.device("meta"):
            return self.block_class()(config, layer_idx=0)

    def params(self, config) -> int:
        """Parameters of the causal LM, a tied LM head counted once (counted on a meta-device instance)."""
        with torch.device("meta"):
            model = self.model_class()(self.with_layers(config, 1))
        one = sum(p.numel() for p in model.parameters())
        return one + (self.layout(config).n_layer - 1) * self.block_params(config)

    def with_layers(self, config, n_layer: int):
        """A copy of ``config`` with ``n_layer`` layers."""
        import copy

        config = copy.deepcopy(config)
        setattr(config, self.layers_field, n_layer)
        return config

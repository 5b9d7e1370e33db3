"""Falcon with ALiBi (``FalconForCausalLM``, ``alibi=True``): the Falcon-RW checkpoints.

Accepted configs: ``alibi: true``, ``multi_query: false``, ``new_decoder_architecture: false`` and as many key/value
heads as query heads; ``parallel_attn`` may be either (only the attention module is replaced, the block is
transformers' own). Everything else is refused in one line: rotary Falcons (``alibi: false``: Falcon-7B/40B/180B),
multi-query attention, the new decoder architecture (grouped key/value heads), and config.json files that give the
shape only under the pre-transformers keys ``n_head`` / ``n_layer``, which transformers' ``FalconConfig`` does not
read (it would silently build its default 71 heads / 32 layers).

Layout: ``transformer.h[i].self_attention`` holds ``query_key_value`` (bias per ``config.bias``, true for RW),
whose rows are interleaved per head as ``[H, 3, d]`` exactly like BLOOM's (``_split_heads`` views the output as
``[B, T, H, 3, d]``), and ``dense``, whose columns ``[dh, d(h+1))`` read head h. Unlike BLOOM the residual is added
by the block, not by the attention module. The LM head is tied to ``word_embeddings``; there is no embedding
layer norm.

Scores: ``(q.k + R(R(m_h) * R(pos_j))) / sqrt(d)``, with BLOOM's slope schedule m_h, ``pos`` the mask's cumsum (left
padding does not count) and R rounding to bfloat16: ``build_alibi_tensor`` multiplies bf16 slopes by the int64
positions, so the product is formed and rounded in bf16 (positions above 256 are themselves rounded). The kernels
get ``softmax_scale = bias_scale = 1/sqrt(d)`` and ``alibi_bf16=True``; the effective slope is m/sqrt(d).

Two transformers signatures, both handled (:func:`takes_alibi` tells which is installed):

* up to 5.24, ``FalconAttention.forward(hidden_states, alibi, attention_mask, ...)``: ``FalconModel`` folds
  ``alibi / sqrt(d)`` into the 4D mask for every attention implementation, and the eager branch adds ``alibi`` to the
  scores again before scaling, so ``attn_implementation="eager"`` and every ``output_attentions=True`` call compute
  ``softmax((q.k + 2 alibi) / sqrt(d))`` (a regression of transformers issue #29946, seen on 5.17 to 5.24). Only the
  SDPA branch without ``output_attentions`` is right, and it is the ground truth. Hence, there: a patched Falcon
  refuses ``output_attentions=True``, ``diagnose --backend eager`` refuses Falcon (:meth:`Falcon.eager_refusal`),
  and the patched forward refuses to fall back to the module's own forward (eager backend, active attention dropout)
  unless the model runs the SDPA branch;
* from 5.25, ``FalconAttention.forward(hidden_states, attention_mask, position_ids, layer_past, ...)`` goes through
  the attention interface with ALiBi only in the mask: eager and SDPA agree (to 1e-7 in fp32), so
  ``output_attentions=True`` falls back to the module's own forward with the eager attention function, with a
  warning, as BLOOM and MPT do.

Either way the patched forward reads only key validity off the mask and takes slopes and positions from the
adapter. Limits: FlashAttention-2 Falcon modules (which refuse ALiBi upstream) are patched like the others, since
they subclass ``FalconAttention``; head slices do not cover the ``dense`` bias.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math

import torch

from ..errors import UsageError
from .base import Family, HeadLayout

__all__ = ["Falcon", "FALCON", "takes_alibi"]

_DEFAULTS = {"alibi": False, "multi_query": True, "new_decoder_architecture": False}  # FalconConfig's defaults

_EAGER_BUG = ("transformers' Falcon attention (before 5.25) adds the ALiBi bias twice on its eager path "
              "(output_attentions=True, attn_implementation='eager'), so its outputs and attention maps are wrong; "
              "use the fused torch or triton backend, without output_attentions, or transformers >= 5.25")


def _flag(config: dict, key: str) -> bool:
    value = config.get(key)
    return bool(_DEFAULTS[key] if value is None else value)


class Falcon(Family):
    name, layers_field = "falcon", "num_hidden_layers"
    embedding, qkv_name, out_name = "word_embeddings.weight", "query_key_value", "dense"
    classes = ("FalconConfig", "FalconForCausalLM", "FalconAttention", "FalconDecoderLayer")

    def refusal(self, config: dict) -> str | None:
        if not _flag(config, "alibi"):
            return ("this Falcon config uses rotary position embeddings (alibi: false); alibi-surgery needs ALiBi "
                    "attention (the Falcon-RW configs)")
        if _flag(config, "new_decoder_architecture"):
            return ("this Falcon config uses the new decoder architecture (new_decoder_architecture: true, grouped "
                    "key/value heads); alibi-surgery supports only the Falcon-RW layout")
        if _flag(config, "multi_query"):
            return ("this Falcon config uses multi-query attention (multi_query: true, one key/value head); "
                    "alibi-surgery supports only the Falcon-RW layout (multi_query: false)")
        for old, new in (("n_head", "num_attention_heads"), ("n_layer", "num_hidden_layers")):
            if config.get(old) is not None and config.get(new) != config[old]:
                return (f"this Falcon config gives {old}: {config[old]} but {new}: {config.get(new)}; transformers' "
                        f"FalconConfig reads only {new}: rename the key in config.json")
        heads, kv = config.get("num_attention_heads"), config.get("num_kv_heads")
        if kv is not None and heads is not None and kv != heads:
            return (f"this Falcon config has num_kv_heads: {kv} for {heads} attention heads; alibi-surgery supports "
                    f"only the Falcon-RW layout (one key/value head per query head)")
        return None

    def block_class(self):
        return _block_class()

    def make_config(self, *, n_layer: int, hidden: int, n_head: int, vocab: int, **extra):
        options = dict(alibi=True, multi_query=False, new_decoder_architecture=False, parallel_attn=False, bias=True)
        options.update(extra)
        return self.config_class()(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layer,
                                   num_attention_heads=n_head, **options)

    def layout(self, config) -> HeadLayout:
        n_head = config.num_attention_heads
        return HeadLayout(config.num_hidden_layers, n_head, config.hidden_size // n_head, config.hidden_size,
                          config.vocab_size)

    def kernel_options(self, attn) -> dict:
        scale = 1.0 / math.sqrt(attn.head_dim)
        return {"softmax_scale": scale, "bias_scale": scale, "alibi_bf16": True}

    def eager_refusal(self) -> str | None:
        return _EAGER_BUG if takes_alibi() else None

    def patched_forward(self):
        return _patched_forward

    def embed(self, tensors, ids, config, device, dtype) -> torch.Tensor:
        return tensors.rows(self.embedding, ids)

    def block_inputs(self, mask, config, dtype):
        # FalconModel passes a 4D mask with alibi / sqrt(d) folded in (and, before 5.25, alibi [B, H, 1, T] too,
        # on which the module's original forward branches); the patched attention reads only key validity off the
        # mask's last query row, so an additive 0 / dtype-min mask [B, 1, 1, T] is enough.
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask == 0,
                                                                                          torch.finfo(dtype).min)
        if not takes_alibi():
            return (additive[:, None, None, :],), {"use_cache": False}
        from transformers.models.falcon.modeling_falcon import build_alibi_tensor

        batch, length = mask.shape
        n_head = config.num_attention_heads
        alibi = build_alibi_tensor(mask.long(), n_head, dtype).reshape(batch, n_head, 1, length)
        return (alibi, additive[:, None, None, :]), {"use_cache": False}


@functools.cache
def takes_alibi() -> bool:
    """True when the installed transformers' ``FalconAttention.forward`` takes the ALiBi tensor as an argument
    (transformers <= 5.24, whose eager branch adds it twice), False when it reads ALiBi off the mask through the
    attention interface (5.25 on)."""
    return "alibi" in _signature().parameters


@functools.cache
def _signature() -> inspect.Signature:
    from transformers.models.falcon.modeling_falcon import FalconAttention

    return inspect.signature(FalconAttention.forward)


@contextlib.contextmanager
def _eager_attention(config):
    """The eager attention function for the calls inside the block (5.25 on: the module reads the implementation
    off its config at each call, and SDPA returns no attention maps)."""
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


@functools.cache
def _block_class():
    from transformers.models.falcon.modeling_falcon import FalconDecoderLayer

    class FalconBlock(FalconDecoderLayer):
        """transformers' ``FalconDecoderLayer`` that also accepts a config loaded without an attention
        implementation (as streamed diagnosis reads config.json): it then builds the SDPA branch's module."""

        def __init__(self, config, layer_idx=None):
            if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa", "flash_attention_2"):
                config = copy.deepcopy(config)
                config._attn_implementation = "sdpa"
            super().__init__(config, layer_idx)

    return FalconBlock


def _patched_forward(self, hidden_states, *args, **kwargs):
    """The patched ``FalconAttention.forward``, for either signature (arguments bound by the installed one)."""
    from ..attention.patch import eager_fallback, fused_attention, patch_state

    call = _signature().bind(self, hidden_states, *args, **kwargs).arguments
    output_attentions = bool(call.get("output_attentions", False))
    dropout_on = self.training and _dropout_p(self) > 0
    if takes_alibi() and (patch_state(self).backend == "eager" or dropout_on) and not output_attentions \
            and self.config._attn_implementation != "sdpa":
        raise UsageError(_EAGER_BUG)  # the module's own forward would run the double-ALiBi eager branch
    eager = eager_fallback(self, output_attentions, dropout_on)  # refuses output_attentions (eager_refusal)
    if eager is not None:
        if output_attentions and not takes_alibi():
            with _eager_attention(self.config):
                return eager(hidden_states, *args, **kwargs)
        return eager(hidden_states, *args, **kwargs)
    batch, q_len, _ = hidden_states.shape
    fused = self.query_key_value(hidden_states).view(batch, q_len, self.num_heads, 3, self.head_dim)  # _split_heads
    context = fused_attention(self, fused, "interleaved", call.get("attention_mask"), cache=call.get("layer_past"))
    context = context.reshape(batch, q_len, self.num_heads * self.head_dim)
    return self.dense(context), None


def _dropout_p(module) -> float:
    """The attention dropout probability (a ``nn.Dropout`` module before 5.25, a float from 5.25)."""
    dropout = module.attention_dropout
    return float(getattr(dropout, "p", dropout) or 0.0)


FALCON = Falcon()

"""BLOOM (``BloomForCausalLM``): the family the package began with.

Layout: ``transformer.h[i].self_attention`` holds ``query_key_value`` (bias), whose rows are interleaved per head as
``[H, 3, d]`` (head h owns rows ``[3dh, 3d(h+1))``, q then k then v), and ``dense`` (bias), whose columns
``[dh, d(h+1))`` read head h. Scores are ``q.k / sqrt(d) + slope_h * pos_j`` with BLOOM's slope schedule
(:func:`alibi_surgery.kernels.alibi.alibi_slopes`) and ``pos`` the mask's cumsum (left padding does not count). The
residual is added inside the attention module. Limits: the ``pretraining_tp > 1`` slow-but-exact output path is
reproduced in the forward only; head slices do not route it.
"""

from __future__ import annotations


import torch
from torch.nn import functional as F

from .base import Family, HeadLayout

__all__ = ["Bloom", "BLOOM"]


class Bloom(Family):
    name, layers_field = "bloom", "n_layer"
    embedding, qkv_name, out_name = "word_embeddings.weight", "query_key_value", "dense"
    classes = ("BloomConfig", "BloomForCausalLM", "BloomAttention", "BloomBlock")
    mlp_live = 5  # bloom_gelu_forward's x, x * 0.5, 0.79788456 * x, 0.044715 * x and its product with x

    def refusal(self, config: dict) -> str | None:
        scheme = config.get("position_embedding_type")
        if config.get("alibi") is False or scheme not in (None, "alibi"):
            why = "alibi: false" if config.get("alibi") is False else f"position_embedding_type: {scheme}"
            return f"this BLOOM config turns ALiBi off ({why}); alibi-surgery needs ALiBi attention"
        return None

    def make_config(self, *, n_layer: int, hidden: int, n_head: int, vocab: int, **extra):
        return self.config_class()(vocab_size=vocab, hidden_size=hidden, n_layer=n_layer, n_head=n_head, **extra)

    def layout(self, config) -> HeadLayout:
        return HeadLayout(config.n_layer, config.n_head, config.hidden_size // config.n_head, config.hidden_size,
                          config.vocab_size)

    def patched_forward(self):
        return _patched_forward

    def embed(self, tensors, ids, config, device, dtype) -> torch.Tensor:
        x = tensors.rows(self.embedding, ids)
        norm = tensors(["word_embeddings_layernorm.weight", "word_embeddings_layernorm.bias"])
        return F.layer_norm(x, (config.hidden_size,), norm["word_embeddings_layernorm.weight"],
                            norm["word_embeddings_layernorm.bias"], config.layer_norm_epsilon)

    def block_inputs(self, mask, config, dtype):
        # the patched attention reads key validity off the last query row of the additive 4D mask; the ALiBi
        # tensor the block passes on is not read
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask == 0,
                                                                                          torch.finfo(dtype).min)
        return (None, additive[:, None, None, :]), {"use_cache": False}


def _patched_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                     output_attentions=False, **kwargs):
    from ..attention.patch import eager_fallback, fused_attention

    eager = eager_fallback(self, output_attentions, self.training and self.attention_dropout.p > 0)
    if eager is not None:
        return eager(hidden_states, residual, alibi, attention_mask, layer_past=layer_past, use_cache=use_cache,
                     output_attentions=output_attentions, **kwargs)
    batch, q_len, _ = hidden_states.shape
    fused = self.query_key_value(hidden_states).view(batch, q_len, self.num_heads, 3, self.head_dim)
    context = fused_attention(self, fused, "interleaved", attention_mask, cache=layer_past)
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


BLOOM = Bloom()

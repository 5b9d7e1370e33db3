"""MPT (``MptForCausalLM``, mpt-7b / mpt-30b) as transformers ports it.

Layout: ``transformer.blocks[i].attn`` holds ``Wqkv`` (no bias), blocked as [q of all heads; k of all heads; v of
all heads] (``chunk(3)``), so head h owns three row ranges ``[hd, (h+1)d)``, ``D + [hd, (h+1)d)`` and
``2D + [hd, (h+1)d)`` (D = hidden); ``out_proj`` (no bias), whose columns ``[hd, (h+1)d)`` read head h. The LM head
is tied to ``wte``; there is no position embedding, no embedding norm and no embedding dropout.

Scores are ``softmax_scale * q.k + slope_h * pos_j``: ``softmax_scale`` from ``attn_config`` (None: 1/sqrt(d)), the
bias not scaled, and ``clip_qkv`` clamps the fused QKV output before the split. Slopes follow MPT's own schedule
(:meth:`Mpt.slopes`; ``alibi_bias_max`` is 8 whatever the config says, as in transformers' port). MPT's positions
are key indices relative to the last key and ignore the mask; here each real key gets its index minus its row's
first real index (the first real token is 0), which differs from MPT's by a constant per row, so left padding gives
MPT's probabilities exactly (shift invariance). Holes inside a row (padding between real tokens) follow MPT too:
positions stay index-based, a real key after a hole sits as far from the query as its index says (BLOOM and Falcon
count only real tokens instead). The fused kernels' padded-query convention (output 0) and their normalised
entropy (which counts ``pos + 1`` visible keys) assume no holes.

Refused: configs transformers' port would silently run with different semantics (``attn_config`` with
``alibi: false``, ``qk_ln``, ``prefix_lm``, ``rope``, or an ``attn_type`` other than multihead_attention).
``MptBlock`` never tells its attention whether attention maps were asked for; the patch reads the flag off the
block's call (a forward pre-hook), so ``output_attentions=True`` runs MPT's eager attention for that call and
returns its maps. Limits: beyond ``max_seq_len`` keys transformers' own eager attention fails while the patched one
keeps going.
"""

from __future__ import annotations

import math

import torch

from .base import Family, HeadLayout

__all__ = ["Mpt", "MPT"]

# attn_config fields of MptConfig: make_config accepts them at top level too
_ATTN_FIELDS = ("attn_type", "attn_pdrop", "attn_impl", "clip_qkv", "softmax_scale", "prefix_lm", "qk_ln",
                "attn_uses_sequence_id", "alibi", "alibi_bias_max")


def _attn_config(config: dict) -> dict:
    attn = config.get("attn_config")
    if attn is None:
        return {}
    return attn if isinstance(attn, dict) else attn.to_dict()


class Mpt(Family):
    name, layers_field = "mpt", "n_layers"
    bool_masks_out = True  # MptModel casts its mask .to(torch.bool): True = masked
    embedding, qkv_name, out_name = "wte.weight", "Wqkv", "out_proj"
    blocks = "blocks"
    final_norm = "norm_f"
    mlp_names = ("ffn.up_proj", "ffn.down_proj")
    block_keeps_output_attentions = True  # MptBlock calls its attention without output_attentions
    classes = ("MptConfig", "MptForCausalLM", "MptAttention", "MptBlock")

    def refusal(self, config: dict) -> str | None:
        attn = _attn_config(config)
        if attn.get("alibi", True) is False:
            return ("this MPT config turns ALiBi off (attn_config.alibi: false): MPT without ALiBi is not supported "
                    "(transformers' MPT port always uses ALiBi)")
        if attn.get("rope"):
            return ("this MPT config asks for rotary position embeddings (attn_config.rope: true), which "
                    "transformers' MPT port ignores; alibi-surgery needs plain ALiBi attention")
        for key in ("qk_ln", "prefix_lm"):
            if attn.get(key):
                return (f"this MPT config sets attn_config.{key}: true, which transformers' MPT port silently "
                        f"ignores; alibi-surgery refuses it rather than run different attention")
        kind = attn.get("attn_type", "multihead_attention")
        if kind not in (None, "multihead_attention"):
            return (f"this MPT config uses attn_config.attn_type: {kind}, which transformers' MPT port silently runs "
                    f"as multihead_attention; alibi-surgery supports only multihead_attention")
        return None

    def make_config(self, *, n_layer: int, hidden: int, n_head: int, vocab: int, **extra):
        """``extra`` may name ``attn_config`` fields (``clip_qkv``, ``softmax_scale``, ...) at top level."""
        attn = dict(extra.pop("attn_config", None) or {})
        attn.update({k: extra.pop(k) for k in _ATTN_FIELDS if k in extra})
        return self.config_class()(vocab_size=vocab, d_model=hidden, n_layers=n_layer, n_heads=n_head,
                                   attn_config=attn, **extra)

    def layout(self, config) -> HeadLayout:
        return HeadLayout(config.n_layers, config.n_heads, config.d_model // config.n_heads, config.d_model,
                          config.vocab_size)

    def attention_shape(self, attn) -> tuple[int, int]:
        return attn.n_heads, attn.head_dim

    def qkv_rows(self, head: int, layout: HeadLayout) -> list[tuple[int, int]]:
        d, width = layout.head_dim, layout.hidden
        return [(part * width + head * d, part * width + (head + 1) * d) for part in range(3)]

    def slopes(self, n_head: int, device=None) -> torch.Tensor:
        """MPT's schedule: with n the next power of two >= n_head, slopes ``2^(-8i/n)`` for i = 1..n (float32, as
        MPT computes them); when n > n_head, those of even i first, then those of odd i, and the first n_head kept."""
        n = 2 ** math.ceil(math.log2(n_head))
        exponents = torch.arange(1, n + 1, device=device, dtype=torch.float32) * (8 / n)
        slopes = 1.0 / torch.pow(2.0, exponents)
        if n != n_head:
            slopes = torch.cat([slopes[1::2], slopes[0::2]])[:n_head]
        return slopes

    def kernel_options(self, attn) -> dict:
        return {"softmax_scale": float(attn.softmax_scale)}

    def key_positions(self, valid: torch.Tensor) -> torch.Tensor:
        """Each real key's index minus its row's first real index; -1 for padded keys (see the module docstring)."""
        valid = valid.bool()
        index = torch.arange(valid.shape[-1], device=valid.device, dtype=torch.int32)
        first = valid.to(torch.int32).argmax(-1, keepdim=True).to(torch.int32)
        return torch.where(valid, index - first, torch.full_like(index, -1)).to(torch.int32)

    def patched_forward(self):
        return _patched_forward

    def embed(self, tensors, ids, config, device, dtype) -> torch.Tensor:
        return tensors.rows(self.embedding, ids)

    def block_inputs(self, mask, config, dtype):
        # MptModel passes a bool 4D mask, True = masked; the patched attention reads key validity off its last
        # query row, so one row [B, 1, 1, T] suffices. position_bias is not read by the patched attention.
        return (None, (mask == 0)[:, None, None, :]), {"use_cache": False}


def _patched_forward(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
    """MptAttention.forward with the fused kernels; accepts the cache as ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier 5.x). Returns ``(attn_output, None)``: the attention maps are not computed."""
    from ..attention.patch import eager_fallback, fused_attention

    for alias in ("past_key_values", "past_key_value"):  # the cache's name before transformers 5.2x
        cache = kwargs.pop(alias, None) if cache is None else cache
    output_attentions = bool(kwargs.get("output_attentions", False))
    eager = eager_fallback(self, output_attentions, self.training and self.attn_dropout_p > 0)
    if eager is not None:
        kwargs.pop("output_attentions", None)
        return eager(hidden_states, position_bias, cache, attention_mask, **kwargs)
    batch, q_len = hidden_states.shape[:2]
    mixed = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed = mixed.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    fused = mixed.view(batch, q_len, 3, self.n_heads, self.head_dim)  # the chunks of Wqkv: the blocked layout
    context = fused_attention(self, fused, "blocked", attention_mask, cache=cache,
                              bool_masks_out=True)  # MPT's bool masks say True = masked
    context = context.reshape(batch, q_len, self.hidden_size)
    return self.out_proj(context), None


MPT = Mpt()

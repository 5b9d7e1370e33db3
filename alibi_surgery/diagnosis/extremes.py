"""Extreme-token metrics without a T x T matrix: value-state drains, head output norms, residual-state peaks.

:class:`ExtremeSink` accumulates, in float64 on the CPU, over every batch of a diagnosis (definitions in
docs/metrics.md, "Extreme-token metrics"):

* ``value_ratio [L, H]``: per prompt, ``||v_first|| / mean_{other valid j} ||v_j||`` of the head's value vectors (its
  key/value head under grouped-query attention: query head ``h`` reads kv head ``h // (H / Hkv)``), then the mean
  over prompts weighted by ``n_p``, the prompt's valid tokens. A prompt with one valid token has no "other" token and
  contributes nothing (neither to the sum nor to the weights); a layer where every prompt has one token gets NaN.
* ``output_norm [L, H]``: the mean over every valid query row of every prompt of ``||W_O[:, head cols] . o_head||``,
  the head's write to the residual stream (the output projection's bias excluded).
* ``residual_peak [L]``: the ``value_ratio`` rule applied to the norms of the residual-stream input of the layer.

A head is ``dormant`` (:func:`dormant_heads`) when its output norm is below ``fraction`` x the median output norm of
its layer's heads (:data:`DEFAULT_DORMANT_FRACTION`).

Feeding it: :meth:`ExtremeSink.add_attention` from inside an attention forward (for the ALiBi families
:func:`attention_extremes` makes the patched attention of :mod:`alibi_surgery.attention.patch` call it) and
:meth:`ExtremeSink.add_residual` from the decoder blocks' forward pre-hooks (:func:`residual_hooks`). Limits: each
call must see whole prompts with no cached past (diagnosis runs without a cache); with a cache the past tokens would
be counted again. Memory: norms ``[B, T, H]``, a copy of the valid rows of the attention output, float64 steps of
:data:`OUTPUT_NORM_ROWS` rows at a time and the heads' Gram matrices ``W_h^T W_h [H, d, d]``: a head's write is never built, its norm is ``sqrt(o . (W_h^T W_h) o)`` in float64
(d x d work per row and head instead of d x hidden; exact up to float64 rounding, below the float32 of the inputs).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..errors import UsageError

__all__ = ["ExtremeSink", "DEFAULT_DORMANT_FRACTION", "dormant_heads", "check_dormant_fraction", "first_token_ratio",
           "attention_extremes", "residual_hooks", "ResidualFeed"]

DEFAULT_DORMANT_FRACTION = 0.1  # docs/metrics.md says why
OUTPUT_NORM_ROWS = 2048  # query rows per float64 output-norm step: its temporaries stay O(rows * H * d), not O(T)


def check_dormant_fraction(fraction: float) -> float:
    """``fraction`` if it lies in (0, 1], else a one-line UsageError (NaN refused too)."""
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"dormant_fraction={fraction}: must be in (0, 1]")
    return float(fraction)


def dormant_heads(output_norm: torch.Tensor, fraction: float = DEFAULT_DORMANT_FRACTION) -> torch.Tensor:
    """bool ``[L, H]``: ``output_norm < fraction * median`` of the layer's heads (the median of an even head count is
    the mean of the two middle values). NaN norms are never dormant."""
    norms = output_norm.double()
    median = norms.nanquantile(0.5, dim=-1, keepdim=True)
    return norms < fraction * median


def first_token_ratio(norms: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt ``norms[first] / mean(norms[other valid])`` and its weight ``n_p``, in float64.

    ``norms [B, T, ...]``, ``valid`` bool ``[B, T]`` (the first True is the prompt's first real token). Returns
    ``(ratio [B, ...], weight [B])``; a prompt with fewer than two valid tokens gets weight 0 and ratio 0."""
    norms = norms.double()
    valid = valid.bool()
    count = valid.sum(-1)  # n_p
    first = valid.int().argmax(-1)
    extra = (1,) * (norms.dim() - 2)
    mask = valid.reshape(*valid.shape, *extra).to(norms.dtype)
    first_norm = norms[torch.arange(norms.shape[0], device=norms.device), first]  # [B, ...]
    others = (norms * mask).sum(1) - first_norm
    counted = count >= 2
    denom = (count - 1).clamp_min(1).view(-1, *extra).to(norms.dtype)
    mean_others = others / denom
    ratio = torch.where(counted.view(-1, *extra), first_norm / mean_others, torch.zeros_like(first_norm))
    return ratio, torch.where(counted, count, torch.zeros_like(count)).to(norms.dtype)


_SUMS = ("value_sum", "value_weight", "out_sum", "out_rows", "resid_sum", "resid_weight")


class ExtremeSink:
    """Accumulator of the extreme-token metrics of one model (``n_layer`` x ``n_head`` query heads).

    Results: :attr:`value_ratio`, :attr:`output_norm` (float32 ``[L, H]``), :attr:`residual_peak` (float32 ``[L]``),
    NaN where nothing was counted; :meth:`dormant`. ``seen_attention`` / ``seen_residual`` say whether any call fed
    the attention or the residual metrics."""

    def __init__(self, n_layer: int, n_head: int):
        self.n_layer, self.n_head = n_layer, n_head
        f64 = dict(dtype=torch.float64)
        self.value_sum = torch.zeros(n_layer, n_head, **f64)  # sum over prompts of n_p * ratio
        self.value_weight = torch.zeros(n_layer, **f64)  # sum of n_p over the prompts counted
        self.out_sum = torch.zeros(n_layer, n_head, **f64)  # sum over valid query rows of the write's norm
        self.out_rows = torch.zeros(n_layer, **f64)
        self.resid_sum = torch.zeros(n_layer, **f64)
        self.resid_weight = torch.zeros(n_layer, **f64)
        self.seen = torch.zeros(2, **f64)  # calls that fed the attention metrics, the residual ones

    @property
    def seen_attention(self) -> bool:
        return bool(self.seen[0] > 0)

    @property
    def seen_residual(self) -> bool:
        return bool(self.seen[1] > 0)

    def sum_tensors(self) -> list[torch.Tensor]:
        """Every accumulator (float64, CPU), for :func:`~alibi_surgery.distributed.sum_across`: after the sum over
        ranks the sink holds every rank's prompts."""
        return [getattr(self, name) for name in _SUMS] + [self.seen]

    @torch.no_grad()
    def add_attention(self, layer: int, value: torch.Tensor, key_valid: torch.Tensor, context: torch.Tensor,
                      w_out: torch.Tensor, query_valid: torch.Tensor) -> None:
        """Add one attention call of ``layer``: ``value [B, Tk, Hkv, d]`` (any strides; ``Hkv`` divides ``n_head``),
        ``key_valid`` bool ``[B, Tk]``, ``context [B, Tq, H, d]`` (the per-head attention output before the output
        projection), ``w_out [hidden, H * d]`` (the projection's weight; columns ``[h d, (h + 1) d)`` read head h)
        and ``query_valid`` bool ``[B, Tq]``."""
        batch, _, n_kv, head_dim = value.shape
        n_head = context.shape[2]
        if n_head != self.n_head or n_head % n_kv or w_out.shape[1] != n_head * head_dim:
            raise ValueError(f"add_attention: {n_head} query heads, {n_kv} kv heads of {head_dim}, w_out "
                             f"{tuple(w_out.shape)} for a sink of {self.n_head} heads")
        norms = torch.linalg.vector_norm(value, dim=-1, dtype=torch.float32)  # [B, Tk, Hkv]
        ratio, weight = first_token_ratio(norms, key_valid)
        ratio = ratio.repeat_interleave(n_head // n_kv, dim=-1)  # query head h reads kv head h // group
        self.value_sum[layer] += (ratio * weight[:, None]).sum(0).cpu()
        self.value_weight[layer] += weight.sum().cpu()
        w_heads = w_out.double().reshape(w_out.shape[0], n_head, head_dim).permute(1, 2, 0)  # [H, d, hidden]
        gram = torch.bmm(w_heads, w_heads.transpose(1, 2))  # W_h^T W_h [H, d, d]: ||W_h o||^2 = o . (W_h^T W_h) o
        valid = context[query_valid.bool()]  # [N, H, d]: valid query rows only (a copy in the input dtype)
        total = torch.zeros(n_head, dtype=torch.float64, device=valid.device)
        for start in range(0, valid.shape[0], OUTPUT_NORM_ROWS):  # float64 temporaries of a bounded size
            rows = valid[start:start + OUTPUT_NORM_ROWS].double().transpose(0, 1)  # [H, n, d]
            total += (torch.bmm(rows, gram) * rows).sum(-1).clamp_min(0.0).sqrt().sum(-1)
        self.out_sum[layer] += total.cpu()
        self.out_rows[layer] += valid.shape[0]
        self.seen[0] += 1

    @torch.no_grad()
    def add_residual(self, layer: int, hidden: torch.Tensor, valid: torch.Tensor) -> None:
        """Add the residual-stream input ``hidden [B, T, hidden]`` of ``layer``; ``valid`` bool ``[B, T]``."""
        norms = torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float32)
        ratio, weight = first_token_ratio(norms, valid)
        self.resid_sum[layer] += (ratio * weight).sum().cpu()
        self.resid_weight[layer] += weight.sum().cpu()
        self.seen[1] += 1

    def merge(self, layer: int, other: "ExtremeSink", other_layer: int = 0) -> None:
        """Add ``other``'s sums of ``other_layer`` into ``layer`` (streamed diagnosis: one sink per block)."""
        for name in _SUMS:
            getattr(self, name)[layer] += getattr(other, name)[other_layer]
        self.seen += other.seen

    @staticmethod
    def _mean(total: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.view(-1, *(1,) * (total.dim() - 1))
        return torch.where(weight > 0, total / weight.clamp_min(1e-300), torch.nan).float()

    @property
    def value_ratio(self) -> torch.Tensor:
        return self._mean(self.value_sum, self.value_weight)

    @property
    def output_norm(self) -> torch.Tensor:
        return self._mean(self.out_sum, self.out_rows)

    @property
    def residual_peak(self) -> torch.Tensor:
        return self._mean(self.resid_sum, self.resid_weight)

    def dormant(self, fraction: float = DEFAULT_DORMANT_FRACTION) -> torch.Tensor:
        return dormant_heads(self.output_norm, fraction)


@contextlib.contextmanager
def attention_extremes(model: nn.Module, sink: ExtremeSink):
    """Make every patched attention module of ``model`` (an ALiBi family, :func:`~alibi_surgery.attention.patch.
    patch`) feed ``sink.add_attention`` during the block; layer = the module's index in ``model``."""
    from ..attention.patch import attention_modules, patch_state

    attns = attention_modules(model)[1]
    for a in attns:
        patch_state(a).extremes = sink  # KeyError: not patched
    try:
        yield sink
    finally:
        for a in attns:
            with contextlib.suppress(KeyError):
                patch_state(a).extremes = None


class ResidualFeed:
    """What :func:`residual_hooks` yields: set :attr:`mask` (``[B, T]``, 0/1 or bool, the batch's attention mask)
    before each forward call."""

    mask: torch.Tensor | None = None


def _block_input(feed: ResidualFeed, sink: ExtremeSink, layer: int, block, args, kwargs) -> None:
    hidden = args[0] if args else kwargs["hidden_states"]
    mask = feed.mask
    if mask is None or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise RuntimeError(f"residual_hooks: set feed.mask to the batch's [batch, tokens] attention mask before "
                           f"the forward (got {None if mask is None else tuple(mask.shape)} for hidden "
                           f"{tuple(hidden.shape)})")
    sink.add_residual(layer, hidden, mask.to(hidden.device).bool())


@contextlib.contextmanager
def residual_hooks(model: nn.Module, sink: ExtremeSink, *, family=None, blocks: list | None = None):
    """Forward pre-hooks on ``model``'s decoder blocks (``family.decoder_blocks(model)``, or ``blocks``) that feed
    ``sink.add_residual(layer, block input, feed.mask)``; yields the :class:`ResidualFeed`. Block ``i`` of the list
    is layer ``i``. The hooks read the hidden states as the first positional argument or ``hidden_states``."""
    if blocks is None:
        from ..families import family_of_module

        blocks = (family or family_of_module(model)).decoder_blocks(model)
    if len(blocks) != sink.n_layer:
        raise ValueError(f"residual_hooks: {len(blocks)} decoder blocks for a sink of {sink.n_layer} layers")
    feed = ResidualFeed()
    handles = [b.register_forward_pre_hook(functools.partial(_block_input, feed, sink, i), with_kwargs=True)
               for i, b in enumerate(blocks)]
    try:
        yield feed
    finally:
        for handle in handles:
            handle.remove()

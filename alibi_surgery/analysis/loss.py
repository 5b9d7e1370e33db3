"""Causal-LM cross-entropy through a frozen LM head, chunked so the ``[tokens, vocab]`` logits never exist.

``chunked_lm_loss(hidden, weight, labels)`` returns the same number as ``BloomForCausalLM(..., labels=labels).loss``
(transformers' ``ForCausalLMLoss``): logits ``hidden @ weight.T`` computed in the input dtype and upcast to float32,
labels shifted left by one (position t predicts label t + 1; the last position of every row predicts nothing), and
the mean of the per-token cross-entropy over the targets that are not ``ignore_index``. With ``reduction="none"``
it returns those per-token losses instead (no gradient), for the perplexity breakdown.

How: a custom ``torch.autograd.Function`` walks over the scored positions (those whose shifted label is not
ignored) ``chunk_tokens`` at a time. For each chunk it computes that chunk's logits, their log-sum-exp, the loss,
and - already in the forward pass - the gradient with respect to that chunk's hidden states, ``(softmax - onehot) /
n_targets`` cast to the input dtype and multiplied by ``weight``, exactly as autograd would through transformers'
graph. Backward only scales the stored gradient by ``grad_output``.

Memory: one chunk of float32 logits (``chunk_tokens * vocab * 4`` bytes; plus one chunk in the input dtype when
that is not float32), worked on in place, and the ``[tokens, hidden]`` gradient in the input dtype, kept for
backward. The default chunk, ``max(16, 2**25 // vocab)`` tokens, makes one chunk of float32 logits about 128 MiB
(133 tokens for BLOOM's 250,880-word vocabulary). Nothing of size ``tokens * vocab`` is ever allocated.

Limits:
* The LM head gets no gradient: with grad mode on, ``weight.requires_grad`` must be False (BLOOM ties it to the input
  embedding, so pass ``weight.detach()`` when the embedding must keep training through its input side only). Under
  ``torch.no_grad()`` or ``torch.inference_mode()`` no gradient can be asked for, and any weight is accepted.
* One host synchronisation per call (counting the scored targets and checking their range), so the function cannot
  be captured in a CUDA graph; the gradient is computed even if backward is never called, whenever ``hidden``
  requires grad and grad mode is on. Differentiable once (no double backward).
* No ``num_items_in_batch`` (transformers' gradient-accumulation normalisation): the loss is always the mean over
  this call's targets; multiply by ``n_targets / num_items_in_batch`` for the other convention.
* When no target is scored (every shifted label ignored, e.g. sequence length 1) the loss is NaN (0 / 0), as in
  transformers; the gradient is then all zeros, again as autograd gives through ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..errors import UsageError

__all__ = ["chunked_lm_loss", "causal_lm_labels", "default_chunk_tokens"]

_CHUNK_LOGIT_ELEMENTS = 2**25  # float32 logits per chunk: 128 MiB


def causal_lm_labels(input_ids: Tensor, attention_mask: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Labels for causal-LM training on a padded batch: a target counts only when both it and the position that
    predicts it are real tokens.

    ``input_ids.masked_fill(mask == 0, -100)`` alone still scores the first real token after left padding, predicted
    from the last padding position, whose attention output differs by design: the fused kernels return 0 there
    (FlashAttention-2's convention), BLOOM's eager attention an average of every value, future tokens included. With
    those labels the patched model's loss differs from eager's; with these it equals eager's (to rounding).
    """
    labels = input_ids.clone()
    if attention_mask is None:
        return labels
    real = attention_mask.to(torch.bool)
    predictor_real = F.pad(real, (1, 0), value=True)[:, :-1]  # position 0 is never a target anyway
    return labels.masked_fill(~(real & predictor_real), ignore_index)


def default_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk so that one chunk of float32 logits is about 128 MiB (at least 16 tokens)."""
    return max(16, _CHUNK_LOGIT_ELEMENTS // max(int(vocab), 1))


def _logits(h: Tensor, weight: Tensor) -> Tensor:
    """``[c, hidden] -> [c, vocab]`` in the input dtype: the LM head on one chunk (a seam the tests watch)."""
    return F.linear(h, weight)


def _grad_hidden(grad_logits: Tensor, weight: Tensor) -> Tensor:
    """``[c, vocab] -> [c, hidden]``: the gradient of one chunk's logits pulled back through the LM head."""
    return grad_logits @ weight


def _chunk_losses(h: Tensor, weight: Tensor, rows: Tensor, targets: Tensor, chunk: int, need_grad: bool):
    """Per-target float32 losses ``[n]`` and (with ``need_grad``) the ``[N, H]`` gradient of their mean."""
    # h [N, H]; rows [n] indices into h of the scored positions; targets [n] their labels (all valid).
    n = rows.numel()
    losses = torch.empty(n, dtype=torch.float32, device=h.device)
    grad = torch.zeros_like(h, memory_format=torch.contiguous_format) if need_grad else None
    inv_n = 1.0 / n if n else 0.0
    for start in range(0, n, chunk):
        idx = rows[start:start + chunk]
        tgt = targets[start:start + chunk, None]
        hc = h.index_select(0, idx)
        x = _logits(hc, weight).float()  # [c, V] float32 (a fresh tensor: worked on in place below)
        m = x.amax(dim=1, keepdim=True)
        x.sub_(m)                                        # x - max, in place
        shifted_target = x.gather(1, tgt).squeeze(1)     # x_t - max
        x.exp_()
        s = x.sum(dim=1, keepdim=True)
        losses[start:start + idx.numel()] = s.squeeze(1).log() - shifted_target  # logsumexp - x_t
        if need_grad:
            x.mul_(s.reciprocal_().mul_(inv_n))          # softmax / n, in one pass
            x.scatter_add_(1, tgt, torch.full_like(tgt, -inv_n, dtype=x.dtype))  # (softmax - onehot) / n
            grad.index_copy_(0, idx, _grad_hidden(x.to(h.dtype), weight))
        del x
    return losses, grad


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, rows: Tensor, targets: Tensor, chunk: int, need_grad: bool):
        losses, grad = _chunk_losses(h, weight, rows, targets, chunk, need_grad)
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.need_grad = need_grad
        n = rows.numel()
        return losses.sum() / n  # float32 scalar; 0 / 0 = NaN when no target is scored, as in transformers

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_h = None
        if ctx.need_grad and ctx.needs_input_grad[0]:
            (grad,) = ctx.saved_tensors
            grad_h = grad * grad_output.to(grad.dtype)
        return grad_h, None, None, None, None, None


def chunked_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, chunk_tokens: int | None = None,
                    ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Mean causal-LM cross-entropy of ``hidden @ weight.T`` against ``labels`` shifted left by one.

    ``hidden`` [batch, seq, hidden_size] (after ``ln_f``), any float dtype; ``weight`` [vocab, hidden_size], same
    dtype and device, frozen (or grad mode off); ``labels`` [batch, seq] integers in ``[0, vocab)`` or ``ignore_index``,
    as passed to ``BloomForCausalLM(labels=...)``. Returns a float32 scalar equal to transformers' loss (NaN when no
    target is scored). ``chunk_tokens`` scored positions are processed at a time (default:
    ``default_chunk_tokens(vocab)``, about 128 MiB of float32 logits per chunk). ``reduction="none"``: the float32
    loss of every scored target instead, ``[n_targets]`` in row-major order of the predicting positions (the same
    numbers the mean averages), without a gradient (refused when one could be asked for).
    """
    if not isinstance(hidden, Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        raise UsageError(f"hidden must be a float tensor [batch, seq, hidden_size], got "
                         f"{_describe(hidden)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise UsageError(f"weight must be a tensor [vocab, hidden_size], got {_describe(weight)}")
    if weight.requires_grad and torch.is_grad_enabled():  # autograd would record a weight gradient we never give
        raise UsageError("weight requires grad, but chunked_lm_loss gives the LM head no gradient: freeze it "
                         "(weight.requires_grad_(False)), pass weight.detach(), or run under torch.no_grad()")
    if weight.shape[1] != hidden.shape[2]:
        raise UsageError(f"hidden_size mismatch: hidden has {hidden.shape[2]}, weight [vocab, hidden_size] has "
                         f"{weight.shape[1]}")
    if weight.dtype != hidden.dtype:
        raise UsageError(f"dtype mismatch: hidden is {hidden.dtype}, weight is {weight.dtype}")
    if weight.device != hidden.device:
        raise UsageError(f"device mismatch: hidden is on {hidden.device}, weight on {weight.device}")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise UsageError(f"labels must be an integer tensor, got {_describe(labels)}")
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise UsageError(f"labels shape {tuple(labels.shape)} does not match hidden's [batch, seq] "
                         f"{tuple(hidden.shape[:2])}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise UsageError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if reduction not in ("mean", "none"):
        raise UsageError(f"reduction={reduction!r}: choose mean or none")
    vocab, size = weight.shape
    chunk = chunk_tokens or default_chunk_tokens(vocab)

    # transformers: pad the labels with one ignore_index on the right, drop the first column.
    labels = labels.to(device=hidden.device, dtype=torch.long)
    shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:].reshape(-1)
    rows = (shifted != ignore_index).nonzero().squeeze(1)
    targets = shifted.index_select(0, rows)
    if targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise UsageError(f"label {bad} is outside [0, {vocab}) and is not ignore_index ({ignore_index})")
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    if reduction == "none":
        if need_grad:
            raise UsageError("reduction='none' gives no gradient: run it under torch.no_grad() or on a detached "
                             "hidden")
        return _chunk_losses(hidden.reshape(-1, size), weight, rows, targets, chunk, False)[0]
    return _ChunkedLMLoss.apply(hidden.reshape(-1, size), weight, rows, targets, chunk, need_grad)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__

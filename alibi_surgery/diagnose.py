"""Head diagnosis: per-head first-token mass and entropy over a prompt set, without attention matrices.

Prompts are tokenised with left padding and run through the base model only (no lm_head, no logits). With the
``triton`` or ``torch`` backend the statistics come out of the fused attention pass; with ``eager`` they are
computed the paper's way, from ``output_attentions`` (T x T per head and layer: the reference, and the memory
baseline). Statistics are token-weighted: sums over every valid query row of every prompt, divided by the row count.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from .backends import check_backend, resolve_backend
from .errors import UsageError
from .patch import bloom_attentions, head_stats, patched
from .report import HeadReport, Thresholds

__all__ = ["diagnose", "check_prompts", "stats_from_attention_probs", "build_report", "encode_prompts",
           "padded_batches"]


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise UsageError("the prompt list is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise UsageError(f"prompt {i} is empty")
    return prompts


def stats_from_attention_probs(probs: torch.Tensor, attention_mask: torch.Tensor, *,
                               exclude_first_query: bool = False, normalize_entropy: bool = False) -> torch.Tensor:
    """The paper's metrics from materialised attention ``probs [B, H, T, T]``: per (batch, head) sums of
    (first-token mass, entropy with A clamped at 1e-10, row count) over valid query rows, in float32 (the caller
    accumulates in float64). Returns [B, H, 3]."""
    probs = probs.float()
    valid = attention_mask.bool()
    pos = attention_mask.long().cumsum(-1) - 1  # position of each real token; first real token is 0
    first = valid.int().argmax(-1)
    p0 = probs[torch.arange(probs.shape[0]), :, :, first]  # [B, H, T]: mass on each row's first real token
    ent = -probs.clamp_min(1e-10).log_().mul_(probs).sum(-1)  # one T x T temporary, not three
    if normalize_entropy:
        ent = torch.where(pos[:, None, :] > 0, ent / (pos[:, None, :] + 1).clamp_min(2).float().log(), 0.0)
    counted = valid & (pos > 0) if exclude_first_query else valid
    w = counted[:, None, :].float()
    return torch.stack([(p0 * w).sum(-1), (ent * w).sum(-1), w.expand_as(p0).sum(-1)], -1)


@contextlib.contextmanager
def _left_padding(tokenizer):
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError("the tokenizer has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def check_options(prompts, backend: str, batch_size: int, max_length: int | None) -> list[str]:
    """Validate diagnose()'s shared arguments; returns the prompt list."""
    prompts = check_prompts(prompts)
    check_backend(backend)
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if max_length is not None and max_length < 1:
        raise UsageError(f"max length must be >= 1, got {max_length}")
    return prompts


def encode_prompts(tokenizer, prompts: list[str], max_length: int | None, batch_size: int):
    """Token ids of each prompt and the batches (lists of prompt indices, similar lengths together)."""
    encoded = [tokenizer(p, truncation=max_length is not None, max_length=max_length)["input_ids"] for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise UsageError(f"prompt {i} has no tokens")
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    return encoded, [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded_batches(tokenizer, encoded, batches, device):
    """Yield ``(input_ids, attention_mask)`` of each batch, left-padded, on ``device``."""
    with _left_padding(tokenizer):
        for batch in batches:
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            yield padded["input_ids"].to(device), padded["attention_mask"].to(device)


def build_report(sums, encoded, *, model_name, dtype, device, backend, exclude_first_query, normalize_entropy,
                 max_length, thresholds, **extra) -> HeadReport:
    """A HeadReport from per-layer, per-head sums ``[n_layer, n_head, 3]`` (first-token mass, entropy, rows)."""
    rows = sums[..., 2].clamp_min(1.0)
    metadata = {
        "model": model_name,
        "metric": {"bos_mass": "mean attention on position 0 (the first real token)",
                   "entropy": "mean row entropy in nats" + (", divided by ln(visible keys)" if normalize_entropy
                                                            else ""),
                   "averaging": "token-weighted over valid query rows of all prompts",
                   "exclude_first_query": exclude_first_query, "normalize_entropy": normalize_entropy},
        "dtype": str(dtype).replace("torch.", ""), "device": str(device), "backend": backend,
        "n_prompts": len(encoded), "prompt_tokens": [len(e) for e in encoded],
        "rows_counted": int(sums[0, 0, 2]), "max_length": max_length, **extra,
    }
    n_tokens = sum(len(e) for e in encoded)
    return HeadReport((sums[..., 0] / rows).float(), (sums[..., 1] / rows).float(), n_tokens, thresholds, metadata)


def diagnose(model, tokenizer, prompts, *, batch_size: int = 8, max_length: int | None = None,
             backend: str = "auto", exclude_first_query: bool = False, normalize_entropy: bool = False,
             thresholds: Thresholds = Thresholds(), progress: bool = False) -> HeadReport:
    """Diagnose every head of a BLOOM model (``BloomForCausalLM`` or ``BloomModel``) over ``prompts``."""
    prompts = check_options(prompts, backend, batch_size, max_length)
    base = getattr(model, "transformer", model)
    try:
        n_layer, n_head = len(bloom_attentions(base)), base.config.n_head
    except TypeError as exc:
        raise UsageError(str(exc)) from None
    param = next(base.parameters())
    concrete = "eager" if backend == "eager" else resolve_backend(backend, param.device)

    with _left_padding(tokenizer):
        encoded, batches = encode_prompts(tokenizer, prompts, max_length, batch_size)
    sums = torch.zeros(n_layer, n_head, 3, dtype=torch.float64)
    options = dict(exclude_first_query=exclude_first_query, normalize_entropy=normalize_entropy)
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        sink = None
        if concrete != "eager":
            stack.enter_context(patched(base, concrete))
            sink = stack.enter_context(head_stats(base, **options))
        stream = padded_batches(tokenizer, encoded, batches, param.device)
        for ids, mask in tqdm(stream, total=len(batches), desc="diagnose", unit="batch", disable=not progress):
            if concrete == "eager":
                out = base(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
                for layer, probs in enumerate(out.attentions):
                    sums[layer] += stats_from_attention_probs(probs, mask, **options).sum(0).cpu().double()
                del out
            else:
                base(input_ids=ids, attention_mask=mask, use_cache=False)
    if sink is not None:
        sums = sink.sums
    return build_report(sums, encoded, model_name=getattr(base.config, "_name_or_path", None) or "bloom",
                        dtype=param.dtype, device=param.device, backend=concrete, max_length=max_length,
                        thresholds=thresholds, **options)

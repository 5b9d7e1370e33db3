"""Head diagnosis: per-head first-token mass and entropy over a prompt set, without attention matrices.

Prompts are tokenised with left padding and run through the base model only (no lm_head, no logits). With the
``triton`` or ``torch`` backend the statistics come out of the fused attention pass; with ``eager`` they are
computed the paper's way, from ``output_attentions`` (T x T per head and layer: the reference, and the memory
baseline). Statistics are token-weighted: sums over every valid query row of every prompt, divided by the row count.
The extreme-token metrics (:mod:`~alibi_surgery.diagnosis.extremes`) come along: ``residual_peak`` from the blocks'
inputs with every backend, ``value_ratio`` and ``output_norm`` from the fused pass only (absent with ``eager``).

The report records what was measured, so that two reports can be checked to be comparable: a fingerprint of each
prompt's token ids (after truncation to ``max_length``) and of the whole set, ``max_length`` and the metric variant.
It also records the first-token mass a uniformly attending head would have on these prompts
(:func:`uniform_bos_mass`), and warns when that is at least half the sink threshold: the prompts are then too short
for the classes to mean anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import warnings

import torch
from tqdm.auto import tqdm

from ..allocator import release_after
from ..attention.backends import check_backend, resolve_backend
from ..distributed import is_main, rank_guard, share_of, sum_across
from ..errors import UsageError
from ..families.base import training_context
from ..io.loading import dtype_name
from ..attention.patch import HeadStatsSink, attention_modules, head_stats, patched
from .dormancy import DEFAULT_THRESHOLD, model_dormancy
from .extremes import (DEFAULT_DORMANT_FRACTION, ExtremeSink, attention_extremes, check_dormant_fraction,
                       residual_hooks)
from .report import HeadReport, Thresholds
from .sinks import DEFAULT_SINK_EPSILON, SINK_SHARE_TEXT, check_sink_epsilon

__all__ = ["diagnose", "check_prompts", "stats_from_attention_probs", "build_report", "encode_prompts",
           "rank_batches", "padded_batches", "prompt_fingerprints", "uniform_bos_mass"]


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
        raise UsageError(f"max_length={max_length}: must be >= 1")
    return prompts


def encode_prompts(tokenizer, prompts: list[str], max_length: int | None, batch_size: int):
    """Token ids of each prompt and the batches (lists of prompt indices, similar lengths together)."""
    encoded = [tokenizer(p, truncation=max_length is not None, max_length=max_length)["input_ids"] for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise UsageError(f"prompt {i} has no tokens")
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    return encoded, [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def rank_batches(encoded, batches) -> list:
    """This process's share of ``batches`` (:func:`~alibi_surgery.distributed.share_of`, balanced by padded
    tokens): the batches themselves are the single process's, so each rank's per-batch statistics are too."""
    mine = share_of([len(b) * max(len(encoded[i]) for i in b) for b in batches])
    return [batches[i] for i in mine]


def padded_batches(tokenizer, encoded, batches, device):
    """Yield ``(input_ids, attention_mask)`` of each batch, left-padded, on ``device``."""
    with _left_padding(tokenizer):
        for batch in batches:
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            yield padded["input_ids"].to(device), padded["attention_mask"].to(device)


def prompt_fingerprints(encoded) -> tuple[list[str], str]:
    """Fingerprints of token-id lists: per prompt (in order), the first 16 hex digits of the SHA-256 of its ids as
    little-endian int64; for the set, the same digest of the sorted per-prompt fingerprints joined by newlines, so it
    ignores prompt order (but not repeats)."""
    each = [hashlib.sha256(struct.pack(f"<{len(ids)}q", *ids)).hexdigest()[:16] for ids in encoded]
    return each, hashlib.sha256("\n".join(sorted(each)).encode()).hexdigest()[:16]


def uniform_bos_mass(lengths, exclude_first_query: bool = False) -> float | None:
    """The bos_mass a head attending uniformly would get on prompts of these token counts, averaged as diagnose
    averages: query row ``p`` sees ``p + 1`` keys (mass ``1 / (p + 1)`` on the first), token-weighted over the
    counted rows of all prompts (row 0 left out with ``exclude_first_query``). None when no row is counted."""
    first = 1 if exclude_first_query else 0
    rows = sum(max(0, n - first) for n in lengths)
    if rows == 0:
        return None
    return sum(1.0 / (p + 1) for n in lengths for p in range(first, n)) / rows


def _warn_if_short(mass: float | None, lengths, thresholds: Thresholds, max_length: int | None) -> None:
    mean = sum(lengths) / len(lengths)
    advice = "use longer prompts" if max_length is None else \
        f"max_length={max_length} cuts them: raise it or use longer prompts"
    if mass is None:
        warnings.warn(f"prompts are short (mean {mean:.1f} tokens): with exclude_first_query no query row is "
                      f"counted, so every statistic is 0; {advice}", stacklevel=3)
    elif mass >= thresholds.sink / 2:
        warnings.warn(f"prompts are short (mean {mean:.1f} tokens): a head attending uniformly would put {mass:.2f} "
                      f"of its attention on the first token, at least half the sink threshold {thresholds.sink:g}; "
                      f"{advice}", stacklevel=3)


def _warn_if_past_context(lengths, context: tuple[int, str] | None) -> None:
    if context is None:
        return
    tokens, field = context
    longer = sum(n > tokens for n in lengths)
    if longer:
        warnings.warn(f"{longer} of {len(lengths)} prompts are longer than the model's training context ({tokens} "
                      f"tokens, config.json {field}; longest {max(lengths)}): rows past it measure the model outside "
                      f"what it was trained on; pass max_length={tokens} to stay inside", stacklevel=3)


_RATIO = "per prompt ||first token's {0}|| / mean over its other valid tokens, mean over prompts weighted by tokens"


def build_report(sums, encoded, *, model_name, dtype, device, backend, exclude_first_query, normalize_entropy,
                 max_length, thresholds, extremes: ExtremeSink | None = None,
                 dormant_fraction: float = DEFAULT_DORMANT_FRACTION, context: tuple[int, str] | None = None,
                 sinks: tuple | None = None, **extra) -> HeadReport:
    """A HeadReport from per-layer, per-head sums ``[n_layer, n_head, 3]`` (first-token mass, entropy, rows) and the
    token ids ``encoded`` they were measured on, plus what ``extremes`` saw; warns (one line) when the prompts are too
    short to classify, and when one is longer than the training ``context`` the config records
    (:func:`~alibi_surgery.families.base.training_context`). ``sinks``: ``(counts [n_layer, n_head], epsilon)``,
    the sequences in which each head is a first-token sink."""
    rows = sums[..., 2].clamp_min(1.0)
    lengths = [len(e) for e in encoded]
    each, whole = prompt_fingerprints(encoded)
    uniform = uniform_bos_mass(lengths, exclude_first_query)
    _warn_if_short(uniform, lengths, thresholds, max_length)
    _warn_if_past_context(lengths, context)
    metadata = {
        "model": model_name,
        "metric": {"bos_mass": "mean attention on position 0 (the first real token)",
                   "entropy": "mean row entropy in nats" + (", divided by ln(visible keys)" if normalize_entropy
                                                            else ""),
                   "averaging": "token-weighted over valid query rows of all prompts",
                   "exclude_first_query": exclude_first_query, "normalize_entropy": normalize_entropy},
        "dtype": dtype_name(dtype), "device": str(device), "backend": backend,
        "n_prompts": len(encoded), "prompt_tokens": lengths, "prompt_set_fingerprint": whole,
        "prompt_fingerprints": each, "rows_counted": int(sums[0, 0, 2]), "max_length": max_length,
        "uniform_bos_mass": uniform,
        "training_context": None if context is None else {"tokens": context[0], "field": context[1]}, **extra,
    }
    n_tokens = sum(lengths)
    seen_attention = extremes is not None and extremes.seen_attention
    seen_residual = extremes is not None and extremes.seen_residual
    if seen_attention:
        metadata["metric"].update(value_ratio=_RATIO.format("value vector"),
                                  output_norm="mean over valid query rows of ||W_O[:, head cols] . o_head|| (no bias)")
    if seen_residual:
        metadata["metric"]["residual_peak"] = _RATIO.format("residual-stream input")
    sink_share = None
    if sinks is not None:
        sink_share = (sinks[0] / max(len(encoded), 1)).float()
        metadata["metric"].update(sink_epsilon=sinks[1], sink_share=SINK_SHARE_TEXT)
    return HeadReport((sums[..., 0] / rows).float(), (sums[..., 1] / rows).float(), n_tokens, thresholds, metadata,
                      value_ratio=extremes.value_ratio if seen_attention else None,
                      output_norm=extremes.output_norm if seen_attention else None,
                      residual_peak=extremes.residual_peak if seen_residual else None,
                      dormant_fraction=dormant_fraction, sink_share=sink_share)


def diagnose(model, tokenizer, prompts, *, batch_size: int = 8, max_length: int | None = None,
             backend: str = "auto", exclude_first_query: bool = False, normalize_entropy: bool = False,
             thresholds: Thresholds = Thresholds(), progress: bool = False,
             dormancy_threshold: float = DEFAULT_THRESHOLD,
             dormant_fraction: float = DEFAULT_DORMANT_FRACTION,
             sink_epsilon: float = DEFAULT_SINK_EPSILON) -> HeadReport:
    """Diagnose every head of a model of a registered family (causal LM or base model) over ``prompts``; the
    report also holds the MLP dormancy (:mod:`~alibi_surgery.diagnosis.dormancy`) at ``dormancy_threshold``, the
    extreme-token metrics, heads flagged dormant at ``dormant_fraction`` of their layer's median output norm, and
    Gu et al.'s first-token sink share and rate at ``sink_epsilon`` (:func:`~alibi_surgery.attention.patch.first_token_sinks`)."""
    prompts = check_options(prompts, backend, batch_size, max_length)
    check_sink_epsilon(sink_epsilon)
    check_dormant_fraction(dormant_fraction)
    dormancy = model_dormancy(model, dormancy_threshold)
    family, attns = attention_modules(model)
    base = family.base_model(model)
    n_layer = len(attns)
    n_head, head_dim = family.attention_shape(attns[0])
    param = next(base.parameters())
    if backend == "eager" and family.eager_refusal():
        raise UsageError(f"backend='eager': {family.eager_refusal()}")
    concrete = "eager" if backend == "eager" else resolve_backend(backend, param.device, head_dim=head_dim)

    with _left_padding(tokenizer):
        encoded, batches = encode_prompts(tokenizer, prompts, max_length, batch_size)
    batches = rank_batches(encoded, batches)  # this rank's share (all of them in a single process)
    options = dict(exclude_first_query=exclude_first_query, normalize_entropy=normalize_entropy)
    extremes = ExtremeSink(n_layer, n_head)
    with rank_guard("diagnosis"), torch.inference_mode(), contextlib.ExitStack() as stack:
        feed = stack.enter_context(residual_hooks(base, extremes, family=family))
        if concrete != "eager":
            stack.enter_context(patched(base, concrete))
            sink = stack.enter_context(head_stats(base, **options, sink_epsilon=sink_epsilon))
            stack.enter_context(attention_extremes(base, extremes))
        else:  # the model's own eager attention, the one that returns attention maps (Falcon >= 5.25 and
            stack.enter_context(patched(base, "eager"))  # interface models switch implementation for it)
            sink = HeadStatsSink(n_layer, n_head, **options, sink_epsilon=sink_epsilon)  # fed from the maps below
        # on a CPU, BLOOM-style MLPs cannot reuse the attention's freed temporaries: resident memory would hold both
        stack.enter_context(release_after(attns, param.device.type == "cpu" and not family.interface))
        stream = padded_batches(tokenizer, encoded, batches, param.device)
        for ids, mask in tqdm(stream, total=len(batches), desc="diagnose", unit="batch",
                              disable=not (progress and is_main())):
            feed.mask = mask
            if concrete == "eager":
                out = base(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
                for layer, probs in enumerate(out.attentions):
                    sink.add(layer, stats_from_attention_probs(probs, mask, **options))
                del out
            else:
                base(input_ids=ids, attention_mask=mask, use_cache=False)
    sums, sinks = sink.sums, sink.sinks
    sum_across(sums, sinks, *extremes.sum_tensors())  # every rank's batches (nothing in a single process)
    return build_report(sums, encoded, model_name=getattr(base.config, "_name_or_path", None) or family.name,
                        dtype=param.dtype, device=param.device, backend=concrete, max_length=max_length,
                        thresholds=thresholds, family=family.name, mlp_dormancy=dormancy, extremes=extremes,
                        dormant_fraction=dormant_fraction, context=training_context(base.config),
                        sinks=(sinks, sink_epsilon), **options)

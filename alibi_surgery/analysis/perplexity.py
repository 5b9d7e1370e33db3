"""Perplexity of a causal LM over a list of texts, each scored alone, under two conventions; and the packed figure.

``prompt_perplexity(model, tokenizer, texts)`` tokenises every text as ``diagnose`` does (the tokenizer's own framing:
BLOOM adds nothing, a tokenizer that prefixes ``<s>`` counts it; truncated to ``max_length`` tokens when given, never
padded), runs each one alone through the model (batch of one: no padding can change a number) and takes its mean
next-token loss ``loss_i`` over its ``T_i - 1`` predicted tokens, with :func:`~alibi_surgery.analysis.loss.chunked_lm_loss`
(float32, no ``[tokens, vocab]`` logits). The texts' figures then combine as ``convention`` says (:func:`combine`):

* ``tokens`` (the default): ``exp(sum_i loss_i (T_i - 1) / sum_i (T_i - 1))``, the true per-token perplexity: every
  predicted token weighs the same.
* ``paper``: ``exp(sum_i loss_i T_i / sum_i T_i)``, the figure of the paper's code (its ``loss * input_ids.size(1)``
  weighting): ``T_i`` counts the first token, which predicts nothing, so short texts weigh slightly more than their
  predicted tokens.

A text of fewer than 2 tokens (after truncation) predicts nothing: it is refused (one-line
:class:`~alibi_surgery.errors.UsageError` naming it) rather than skipped, so a figure always covers every text given.
The model runs on the fused ALiBi attention of ``backend`` (``auto``: triton on CUDA, torch elsewhere; ``eager``:
transformers' own attention) and is left as it was (patch state, train/eval mode) afterwards, so a training loop may
call this on its in-memory model at every checkpoint.

``packed_perplexity`` is the held-out figure ``repair --eval-text`` reports: the text's documents tokenised, joined by
EOS and cut into ``[n, seq_len]`` rows (:func:`~alibi_surgery.io.corpus.pack_text`), scored ``batch_size`` rows at a
time. Every row has ``seq_len`` tokens, so both conventions give the same total there. (:func:`chunks_perplexity`,
the trainer's in-loop figure, is the same number without the per-token figures.)

Besides the total, both keep every predicted token's loss (:class:`TextLoss` ``targets`` / ``nll``) and report
(:mod:`alibi_surgery.analysis.ppl_breakdown` has the rules): the figure **without special tokens** (the tokenizer's
``all_special_ids`` as predicted targets left out; as context they are kept), per text and in total, under the same
convention; with ``bootstrap`` resamples (default 1,000, seeded; 0 skips) a 95% percentile interval over texts (over
rows for the packed figure) for both; with ``breakdown=True`` the per-class table. :func:`compare_perplexities`
gives, for several models on the same texts, the paired interval of each model's perplexity over the first's and
warns (``warnings.warn``) when one token id carries more than 25% of the change of summed loss (its absolute
change over the sum of every id's).

Limits: texts are scored one at a time (no batching); nothing is cached between calls; the per-token losses are
float32 (summed in float64) and are kept in memory (one float and one id per token).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from . import ppl_breakdown as pb
from ..io.texts import read_texts  # re-exported: the reader of text lists (.txt lines, .jsonl, .json)

__all__ = ["CONVENTIONS", "TextLoss", "Perplexity", "check_convention", "check_bootstrap", "combine", "encode_texts",
           "score_texts", "prompt_perplexity", "packed_perplexity", "compare_perplexities", "read_texts"]

CONVENTIONS = ("tokens", "paper")


@dataclasses.dataclass(frozen=True)
class TextLoss:
    """One text's figures: ``tokens`` (``T_i``, after truncation) and ``loss`` (mean next-token NLL, nats); from
    :func:`score_texts` also ``targets`` (the ``T_i - 1`` predicted ids) and ``nll`` (each one's loss, float32)."""

    tokens: int
    loss: float
    targets: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    nll: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    def without(self, exclude) -> tuple[int, float | None]:
        """(predicted targets not in ``exclude``, their mean loss; None when there is none)."""
        sums, counts = pb.unit_sums([self], exclude)
        return int(counts[0]), (float(sums[0] / counts[0]) if counts[0] else None)


@dataclasses.dataclass
class Perplexity:
    """One model's perplexity. Scored texts: ``texts`` holds each one's :class:`TextLoss` (in input order). Packed
    text: ``texts`` is empty, ``chunks`` rows of ``seq_len`` tokens were scored, ``rows`` holds each row's figures.
    ``specials``: the special token ids and names left out of ``without_specials``; ``interval`` /
    ``interval_without_specials``: bootstrap ``level`` intervals (None when skipped); ``breakdown``: the per-class
    table (None unless asked for)."""

    model: str
    convention: str
    perplexity: float
    texts: list[TextLoss] = dataclasses.field(default_factory=list)
    chunks: int | None = None
    seq_len: int | None = None
    rows: list[TextLoss] = dataclasses.field(default_factory=list)
    specials: dict[int, str] = dataclasses.field(default_factory=dict)
    without_specials: float | None = None
    interval: tuple[float, float] | None = None
    interval_without_specials: tuple[float, float] | None = None
    level: float = 0.95
    breakdown: list[pb.ClassLoss] | None = None

    @property
    def units(self) -> list[TextLoss]:
        """The bootstrap's units: the texts, or the packed rows."""
        return self.texts if self.chunks is None else self.rows

    @property
    def tokens(self) -> int:
        """Tokens scored in all (the first token of each text or row included)."""
        return sum(t.tokens for t in self.texts) if self.chunks is None else self.chunks * self.seq_len

    def to_dict(self) -> dict:
        out = {"model": self.model, "perplexity": self.perplexity, "tokens": self.tokens}
        if self.units and self.units[0].targets is not None:
            out.update(perplexity_without_specials=self.without_specials, specials=self.specials,
                       interval=self.interval, interval_without_specials=self.interval_without_specials,
                       level=self.level)
        if self.breakdown is not None:
            out["breakdown"] = [c.to_dict() for c in self.breakdown]
        key = "prompts" if self.chunks is None else "rows"
        if self.chunks is not None:
            out.update(chunks=self.chunks, seq_len=self.seq_len)
        if self.chunks is None or self.rows:
            out[key] = [self._unit_dict(t) for t in self.units]
        return out

    def _unit_dict(self, t: TextLoss) -> dict:
        entry = {"tokens": t.tokens, "loss": t.loss}
        if t.targets is not None:
            kept, loss = t.without(self.specials)
            entry.update(special_targets=t.tokens - 1 - kept, loss_without_specials=loss)
        return entry


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise UsageError(f"unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    return convention


def check_bootstrap(bootstrap: int, seed: int = 0) -> int:
    """Bootstrap resamples: a whole number >= 0 (0 skips the intervals); the seed a whole number."""
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise UsageError(f"bootstrap={bootstrap!r}: must be a whole number >= 0 (0 skips the intervals)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed={seed!r}: must be a whole number")
    return bootstrap


def combine(losses, convention: str = "tokens") -> float:
    """The perplexity of texts with these :class:`TextLoss` figures under ``convention`` (see the module
    docstring; the rule is :func:`~alibi_surgery.analysis.ppl_breakdown.combine_sums`). Each text must have at least
    2 tokens."""
    check_convention(convention)
    losses = list(losses)
    if not losses:
        raise UsageError("no texts to combine")
    counts = [t.tokens - 1 for t in losses]
    return pb.combine_sums([t.loss * n for t, n in zip(losses, counts)], counts, convention)


def encode_texts(tokenizer, texts, max_length: int | None = None, *, name=None) -> list[list[int]]:
    """Token ids of each text, as ``diagnose`` tokenises prompts (truncated to ``max_length``); refuses an empty
    list, a blank text, ``max_length < 2`` and a text of fewer than 2 tokens. ``name(i)`` says how an error names
    text ``i`` (default ``"text i"``)."""
    from ..diagnosis.diagnose import check_prompts, encode_prompts

    name = name or (lambda i: f"text {i}")
    if max_length is not None and max_length < 2:
        raise UsageError(f"max length must be at least 2 (a text of 1 token predicts nothing), got {max_length}")
    texts = check_prompts(texts)
    encoded, _ = encode_prompts(tokenizer, texts, max_length, 1)
    for i, ids in enumerate(encoded):
        if len(ids) < 2:
            raise UsageError(f"{name(i)} has {len(ids)} token: it predicts nothing, so it has no loss; remove it "
                             f"or make it longer")
    return encoded


@contextlib.contextmanager
def _scoring(model, backend: str):
    """The model's base, in eval mode and patched with ``backend`` for the block; everything restored after."""
    from ..attention.backends import resolve_backend
    from ..attention.patch import attention_modules, patched

    family, attns = attention_modules(model)
    if backend == "eager" and family.eager_refusal():
        raise UsageError(f"backend='eager': {family.eager_refusal()}")
    base = family.base_model(model)
    device = next(base.parameters()).device
    concrete = "eager" if backend == "eager" else \
        resolve_backend(backend, device, head_dim=family.attention_shape(attns[0])[1])
    was_training = model.training
    model.eval()
    try:
        with patched(base, concrete), torch.no_grad():
            yield base, device
    finally:
        model.train(was_training)


def _row_losses(base, weight, rows: torch.Tensor) -> list[TextLoss]:
    """Each row of ``rows`` ``[b, T]`` (on the model's device) as a :class:`TextLoss` with its per-token losses."""
    from .loss import chunked_lm_loss

    hidden = base(input_ids=rows, use_cache=False).last_hidden_state
    nll = chunked_lm_loss(hidden, weight, rows, reduction="none").view(rows.shape[0], rows.shape[1] - 1)
    n = rows.shape[1] - 1
    return [TextLoss(rows.shape[1], float(r.sum() / n), ids[1:].cpu().numpy(), r.cpu().numpy())
            for ids, r in zip(rows, nll)]


def score_texts(model, encoded, *, backend: str = "auto", progress: bool = False) -> list[TextLoss]:
    """Each token-id list's :class:`TextLoss` (with its per-token losses), run alone through ``model`` (a causal LM
    of a registered family)."""
    weight = model.get_output_embeddings().weight.detach()
    out = []
    with _scoring(model, backend) as (base, device):
        for ids in tqdm(encoded, desc="perplexity", unit="text", disable=not progress):
            out += _row_losses(base, weight, torch.tensor([ids], dtype=torch.long, device=device))
    return out


def _report(model, convention: str, units: list[TextLoss], tokenizer, bootstrap: int, seed: int, breakdown: bool,
            **packed) -> Perplexity:
    """The :class:`Perplexity` of these scored units: total, without specials, intervals, breakdown."""
    specials = pb.special_names(tokenizer)
    sums, counts = pb.unit_sums(units)
    kept_sums, kept = pb.unit_sums(units, specials)
    without = pb.combine_sums(kept_sums, kept, convention)
    result = Perplexity(_model_name(model), convention, pb.combine_sums(sums, counts, convention),
                        [] if packed else units, rows=units if packed else [], specials=specials,
                        without_specials=None if math.isnan(without) else without, **packed)
    if bootstrap:
        result.interval = pb.perplexity_interval(units, convention, resamples=bootstrap, seed=seed)
        if result.without_specials is not None:
            result.interval_without_specials = pb.perplexity_interval(units, convention, specials,
                                                                      resamples=bootstrap, seed=seed)
    if breakdown:
        result.breakdown = pb.breakdown(units, tokenizer)
    return result


def prompt_perplexity(model, tokenizer, texts, *, convention: str = "tokens", max_length: int | None = None,
                      backend: str = "auto", progress: bool = False, name=None, bootstrap: int = 1000,
                      seed: int = 0, breakdown: bool = False) -> Perplexity:
    """The perplexity of ``model`` (an in-memory causal LM) over ``texts`` (strings), each scored alone; see the
    module docstring. ``name(i)`` names text ``i`` in errors; ``bootstrap`` resamples (0: no interval) drawn with
    ``seed``; ``breakdown`` adds the per-class table."""
    check_convention(convention)
    check_bootstrap(bootstrap, seed)
    encoded = encode_texts(tokenizer, texts, max_length, name=name)
    losses = score_texts(model, encoded, backend=backend, progress=progress)
    return _report(model, convention, losses, tokenizer, bootstrap, seed, breakdown)


def chunks_perplexity(model, chunks: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token loss) of ``model`` over packed ``[n, seq_len]`` chunks (no gradients), with the model as
    it is (patched or not, in its current mode): the trainer's held-out figure."""
    from ..families import family_for
    from .loss import chunked_lm_loss

    base = family_for(model.config).base_model(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(chunks), batch_size):
            ids = chunks[i:i + batch_size].to(model.device)
            hidden = base(ids, use_cache=False).last_hidden_state
            n = ids.numel() - ids.shape[0]
            total += float(chunked_lm_loss(hidden, model.get_output_embeddings().weight.detach(), ids)) * n
            count += n
    return math.exp(total / count)


def packed_perplexity(model, chunks: torch.Tensor, *, batch_size: int = 1, backend: str = "auto",
                      convention: str = "tokens", tokenizer=None, bootstrap: int = 1000, seed: int = 0,
                      breakdown: bool = False, progress: bool = False) -> Perplexity:
    """``repair``'s held-out perplexity of ``model`` over packed ``[n, seq_len]`` rows (from
    :func:`~alibi_surgery.io.corpus.pack_text`); equal rows make both conventions one total. The rows are the
    bootstrap's units; ``tokenizer`` names the special tokens (without it nothing is left out) and is needed for
    ``breakdown``."""
    check_convention(convention)
    check_bootstrap(bootstrap, seed)
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if breakdown and tokenizer is None:
        raise UsageError("breakdown=True needs the tokenizer (tokenizer=...) to name the token classes")
    weight = model.get_output_embeddings().weight.detach()
    rows = []
    with _scoring(model, backend) as (base, device):
        for i in tqdm(range(0, len(chunks), batch_size), desc="perplexity", unit="batch", disable=not progress):
            rows += _row_losses(base, weight, chunks[i:i + batch_size].to(device))
    return _report(model, convention, rows, tokenizer, bootstrap, seed, breakdown, chunks=int(chunks.shape[0]),
                   seq_len=int(chunks.shape[1]))


def compare_perplexities(results: list[Perplexity], *, tokenizer=None, bootstrap: int = 1000, seed: int = 0,
                         warn: bool = True) -> list[dict]:
    """For each of ``results[1:]`` against ``results[0]`` (the same texts or rows, the same convention): the ratio
    of perplexities with and without special tokens, their paired bootstrap intervals (the same units resampled
    for both models; None when ``bootstrap`` is 0) and the token ids carrying more than
    :data:`~alibi_surgery.analysis.ppl_breakdown.DOMINANT_SHARE` of the change of summed loss (``share``: its
    absolute change over the sum of every id's; ``change``: its signed change, nats); with ``warn``,
    one ``warnings.warn`` per such token. ``tokenizer`` (model 0's) names the tokens."""
    check_bootstrap(bootstrap, seed)
    if not results:
        raise UsageError("results=[]: nothing to compare")
    base, out = results[0], []
    for other in results[1:]:
        if other.convention != base.convention or len(other.units) != len(base.units):
            raise UsageError(f"results: {other.model} was not scored as {base.model} was (convention or texts "
                             f"differ)")
        entry = {"model": other.model, "base": base.model, "ratio": other.perplexity / base.perplexity,
                 "ratio_without_specials": None, "interval": None, "interval_without_specials": None}
        if base.without_specials is not None and other.without_specials is not None:
            entry["ratio_without_specials"] = other.without_specials / base.without_specials
        if bootstrap:
            entry["interval"] = pb.ratio_interval(base.units, other.units, base.convention, resamples=bootstrap,
                                                  seed=seed)
            if entry["ratio_without_specials"] is not None:
                entry["interval_without_specials"] = pb.ratio_interval(
                    base.units, other.units, base.convention, base.specials, resamples=bootstrap, seed=seed)
        shares = pb.token_shares(base.units, other.units)
        entry["loss_change"] = None if shares is None else sum(d for d, _ in shares.values())
        entry["dominant_tokens"] = [{"id": t, "token": _token_name(tokenizer, t), "change": d, "share": s}
                                    for t, d, s in pb.dominant_tokens(base.units, other.units)]
        for d in entry["dominant_tokens"] if warn else []:
            warnings.warn(f"one token carries {d['share']:.0%} of the change of summed loss from {base.model} to "
                          f"{other.model}: {d['token']!r} (id {d['id']}) {d['change']:+.2f} nats of "
                          f"{entry['loss_change']:+.2f} in all; compare the figures without special tokens and "
                          f"the breakdown", stacklevel=2)
        out.append(entry)
    return out


def _token_name(tokenizer, token: int) -> str:
    if tokenizer is None:
        return f"id {token}"
    specials = pb.special_names(tokenizer)
    return specials.get(token) or tokenizer.decode([token])


def _model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)

"""Perplexity that one token cannot fool: the figure without special tokens, a per-class breakdown, bootstrap
intervals over texts, and the check that no single token id carries the change between two models.

Everything here works on *units* (the texts scored alone, or the packed rows): objects with ``targets`` (the
predicted token ids, ``T - 1`` of them) and ``nll`` (each one's next-token loss in nats, same length), as
:class:`~alibi_surgery.analysis.perplexity.TextLoss` carries them.

* :func:`combine_sums` is the one rule that turns per-unit summed losses ``s_i`` over ``n_i`` predicted tokens into a
  perplexity: ``tokens`` is ``exp(sum s_i / sum n_i)``; ``paper`` weighs each unit's mean loss ``s_i / n_i`` by its
  token count ``n_i + 1`` (the paper's ``loss * input_ids.size(1)``, which counts the first token). A unit with
  ``n_i = 0`` has no loss and weighs nothing.
* **Without special tokens** (:func:`unit_sums` with ``exclude``): a special token as the *predicted target* is left
  out of ``s_i`` and ``n_i``; as context it is kept (``<s>`` still conditions the first byte; the model still saw
  ``</s>`` before the next document of a packed row). Under ``paper`` the weight becomes ``n_i + 1`` with the
  special targets removed, so with no special target the figure is the total. A unit whose every target is special
  drops out.
* :func:`breakdown`: the predicted targets grouped by class, each with its count, summed loss, mean loss and share
  of the total summed loss. Classes: every special token by name, then, by the token's decoded text (any tokenizer;
  for a byte tokenizer one token is one byte): ``letters`` (after leading whitespace, all alphabetic: " the" and "a"),
  ``digits`` (likewise all digits), ``whitespace`` (all whitespace), ``punctuation`` (after leading whitespace, all
  Unicode punctuation or symbols), ``partial-bytes`` (decodes to U+FFFD: a piece of a multi-byte character) and
  ``other`` (anything else: mixed pieces such as "a1", control characters). Every target is in exactly one class,
  so the classes sum to the total.
* :func:`perplexity_interval` / :func:`ratio_interval`: percentile bootstrap over units
  (:func:`~alibi_surgery.analysis.intervals.paired_bootstrap_ci`; the ratio resamples the same units of both
  models together).
* :func:`token_shares`: each token id's share of the change of summed loss between two models scored on the same
  units. Its change is ``d_v = sum over its positions of (nll_other - nll_base)``; its share is ``|d_v| / sum_u
  |d_u|``, the absolute change over every id's absolute change, so ids that moved in opposite directions cannot
  cancel into a small total that makes every share large (two nearly equal models would otherwise warn on noise).
  :data:`DOMINANT_SHARE` (0.25) is the warning line.

Limits: a resample whose units all have ``n_i = 0`` gives NaN (only possible without specials, on units that predict
nothing but specials); the shares need the same targets unit by unit (the same tokenizer on the same texts),
otherwise :func:`token_shares` returns None (and nothing is checked); identical losses have no shares.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata

import numpy as np

from ..errors import UsageError
from .intervals import paired_bootstrap_ci

__all__ = ["DOMINANT_SHARE", "ClassLoss", "combine_sums", "special_names", "unit_sums", "perplexity_interval",
           "ratio_interval", "token_class", "breakdown", "token_shares", "dominant_tokens"]

DOMINANT_SHARE = 0.25
_CLASSES = ("letters", "digits", "whitespace", "punctuation", "partial-bytes", "other")


@dataclasses.dataclass(frozen=True)
class ClassLoss:
    """One class of predicted tokens: ``tokens`` targets, ``loss`` their summed NLL (nats), ``mean`` = loss / tokens,
    ``share`` = loss / the total summed NLL."""

    name: str
    tokens: int
    loss: float
    mean: float
    share: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _weights(counts: np.ndarray, convention: str) -> np.ndarray:
    return np.where(counts > 0, counts + (convention == "paper"), 0).astype(np.float64)


def combine_sums(sums, counts, convention: str = "tokens") -> float:
    """The perplexity of units with summed losses ``sums`` over ``counts`` predicted tokens (see the module
    docstring); NaN when no unit predicts anything."""
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    weights = _weights(counts, convention)
    total = weights.sum()
    if total == 0:
        return math.nan
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return math.exp(float((weights * means).sum() / total))


def special_names(tokenizer) -> dict[int, str]:
    """The tokenizer's special token ids and their names (``</s>``, ``<s>``, ``<pad>``, ``<unk>``, ...)."""
    if tokenizer is None:
        return {}
    ids = sorted({int(i) for i in tokenizer.all_special_ids if i is not None})
    return {i: tokenizer.convert_ids_to_tokens(i) for i in ids}


def _arrays(unit) -> tuple[np.ndarray, np.ndarray]:
    if getattr(unit, "targets", None) is None or getattr(unit, "nll", None) is None:
        raise UsageError("these figures were made without per-token losses (score them with score_texts or "
                         "prompt_perplexity)")
    return np.asarray(unit.targets), np.asarray(unit.nll, dtype=np.float64)


def unit_sums(units, exclude=()) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: the summed NLL and the count of its predicted targets whose id is not in ``exclude``."""
    exclude = np.asarray(sorted(exclude), dtype=np.int64)
    sums, counts = [], []
    for unit in units:
        targets, nll = _arrays(unit)
        keep = ~np.isin(targets, exclude)
        sums.append(float(nll[keep].sum()))
        counts.append(int(keep.sum()))
    return np.asarray(sums), np.asarray(counts)


def perplexity_interval(units, convention: str = "tokens", exclude=(), *, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float] | None:
    """Bootstrap ``level`` interval of the perplexity over ``units`` (resampled with replacement); None when
    ``resamples`` is 0."""
    sums, counts = unit_sums(units, exclude)
    return paired_bootstrap_ci([sums, counts], lambda s: combine_sums(s[0], s[1], convention), resamples=resamples,
                               seed=seed, level=level)


def ratio_interval(base_units, other_units, convention: str = "tokens", exclude=(), *, resamples: int = 1000,
                   seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Paired bootstrap interval of perplexity(other) / perplexity(base) on the same units, resampled together."""
    s0, n0 = unit_sums(base_units, exclude)
    s1, n1 = unit_sums(other_units, exclude)
    if len(s0) != len(s1):
        raise UsageError(f"ratio: the models were scored on different units ({len(s0)} and {len(s1)})")
    return paired_bootstrap_ci(
        [s0, n0, s1, n1], lambda s: combine_sums(s[2], s[3], convention) / combine_sums(s[0], s[1], convention),
        resamples=resamples, seed=seed, level=level)


def token_class(text: str) -> str:
    """The class of a non-special token by its decoded text (see the module docstring)."""
    if "\ufffd" in text:
        return "partial-bytes"
    if text and text.isspace():
        return "whitespace"
    word = text.lstrip()
    if word.isalpha():
        return "letters"
    if word.isdigit():
        return "digits"
    if word and all(unicodedata.category(c)[0] in "PS" for c in word):
        return "punctuation"
    return "other"


def breakdown(units, tokenizer) -> list[ClassLoss]:
    """The predicted targets of ``units`` by class (special tokens by name first, in id order, then the text classes;
    empty classes left out)."""
    specials = special_names(tokenizer)
    totals: dict[str, list] = {}
    classes: dict[int, str] = {}
    for unit in units:
        targets, nll = _arrays(unit)
        for token in np.unique(targets):
            token = int(token)
            if token not in classes:
                classes[token] = specials.get(token) or token_class(tokenizer.decode([token]))
            mask = targets == token
            entry = totals.setdefault(classes[token], [0, 0.0])
            entry[0] += int(mask.sum())
            entry[1] += float(nll[mask].sum())
    grand = sum(loss for _, loss in totals.values())
    order = [specials[i] for i in sorted(specials)] + list(_CLASSES)
    order += sorted(set(totals) - set(order))  # a special token named like a class cannot be lost
    return [ClassLoss(name, totals[name][0], totals[name][1], totals[name][1] / totals[name][0],
                      totals[name][1] / grand if grand else math.nan)
            for name in dict.fromkeys(order) if name in totals]


def token_shares(base_units, other_units) -> dict[int, tuple[float, float]] | None:
    """``{token id: (its change of summed NLL, its share of the change)}`` from ``base`` to ``other``: the change
    summed over the id's positions, and its absolute value over the sum of every id's absolute change. None when the
    two were not scored on the same targets or nothing changed."""
    base_units, other_units = list(base_units), list(other_units)
    if len(base_units) != len(other_units):
        return None
    delta: dict[int, float] = {}
    for b, o in zip(base_units, other_units):
        (tb, nb), (to, no) = _arrays(b), _arrays(o)
        if tb.shape != to.shape or not np.array_equal(tb, to):
            return None
        for token in np.unique(tb):
            mask = tb == token
            delta[int(token)] = delta.get(int(token), 0.0) + float((no[mask] - nb[mask]).sum())
    gross = sum(abs(d) for d in delta.values())
    if gross == 0:
        return None
    return {token: (d, abs(d) / gross) for token, d in delta.items()}


def dominant_tokens(base_units, other_units, line: float = DOMINANT_SHARE) -> list[tuple[int, float, float]]:
    """``(token id, change, share)`` of every token id whose share of the change exceeds ``line``, largest first
    (empty when the shares cannot be computed)."""
    shares = token_shares(base_units, other_units) or {}
    return sorted(((t, d, s) for t, (d, s) in shares.items() if s > line), key=lambda x: -x[2])

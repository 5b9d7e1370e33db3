"""Head selections: the one spec grammar, the one validator, and the one zone rule.

A *selection* is ``{layer: [heads]}`` (0-based indices; in JSON the layer keys are strings). Every command and
function that takes heads reads them here: ``repair --heads/--freeze/--include``, ``compare --targets/--zone``,
:class:`~alibi_surgery.surgery.plan.Plan`, :class:`~alibi_surgery.analysis.comparison.Comparison`,
:class:`~alibi_surgery.surgery.slices.HeadSlices` and :func:`~alibi_surgery.surgery.reinit.reinit_heads`.

The spec grammar (:func:`parse_spec`; spaces around any token are ignored, letters in any case)::

    SPEC   := ENTRY (";" ENTRY)* [";"]          one trailing ";" allowed, an empty entry between two is not
    ENTRY  := LAYERS ":" HEADS
    LAYERS := "*" | ITEM ("," ITEM)*             ITEM of layers: 5, 5-22, L5, L5-L22
    HEADS  := "*" | ITEM ("," ITEM)*             ITEM of heads:  9, 9-15, H9, H9-H15

``*`` is every layer (or head) of the model; ``N-M`` is inclusive, written with a dash or an en dash, and must not be
reversed. Entries add up and duplicates merge. :func:`format_heads` writes the canonical form (``5-22:9-15;23:4``),
which :func:`parse_heads` reads back to the same selection.

The validator (:func:`check_selection`) accepts int or int-like string layer keys and a list (or a single int) of
heads per layer, and rejects layers or heads outside the model, layers that list no heads, and booleans.

The zone rule (:func:`head_zone`): a head is a ``target`` when the surgery selects it, ``in-band`` when it lies in
the zone (the collapse band the surgery aims at) without being a target, ``outside`` otherwise.

Every error is a one-line :class:`~alibi_surgery.errors.UsageError`.
"""

from __future__ import annotations

import dataclasses
import re

from ..errors import UsageError

__all__ = ["ZONES", "PLAN_FORMAT", "HeadSpec", "SpecError", "HeadOutOfRange", "parse_spec", "parse_heads",
           "parse_range", "match_range", "check_shape", "check_selection", "check_head", "format_heads", "compact",
           "head_zone", "zone_grid", "pairs", "from_pairs", "n_selected"]

ZONES = ("target", "in-band", "outside")
PLAN_FORMAT = "alibi-surgery-plan"  # the "format" of a saved plan (a selection with its source, surgery.plan)
_PREFIX = {"layer": "L", "head": "H"}


class SpecError(UsageError):
    """A head spec that does not parse; ``kind`` is ``"empty"``, ``"reversed"`` or ``"syntax"``."""

    def __init__(self, message: str, kind: str = "syntax", part: str = ""):
        super().__init__(message)
        self.kind, self.part = kind, part


class HeadOutOfRange(UsageError, IndexError):
    """A layer or head index outside the model (an IndexError too, for grid lookups)."""


# --------------------------------------------------------------------------------------------- ranges

def match_range(spec: str, what: str) -> tuple[int, int]:
    """``"9-15"`` or ``"9"`` -> ``(first, last)``, inclusive, syntax only (no bounds). ``what`` names the thing in
    error messages; for ``"layer"`` / ``"head"`` an ``L`` / ``H`` prefix is accepted (``"H9-H15"``), and an en dash
    works as the dash."""
    if not isinstance(spec, str):
        raise UsageError(f"{what} range must be text like 9-15, got {spec!r}")
    prefix = _PREFIX.get(what)
    p = f"(?:{prefix})?" if prefix else ""
    m = re.fullmatch(rf"\s*{p}(\d+)\s*(?:[-\u2013]\s*{p}(\d+)\s*)?", spec, re.IGNORECASE)
    if m is None:
        shown = f"{prefix}9-{prefix}15" if prefix else "9-15"
        raise SpecError(f"bad {what} range {spec!r}: expected N or N-M (e.g. 9-15 or {shown})", part=spec.strip())
    first = int(m.group(1))
    last = first if m.group(2) is None else int(m.group(2))
    if last < first:
        raise SpecError(f"{what} range {spec.strip()!r} is reversed: write {last}-{first}", "reversed", spec.strip())
    return first, last


def parse_range(spec: str, lo: int, hi: int, what: str) -> tuple[int, int]:
    """:func:`match_range`, then checked to lie in ``lo..hi``."""
    first, last = match_range(spec, what)
    for n in (first, last):
        if not lo <= n <= hi:
            raise HeadOutOfRange(f"{what} {n} is out of range {lo}..{hi}")
    return first, last


# --------------------------------------------------------------------------------------------- the grammar

Ranges = tuple  # tuple[tuple[int, int], ...] of inclusive ranges, or None for "*"


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """A parsed spec: ``(layers, heads)`` groups of inclusive ranges (None: ``*``), resolved against a shape by
    :meth:`resolve`. Specs add up with ``+``."""

    groups: tuple[tuple[Ranges | None, Ranges | None], ...]

    def __add__(self, other: "HeadSpec") -> "HeadSpec":
        return HeadSpec(self.groups + other.groups)

    def resolve(self, n_layer: int, n_head: int, what: str | None = None) -> dict[int, list[int]]:
        """The selection on a model of ``n_layer`` x ``n_head`` heads, validated (:func:`check_selection`; errors
        start with ``what`` when given)."""
        check_shape(n_layer, n_head)
        out: dict[int, set[int]] = {}
        for layers, heads in self.groups:
            layers = layers if layers is not None else ((0, n_layer - 1),)
            heads = heads if heads is not None else ((0, n_head - 1),)
            h_ends = [h for r in heads for h in r]
            corners = {a: [min(h_ends), max(h_ends)] if h_ends else [] for r in layers for a in r}
            check_selection(corners, n_layer, n_head, what=what)  # bounds before anything is expanded
            cols = {h for a, b in heads for h in range(a, b + 1)}
            for a, b in layers:
                for layer in range(a, b + 1):
                    out.setdefault(layer, set()).update(cols)
        return {layer: sorted(out[layer]) for layer in sorted(out)}


def _items(text: str, what: str) -> Ranges | None:
    if text.strip() == "*":
        return None
    return tuple(match_range(item, what) for item in text.split(","))


def parse_spec(spec: str) -> HeadSpec:
    """Parse a head spec (the grammar in the module docstring) without knowing the model's shape; raises
    :class:`SpecError` (a UsageError) naming the bad entry."""
    if not isinstance(spec, str):
        raise SpecError(f"a head spec must be text like 5:9-15;6:12, got {spec!r}")
    text = spec.strip()
    if not text or text == ";":
        raise SpecError("empty head spec: expected LAYER:HEADS entries like 5:9-15;6:12", "empty")
    groups = []
    for entry in text.removesuffix(";").split(";"):
        if not entry.strip():
            raise SpecError(f"bad head spec {text!r}: empty entry between ';'")
        if entry.count(":") != 1:
            raise SpecError(f"bad head spec entry {entry.strip()!r}: expected LAYER:HEADS, e.g. 5:9-15 or 5-22:9,12",
                            part=entry.strip())
        layer_part, head_part = entry.split(":")
        try:
            groups.append((_items(layer_part, "layer"), _items(head_part, "head")))
        except SpecError as exc:
            raise SpecError(f"bad head spec entry {entry.strip()!r}: {exc}", exc.kind, exc.part) from None
    return HeadSpec(tuple(groups))


def parse_heads(spec: str, n_layer: int, n_head: int) -> dict[int, list[int]]:
    """Parse a head spec (``"5:14,15;6:9-15"``) into ``{layer: sorted heads}``, validated against a model of
    ``n_layer`` layers x ``n_head`` heads."""
    check_shape(n_layer, n_head)
    return parse_spec(spec).resolve(n_layer, n_head)


# --------------------------------------------------------------------------------------------- the validator

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_shape(n_layer, n_head) -> None:
    """Both counts positive integers (UsageError otherwise)."""
    for name, v in (("n_layer", n_layer), ("n_head", n_head)):
        if not _is_int(v) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")


def check_selection(selection, n_layer: int, n_head: int, *, what: str | None = None,
                    allow_empty: bool = False) -> dict[int, tuple[int, ...]]:
    """Validate ``{layer: heads}`` against a model of ``n_layer`` x ``n_head`` heads; returns it with int layers in
    order and each layer's heads sorted and deduplicated (tuples). Layer keys may be int-like strings (JSON), a
    layer's heads a single int. ``what`` starts every error message (e.g. ``"targets"``); an empty selection is an
    error unless ``allow_empty``."""
    check_shape(n_layer, n_head)
    lead = f"{what}: " if what else ""
    if not isinstance(selection, dict) or not (selection or allow_empty):
        got = "" if isinstance(selection, dict) else f", got {type(selection).__name__}"
        kind = "a dict" if allow_empty else "a non-empty dict"
        raise UsageError(f"{lead}a head selection must be {kind} {{layer: [heads]}}{got}")
    merged: dict[int, set] = {}
    for layer, heads in selection.items():
        key = layer
        if isinstance(layer, str):
            try:
                key = int(layer)
            except ValueError:
                key = None
        if not _is_int(key):
            raise UsageError(f"{lead}layer {layer!r} is not an integer")
        if not 0 <= key < n_layer:
            raise HeadOutOfRange(f"{lead}selection layer {key} is out of range 0..{n_layer - 1}")
        heads = [heads] if _is_int(heads) else heads
        if not isinstance(heads, (list, tuple, set, frozenset, range)):
            raise UsageError(f"{lead}selection layer {key}: heads must be a list of integers, got {heads!r}")
        try:
            merged.setdefault(key, set()).update(heads)
        except TypeError:
            raise UsageError(f"{lead}selection layer {key}: heads must be integers, got {heads!r}") from None
    out = {}
    for layer in sorted(merged):
        heads = merged[layer]
        if not heads:
            raise UsageError(f"{lead}selection layer {layer} lists no heads: each layer must list at least one head")
        bad = sorted((h for h in heads if not _is_int(h) or not 0 <= h < n_head),
                     key=lambda h: (0, h, "") if _is_int(h) else (1, 0, repr(h)))
        if bad:
            raise HeadOutOfRange(f"{lead}selection layer {layer}: head {bad[0]!r} is out of range 0..{n_head - 1}")
        out[layer] = tuple(sorted(heads))
    return out


# --------------------------------------------------------------------------------------------- writing

def _runs(values) -> list[tuple[int, int]]:
    """Sorted distinct ints -> inclusive runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for v in sorted(set(values)):
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs


def compact(values, prefix: str = "") -> str:
    """``[9, 10, 11, 12, 15]`` -> ``"9-12,15"`` (with ``prefix="H"``: ``"H9-12,15"``)."""
    return prefix + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in _runs(values))


def format_heads(selection: dict) -> str:
    """The canonical head spec of a selection (what :func:`parse_heads` reads back): ``"5-22:9-15;23:4"``.
    Consecutive layers with the same heads share one entry. An empty selection gives ``""``."""
    groups: list[list] = []  # [first layer, last layer, heads]
    for layer in sorted(selection):
        heads = sorted(set(selection[layer]))
        if not heads:
            continue
        if groups and groups[-1][1] == layer - 1 and groups[-1][2] == heads:
            groups[-1][1] = layer
        else:
            groups.append([layer, layer, heads])
    return ";".join(f"{a if a == b else f'{a}-{b}'}:{compact(heads)}" for a, b, heads in groups)


# --------------------------------------------------------------------------------------------- sets and zones

def pairs(selection: dict | None) -> set[tuple[int, int]]:
    """``{layer: heads}`` -> ``{(layer, head)}`` (None: empty)."""
    return {(layer, h) for layer, heads in (selection or {}).items() for h in heads}


def from_pairs(items) -> dict[int, list[int]]:
    """``(layer, head)`` pairs -> ``{layer: sorted heads}`` with layers in order."""
    out: dict[int, list[int]] = {}
    for layer, h in sorted(set(items)):
        out.setdefault(layer, []).append(h)
    return out


def n_selected(selection: dict | None) -> int:
    """Number of heads in a selection."""
    return sum(len(h) for h in (selection or {}).values())


def head_zone(layer: int, head: int, targets: dict | None, zone: dict | None) -> str:
    """The zone rule: ``"target"`` if ``targets`` holds the head, else ``"in-band"`` if ``zone`` does, else
    ``"outside"`` (None means an empty selection)."""
    if head in (targets or {}).get(layer, ()):
        return "target"
    if head in (zone or {}).get(layer, ()):
        return "in-band"
    return "outside"


def zone_grid(n_layer: int, n_head: int, targets: dict | None, zone: dict | None) -> list[list[str]]:
    """:func:`head_zone` of every head, ``[layer][head]``."""
    return [[head_zone(layer, h, targets, zone) for h in range(n_head)] for layer in range(n_layer)]


def check_head(layer, head, n_layer: int, n_head: int) -> None:
    """A single ``(layer, head)`` inside the model (:class:`HeadOutOfRange` otherwise)."""
    if not (_is_int(layer) and 0 <= layer < n_layer and _is_int(head) and 0 <= head < n_head):
        raise HeadOutOfRange(f"head L{layer}:H{head} is outside the model's {n_layer} x {n_head} heads")

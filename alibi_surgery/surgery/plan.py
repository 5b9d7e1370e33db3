"""Surgery plans: which heads are re-initialised and retrained, which stay frozen, and what a step will cost.

A :class:`Plan` holds four head sets, each a selection ``{layer: [heads]}`` with sorted heads and no empty layers:

* ``selection``: the heads to re-initialise and train (the *targets*);
* ``zone``: the targeted band: every head of the band x layers rectangle the plan aims at, targets included. A frozen
  head inside the zone is *in-band* (the paper's "in-band healthy heads stay frozen"); every other frozen head is
  *outside*. Drift is reported separately for the two (:meth:`Plan.zone_of`);
* ``frozen``: the heads named by ``freeze`` (never selected);
* ``included``: the heads ``include`` added that the mode had not selected (e.g. healthy ones).

How :func:`make_plan` chooses (``source`` records which; ``"report"`` is ``"auto"`` with the report read from a
file, set by the caller with ``source="report"``):

* ``heads="auto"`` (the default, source ``"auto"``): every head the report classes dead or bos-sink
  (``report.sick_heads()``). Needs a report. Zone: the report's collapse band (``report.band()``) over the layers
  that hold targets, plus the targets themselves (collapsed heads outside the band are targets too); with no band,
  the targets alone.
* ``heads="5:14,15;6:9-15"`` (source ``"list"``): exactly these heads, sick or not; a report is optional (its shape is
  still checked). Zone: the rectangle min..max head x min..max layer of the listed heads.
* ``band="9-15"`` with ``layers="5-22"`` (source ``"band"``; ``layers`` defaults to every layer): the heads the report
  classes dead or bos-sink inside band x layers. Needs a report. Zone: band x layers. ``band`` cannot be combined with
  an explicit ``heads`` list, and ``layers`` means nothing without ``band``.
* ``heads=None``: no heads from any mode; only ``include`` selects (source ``"list"``; zone as for a list).

Then ``freeze`` (a head spec) removes heads from the selection; they stay in the zone, where they count as in-band
frozen. An explicit ``heads`` list that names a frozen head is an error (it asks for both). ``include`` (a head spec) adds heads, healthy or not, and the zone grows to hold them (the paper's H5
experiment: ``include="5-22:5"``). A head both frozen and included is an error. A plan that selects nothing is an
error ("nothing to repair: ...") unless ``allow_empty=True``.

Head specs (:func:`parse_heads`): ``LAYERS:HEADS`` entries separated by ``;``. ``LAYERS`` is a layer or an inclusive
range (``5`` or ``5-22``, optionally ``L5``/``L5-L22``), ``HEADS`` a comma-separated list of heads and inclusive
ranges (``9-12,15``, optionally ``H9-H12,H15``). Spaces around tokens are ignored, a trailing ``;`` too, duplicates
merge. Indices are 0-based. :func:`format_heads` writes the canonical spec, merging consecutive layers with the same
heads (``5-22:9-15``).

Every error is a one-line :class:`~alibi_surgery.errors.UsageError`.
"""

from __future__ import annotations

import dataclasses
import json
import re

import torch

from ..errors import UsageError
from ..io.files import atomic_write_text
from .loss import default_chunk_tokens
from ..diagnosis.report import HeadReport

__all__ = ["Plan", "NothingToRepair", "make_plan", "parse_heads", "parse_range", "format_heads", "predict_memory",
           "format_memory", "format_bytes", "bloom_n_params", "SOURCES"]

SOURCES = ("auto", "report", "list", "band")
GIB = 2**30
PLAN_FORMAT = "alibi-surgery-plan"
PLAN_VERSION = 1

# Activation working set of one recomputed BLOOM block, in units of hidden values per token: input and
# post-attention LayerNorm outputs (2), fused qkv (3), attention context (1), dense output (1), residual (1),
# MLP up-projection and GELU output (4 + 4). See predict_memory.
BLOCK_WORKING_SET = 16

_PREFIX = {"layer": "L", "head": "H"}
_DTYPES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}


# --------------------------------------------------------------------------------------------- specs

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
        raise UsageError(f"bad {what} range {spec!r}: expected N or N-M (e.g. 9-15 or {shown})")
    first = int(m.group(1))
    last = first if m.group(2) is None else int(m.group(2))
    if last < first:
        raise UsageError(f"{what} range {spec.strip()!r} is reversed: write {last}-{first}")
    return first, last


def parse_range(spec: str, lo: int, hi: int, what: str) -> tuple[int, int]:
    """:func:`match_range`, then checked to lie in ``lo..hi``."""
    first, last = match_range(spec, what)
    for n in (first, last):
        if not lo <= n <= hi:
            raise UsageError(f"{what} {n} is out of range {lo}..{hi}")
    return first, last


def _check_shape(n_layer, n_head) -> None:
    for name, v in (("n_layer", n_layer), ("n_head", n_head)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")


def parse_heads(spec: str, n_layer: int, n_head: int) -> dict[int, list[int]]:
    """Parse a head spec (``"5:14,15;6:9-15"``, see the module docstring) into ``{layer: sorted heads}``,
    validated against a model of ``n_layer`` layers x ``n_head`` heads."""
    _check_shape(n_layer, n_head)
    if not isinstance(spec, str):
        raise UsageError(f"a head spec must be text like 5:9-15;6:12, got {spec!r}")
    entries = spec.strip().removesuffix(";").split(";")
    if not spec.strip() or spec.strip() == ";":
        raise UsageError("empty head spec: expected LAYER:HEADS entries like 5:9-15;6:12")
    out: dict[int, set[int]] = {}
    for entry in entries:
        if not entry.strip():
            raise UsageError(f"bad head spec {spec.strip()!r}: empty entry between ';'")
        if entry.count(":") != 1:
            raise UsageError(f"bad head spec entry {entry.strip()!r}: expected LAYER:HEADS, e.g. 5:9-15 or 5-22:9,12")
        layer_part, head_part = entry.split(":")
        try:
            l0, l1 = parse_range(layer_part, 0, n_layer - 1, "layer")
            heads: set[int] = set()
            for item in head_part.split(","):
                h0, h1 = parse_range(item, 0, n_head - 1, "head")
                heads.update(range(h0, h1 + 1))
        except UsageError as exc:
            raise UsageError(f"bad head spec entry {entry.strip()!r}: {exc}") from None
        for layer in range(l0, l1 + 1):
            out.setdefault(layer, set()).update(heads)
    return {layer: sorted(out[layer]) for layer in sorted(out)}


def _runs(heads) -> list[tuple[int, int]]:
    """Sorted distinct ints -> inclusive runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for h in sorted(set(heads)):
        if runs and h == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], h)
        else:
            runs.append((h, h))
    return runs


def _compact(heads, prefix: str = "") -> str:
    """``[9, 10, 11, 12, 15]`` -> ``"9-12,15"`` (with ``prefix="H"``: ``"H9-12,15"``)."""
    return prefix + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in _runs(heads))


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
    return ";".join(f"{a if a == b else f'{a}-{b}'}:{_compact(heads)}" for a, b, heads in groups)


# --------------------------------------------------------------------------------------------- selections

def _pairs(sel: dict) -> set[tuple[int, int]]:
    return {(layer, h) for layer, heads in sel.items() for h in heads}


def _sel(pairs) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, h in sorted(pairs):
        out.setdefault(layer, []).append(h)
    return out


def _rect(layers: tuple[int, int], heads: tuple[int, int]) -> set[tuple[int, int]]:
    return {(layer, h) for layer in range(layers[0], layers[1] + 1) for h in range(heads[0], heads[1] + 1)}


def _bounding_rect(pairs) -> set[tuple[int, int]]:
    if not pairs:
        return set()
    layers = [p[0] for p in pairs]
    heads = [p[1] for p in pairs]
    return _rect((min(layers), max(layers)), (min(heads), max(heads)))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _head_name(pair) -> str:
    return f"L{pair[0]}:H{pair[1]}"


# --------------------------------------------------------------------------------------------- the plan

class NothingToRepair(UsageError):
    """The plan selects no head (no collapsed head, or every one frozen): :func:`make_plan` without ``allow_empty``."""


@dataclasses.dataclass
class Plan:
    """Which heads a surgery re-initialises and trains (see the module docstring for the four head sets)."""

    selection: dict[int, list[int]]
    zone: dict[int, list[int]]
    frozen: dict[int, list[int]]
    included: dict[int, list[int]]
    source: str
    n_layer: int
    n_head: int
    head_dim: int
    hidden: int

    @property
    def n_heads(self) -> int:
        """Number of heads to re-initialise and train."""
        return sum(len(h) for h in self.selection.values())

    @property
    def params_per_head(self) -> int:
        """Trainable elements of one head: qkv rows ``3d x hidden``, qkv bias ``3d``, dense columns ``hidden x d``."""
        d = self.head_dim
        return 3 * d * self.hidden + 3 * d + self.hidden * d

    @property
    def trainable_params(self) -> int:
        return self.n_heads * self.params_per_head

    def zone_of(self, layer: int, head: int) -> str:
        """``"target"`` (selected), ``"in-band"`` (frozen, inside the zone) or ``"outside"``."""
        if not (isinstance(layer, int) and 0 <= layer < self.n_layer and isinstance(head, int)
                and 0 <= head < self.n_head):
            raise UsageError(f"head L{layer}:H{head} is outside the model's {self.n_layer} x {self.n_head} heads")
        if head in self.selection.get(layer, ()):
            return "target"
        if head in self.zone.get(layer, ()):
            return "in-band"
        return "outside"

    def in_band(self) -> dict[int, list[int]]:
        """The frozen heads inside the zone (zone minus selection)."""
        return _sel(_pairs(self.zone) - _pairs(self.selection))

    def validate(self) -> "Plan":
        """Check shape, ranges and the relations between the head sets; normalises each to sorted lists and
        returns ``self``. Raises UsageError."""
        _check_shape(self.n_layer, self.n_head)
        for name in ("head_dim", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UsageError(f"plan {name} must be a positive integer, got {v!r}")
        if self.hidden != self.n_head * self.head_dim:
            raise UsageError(f"plan shape is inconsistent: hidden {self.hidden} != {self.n_head} heads x "
                             f"head_dim {self.head_dim}")
        if self.source not in SOURCES:
            raise UsageError(f"plan source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        sets = {}
        for name in ("selection", "zone", "frozen", "included"):
            sel = getattr(self, name)
            if not isinstance(sel, dict):
                raise UsageError(f"plan {name} must be a dict {{layer: [heads]}}, got {type(sel).__name__}")
            for layer, heads in sel.items():
                if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layer:
                    raise UsageError(f"plan {name}: layer {layer!r} is out of range 0..{self.n_layer - 1}")
                if not isinstance(heads, (list, tuple)) or not heads:
                    raise UsageError(f"plan {name}: layer {layer} must list at least one head")
                bad = [h for h in heads if not isinstance(h, int) or isinstance(h, bool) or not 0 <= h < self.n_head]
                if bad:
                    raise UsageError(f"plan {name}: layer {layer} head {bad[0]!r} is out of range 0..{self.n_head - 1}")
            sets[name] = _pairs(sel)
            setattr(self, name, _sel(sets[name]))
        if sets["selection"] & sets["frozen"]:
            raise UsageError(f"plan selects frozen head {_head_name(min(sets['selection'] & sets['frozen']))}")
        if sets["included"] - sets["selection"]:
            raise UsageError(f"plan includes {_head_name(min(sets['included'] - sets['selection']))} "
                             "without selecting it")
        if sets["selection"] - sets["zone"]:
            raise UsageError(f"plan target {_head_name(min(sets['selection'] - sets['zone']))} lies outside its zone")
        return self

    # ---- serialisation

    def to_dict(self) -> dict:
        def enc(sel):
            return {str(layer): list(heads) for layer, heads in sorted(sel.items())}

        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "source": self.source, "n_layer": self.n_layer,
                "n_head": self.n_head, "head_dim": self.head_dim, "hidden": self.hidden,
                "selection": enc(self.selection), "zone": enc(self.zone), "frozen": enc(self.frozen),
                "included": enc(self.included), "n_heads": self.n_heads, "trainable_params": self.trainable_params,
                "spec": format_heads(self.selection)}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """Inverse of :meth:`to_dict` (derived fields such as ``n_heads`` are ignored); validated."""
        if not isinstance(data, dict):
            raise UsageError(f"a plan must be a JSON object, got {type(data).__name__}")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise UsageError(f"not a surgery plan (format {data.get('format')!r})")
        if data.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise UsageError(f"unsupported plan version {data.get('version')!r} (this build reads {PLAN_VERSION})")
        missing = [k for k in ("selection", "zone", "n_layer", "n_head", "head_dim", "hidden") if k not in data]
        if missing:
            raise UsageError(f"plan is missing {', '.join(missing)}")

        def dec(name):
            raw = data.get(name, {})
            if not isinstance(raw, dict):
                raise UsageError(f"plan {name} must be an object {{layer: [heads]}}")
            out = {}
            for key, heads in raw.items():
                try:
                    layer = int(key)
                except (TypeError, ValueError):
                    raise UsageError(f"plan {name}: layer {key!r} is not an integer") from None
                out[layer] = heads
            return out

        plan = cls(selection=dec("selection"), zone=dec("zone"), frozen=dec("frozen"), included=dec("included"),
                   source=data.get("source", "list"), n_layer=data["n_layer"], n_head=data["n_head"],
                   head_dim=data["head_dim"], hidden=data["hidden"])
        return plan.validate()

    def to_json(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path) -> "Plan":
        try:
            with open(path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise UsageError(f"plan file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read plan {path}: {exc.__class__.__name__}") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"plan {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return cls.from_dict(data)

    # ---- text

    def format(self, memory: dict | None = None) -> str:
        """Multi-line summary for ``--dry-run``: heads per layer, counts, trainable parameters and, given a
        :func:`predict_memory` result, the predicted memory."""
        n_zone = sum(len(h) for h in self.zone.values())
        in_band = self.in_band()
        lines = [f"surgery plan ({self.source}): {_count(self.n_heads, 'head')} in "
                 f"{_count(len(self.selection), 'layer')} (model: {self.n_layer} layers x {self.n_head} heads of "
                 f"{self.head_dim}, hidden {self.hidden})"]
        if self.selection:
            lines.append("  heads to re-initialise and train:")
            lines += [f"    L{layer}: {_compact(heads, 'H')}  ({len(heads)})"
                      for layer, heads in self.selection.items()]
        else:
            lines.append("  heads to re-initialise and train: none")

        def listing(sel):
            return "; ".join(f"L{layer}: {_compact(heads, 'H')}" for layer, heads in sel.items())

        lines.append(f"  zone: {_count(n_zone, 'head')} = {self.n_heads} targets + "
                     f"{sum(len(h) for h in in_band.values())} in-band frozen")
        if self.frozen:
            lines.append(f"  frozen (--freeze): {_count(sum(len(h) for h in self.frozen.values()), 'head')}: "
                         f"{listing(self.frozen)}")
        if self.included:
            lines.append(f"  included (--include): {_count(sum(len(h) for h in self.included.values()), 'head')}: "
                         f"{listing(self.included)}")
        d = self.head_dim
        lines.append(f"  trainable parameters: {self.trainable_params:,} ({self.params_per_head:,} per head = "
                     f"qkv rows {3 * d}x{self.hidden} + qkv bias {3 * d} + dense columns {self.hidden}x{d})")
        if memory is not None:
            lines.append(format_memory(memory))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# --------------------------------------------------------------------------------------------- make_plan

def make_plan(*, n_layer: int, n_head: int, head_dim: int, hidden: int, report: HeadReport | None = None,
              heads: str | None = "auto", band: str | None = None, layers: str | None = None,
              freeze: str | None = None, include: str | None = None, source: str | None = None,
              allow_empty: bool = False) -> Plan:
    """Build a :class:`Plan` for a model of ``n_layer`` x ``n_head`` heads of ``head_dim`` (hidden ``hidden``).

    See the module docstring for the modes (``heads="auto"``, ``heads=<spec>``, ``band``/``layers``,
    ``heads=None``), ``freeze``, ``include`` and ``allow_empty``. ``source`` overrides the recorded source (e.g.
    ``"report"`` when the report was read from a file). Raises UsageError.
    """
    _check_shape(n_layer, n_head)
    for name, v in (("head_dim", head_dim), ("hidden", hidden)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
    if hidden != n_head * head_dim:
        raise UsageError(f"hidden size {hidden} is not {n_head} heads x head_dim {head_dim}")
    if report is not None and (report.n_layer, report.n_head) != (n_layer, n_head):
        raise UsageError(f"the report is for {report.n_layer} layers x {report.n_head} heads, but the model has "
                         f"{n_layer} x {n_head}")
    if source is not None and source not in SOURCES:
        raise UsageError(f"plan source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "report" and report is None:
        raise UsageError("source 'report' needs a report")
    auto = isinstance(heads, str) and heads.strip().lower() == "auto"
    if layers is not None and band is None:
        raise UsageError("--layers only applies with --band (e.g. --band 9-15 --layers 5-22)")

    if band is not None:
        if heads is not None and not auto:
            raise UsageError("--band and an explicit --heads list are exclusive: use one")
        if report is None:
            raise UsageError("--band needs a diagnosis report to tell collapsed heads from healthy ones")
        b = parse_range(band, 0, n_head - 1, "head")
        ls = (0, n_layer - 1) if layers is None else parse_range(layers, 0, n_layer - 1, "layer")
        zone = _rect(ls, b)
        targets = _pairs(report.sick_heads()) & zone
        mode = "band"
        empty_why = f"no dead or bos-sink head in band H{_compact(range(b[0], b[1] + 1))} over " + (
            f"layer {ls[0]}" if ls[0] == ls[1] else f"layers {ls[0]}-{ls[1]}")
    elif auto:
        if report is None:
            raise UsageError("automatic head selection needs a diagnosis report (or give a --heads list)")
        targets = _pairs(report.sick_heads())
        rb = report.band()
        zone = set(targets)
        if rb is not None:
            zone |= {(layer, h) for layer in {p[0] for p in targets} for h in range(rb[0], rb[1] + 1)}
        mode = "auto"
        empty_why = "the report classes no head dead or bos-sink"
    elif heads is None:
        targets, zone, mode = set(), set(), "list"
        empty_why = "no heads were selected"
    else:
        targets = _pairs(parse_heads(heads, n_layer, n_head))
        zone = _bounding_rect(targets)
        mode = "list"
        empty_why = "no heads were selected"

    frozen = _pairs(parse_heads(freeze, n_layer, n_head)) if freeze is not None else set()
    if mode == "list" and targets & frozen:  # an explicit list that also freezes a head contradicts itself
        raise UsageError(f"head {_head_name(min(targets & frozen))} is both listed in --heads and frozen by --freeze")
    wanted = _pairs(parse_heads(include, n_layer, n_head)) if include is not None else set()
    both = frozen & wanted
    if both:
        raise UsageError(f"head {_head_name(min(both))} is both frozen (--freeze) and included (--include)")
    included = wanted - targets
    if heads is None and band is None and included:
        zone = _bounding_rect(included)
    selection = (targets - frozen) | included
    zone |= included
    if not selection and not allow_empty:
        if targets and not (targets - frozen):
            empty_why = "--freeze removes every selected head"
        raise NothingToRepair(f"nothing to repair: {empty_why}")
    plan = Plan(selection=_sel(selection), zone=_sel(zone), frozen=_sel(frozen), included=_sel(included),
                source=source or mode, n_layer=n_layer, n_head=n_head, head_dim=head_dim, hidden=hidden)
    return plan.validate()


# --------------------------------------------------------------------------------------------- memory

def bloom_n_params(n_layer: int, hidden: int, vocab: int) -> int:
    """Parameters of a BLOOM causal LM (the LM head is tied to the embedding): embedding ``vocab x hidden`` and its
    LayerNorm, ``12 hidden^2 + 13 hidden`` per block, the final LayerNorm. bloom-7b1: 7,069,016,064."""
    return vocab * hidden + 2 * hidden + n_layer * (12 * hidden * hidden + 13 * hidden) + 2 * hidden


def _dtype_bytes(dtype) -> tuple[str, int]:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    key = str(dtype).strip().lower()
    if key not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    canon = {4: "float32", 2: "bfloat16" if key.startswith("b") else "float16"}[_DTYPES[key]]
    return canon, _DTYPES[key]


def predict_memory(plan: Plan, *, dtype: str, seq_len: int, batch: int, vocab: int, n_params_total: int,
                   stochastic_rounding: bool = False) -> dict:
    """Predicted peak device memory of one surgery step, in bytes, by part.

    With ``N = plan.trainable_params`` trained elements, ``w`` bytes per weight element (4 for float32, 2 for
    bfloat16/float16), ``P = n_params_total``, ``B = batch``, ``T = seq_len``, ``h = plan.hidden``,
    ``L0`` = the lowest selected layer (autograd records nothing below it):

    * ``weights``     = P * w (the whole model, resident);
    * ``grads``       = N * w (``HeadSlices``' flat slice-gradient buffer, in the weights' dtype);
    * ``moments``     = N * 8 (AdamW ``exp_avg`` and ``exp_avg_sq``, fp32);
    * ``master``      = N * 4 for bfloat16/float16 weights unless ``stochastic_rounding``, else 0;
    * ``optimizer``   = moments + master;
    * ``activations`` = (n_layer - L0 + 1 + 16) * B*T*h * w: non-reentrant gradient checkpointing keeps each
      recorded block's input, plus the final hidden state, plus one block recomputed during backward
      (~16 hidden values per token: two LayerNorm outputs, fused qkv 3h, context, dense output, residual, MLP 4h +
      GELU 4h). Fused attention keeps only O(T) statistics per head: neglected;
    * ``loss_chunk``  = c * vocab * (4 + w') + B*T*h * w, with w' = w for bfloat16/float16 and 0 for float32: one
      chunk of fp32 logits (plus the chunk in the model dtype it is computed in) of
      ``c = min(default_chunk_tokens(vocab), B*T)`` tokens (133 for BLOOM's vocabulary), and the hidden-state
      gradient the chunked loss keeps for backward;
    * ``total``       = the sum: the peak, reached in the backward pass (gradients and optimizer state exist from
      the start of the step). With nothing selected there is no backward: activations and loss chunk are 0.

    bloom-7b1, 300 heads (10 per layer), bf16, seq 512, batch 1 predicts 19.40 GiB with stochastic rounding and
    21.75 GiB with the master copy; an H100 measured 19.39 and 21.73 GiB (``max_memory_allocated``). CPU resident
    memory adds a few hundred MiB of allocator overhead that this does not model.
    """
    name, w = _dtype_bytes(dtype)
    for label, v in (("seq_len", seq_len), ("batch", batch), ("vocab", vocab), ("n_params_total", n_params_total)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{label} must be a positive integer, got {v!r}")
    if stochastic_rounding and name != "bfloat16":
        raise UsageError(f"stochastic rounding is for bfloat16 weights, not {name}")
    n = plan.trainable_params
    tokens_hidden = batch * seq_len * plan.hidden * w
    lowest = min(plan.selection) if plan.selection else plan.n_layer
    recorded = plan.n_layer - lowest
    chunk = min(default_chunk_tokens(vocab), batch * seq_len)
    out = {
        "weights": n_params_total * w,
        "grads": n * w,
        "moments": n * 8,
        "master": n * 4 if w == 2 and not stochastic_rounding else 0,
        "activations": (recorded + 1 + BLOCK_WORKING_SET) * tokens_hidden if recorded else 0,
        "loss_chunk": chunk * vocab * (4 + (w if w != 4 else 0)) + tokens_hidden if recorded else 0,
    }
    out["optimizer"] = out["moments"] + out["master"]
    out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"] + out["loss_chunk"]
    out.update(dtype=name, trainable_params=n, chunk_tokens=chunk, stochastic_rounding=bool(stochastic_rounding),
               seq_len=seq_len, batch=batch)
    return out


def format_memory(mem: dict) -> str:
    """Text lines for a :func:`predict_memory` result (binary units, see :func:`format_bytes`)."""
    def g(key):
        return format_bytes(mem[key])

    opt = f"AdamW m+v {g('moments')}" + (f" + fp32 master {g('master')}" if mem["master"] else
                                          " (stochastic rounding, no master)" if mem["stochastic_rounding"] else "")
    return (f"  predicted peak memory: {g('total')} ({mem['dtype']}, batch {mem['batch']} x {mem['seq_len']} "
            f"tokens, gradient checkpointing)\n"
            f"    = weights {g('weights')} + slice grads {g('grads')} + {opt}\n"
            f"      + activations {g('activations')} + loss chunk {g('loss_chunk')} ({mem['chunk_tokens']} tokens)")


def format_bytes(n: float) -> str:
    """``19.40 GiB``, ``312.5 MiB`` or ``48.0 KiB``: binary units, the largest that keeps the number >= 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"

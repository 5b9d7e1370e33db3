"""Surgery plans: which heads are re-initialised and retrained, which stay frozen, and what a step will cost.

A :class:`Plan` holds four head sets, each a selection ``{layer: [heads]}`` with sorted heads and no empty layers:

* ``selection``: the heads to re-initialise and train (the *targets*);
* ``zone``: the targeted band: every head of the band x layers rectangle the plan aims at, targets included. A frozen
  head inside the zone is *in-band* (the paper's "in-band healthy heads stay frozen"); every other frozen head is
  *outside*. Drift is reported separately for the two (:meth:`Plan.zone_of`);
* ``frozen``: the heads named by ``freeze`` (never selected);
* ``included``: the heads ``include`` added that the mode had not selected (e.g. healthy ones);
* ``replaces`` (empty but for the ``random-healthy`` control arm, :mod:`~alibi_surgery.surgery.controls`): the
  targets the selection stands in for, left untouched.

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
* ``heads="all"`` (source ``"list"``): every head of every layer (``sparsify``'s default). Zone: the whole model.

Then ``freeze`` (a head spec) removes heads from the selection; they stay in the zone, where they count as in-band
frozen. An explicit ``heads`` list that names a frozen head is an error (it asks for both). ``include`` (a head
spec) adds heads, healthy or not, and the zone grows to hold them (the paper's H5 experiment: ``include="5-22:5"``).
A head both frozen and included is an error. A plan that selects nothing is an error ("nothing to repair: ...")
unless ``allow_empty=True``.

Head specs (``heads``, ``freeze``, ``include``) follow the one grammar of :mod:`alibi_surgery.diagnosis.selection`
(``5:14,15;6:9-15``, ``5-22:9-15``, ``*:9-15``, ``L5:H9,H12``); the zone rule is
:func:`~alibi_surgery.diagnosis.selection.head_zone`.
The predicted memory of a step is :func:`alibi_surgery.surgery.memory_plan.predict_memory`.

Every error is a one-line :class:`~alibi_surgery.errors.UsageError`.
"""

from __future__ import annotations

import dataclasses
import json

from ..errors import UsageError
from ..io.files import atomic_write_text
from ..diagnosis.report import HeadReport
from ..diagnosis.selection import (PLAN_FORMAT, check_head, check_selection, check_shape, compact, format_heads,
                                   from_pairs, head_zone, n_selected, pairs, parse_heads, parse_range)

__all__ = ["Plan", "NothingToRepair", "make_plan", "plan_shape", "meta_block", "SOURCES"]

SOURCES = ("auto", "report", "list", "band")
PLAN_VERSION = 1


def _rect(layers: tuple[int, int], heads: tuple[int, int]) -> set[tuple[int, int]]:
    return {(layer, h) for layer in range(layers[0], layers[1] + 1) for h in range(heads[0], heads[1] + 1)}


def _bounding_rect(cells) -> set[tuple[int, int]]:
    if not cells:
        return set()
    layers = [p[0] for p in cells]
    heads = [p[1] for p in cells]
    return _rect((min(layers), max(layers)), (min(heads), max(heads)))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _head_name(pair) -> str:
    return f"L{pair[0]}:H{pair[1]}"


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")


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
    qkv_bias: bool = True  # whether the fused QKV projection has a bias (BLOOM, Falcon per config; not MPT)
    replaces: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # random-healthy: the targets replaced

    @property
    def n_heads(self) -> int:
        """Number of heads to re-initialise and train."""
        return n_selected(self.selection)

    @property
    def params_per_head(self) -> int:
        """Trainable elements of one head's slices (:class:`~alibi_surgery.surgery.slices.HeadSlices`): its q, k and
        v rows of the fused QKV weight ``3d x hidden``, the same rows of the QKV bias ``3d`` when there is one, and
        its output-projection columns ``hidden x d``."""
        d = self.head_dim
        return 3 * d * self.hidden + (3 * d if self.qkv_bias else 0) + self.hidden * d

    @property
    def trainable_params(self) -> int:
        return self.n_heads * self.params_per_head

    def zone_of(self, layer: int, head: int) -> str:
        """``"target"`` (selected), ``"in-band"`` (frozen, inside the zone) or ``"outside"`` (the zone rule of
        :func:`~alibi_surgery.diagnosis.selection.head_zone`)."""
        check_head(layer, head, self.n_layer, self.n_head)
        return head_zone(layer, head, self.selection, self.zone)

    def in_band(self) -> dict[int, list[int]]:
        """The frozen heads inside the zone (zone minus selection)."""
        return from_pairs(pairs(self.zone) - pairs(self.selection))

    def validate(self) -> "Plan":
        """Check shape, ranges and the relations between the head sets; normalises each to sorted lists and
        returns ``self``. Raises UsageError."""
        check_shape(self.n_layer, self.n_head)
        try:
            _check_positive(head_dim=self.head_dim, hidden=self.hidden)
        except UsageError as exc:
            raise UsageError(f"plan {exc}") from None
        if self.hidden != self.n_head * self.head_dim:
            raise UsageError(f"plan shape is inconsistent: hidden {self.hidden} != {self.n_head} heads x "
                             f"head_dim {self.head_dim}")
        if self.source not in SOURCES:
            raise UsageError(f"plan source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not isinstance(self.qkv_bias, bool):
            raise UsageError(f"plan qkv_bias must be true or false, got {self.qkv_bias!r}")
        sets = {}
        for name in ("selection", "zone", "frozen", "included", "replaces"):
            checked = check_selection(getattr(self, name), self.n_layer, self.n_head, what=f"plan {name}",
                                      allow_empty=True)
            sets[name] = pairs(checked)
            setattr(self, name, from_pairs(sets[name]))
        if sets["selection"] & sets["frozen"]:
            raise UsageError(f"plan selects frozen head {_head_name(min(sets['selection'] & sets['frozen']))}")
        if sets["included"] - sets["selection"]:
            raise UsageError(f"plan includes {_head_name(min(sets['included'] - sets['selection']))} "
                             "without selecting it")
        if sets["selection"] & sets["replaces"]:
            raise UsageError(f"plan selects {_head_name(min(sets['selection'] & sets['replaces']))}, which it "
                             "replaces")
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
                "included": enc(self.included), "replaces": enc(self.replaces), "qkv_bias": self.qkv_bias,
                "n_heads": self.n_heads,
                "trainable_params": self.trainable_params,
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
                   head_dim=data["head_dim"], hidden=data["hidden"], qkv_bias=data.get("qkv_bias", True),
                   replaces=dec("replaces"))
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
        :func:`~alibi_surgery.surgery.memory_plan.predict_memory` result, the predicted memory."""
        n_zone = n_selected(self.zone)
        in_band = self.in_band()
        lines = [f"surgery plan ({self.source}): {_count(self.n_heads, 'head')} in "
                 f"{_count(len(self.selection), 'layer')} (model: {self.n_layer} layers x {self.n_head} heads of "
                 f"{self.head_dim}, hidden {self.hidden})"]
        if self.selection:
            lines.append("  heads to re-initialise and train:")
            lines += [f"    L{layer}: {compact(heads, 'H')}  ({len(heads)})"
                      for layer, heads in self.selection.items()]
        else:
            lines.append("  heads to re-initialise and train: none")

        def listing(sel):
            return "; ".join(f"L{layer}: {compact(heads, 'H')}" for layer, heads in sel.items())

        lines.append(f"  zone: {_count(n_zone, 'head')} = {self.n_heads} targets + "
                     f"{n_selected(in_band)} in-band frozen")
        if self.frozen:
            lines.append(f"  frozen (--freeze): {_count(n_selected(self.frozen), 'head')}: "
                         f"{listing(self.frozen)}")
        if self.replaces:
            lines.append(f"  random-healthy control: the heads above are drawn in place of the targets "
                         f"({_count(n_selected(self.replaces), 'head')}: {listing(self.replaces)}), which stay "
                         f"untouched")
        if self.included:
            lines.append(f"  included (--include): {_count(n_selected(self.included), 'head')}: "
                         f"{listing(self.included)}")
        d = self.head_dim
        bias = f" + qkv bias {3 * d}" if self.qkv_bias else ""
        lines.append(f"  trainable parameters: {self.trainable_params:,} ({self.params_per_head:,} per head = "
                     f"qkv rows {3 * d}x{self.hidden}{bias} + output columns {self.hidden}x{d})")
        if memory is not None:
            from .memory_plan import format_memory

            lines.append(format_memory(memory))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# --------------------------------------------------------------------------------------------- make_plan

def make_plan(*, n_layer: int, n_head: int, head_dim: int, hidden: int, report: HeadReport | None = None,
              heads: str | None = "auto", band: str | None = None, layers: str | None = None,
              freeze: str | None = None, include: str | None = None, source: str | None = None,
              allow_empty: bool = False, qkv_bias: bool = True) -> Plan:
    """Build a :class:`Plan` for a model of ``n_layer`` x ``n_head`` heads of ``head_dim`` (hidden ``hidden``).

    See the module docstring for the modes (``heads="auto"``, ``heads=<spec>``, ``band``/``layers``,
    ``heads=None``), ``freeze``, ``include`` and ``allow_empty``. ``source`` overrides the recorded source (e.g.
    ``"report"`` when the report was read from a file). ``qkv_bias``: whether the model's fused QKV projection has a
    bias (:func:`plan_shape` gives it with the shape). Raises UsageError.
    """
    check_shape(n_layer, n_head)
    _check_positive(head_dim=head_dim, hidden=hidden)
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
        raise UsageError(f"layers={layers!r} only applies with band (e.g. band='9-15', layers='5-22')")

    if band is not None:
        if heads is not None and not auto:
            raise UsageError(f"band={band!r} and an explicit heads={heads!r} list are exclusive: use one")
        if report is None:
            raise UsageError(f"band={band!r} needs a diagnosis report to tell collapsed heads from healthy ones")
        b = parse_range(band, 0, n_head - 1, "head")
        ls = (0, n_layer - 1) if layers is None else parse_range(layers, 0, n_layer - 1, "layer")
        zone = _rect(ls, b)
        targets = pairs(report.sick_heads()) & zone
        mode = "band"
        empty_why = f"no dead or bos-sink head in band H{compact(range(b[0], b[1] + 1))} over " + (
            f"layer {ls[0]}" if ls[0] == ls[1] else f"layers {ls[0]}-{ls[1]}")
    elif auto:
        if report is None:
            raise UsageError("heads='auto' needs a diagnosis report (or give a list of heads)")
        targets = pairs(report.sick_heads())
        rb = report.band()
        zone = set(targets)
        if rb is not None:
            zone |= {(layer, h) for layer in {p[0] for p in targets} for h in range(rb[0], rb[1] + 1)}
        mode = "auto"
        empty_why = "the report classes no head dead or bos-sink"
    elif heads is None:
        targets, zone, mode = set(), set(), "list"
        empty_why = "no heads were selected"
    elif isinstance(heads, str) and heads.strip().lower() == "all":  # every head (sparsify's default)
        targets = zone = _rect((0, n_layer - 1), (0, n_head - 1))
        mode, empty_why = "list", "the model has no heads"
    else:
        targets = pairs(parse_heads(heads, n_layer, n_head))
        zone = _bounding_rect(targets)
        mode = "list"
        empty_why = "no heads were selected"

    frozen = pairs(parse_heads(freeze, n_layer, n_head)) if freeze is not None else set()
    if mode == "list" and targets & frozen:  # an explicit list that also freezes a head contradicts itself
        raise UsageError(f"head {_head_name(min(targets & frozen))} is both listed in heads={heads!r} and frozen by "
                         f"freeze={freeze!r}")
    wanted = pairs(parse_heads(include, n_layer, n_head)) if include is not None else set()
    both = frozen & wanted
    if both:
        raise UsageError(f"head {_head_name(min(both))} is both frozen (freeze={freeze!r}) and included "
                         f"(include={include!r})")
    included = wanted - targets
    if heads is None and band is None and included:
        zone = _bounding_rect(included)
    selection = (targets - frozen) | included
    zone |= included
    if not selection and not allow_empty:
        if targets and not (targets - frozen):
            empty_why = f"freeze={freeze!r} removes every selected head"
        raise NothingToRepair(f"nothing to repair: {empty_why}")
    plan = Plan(selection=from_pairs(selection), zone=from_pairs(zone), frozen=from_pairs(frozen),
                included=from_pairs(included),
                source=source or mode, n_layer=n_layer, n_head=n_head, head_dim=head_dim, hidden=hidden,
                qkv_bias=qkv_bias)
    return plan.validate()


def meta_block(config):
    """``(family, block)``: one block of ``config``'s family built on the meta device (shapes only, no memory)."""
    from ..families import family_for

    family = family_for(config)
    return family, family.meta_block(config)


def plan_shape(config) -> dict:
    """The shape keywords of :func:`make_plan` for a model config of any registered family: ``n_layer``, ``n_head``,
    ``head_dim``, ``hidden`` (from :meth:`~alibi_surgery.families.base.Family.layout`) and ``qkv_bias`` (read off a
    :func:`meta_block`)."""
    family, block = meta_block(config)
    layout = family.layout(config)
    qkv = family.qkv(family.attention_modules(block)[0])
    return {"n_layer": layout.n_layer, "n_head": layout.n_head, "head_dim": layout.head_dim, "hidden": layout.hidden,
            "qkv_bias": qkv.bias is not None}

"""Before/after comparison of two diagnoses: which heads surgery repaired, which it broke, and how far the rest drifted.

Every head falls in one zone (the rule of :func:`~alibi_surgery.diagnosis.selection.head_zone`):

* ``target``: re-initialised by surgery (``targets``);
* ``in-band``: inside the collapse band (``zone``) but not a target (the paper's frozen in-band heads);
* ``outside``: everything else.

Outcomes, from each report's classes (sick = dead or bos-sink):

* recovered: a target that was sick before and is not sick after;
* still sick: a target that was sick before and is sick after;
* newly sick target: a target that was not sick before and is sick after;
* iatrogenic: a head that is not a target, was not sick before and is sick after.

Without ``targets`` every head counts as a candidate for repair: recovered / still sick are then counted over all
heads that were sick before, and iatrogenic over all heads that were not.

Healthy heads: with ``healthy`` (``"ours"`` or ``"paper"``, :mod:`~alibi_surgery.diagnosis.healthy`) the summary,
the JSON and the printed summary also give the healthy heads before and after under that definition, named; None
(the default) leaves them out. Outcomes do not depend on it (recovered = not collapsed, under both).

Drift (the paper's rule): ``|bos_mass_after - bos_mass_before| > drift_threshold`` (0.05), counted per zone.
Deltas are computed in float64 from the reports' float32 values. :class:`Comparison` only notes reports measured
differently (prompt set, truncation); :func:`alibi_surgery.analysis.compare.compare` refuses them unless ``force``.
The figure is :func:`alibi_surgery.viz.comparison_figures.plot_delta_heatmap`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch

from ..errors import UsageError
from ..io.files import atomic_write_text
from ..diagnosis.healthy import check_healthy_definition, healthy_text
from ..diagnosis.report import HeadReport, Thresholds, measurement_differences, metric_differences, model_name
from ..diagnosis.selection import ZONES, check_head, check_selection, from_pairs, head_zone, n_selected, zone_grid

__all__ = ["Comparison", "ZONES", "KIND", "check_drift_threshold", "thresholds_text"]

KIND = "alibi-surgery comparison"


def _checked(selection, n_layer: int, n_head: int, what: str) -> dict[int, list[int]] | None:
    """A targets / zone selection validated (:func:`~alibi_surgery.diagnosis.selection.check_selection`, empty
    allowed), as sorted lists; None stays None."""
    if selection is None:
        return None
    return {layer: list(heads) for layer, heads in
            check_selection(selection, n_layer, n_head, what=what, allow_empty=True).items()}


@dataclasses.dataclass
class Comparison:
    """Two diagnoses of the same architecture, with the optional surgery targets and band zone.

    ``targets``/``zone`` are selections ``{layer: [heads]}``; they are validated against the shape and stored
    sorted. Shapes, class thresholds and metric options (first-query exclusion, entropy normalisation) must match.
    ``healthy``: None, or the definition of healthy heads the summaries count (module docstring).
    """

    before: HeadReport
    after: HeadReport
    targets: dict[int, list[int]] | None = None
    zone: dict[int, list[int]] | None = None
    drift_threshold: float = 0.05
    healthy: str | None = None

    def __post_init__(self):
        for name in ("before", "after"):
            if not isinstance(getattr(self, name), HeadReport):
                raise TypeError(f"Comparison.{name} must be a HeadReport, got {type(getattr(self, name)).__name__}")
        b, a = self.before, self.after
        if tuple(b.bos_mass.shape) != tuple(a.bos_mass.shape):
            raise UsageError(f"the reports have different shapes: before is {b.n_layer} layers x {b.n_head} heads, "
                             f"after is {a.n_layer} layers x {a.n_head} heads")
        if b.thresholds != a.thresholds:
            raise UsageError(f"the reports use different class thresholds ({thresholds_text(b.thresholds)} vs "
                             f"{thresholds_text(a.thresholds)}): their classes are not comparable")
        metric = metric_differences(b, a)
        if metric:
            raise UsageError(f"the reports were measured differently: {metric[0]}")
        self.drift_threshold = check_drift_threshold(self.drift_threshold)
        if self.healthy is not None:
            check_healthy_definition(self.healthy)
        self.targets = _checked(self.targets, b.n_layer, b.n_head, "targets")
        self.zone = _checked(self.zone, b.n_layer, b.n_head, "zone")

    # ---- per-head views ---------------------------------------------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return self.before.n_layer

    @property
    def n_head(self) -> int:
        return self.before.n_head

    @property
    def delta(self) -> torch.Tensor:
        """``after.bos_mass - before.bos_mass``, float64 ``[n_layer, n_head]``."""
        return self.after.bos_mass.double() - self.before.bos_mass.double()

    def zone_grid(self) -> list[list[str]]:
        """The zone of every head, ``[layer][head]`` (:func:`~alibi_surgery.diagnosis.selection.head_zone`)."""
        return zone_grid(self.n_layer, self.n_head, self.targets, self.zone)

    def zone_of(self, layer: int, head: int) -> str:
        """``"target"``, ``"in-band"`` (in ``zone`` but not a target) or ``"outside"``; IndexError (a UsageError too)
        outside the grid."""
        check_head(layer, head, self.n_layer, self.n_head)
        return head_zone(layer, head, self.targets, self.zone)

    def outcomes(self) -> list[list[str | None]]:
        """Per head: ``recovered``, ``still-sick``, ``newly-sick-target``, ``iatrogenic`` or None."""
        before, after = self.before.sick_mask(), self.after.sick_mask()
        zones = self.zone_grid()
        out: list[list[str | None]] = []
        for layer in range(self.n_layer):
            row = []
            for h in range(self.n_head):
                sb, sa = before[layer][h], after[layer][h]
                candidate = self.targets is None or zones[layer][h] == "target"
                if sb and candidate:
                    row.append("still-sick" if sa else "recovered")
                elif not sb and sa:
                    row.append("newly-sick-target" if self.targets is not None and candidate else "iatrogenic")
                else:
                    row.append(None)
            out.append(row)
        return out

    def _select(self, outcome: str) -> dict[int, list[int]]:
        return from_pairs((layer, h) for layer, row in enumerate(self.outcomes())
                             for h, o in enumerate(row) if o == outcome)

    def recovered(self) -> dict[int, list[int]]:
        """Targets (all heads without targets) sick before and not sick after, as ``{layer: [heads]}``."""
        return self._select("recovered")

    def still_sick(self) -> dict[int, list[int]]:
        """Targets (all heads without targets) sick before and still sick after."""
        return self._select("still-sick")

    def newly_sick_targets(self) -> dict[int, list[int]]:
        """Targets that were not sick before but are sick after (always empty without targets)."""
        return self._select("newly-sick-target")

    def iatrogenic(self) -> dict[int, list[int]]:
        """Non-target heads (all heads without targets) not sick before and sick after."""
        return self._select("iatrogenic")

    def zone_heads(self, zone_name: str) -> list[tuple[int, int]]:
        """``(layer, head)`` pairs of a zone (``"all"`` for every head), in layer-major order."""
        if zone_name != "all" and zone_name not in ZONES:
            raise ValueError(f"unknown zone {zone_name!r}; choose one of {', '.join(ZONES)}, all")
        grid = self.zone_grid()
        return [(layer, h) for layer in range(self.n_layer) for h in range(self.n_head)
                if zone_name == "all" or grid[layer][h] == zone_name]

    def drift(self, zone_name: str = "all") -> dict:
        """Drift in one zone: ``n`` heads, ``count`` with ``|delta| > drift_threshold``, ``mean_abs`` |delta| and the
        ``worst`` head (largest |delta|; ties: the first in layer-major order). ``mean_abs``/``worst`` are None for an
        empty zone."""
        heads = self.zone_heads(zone_name)
        delta = self.delta.tolist()
        values = [(abs(delta[layer][h]), layer, h) for layer, h in heads]
        count = sum(1 for v, _, _ in values if v > self.drift_threshold)
        worst = None
        if values:
            _, wl, wh = max(values, key=lambda t: (t[0], -t[1], -t[2]))
            worst = {"layer": wl, "head": wh, "delta": delta[wl][wh]}
        return {"zone": zone_name, "n": len(values), "count": count,
                "mean_abs": sum(v for v, _, _ in values) / len(values) if values else None, "worst": worst}

    def notes(self) -> list[str]:
        """Caveats about how comparable the two reports are: measurement differences (prompts, truncation), dtype,
        backend."""
        b, a = self.before.metadata, self.after.metadata
        out = measurement_differences(self.before, self.after)
        for key in ("dtype", "backend"):
            if b.get(key) is not None and a.get(key) is not None and b[key] != a[key]:
                out.append(f"{key} differs: {b[key]} before, {a[key]} after")
        return out

    # ---- serialisation ----------------------------------------------------------------------------------------------

    def summary(self) -> dict:
        out = {"recovered": n_selected(self.recovered()), "still_sick": n_selected(self.still_sick()),
               "newly_sick_targets": n_selected(self.newly_sick_targets()),
               "iatrogenic": n_selected(self.iatrogenic()),
               "n_targets": None if self.targets is None else n_selected(self.targets),
               "classes_before": self.before.summary(self.healthy), "classes_after": self.after.summary(self.healthy),
               "drift": {z: self.drift(z) for z in (*ZONES, "all")}}
        if self.healthy is not None:
            out["healthy"] = {"definition": self.healthy, "before": self.before.n_healthy(self.healthy),
                              "after": self.after.n_healthy(self.healthy)}
        return out

    def to_dict(self) -> dict:
        def sel(s):
            return None if s is None else {str(k): list(v) for k, v in s.items()}

        delta = self.delta.tolist()
        cb, ca = self.before.classes, self.after.classes
        outcomes, zones = self.outcomes(), self.zone_grid()
        heads = [{"layer": layer, "head": h, "zone": zones[layer][h],
                  "bos_mass_before": float(self.before.bos_mass[layer, h]),
                  "bos_mass_after": float(self.after.bos_mass[layer, h]), "delta": delta[layer][h],
                  "entropy_before": float(self.before.entropy[layer, h]),
                  "entropy_after": float(self.after.entropy[layer, h]),
                  "class_before": cb[layer][h], "class_after": ca[layer][h],
                  "drifting": abs(delta[layer][h]) > self.drift_threshold, "outcome": outcomes[layer][h]}
                 for layer in range(self.n_layer) for h in range(self.n_head)]
        return {"kind": KIND, "version": 1, "n_layer": self.n_layer, "n_head": self.n_head,
                "drift_threshold": self.drift_threshold, "targets": sel(self.targets), "zone": sel(self.zone),
                "summary": self.summary(), "notes": self.notes(),
                "recovered": sel(self.recovered()), "still_sick": sel(self.still_sick()),
                "newly_sick_targets": sel(self.newly_sick_targets()), "iatrogenic": sel(self.iatrogenic()),
                "heads": heads, "before": self.before.to_dict(self.healthy), "after": self.after.to_dict(self.healthy),
                **({} if self.healthy is None else {"healthy": self.healthy})}

    def to_json(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "Comparison":
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise UsageError("not a comparison JSON (written by Comparison.to_json / compare --json)")
        return cls(HeadReport.from_dict(data["before"]), HeadReport.from_dict(data["after"]),
                   targets=data.get("targets"), zone=data.get("zone"),
                   drift_threshold=data.get("drift_threshold", 0.05), healthy=data.get("healthy"))

    @classmethod
    def from_json(cls, path) -> "Comparison":
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    # ---- text -------------------------------------------------------------------------------------------------------

    def format_table(self, max_rows: int | None = 30) -> str:
        """One row per head, largest |delta| first (ties: layer-major order): zone, bos_mass before/after, delta,
        class before -> after, and the outcome. ``max_rows`` None or 0: every head."""
        delta = self.delta.tolist()
        cb, ca = self.before.classes, self.after.classes
        outcomes, zones = self.outcomes(), self.zone_grid()
        order = sorted(((layer, h) for layer in range(self.n_layer) for h in range(self.n_head)),
                       key=lambda p: (-abs(delta[p[0]][p[1]]), p[0], p[1]))
        shown = order if not max_rows else order[:max_rows]
        lines = [f"{'layer':>5} {'head':>4}  {'zone':<8} {'before':>7} {'after':>7} {'delta':>8}  "
                 f"{'class before -> after':<27} outcome"]
        for layer, h in shown:
            d = delta[layer][h]
            flag = "*" if abs(d) > self.drift_threshold else " "
            outcome = (outcomes[layer][h] or "").replace("-", " ")
            lines.append(f"{layer:>5} {h:>4}  {zones[layer][h]:<8} {float(self.before.bos_mass[layer, h]):7.4f} "
                         f"{float(self.after.bos_mass[layer, h]):7.4f} {d:+8.4f}{flag} "
                         f"{cb[layer][h] + ' -> ' + ca[layer][h]:<27} {outcome}".rstrip())
        if len(shown) < len(order):
            rest = order[len(shown):]
            top = abs(delta[rest[0][0]][rest[0][1]])
            lines.append(f"... {len(rest)} more heads with |delta| <= {top:.4f}")
        lines.append(f"* |delta| > {self.drift_threshold:g} (drifting)")
        return "\n".join(lines)

    def format_summary(self) -> str:
        """Class counts before -> after, repair outcomes, and drift per zone."""
        sb, sa = self.before.summary(self.healthy), self.after.summary(self.healthy)
        total = self.n_layer * self.n_head
        lines = [f"{_named(self.before, 'before')} -> {_named(self.after, 'after')}: "
                 f"{self.n_layer} layers x {self.n_head} heads",
                 "  classes: " + "  ".join(f"{name} {sb[key]} -> {sa[key]}" for name, key in
                                           (("healthy", "healthy"), ("bos-sink", "bos_sink"), ("dead", "dead"),
                                            ("low-entropy", "low_entropy")))
                 + f"  (collapsed {sb['dead'] + sb['bos_sink']} -> {sa['dead'] + sa['bos_sink']} of {total})"]
        if self.healthy is not None:
            lines.append(f"  {healthy_text(self.healthy)}: {sb['healthy_heads']} -> {sa['healthy_heads']} of {total}")
        rec, still = n_selected(self.recovered()), n_selected(self.still_sick())
        iat = n_selected(self.iatrogenic())
        if self.targets is None:
            lines.append(f"  no targets given: of {rec + still} heads collapsed before, recovered {rec}, still sick "
                         f"{still}; newly collapsed {iat}")
        else:
            new = n_selected(self.newly_sick_targets())
            lines.append(f"  targets {n_selected(self.targets)}: recovered {rec}, still sick {still}"
                         + (f", newly sick {new}" if new else "")
                         + f"; iatrogenic (non-targets newly collapsed) {iat}")
        lines.append(f"  drift (|delta| > {self.drift_threshold:g}):")
        for name in (*ZONES, "all"):
            d = self.drift(name)
            if d["n"] == 0:
                if {"target": self.targets, "in-band": self.zone}.get(name, True) is not None:
                    lines.append(f"    {name:<8} no heads")
                continue
            w = d["worst"]
            lines.append(f"    {name:<8} {d['count']:>4}/{d['n']:<4} drifting  mean |delta| {d['mean_abs']:.4f}  "
                         f"worst L{w['layer']} H{w['head']} {w['delta']:+.4f}")
        lines += [f"  note: {n}" for n in self.notes()]
        return "\n".join(lines)


def _named(report: HeadReport, fallback: str) -> str:
    """The report's model name, with the surgery arm that made the model (``[arm ablate]``) when it is recorded."""
    arm = report.metadata.get("arm")
    return model_name(report, fallback) + (f" [arm {arm}]" if arm else "")


def check_drift_threshold(threshold) -> float:
    """A finite number >= 0, as float (UsageError otherwise)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold < 0:
        raise UsageError(f"the drift threshold must be a finite number >= 0, got {threshold!r}")
    return float(threshold)


def thresholds_text(t: Thresholds) -> str:
    """``dead 0.95, sink 0.5, low-entropy 0.5``: class thresholds in messages."""
    return f"dead {t.dead:g}, sink {t.sink:g}, low-entropy {t.low_entropy:g}"

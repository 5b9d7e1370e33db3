"""Before/after comparison of two diagnoses: which heads surgery repaired, which it broke, and how far the rest drifted.

Every head falls in one zone:

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

Drift (the paper's rule): ``|bos_mass_after - bos_mass_before| > drift_threshold`` (0.05), counted per zone.
Deltas are computed in float64 from the reports' float32 values.

:func:`compare` refuses two diagnoses measured differently (prompt set, truncation:
:func:`~alibi_surgery.diagnosis.report.measurement_differences`) unless ``force``; :class:`Comparison` itself only notes them.

    alibi-surgery compare A B [--targets SPEC] [--zone SPEC] [--plan PLAN.json] [--json OUT] [--heatmap OUT.png]
                              [--table] [--drift-threshold T] [--force]

``A`` and ``B`` are each a diagnosis JSON (``diagnose --json``) or a BLOOM model directory, which is then diagnosed
here with the same options as ``diagnose`` (default prompts unless ``--prompt``/``--prompts-file``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from pathlib import Path

import torch

from ..errors import UsageError
from ..viz.heatmap import save_figure
from ..io.files import atomic_write_text, check_output_paths
from ..cli.options import add_model_options, add_prompt_options
from ..diagnosis.prompts import read_prompts
from ..diagnosis.report import (METRIC_VARIANTS, HeadReport, Thresholds, check_same_measurement, measurement_differences,
                     metric_differences, read_report)

__all__ = ["Comparison", "compare", "save_delta_heatmap", "plot_delta_heatmap", "parse_selection_spec",
           "add_compare_parser", "run_compare", "ZONES"]

ZONES = ("target", "in-band", "outside")
_DIAGNOSE_OPTIONS = ("device", "dtype", "backend", "batch_size", "max_length", "prompts", "exclude_first_query",
                     "normalize_entropy", "thresholds", "progress")
_KIND = "alibi-surgery comparison"
_PLAN_FORMAT = "alibi-surgery-plan"


def _normalise_selection(selection, n_layer: int, n_head: int, what: str) -> dict[int, list[int]] | None:
    """``{layer: heads}`` (layer keys may be int-like strings, as in JSON) -> sorted ``{int: [int]}``; empty dict
    allowed (no head); range errors name ``what``."""
    if selection is None:
        return None
    if not isinstance(selection, dict):
        raise UsageError(f"{what} must be a dict {{layer: [heads]}}, got {type(selection).__name__}")
    if not selection:
        return {}
    from ..surgery.slices import check_selection

    converted = {}
    for layer, heads in selection.items():
        try:
            key = int(layer) if isinstance(layer, str) else layer
        except ValueError:
            raise UsageError(f"{what}: layer {layer!r} is not an integer") from None
        if isinstance(heads, int):
            heads = [heads]
        converted[key] = sorted(set(converted.get(key, ())) | set(heads))
    try:
        checked = check_selection(converted, n_layer, n_head)
    except UsageError as exc:
        raise UsageError(f"{what}: {exc}") from None
    return {layer: list(heads) for layer, heads in checked.items()}


def _selection_count(selection: dict[int, list[int]]) -> int:
    return sum(len(h) for h in selection.values())


def _as_selection(pairs) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in pairs:
        out.setdefault(layer, []).append(head)
    return out


def _model_name(report: HeadReport, fallback: str) -> str:
    return str(report.metadata.get("model") or fallback)


@dataclasses.dataclass
class Comparison:
    """Two diagnoses of the same architecture, with the optional surgery targets and band zone.

    ``targets``/``zone`` are selections ``{layer: [heads]}``; they are validated against the shape and stored
    sorted. Shapes, class thresholds and metric options (first-query exclusion, entropy normalisation) must match.
    """

    before: HeadReport
    after: HeadReport
    targets: dict[int, list[int]] | None = None
    zone: dict[int, list[int]] | None = None
    drift_threshold: float = 0.05

    def __post_init__(self):
        for name in ("before", "after"):
            if not isinstance(getattr(self, name), HeadReport):
                raise TypeError(f"Comparison.{name} must be a HeadReport, got {type(getattr(self, name)).__name__}")
        b, a = self.before, self.after
        if tuple(b.bos_mass.shape) != tuple(a.bos_mass.shape):
            raise UsageError(f"the reports have different shapes: before is {b.n_layer} layers x {b.n_head} heads, "
                             f"after is {a.n_layer} layers x {a.n_head} heads")
        if b.thresholds != a.thresholds:
            raise UsageError(f"the reports use different class thresholds ({_thresholds_text(b.thresholds)} vs "
                             f"{_thresholds_text(a.thresholds)}): their classes are not comparable")
        metric = metric_differences(b, a)
        if metric:
            raise UsageError(f"the reports were measured differently: {metric[0]}")
        self.drift_threshold = _check_drift_threshold(self.drift_threshold)
        self.targets = _normalise_selection(self.targets, b.n_layer, b.n_head, "targets")
        self.zone = _normalise_selection(self.zone, b.n_layer, b.n_head, "zone")

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

    def _zone_grid(self) -> list[list[str]]:
        grid = [["outside"] * self.n_head for _ in range(self.n_layer)]
        for selection, name in ((self.zone, "in-band"), (self.targets, "target")):  # targets win
            for layer, heads in (selection or {}).items():
                for h in heads:
                    grid[layer][h] = name
        return grid

    def zone_of(self, layer: int, head: int) -> str:
        """``"target"``, ``"in-band"`` (in ``zone`` but not a target) or ``"outside"``."""
        if not (0 <= layer < self.n_layer and 0 <= head < self.n_head):
            raise IndexError(f"head L{layer} H{head} is outside the {self.n_layer} x {self.n_head} grid")
        if self.targets and head in self.targets.get(layer, ()):
            return "target"
        if self.zone and head in self.zone.get(layer, ()):
            return "in-band"
        return "outside"

    def _outcomes(self) -> list[list[str | None]]:
        """Per head: ``recovered``, ``still-sick``, ``newly-sick-target``, ``iatrogenic`` or None."""
        before, after = self.before.sick_mask(), self.after.sick_mask()
        zones = self._zone_grid()
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
        return _as_selection((layer, h) for layer, row in enumerate(self._outcomes())
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
        grid = self._zone_grid()
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
        return {"recovered": _selection_count(self.recovered()), "still_sick": _selection_count(self.still_sick()),
                "newly_sick_targets": _selection_count(self.newly_sick_targets()),
                "iatrogenic": _selection_count(self.iatrogenic()),
                "n_targets": None if self.targets is None else _selection_count(self.targets),
                "classes_before": self.before.summary(), "classes_after": self.after.summary(),
                "drift": {z: self.drift(z) for z in (*ZONES, "all")}}

    def to_dict(self) -> dict:
        def sel(s):
            return None if s is None else {str(k): list(v) for k, v in s.items()}

        delta = self.delta.tolist()
        cb, ca = self.before.classes, self.after.classes
        outcomes, zones = self._outcomes(), self._zone_grid()
        heads = [{"layer": layer, "head": h, "zone": zones[layer][h],
                  "bos_mass_before": float(self.before.bos_mass[layer, h]),
                  "bos_mass_after": float(self.after.bos_mass[layer, h]), "delta": delta[layer][h],
                  "entropy_before": float(self.before.entropy[layer, h]),
                  "entropy_after": float(self.after.entropy[layer, h]),
                  "class_before": cb[layer][h], "class_after": ca[layer][h],
                  "drifting": abs(delta[layer][h]) > self.drift_threshold, "outcome": outcomes[layer][h]}
                 for layer in range(self.n_layer) for h in range(self.n_head)]
        return {"kind": _KIND, "version": 1, "n_layer": self.n_layer, "n_head": self.n_head,
                "drift_threshold": self.drift_threshold, "targets": sel(self.targets), "zone": sel(self.zone),
                "summary": self.summary(), "notes": self.notes(),
                "recovered": sel(self.recovered()), "still_sick": sel(self.still_sick()),
                "newly_sick_targets": sel(self.newly_sick_targets()), "iatrogenic": sel(self.iatrogenic()),
                "heads": heads, "before": self.before.to_dict(), "after": self.after.to_dict()}

    def to_json(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "Comparison":
        if not isinstance(data, dict) or data.get("kind") != _KIND:
            raise UsageError("not a comparison JSON (written by Comparison.to_json / compare --json)")
        return cls(HeadReport.from_dict(data["before"]), HeadReport.from_dict(data["after"]), targets=data.get("targets"),
                   zone=data.get("zone"), drift_threshold=data.get("drift_threshold", 0.05))

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
        outcomes, zones = self._outcomes(), self._zone_grid()
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
        sb, sa = self.before.summary(), self.after.summary()
        total = self.n_layer * self.n_head
        lines = [f"{_model_name(self.before, 'before')} -> {_model_name(self.after, 'after')}: "
                 f"{self.n_layer} layers x {self.n_head} heads",
                 "  classes: " + "  ".join(f"{name} {sb[key]} -> {sa[key]}" for name, key in
                                           (("healthy", "healthy"), ("bos-sink", "bos_sink"), ("dead", "dead"),
                                            ("low-entropy", "low_entropy")))
                 + f"  (collapsed {sb['dead'] + sb['bos_sink']} -> {sa['dead'] + sa['bos_sink']} of {total})"]
        rec, still = _selection_count(self.recovered()), _selection_count(self.still_sick())
        iat = _selection_count(self.iatrogenic())
        if self.targets is None:
            lines.append(f"  no targets given: of {rec + still} heads collapsed before, recovered {rec}, still sick "
                         f"{still}; newly collapsed {iat}")
        else:
            new = _selection_count(self.newly_sick_targets())
            lines.append(f"  targets {_selection_count(self.targets)}: recovered {rec}, still sick {still}"
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


def _check_drift_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold < 0:
        raise UsageError(f"the drift threshold must be a finite number >= 0, got {threshold!r}")
    return float(threshold)


def _thresholds_text(t: Thresholds) -> str:
    return f"dead {t.dead:g}, sink {t.sink:g}, low-entropy {t.low_entropy:g}"


# ---- inputs ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    label: str
    report: HeadReport | None = None
    model: str | None = None
    shape: tuple[int, int] | None = None


def _resolve_source(x, label: str) -> _Source:
    """A HeadReport, a diagnosis ``.json`` file, or a BLOOM model directory (or cached hub id)."""
    if isinstance(x, HeadReport):
        return _Source(label, report=x, shape=(x.n_layer, x.n_head))
    if not isinstance(x, (str, Path)):
        raise TypeError(f"{label} must be a HeadReport or a path, got {type(x).__name__}")
    path = Path(x)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise UsageError(f"{label} is neither a diagnosis .json file nor a model directory: {path}")
        report = read_report(path, label, not_a=(_KIND, "a comparison"))
        return _Source(label, report=report, shape=(report.n_layer, report.n_head))
    if path.is_dir() or (not path.exists() and path.suffix.lower() != ".json" and str(x).count("/") == 1
                         and not str(x).startswith((".", "/"))):
        from ..io.loading import resolve_model_dir

        try:
            resolved = resolve_model_dir(str(x))
        except UsageError as exc:
            raise UsageError(f"{label}: {exc}") from None
        config = json.loads((resolved / "config.json").read_text(encoding="utf-8"))
        n_layer = config.get("n_layer", config.get("num_hidden_layers"))
        n_head = config.get("n_head", config.get("num_attention_heads"))
        shape = (n_layer, n_head) if isinstance(n_layer, int) and isinstance(n_head, int) else None
        return _Source(label, model=str(x), shape=shape)
    if not path.exists():
        raise UsageError(f"{label} does not exist: {path}")
    raise UsageError(f"{label} is neither a diagnosis .json file nor a model directory: {path}")


def _diagnose_source(source: _Source, options: dict) -> HeadReport:
    from ..diagnosis.diagnose import diagnose
    from ..io.loading import load_bloom
    from ..diagnosis.prompts import DEFAULT_PROMPTS

    model, tokenizer = load_bloom(source.model, dtype=options.get("dtype"), device=options.get("device"))
    kwargs = {k: options[k] for k in ("batch_size", "max_length", "backend", "exclude_first_query",
                                      "normalize_entropy", "thresholds", "progress") if options.get(k) is not None}
    try:
        return diagnose(model, tokenizer, options.get("prompts") or list(DEFAULT_PROMPTS), **kwargs)
    finally:
        is_cuda = next(model.parameters()).device.type == "cuda"
        del model
        gc.collect()
        if is_cuda:
            torch.cuda.empty_cache()


def _check_measurement(report: HeadReport, label: str, options: dict) -> dict:
    """Options for diagnosing a model that is compared with ``report``: class thresholds and max_length default to
    the report's, and explicit thresholds or metric options that differ from it are refused before any diagnosis."""
    options = dict(options)
    if options.get("thresholds") is None:
        options["thresholds"] = report.thresholds
    elif options["thresholds"] != report.thresholds:
        raise UsageError(f"{label} was classified with thresholds {_thresholds_text(report.thresholds)}, not "
                         f"{_thresholds_text(options['thresholds'])}")
    if options.get("max_length") is None:
        options["max_length"] = report.metadata.get("max_length")
    metric = report.metadata.get("metric") or {}
    for key in METRIC_VARIANTS:
        if key in metric and bool(metric[key]) != bool(options.get(key, False)):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{label} was measured with {key}={bool(metric[key])}: diagnose the model the same way "
                             f"({'pass' if metric[key] else 'drop'} {flag})")
    return options


def compare(a, b, *, targets=None, zone=None, drift_threshold: float = 0.05, force: bool = False,
            **diagnose_kwargs) -> Comparison:
    """Compare diagnosis ``a`` (before) with ``b`` (after).

    ``a``/``b``: a :class:`HeadReport`, a path to a diagnosis JSON, or a BLOOM model directory, which is diagnosed
    with ``diagnose_kwargs`` (``device``, ``dtype``, ``backend``, ``batch_size``, ``max_length``, ``prompts``
    (default: the built-in set), ``exclude_first_query``, ``normalize_entropy``, ``thresholds`` (default: those of
    the other input when it is a report), ``progress``; ignored for reports; ``max_length`` also defaults to the
    other report's). Inputs, shapes, targets, zone and options are all checked before anything is diagnosed; two
    model directories are loaded one after the other.

    Two diagnoses measured differently (:func:`~alibi_surgery.diagnosis.report.measurement_differences`: prompt set,
    max_length) raise a UsageError naming the first difference, or with ``force`` a UserWarning; a report without a
    prompt fingerprint (written by an older version) gives a warning that its prompt set cannot be checked.
    """
    unknown = sorted(set(diagnose_kwargs) - set(_DIAGNOSE_OPTIONS))
    if unknown:
        raise TypeError(f"compare() got unexpected keyword argument(s): {', '.join(unknown)}")
    sources = [_resolve_source(a, "A"), _resolve_source(b, "B")]
    if all(s.shape for s in sources) and sources[0].shape != sources[1].shape:
        (la, ha), (lb, hb) = sources[0].shape, sources[1].shape
        raise UsageError(f"A and B have different shapes: A is {la} layers x {ha} heads, B is {lb} layers x {hb} "
                         f"heads")
    options = dict(diagnose_kwargs)
    if any(s.report is None for s in sources):
        from ..attention.backends import check_backend
        from ..diagnosis.diagnose import check_prompts

        check_backend(options.get("backend") or "auto")
        if options.get("prompts") is not None:
            options["prompts"] = check_prompts(options["prompts"])
        for s in sources:
            if s.report is not None:
                options = _check_measurement(s.report, s.label, options)
        shape = next((s.shape for s in sources if s.shape), None)
        if shape is not None:  # bad targets / zone / threshold fail now, not after a diagnosis
            _normalise_selection(targets, *shape, "targets")
            _normalise_selection(zone, *shape, "zone")
        _check_drift_threshold(drift_threshold)
    reports = [s.report if s.report is not None else _diagnose_source(s, options) for s in sources]
    if reports[0].bos_mass.shape != reports[1].bos_mass.shape:
        raise UsageError(f"A and B have different shapes: A is {reports[0].n_layer} layers x {reports[0].n_head} "
                         f"heads, B is {reports[1].n_layer} layers x {reports[1].n_head} heads")
    comparison = Comparison(reports[0], reports[1], targets=targets, zone=zone, drift_threshold=drift_threshold)
    check_same_measurement(*reports, force=force)
    return comparison


# ---- heatmap --------------------------------------------------------------------------------------------------------


def _outline(ax, cells: set[tuple[int, int]], **style) -> None:
    """Draw the boundary of a set of ``(layer, head)`` cells (head on x, layer on y, cells 1 x 1 centred)."""
    from matplotlib.collections import LineCollection

    segments = []
    for layer, h in cells:
        x0, x1, y0, y1 = h - 0.5, h + 0.5, layer - 0.5, layer + 0.5
        if (layer - 1, h) not in cells:
            segments.append([(x0, y0), (x1, y0)])
        if (layer + 1, h) not in cells:
            segments.append([(x0, y1), (x1, y1)])
        if (layer, h - 1) not in cells:
            segments.append([(x0, y0), (x0, y1)])
        if (layer, h + 1) not in cells:
            segments.append([(x1, y0), (x1, y1)])
    if segments:
        ax.add_collection(LineCollection(segments, **style))


OUTCOME_MARKS = {"recovered": "R", "still-sick": "X", "newly-sick-target": "!", "iatrogenic": "!"}


def plot_delta_heatmap(comparison: Comparison, ax=None, title: str | None = None):
    """Draw the layer x head map of ``delta`` bos_mass on ``ax`` (a new figure when None); returns the Axes.

    Diverging colours centred on 0 (red: more first-token mass after, blue: less), scaled to the largest |delta|
    (at least the drift threshold); targets outlined solid, the band zone dashed; marks: R recovered, X still sick,
    ! newly sick (iatrogenic)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    c = comparison
    if ax is None:
        width = min(max(6.0, 2.0 + 0.42 * c.n_head), 40.0)
        height = min(max(3.2, 2.0 + 0.32 * c.n_layer), 40.0)
        _, ax = plt.subplots(figsize=(width, height), layout="constrained")
    delta = c.delta
    scale = max(float(delta.abs().max()), c.drift_threshold, 1e-3)
    image = ax.imshow(delta.numpy(), cmap="RdBu_r", aspect="auto", interpolation="nearest",
                      norm=Normalize(vmin=-scale, vmax=scale))
    if c.n_head * c.n_layer <= 2048:
        for layer, row in enumerate(c._outcomes()):
            for h, outcome in enumerate(row):
                if outcome:
                    dark = abs(float(delta[layer, h])) > 0.6 * scale
                    ax.text(h, layer, OUTCOME_MARKS[outcome], ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    if c.zone:
        _outline(ax, {(layer, h) for layer, heads in c.zone.items() for h in heads}, colors="0.25",
                 linewidths=1.2, linestyles="dashed")
    if c.targets:
        _outline(ax, {(layer, h) for layer, heads in c.targets.items() for h in heads}, colors="black",
                 linewidths=1.8)
    ax.set_xlim(-0.5, c.n_head - 0.5)
    ax.set_ylim(c.n_layer - 0.5, -0.5)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, c.n_head, max(1, c.n_head // 16)))
    ax.set_yticks(range(0, c.n_layer, max(1, c.n_layer // 24)))
    if title is None:
        rec, still = _selection_count(c.recovered()), _selection_count(c.still_sick())
        new = _selection_count(c.iatrogenic()) + _selection_count(c.newly_sick_targets())
        drift = [c.drift(z) for z in ZONES]
        who = "all heads" if c.targets is None else f"{_selection_count(c.targets)} targets"
        names = [Path(_model_name(r, fallback)).name or fallback for r, fallback in ((c.before, "before"),
                                                                                    (c.after, "after"))]
        title = (f"{names[0]} -> {names[1]}: delta first-token mass\n"
                 f"{who}: R recovered {rec}, X still sick {still}, ! newly sick {new}\n"
                 f"drifting (|delta| > {c.drift_threshold:g}): "
                 + ", ".join(f"{d['zone']} {d['count']}/{d['n']}" for d in drift if d["n"] or d["zone"] == "outside")
                 + ("" if not (c.targets or c.zone) else
                    "\n" + ", ".join(p for p, on in (("targets: solid outline", c.targets),
                                                      ("zone: dashed outline", c.zone)) if on)))
    ax.set_title(title, fontsize=9)
    bar = ax.figure.colorbar(image, ax=ax, label="bos_mass after - before")
    for y in (-c.drift_threshold, c.drift_threshold):
        if c.drift_threshold > 0:
            bar.ax.axhline(y, color="black", linewidth=0.8, linestyle=":")
    return ax


def save_delta_heatmap(comparison: Comparison, path) -> None:
    """Render :func:`plot_delta_heatmap` to a PNG at ``path`` (written atomically)."""

    save_figure(plot_delta_heatmap(comparison).figure, path)


# ---- command line ---------------------------------------------------------------------------------------------------


class _Spec:
    """A parsed selection spec: ``(layers, heads)`` groups, None meaning ``*`` (all), resolved once the shape is
    known."""

    def __init__(self, groups):
        self.groups = groups

    def resolve(self, n_layer: int, n_head: int) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layers, heads in self.groups:
            for layer in (range(n_layer) if layers is None else layers):
                out.setdefault(layer, []).extend(range(n_head) if heads is None else heads)
        return out


_SPEC_HELP = "expected LAYERS:HEADS such as 5-22:9-15, L5:H9,H12 or *:9-15"


def _parse_indices(text: str, kind: str, what: str, spec: str) -> list[int] | None:
    """``*`` -> None (all); else comma-separated ``N`` / ``N-M`` items of ``kind`` (``layer``/``head``, so ``L5``,
    ``H9`` work), parsed as plan specs are (:func:`~alibi_surgery.surgery.plan.match_range`)."""
    from ..surgery.plan import match_range

    if text.strip() == "*":
        return None
    out = []
    for part in text.split(","):
        try:
            lo, hi = match_range(part, kind)
        except UsageError as exc:
            if "reversed" in str(exc):
                raise UsageError(f"{what}: reversed range {part.strip()!r} in {spec!r}") from None
            raise UsageError(f"{what}: bad selection {spec!r} ({_SPEC_HELP})") from None
        out.extend(range(lo, hi + 1))
    return out


def _json_groups(path: Path, what: str) -> list:
    if not path.is_file():
        raise UsageError(f"{what} file does not exist: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{what}: cannot read {path} as JSON: {exc}") from None
    key = what.lstrip("-")
    if isinstance(data, dict) and data.get("format") == _PLAN_FORMAT:  # a surgery plan (plan --json)
        key = {"targets": "selection"}.get(key, key)
    if isinstance(data, dict) and isinstance(data.get(key), dict):
        data = data[key]
    groups = []
    try:
        if not isinstance(data, dict) or not data:
            raise ValueError
        for layer, heads in data.items():
            heads = [heads] if isinstance(heads, int) else list(heads)
            if not all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
                raise ValueError
            groups.append(([int(layer)], heads))
    except (TypeError, ValueError):
        raise UsageError(f"{what}: {path} does not hold a selection {{layer: [heads]}}") from None
    return groups


def parse_selection_spec(specs, what: str = "--targets") -> _Spec | None:
    """Parse ``LAYERS:HEADS[;LAYERS:HEADS...]`` (each side ``*`` or comma-separated indices and ``a-b`` ranges,
    optionally prefixed ``L``/``H`` as in plan specs; several specs add up), or a ``.json`` file holding
    ``{layer: [heads]}``, an object with such a ``targets`` / ``zone`` entry (for ``--targets`` / ``--zone``), or a
    surgery plan (its ``selection`` / ``zone``). Returns an object whose ``resolve(n_layer, n_head)`` gives the
    selection (ranges are checked later, against the reports), or None for no spec."""
    if specs is None:
        return None
    if isinstance(specs, str):
        specs = [specs]
    groups = []
    for spec in specs:
        if spec.strip().lower().endswith(".json"):
            groups += _json_groups(Path(spec.strip()), what)
            continue
        for group in spec.split(";"):
            if not group.strip():
                continue
            if group.count(":") != 1:
                raise UsageError(f"{what}: bad selection {spec!r} ({_SPEC_HELP})")
            layers, heads = group.split(":")
            groups.append((_parse_indices(layers, "layer", what, spec), _parse_indices(heads, "head", what, spec)))
    if not groups:
        raise UsageError(f"{what}: empty selection")
    return _Spec(groups)


def add_compare_parser(subparsers) -> None:
    """Register ``compare A B`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "compare", help="compare two diagnoses (before/after surgery): recovered, iatrogenic, drift",
        description="Per-head change in first-token mass between two diagnoses, with the heads surgery recovered, "
                    "the ones still sick, the non-targets it made sick, and drift (|delta| > threshold) per zone: "
                    "targets, in-band (the zone minus the targets) and outside. A and B are diagnosis JSON files "
                    "(diagnose --json) or BLOOM model directories, diagnosed here like diagnose does.")
    p.add_argument("a", metavar="A", help="before: a diagnosis .json or a model directory")
    p.add_argument("b", metavar="B", help="after: a diagnosis .json or a model directory")
    p.add_argument("--targets", action="append", metavar="SPEC",
                   help="heads re-initialised by surgery: LAYERS:HEADS such as 5-22:9-15 (';'-separated groups, "
                        "'*' for all, repeatable) or a JSON file {layer: [heads]}")
    p.add_argument("--zone", action="append", metavar="SPEC",
                   help="the collapse band, same syntax; its non-target heads count as in-band")
    p.add_argument("--plan", metavar="PLAN.json",
                   help="take --targets (its selection) and --zone from a surgery plan file; explicit --targets / "
                        "--zone win")
    p.add_argument("--drift-threshold", type=float, default=0.05, metavar="T",
                   help="|delta bos_mass| above this counts as drift (0.05)")
    p.add_argument("--json", metavar="OUT", help="write the comparison as JSON")
    p.add_argument("--heatmap", metavar="OUT.png", help="write a layer x head heatmap of delta first-token mass")
    p.add_argument("--table", action="store_true", help="print the per-head table, largest |delta| first")
    p.add_argument("--table-rows", type=int, default=30, metavar="N",
                   help="rows of the --table output (default 30; 0 = every head)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    p.add_argument("--force", action="store_true",
                   help="compare even when A and B were measured differently (another prompt set or --max-length); "
                        "a warning names the difference")
    g = p.add_argument_group("diagnosing a model directory (ignored for .json inputs)")
    add_prompt_options(g, exclude_help="leave query row 0 out of the averages (must match the other input's setting)")
    add_model_options(g)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_compare)


def run_compare(args) -> None:
    """The ``compare`` command: check outputs and options, compare, write the files, then print the summary."""
    outputs = check_output_paths({"json": args.json, "heatmap": args.heatmap}, overwrite=args.overwrite,
                                 inputs={"A": args.a, "B": args.b})
    if args.table_rows < 0:
        raise UsageError(f"--table-rows must be >= 0, got {args.table_rows}")
    if not math.isfinite(args.drift_threshold) or args.drift_threshold < 0:
        raise UsageError(f"--drift-threshold must be a finite number >= 0, got {args.drift_threshold}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max-length must be >= 1, got {args.max_length}")
    from ..attention.backends import check_backend

    check_backend(args.backend)
    plan = getattr(args, "plan", None)
    if plan:
        try:
            fmt = json.loads(Path(plan).read_text(encoding="utf-8")).get("format")
        except OSError:
            raise UsageError(f"--plan file does not exist or cannot be read: {plan}") from None
        except (ValueError, AttributeError):
            fmt = None
        if fmt != _PLAN_FORMAT or not plan.strip().lower().endswith(".json"):
            raise UsageError(f"--plan: {plan} is not a surgery plan .json file")
    target_spec = parse_selection_spec(args.targets or ([plan] if plan else None), "--targets")
    zone_spec = parse_selection_spec(args.zone or ([plan] if plan else None), "--zone")
    prompts = read_prompts(getattr(args, "prompt", None), getattr(args, "prompts_file", None))

    sources = [_resolve_source(args.a, "A"), _resolve_source(args.b, "B")]
    shape = next((s.shape for s in sources if s.shape), None)
    if shape is None and (target_spec or zone_spec):
        raise UsageError(f"cannot read the number of layers and heads from {args.a}'s config.json")
    targets = target_spec.resolve(*shape) if target_spec else None
    zone = zone_spec.resolve(*shape) if zone_spec else None
    inputs = [s.report if s.report is not None else s.model for s in sources]
    comparison = compare(*inputs, targets=targets, zone=zone, drift_threshold=args.drift_threshold,
                         force=args.force, device=args.device, dtype=args.dtype, backend=args.backend,
                         batch_size=args.batch_size, max_length=args.max_length, prompts=prompts,
                         exclude_first_query=args.exclude_first_query, normalize_entropy=args.normalize_entropy,
                         progress=not args.quiet)
    if "json" in outputs:  # files first, then the terminal: a closed pipe can never cost a file
        comparison.to_json(outputs["json"])
    if "heatmap" in outputs:
        save_delta_heatmap(comparison, outputs["heatmap"])
    print(comparison.format_summary())
    if args.table:
        print(comparison.format_table(max_rows=args.table_rows or None))
    for path in outputs.values():
        print(f"wrote {path}")

"""``HeadReport``: per-head first-token mass and entropy, the paper's classes, and their JSON/CSV forms.

Classes (defaults from Schallon 2026; every threshold is configurable through :class:`Thresholds`):

* ``dead``: bos_mass > 0.95
* ``bos-sink``: 0.50 < bos_mass <= 0.95
* ``low-entropy``: entropy < 0.50 and neither of the above
* ``healthy``: everything else

"Sick" (collapsed) means dead or bos-sink.

Which heads count as *healthy* in a headline count is a separate, named choice (``ours`` or ``paper``,
:mod:`~alibi_surgery.diagnosis.healthy`; the classes never change with it). :meth:`HeadReport.n_healthy` applies it;
``summary``, ``to_dict``/``to_json`` and ``format_summary`` take it as ``healthy=`` and, when given, record the
definition beside the count.

Beside the classes, and without changing them, a report may hold the extreme-token metrics
(:mod:`~alibi_surgery.diagnosis.extremes`): ``value_ratio`` and ``output_norm`` per head, ``residual_peak`` per
layer, and the ``dormant`` flag derived from ``output_norm`` at ``dormant_fraction``. Each is None when it was not
measured (reports written before them; ``value_ratio``/``output_norm`` with the eager backend); NaN where nothing was
counted (written as JSON null).

:func:`measurement_differences` says, in one place, whether two reports measured the same thing (prompt set, its
truncation, metric variant): before/after comparisons refuse or note what it lists.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import warnings
from pathlib import Path

import torch

from ..errors import UsageError
from ..io.files import atomic_write_text, read_text
from .extremes import DEFAULT_DORMANT_FRACTION, dormant_heads
from .healthy import SICK, check_healthy_definition, healthy_text, is_healthy
from .sinks import sink_rate

__all__ = ["Thresholds", "HeadReport", "read_report", "model_name", "CLASSES", "SICK", "classify", "collapse_band",
           "metric_differences", "measurement_differences", "check_same_measurement"]

CLASSES = ("healthy", "bos-sink", "dead", "low-entropy")
SINK_SWEEP = (0.4, 0.5, 0.6)  # the sink thresholds the diagnosis JSON also counts the classes at
TOP_LEVEL = ("mlp_dormancy", "key_sinks")  # metadata written as top-level JSON fields (dormancy.py, key_sinks.py)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    dead: float = 0.95
    sink: float = 0.50
    low_entropy: float = 0.50

    def __post_init__(self):
        if not 0.0 <= self.sink < self.dead <= 1.0:
            raise ValueError(f"thresholds need 0 <= sink < dead <= 1, got sink={self.sink}, dead={self.dead}")
        if self.low_entropy < 0:
            raise ValueError(f"the low-entropy threshold must be >= 0, got {self.low_entropy}")


def classify(bos_mass: float, entropy: float, t: Thresholds = Thresholds()) -> str:
    if bos_mass > t.dead:
        return "dead"
    if bos_mass > t.sink:
        return "bos-sink"
    if entropy < t.low_entropy:
        return "low-entropy"
    return "healthy"


def collapse_band(sick: list[list[bool]]) -> tuple[int, int] | None:
    """The head-index band where collapse sits: of the contiguous runs of head indices that are collapsed in at
    least half as many layers as the most-collapsed index, the run holding the most collapsed heads (ties: the
    lower indices). ``sick[layer][head]``. Returns ``(first, last)`` inclusive, or None when no head is sick."""
    n_head = len(sick[0])
    per_index = [sum(row[h] for row in sick) for h in range(n_head)]
    top = max(per_index)
    if top == 0:
        return None
    best, best_count, start = None, -1, None
    for h in range(n_head + 1):
        inside = h < n_head and 2 * per_index[h] >= top
        if inside and start is None:
            start = h
        elif not inside and start is not None:
            count = sum(per_index[start:h])
            if count > best_count:
                best, best_count = (start, h - 1), count
            start = None
    return best


@dataclasses.dataclass
class HeadReport:
    """Diagnosis of every head of one model. ``bos_mass``/``entropy`` (and ``value_ratio``/``output_norm`` when
    measured) are float32 ``[n_layer, n_head]``, ``residual_peak`` float32 ``[n_layer]``."""

    bos_mass: torch.Tensor
    entropy: torch.Tensor
    n_tokens: int
    thresholds: Thresholds = Thresholds()
    metadata: dict = dataclasses.field(default_factory=dict)
    value_ratio: torch.Tensor | None = None
    output_norm: torch.Tensor | None = None
    residual_peak: torch.Tensor | None = None
    dormant_fraction: float = DEFAULT_DORMANT_FRACTION
    sink_share: torch.Tensor | None = None  # float32 [n_layer, n_head]: diagnosis/sinks.py

    @property
    def n_layer(self) -> int:
        return self.bos_mass.shape[0]

    @property
    def n_head(self) -> int:
        return self.bos_mass.shape[1]

    @property
    def classes(self) -> list[list[str]]:
        return [[classify(float(b), float(e), self.thresholds) for b, e in zip(brow, erow)]
                for brow, erow in zip(self.bos_mass.tolist(), self.entropy.tolist())]

    def summary(self, healthy: str | None = None) -> dict:
        """Counts per class; with ``healthy`` (``"ours"`` or ``"paper"``, :mod:`~alibi_surgery.diagnosis.healthy`) also ``healthy_definition`` and
        ``healthy_heads``, the heads healthy under it (:meth:`n_healthy`)."""
        flat = [c for row in self.classes for c in row]
        out = {"healthy": flat.count("healthy"), "bos_sink": flat.count("bos-sink"), "dead": flat.count("dead"),
               "low_entropy": flat.count("low-entropy")}
        if healthy is not None:
            out.update(healthy_definition=check_healthy_definition(healthy), healthy_heads=self.n_healthy(healthy))
        return out

    def n_healthy(self, healthy: str = "ours") -> int:
        """The heads that count as healthy under the definition ``healthy`` (module docstring)."""
        check_healthy_definition(healthy)
        return sum(is_healthy(c, healthy) for row in self.classes for c in row)

    @property
    def dormant(self) -> list[list[bool]] | None:
        """Per head: output norm below ``dormant_fraction`` x its layer's median head; None when not measured."""
        return None if self.output_norm is None else dormant_heads(self.output_norm, self.dormant_fraction).tolist()

    def sick_mask(self) -> list[list[bool]]:
        return [[c in SICK for c in row] for row in self.classes]

    def sick_heads(self) -> dict[int, list[int]]:
        """Collapsed heads as a selection ``{layer: [heads]}`` (layers without any are left out)."""
        return {layer: [h for h, s in enumerate(row) if s] for layer, row in enumerate(self.sick_mask()) if any(row)}

    def band(self) -> tuple[int, int] | None:
        return collapse_band(self.sick_mask())

    def to_dict(self, healthy: str | None = None) -> dict:
        """The JSON form; ``healthy`` as in :meth:`summary` (its ``summary`` block then names the definition)."""
        classes = self.classes
        heads = [{"layer": layer, "head": h, "bos_mass": float(self.bos_mass[layer, h]),
                  "entropy": float(self.entropy[layer, h]), "class": classes[layer][h]}
                 for layer in range(self.n_layer) for h in range(self.n_head)]
        metric = dict(self.metadata.get("metric", {}))
        metric["thresholds"] = dataclasses.asdict(self.thresholds)
        top = {k: self.metadata[k] for k in TOP_LEVEL if k in self.metadata}
        dormant = self.dormant
        for entry in heads:
            at = entry["layer"], entry["head"]
            if self.value_ratio is not None:
                entry["value_ratio"] = _number(self.value_ratio[at])
            if self.output_norm is not None:
                entry["output_norm"] = _number(self.output_norm[at])
                entry["dormant"] = dormant[at[0]][at[1]]
            if self.sink_share is not None:
                entry["sink_share"] = float(self.sink_share[at])
        if self.sink_share is not None:
            top["sink_rate"] = sink_rate(self.sink_share)
        if self.output_norm is not None:
            metric["dormant_fraction"] = self.dormant_fraction
        if self.residual_peak is not None:
            top["residual_peak"] = [_number(x) for x in self.residual_peak]
        return {"model": self.metadata.get("model"), "n_layer": self.n_layer, "n_head": self.n_head,
                "n_tokens": self.n_tokens, "metric": metric, "heads": heads, "summary": self.summary(healthy), **top,
                "metadata": {k: v for k, v in self.metadata.items() if k not in ("model", "metric", *TOP_LEVEL)}}

    def class_counts_by_sink_threshold(self, sinks=SINK_SWEEP) -> dict:
        """Class counts (as :meth:`summary`) with the sink threshold moved to each of ``sinks``, the dead and
        low-entropy thresholds kept; keyed by the threshold as text (``"0.4"``). None for a value not below the
        dead threshold (no such class split)."""
        out = {}
        for sink in sinks:
            if not 0.0 <= sink < self.thresholds.dead:
                out[f"{sink:g}"] = None
                continue
            t = dataclasses.replace(self.thresholds, sink=sink)
            flat = [classify(float(b), float(e), t) for b, e in zip(self.bos_mass.flatten().tolist(),
                                                                   self.entropy.flatten().tolist())]
            out[f"{sink:g}"] = {"healthy": flat.count("healthy"), "bos_sink": flat.count("bos-sink"),
                                "dead": flat.count("dead"), "low_entropy": flat.count("low-entropy")}
        return out

    def to_json(self, path, healthy: str | None = None) -> None:
        """:meth:`to_dict` (``healthy`` as there) plus ``class_counts_by_sink_threshold``
        (:meth:`class_counts_by_sink_threshold`)."""
        data = dict(self.to_dict(healthy), class_counts_by_sink_threshold=self.class_counts_by_sink_threshold())
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")

    def to_csv(self, path) -> None:
        """One row per head; the extreme-token columns (``value_ratio``, ``output_norm``, ``dormant``, and
        ``residual_peak``: the layer's value on each of its heads) only when measured, empty where NaN."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        data = self.to_dict()
        extra = [k for k in ("value_ratio", "output_norm", "dormant") if k in data["heads"][0]]
        peak = data.get("residual_peak")
        writer.writerow(["layer", "head", "bos_mass", "entropy", "class", *extra]
                        + (["residual_peak"] if peak is not None else []))
        for h in data["heads"]:
            row = [h["layer"], h["head"], f"{h['bos_mass']:.6f}", f"{h['entropy']:.6f}", h["class"]]
            row += [_cell(h[k]) for k in extra] + ([_cell(peak[h["layer"]])] if peak is not None else [])
            writer.writerow(row)
        atomic_write_text(path, buf.getvalue())

    @classmethod
    def from_dict(cls, data: dict) -> "HeadReport":
        """The inverse of :meth:`to_dict`."""
        bos = torch.zeros(data["n_layer"], data["n_head"])
        ent = torch.zeros_like(bos)
        extremes = {k: torch.full_like(bos, torch.nan) for k in ("value_ratio", "output_norm", "sink_share")
                    if any(k in h for h in data["heads"])}  # absent in reports written before them
        for h in data["heads"]:
            bos[h["layer"], h["head"]] = h["bos_mass"]
            ent[h["layer"], h["head"]] = h["entropy"]
            for k, grid in extremes.items():
                grid[h["layer"], h["head"]] = _from_number(h.get(k))
        metric = dict(data.get("metric") or {})
        thresholds = Thresholds(**metric.pop("thresholds", {}))
        fraction = float(metric.pop("dormant_fraction", DEFAULT_DORMANT_FRACTION))
        metadata = dict(data.get("metadata") or {}, model=data.get("model"), metric=metric,
                        **{k: data[k] for k in TOP_LEVEL if k in data})
        peak = data.get("residual_peak")
        peak = None if peak is None else torch.tensor([_from_number(x) for x in peak], dtype=torch.float32)
        return cls(bos, ent, data["n_tokens"], thresholds, metadata, extremes.get("value_ratio"),
                   extremes.get("output_norm"), peak, fraction, extremes.get("sink_share"))

    @classmethod
    def from_json(cls, path) -> "HeadReport":
        """The report in a diagnosis JSON file, checked (see :func:`read_report`)."""
        return read_report(path)

    def format_summary(self, healthy: str | None = None) -> str:
        """Compact terminal summary: counts per class, sick heads per layer, and the sick head-index band; with
        ``healthy`` also the healthy heads under that definition, named."""
        s = self.summary(healthy)
        total = self.n_layer * self.n_head
        sick = s["dead"] + s["bos_sink"]
        lines = [f"{self.metadata.get('model', 'model')}: {self.n_layer} layers x {self.n_head} heads, "
                 f"{self.n_tokens} tokens",
                 f"  healthy {s['healthy']}  bos-sink {s['bos_sink']}  dead {s['dead']}  "
                 f"low-entropy {s['low_entropy']}  (collapsed {sick}/{total} = {100.0 * sick / total:.1f}%)"]
        if healthy is not None:
            lines.append(f"  {healthy_text(healthy)}: {s['healthy_heads']}/{total} = "
                         f"{100.0 * s['healthy_heads'] / total:.1f}%")
        per_layer = [sum(row) for row in self.sick_mask()]
        lines.append("  collapsed per layer: " + " ".join(f"L{i}:{n}" for i, n in enumerate(per_layer)))
        band = self.band()
        lines.append("  collapse band: " + ("none" if band is None else f"H{band[0]}-H{band[1]}"))
        if self.sink_share is not None:
            eps = self.metadata.get("metric", {}).get("sink_epsilon")
            lines.append(f"  first-token sink rate (Gu et al., epsilon {eps}): {sink_rate(self.sink_share):.1f}%")
        if self.output_norm is not None:
            n = sum(map(sum, self.dormant))
            lines.append(f"  dormant (output norm < {self.dormant_fraction:g} x layer median): {n}/{total}")
        if self.value_ratio is not None:
            lines.append(f"  value_ratio median {self.value_ratio.nanmedian().item():.3g}, "
                         f"min {self.value_ratio.nan_to_num(torch.inf).min().item():.3g}")
        if self.residual_peak is not None and not self.residual_peak.isnan().all():
            top = int(self.residual_peak.nan_to_num(-torch.inf).argmax())
            lines.append(f"  residual_peak max {self.residual_peak[top].item():.3g} at L{top}")
        return "\n".join(lines)


def _number(x) -> float | None:
    """A JSON number: None for NaN."""
    x = float(x)
    return None if x != x else x


def _from_number(x) -> float:
    return float("nan") if x is None else float(x)


def _cell(x) -> str:
    if isinstance(x, bool):
        return str(x).lower()
    return "" if x is None else f"{x:.6f}"


METRIC_VARIANTS = ("exclude_first_query", "normalize_entropy")


def metric_differences(a: HeadReport, b: HeadReport, labels=("before", "after")) -> list[str]:
    """The metric variants (``exclude_first_query``, ``normalize_entropy``) recorded in both reports that differ."""
    ma, mb = a.metadata.get("metric") or {}, b.metadata.get("metric") or {}
    return [f"{key} is {bool(ma[key])} {labels[0]} and {bool(mb[key])} {labels[1]}" for key in METRIC_VARIANTS
            if key in ma and key in mb and bool(ma[key]) != bool(mb[key])]


def measurement_differences(a: HeadReport, b: HeadReport, labels=("before", "after")) -> list[str]:
    """How ``a`` and ``b`` were measured differently, one line each (empty: the same measurement as far as their
    metadata tells), in this order:

    * the model family (``metadata["family"]``): a before/after comparison is of one model, and two families' heads
      are not the same heads;
    * ``max_length``, unless both prompt-set fingerprints match (then truncation changed nothing: same token ids);
    * the metric variants (:func:`metric_differences`);
    * the prompt set: the ``prompt_set_fingerprint`` values when both reports have one; otherwise (reports written
      before fingerprints) only the token counts can tell, so prompt sets with equal counts pass unnoticed.

    Class thresholds are not compared here (:class:`~alibi_surgery.analysis.comparison.Comparison` refuses different
    ones).
    """
    la, lb = labels
    da, db = a.metadata, b.metadata
    fa, fb = da.get("prompt_set_fingerprint"), db.get("prompt_set_fingerprint")
    out = []
    if da.get("family") and db.get("family") and da["family"] != db["family"]:
        out.append(f"they are two model families: {da['family']} {la}, {db['family']} {lb}")
    if not (fa and fa == fb) and "max_length" in da and "max_length" in db and da["max_length"] != db["max_length"]:
        out.append(f"max_length differs: {da['max_length']} {la}, {db['max_length']} {lb}")
    out += metric_differences(a, b, labels)
    if fa and fb:
        if fa != fb:
            out.append(f"the prompt sets differ: {la} has {da.get('n_prompts', '?')} prompts, {a.n_tokens} tokens "
                       f"(fingerprint {fa}), {lb} {db.get('n_prompts', '?')} prompts, {b.n_tokens} tokens "
                       f"(fingerprint {fb})")
        return out
    ta, tb = da.get("prompt_tokens"), db.get("prompt_tokens")
    if a.n_tokens != b.n_tokens:
        out.append(f"the prompts differ: {a.n_tokens} tokens {la}, {b.n_tokens} tokens {lb}")
    elif ta is not None and tb is not None and sorted(ta) != sorted(tb):
        out.append(f"the prompts differ: the same {a.n_tokens} tokens in all, but not the same token count per "
                   f"prompt")
    return out


def check_same_measurement(a: HeadReport, b: HeadReport, *, force: bool = False, labels=("A", "B")) -> None:
    """Refuse (UsageError naming the first of :func:`measurement_differences`) to compare two reports measured
    differently, or with ``force`` warn and go on. A report without a prompt fingerprint (written by an older
    version) gives a warning that the prompt sets cannot be checked."""
    unknown = [label for label, r in zip(labels, (a, b)) if not r.metadata.get("prompt_set_fingerprint")]
    if unknown:
        warnings.warn(f"{' and '.join(unknown)} {'has' if len(unknown) == 1 else 'have'} no prompt fingerprint "
                      f"(written by an older version): the prompt sets cannot be checked", stacklevel=3)
    differences = measurement_differences(a, b, labels)
    if differences and not force:
        raise UsageError(f"{labels[0]} and {labels[1]} were measured differently: {differences[0]}; pass force=True "
                         f"to compare them anyway")
    if differences:
        warnings.warn(f"comparing anyway (force=True), although {labels[0]} and {labels[1]} were measured differently: "
                      f"{'; '.join(differences)}", stacklevel=3)


def read_report(path, label: str = "report", *, not_a: tuple[str, str] | None = None) -> HeadReport:
    """A diagnosis JSON file (what ``diagnose --json`` writes), checked: one-line errors for a missing, unreadable
    or non-UTF-8 file, invalid JSON, a grid of heads that is not complete, and (``not_a``: a ``kind`` value and its
    name) another of our JSON kinds."""
    path = Path(path)
    try:
        data = json.loads(read_text(path, what=label))
    except ValueError as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{label}: {path} is not valid JSON: {exc}") from None
    if not_a is not None and isinstance(data, dict) and data.get("kind") == not_a[0]:
        raise UsageError(f"{label}: {path} is {not_a[1]}, not a diagnosis report (write one with diagnose --json)")
    try:
        n_layer, n_head, heads = data["n_layer"], data["n_head"], data["heads"]
        if not (isinstance(n_layer, int) and isinstance(n_head, int) and n_layer > 0 and n_head > 0):
            raise ValueError("bad shape")
        seen = {(h["layer"], h["head"]) for h in heads}
        if len(heads) != n_layer * n_head or len(seen) != len(heads) or \
                any(not (0 <= layer < n_layer and 0 <= h < n_head) for layer, h in seen):
            raise ValueError("heads do not cover the grid")
        report = HeadReport.from_dict(data)
    except (KeyError, TypeError, ValueError, IndexError):
        raise UsageError(f"{label}: {path} is not a diagnosis report (expected the JSON that diagnose --json "
                         f"writes)") from None
    if not report.metadata.get("model"):
        report.metadata["model"] = str(path)
    return report


def model_name(report: HeadReport, fallback: str) -> str:
    """The report's ``model`` metadata, or ``fallback``."""
    return str(report.metadata.get("model") or fallback)

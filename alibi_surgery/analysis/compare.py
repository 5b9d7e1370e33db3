"""Compare two diagnoses (before and after surgery): :func:`compare` and the ``compare`` command's work.

    alibi-surgery compare A B [--targets SPEC] [--zone SPEC] [--plan PLAN.json] [--json OUT] [--heatmap OUT.png]
                              [--table] [--drift-threshold T] [--force]
    alibi-surgery compare STOCK A B ... --panels OUT.png [--panel-scale 0.4] [--annotate-threshold 0.15] [--json OUT]

(several conditions: :mod:`alibi_surgery.analysis.panels`; ``--json`` then writes the panels' numbers)

``A`` and ``B`` are each a :class:`~alibi_surgery.diagnosis.report.HeadReport`, a diagnosis JSON (``diagnose
--json``) or a model directory of any registered family, which is then diagnosed here with the same options as
``diagnose`` (default prompts unless ``--prompt``/``--prompts-file``). The result is a
:class:`~alibi_surgery.analysis.comparison.Comparison` (outcomes, zones, drift). :func:`compare` refuses two
diagnoses measured differently (prompt set, truncation: :func:`~alibi_surgery.diagnosis.report.measurement_differences`)
unless ``force``. ``--targets`` / ``--zone`` take the head-spec grammar of :mod:`alibi_surgery.diagnosis.selection` or
a JSON file (:func:`parse_selection_spec`). The parser is :mod:`alibi_surgery.cli.compare`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from pathlib import Path

import torch

from ..errors import UsageError
from ..io.files import check_output_paths
from ..diagnosis.prompts import read_prompts
from ..diagnosis.report import METRIC_VARIANTS, HeadReport, check_same_measurement, read_report
from ..diagnosis.selection import PLAN_FORMAT, HeadSpec, SpecError, check_selection, parse_spec
from ..viz.comparison_figures import save_delta_heatmap
from ..diagnosis.healthy import check_healthy_definition
from .comparison import KIND, Comparison, check_drift_threshold, thresholds_text

__all__ = ["compare", "parse_selection_spec", "run_compare", "run_arm"]

_DIAGNOSE_OPTIONS = ("device", "dtype", "backend", "batch_size", "max_length", "prompts", "exclude_first_query",
                     "normalize_entropy", "thresholds", "progress")


# ---- inputs ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    label: str
    report: HeadReport | None = None
    model: str | None = None
    shape: tuple[int, int] | None = None
    arm: str | None = None  # the surgery arm that made a model directory (run_arm)


def run_arm(model_dir) -> str | None:
    """The surgery arm (treatment, gradient-only or a control) that made the model directory ``model_dir``, read
    from the run record beside it: ``OUT/final`` -> ``OUT/report.json`` or ``OUT/run.json``,
    ``OUT/checkpoints/step-N`` -> ``OUT/run.json``; None when there is none (a model not made by repair, or by a
    version that did not record arms)."""
    path = Path(model_dir)
    for record in (path.parent / "report.json", path.parent / "run.json", path.parent.parent / "run.json"):
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("arm"), str):
            return data["arm"]
    return None


def _resolve_source(x, label: str) -> _Source:
    """A HeadReport, a diagnosis ``.json`` file, or a model directory of a registered family (or cached hub id)."""
    if isinstance(x, HeadReport):
        return _Source(label, report=x, shape=(x.n_layer, x.n_head))
    if not isinstance(x, (str, Path)):
        raise TypeError(f"{label} must be a HeadReport or a path, got {type(x).__name__}")
    path = Path(x)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise UsageError(f"{label} is neither a diagnosis .json file nor a model directory: {path}")
        report = read_report(path, label, not_a=(KIND, "a comparison"))
        return _Source(label, report=report, shape=(report.n_layer, report.n_head))
    if path.is_dir() or (not path.exists() and path.suffix.lower() != ".json" and str(x).count("/") == 1
                         and not str(x).startswith((".", "/"))):
        from ..io.loading import resolve_model_dir

        try:
            resolved = resolve_model_dir(str(x))
        except UsageError as exc:
            raise UsageError(f"{label}: {exc}") from None
        return _Source(label, model=str(x), shape=_model_shape(resolved, label), arm=run_arm(path))
    if not path.exists():
        raise UsageError(f"{label} does not exist: {path}")
    raise UsageError(f"{label} is neither a diagnosis .json file nor a model directory: {path}")


def _model_shape(model_dir: Path, label: str) -> tuple[int, int]:
    """``(n_layer, n_head)`` of a model directory, from its family's layout (a one-line error for a model no
    registered family handles)."""
    from ..families import family_for
    from ..io.loading import load_config

    try:
        config = load_config(str(model_dir))
    except UsageError as exc:
        raise UsageError(f"{label}: {exc}") from None
    layout = family_for(config).layout(config)
    return layout.n_layer, layout.n_head


def _diagnose_source(source: _Source, options: dict) -> HeadReport:
    from ..diagnosis.diagnose import diagnose
    from ..io.loading import load_model
    from ..diagnosis.prompts import DEFAULT_PROMPTS

    model, tokenizer = load_model(source.model, dtype=options.get("dtype"), device=options.get("device"))
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


def _with_arm(report: HeadReport, arm: str | None) -> HeadReport:
    """``report`` with the surgery arm of the model it diagnosed in its metadata (``arm``), when there is one: the
    comparison's summary shows it beside the model's name."""
    if arm is not None:
        report.metadata["arm"] = arm
    return report


def _check_measurement(report: HeadReport, label: str, options: dict) -> dict:
    """Options for diagnosing a model that is compared with ``report``: class thresholds and max_length default to
    the report's, and explicit thresholds or metric options that differ from it are refused before any diagnosis."""
    options = dict(options)
    if options.get("thresholds") is None:
        options["thresholds"] = report.thresholds
    elif options["thresholds"] != report.thresholds:
        raise UsageError(f"{label} was classified with thresholds {thresholds_text(report.thresholds)}, not "
                         f"{thresholds_text(options['thresholds'])}")
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
            healthy: str | None = None, **diagnose_kwargs) -> Comparison:
    """Compare diagnosis ``a`` (before) with ``b`` (after).

    ``a``/``b``: a :class:`HeadReport`, a path to a diagnosis JSON, or a model directory of a registered family,
    which is diagnosed with ``diagnose_kwargs`` (``device``, ``dtype``, ``backend``, ``batch_size``, ``max_length``,
    ``prompts`` (default: the built-in set), ``exclude_first_query``, ``normalize_entropy``, ``thresholds``
    (default: those of the other input when it is a report), ``progress``; ignored for reports; ``max_length`` also
    defaults to the other report's). Inputs, shapes, targets, zone and options are all checked before anything is
    diagnosed; two model directories are loaded one after the other.

    Two diagnoses measured differently (:func:`~alibi_surgery.diagnosis.report.measurement_differences`: prompt set,
    max_length) raise a UsageError naming the first difference, or with ``force`` a UserWarning; a report without a
    prompt fingerprint (written by an older version) gives a warning that its prompt set cannot be checked.
    ``healthy``: the definition of healthy heads the summaries count (:class:`Comparison`), None to leave them out.
    """
    if healthy is not None:
        check_healthy_definition(healthy)
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
            for selection, what in ((targets, "targets"), (zone, "zone")):
                if selection is not None:
                    check_selection(selection, *shape, what=what, allow_empty=True)
        check_drift_threshold(drift_threshold)
    reports = [s.report if s.report is not None else _with_arm(_diagnose_source(s, options), s.arm)
               for s in sources]
    if reports[0].bos_mass.shape != reports[1].bos_mass.shape:
        raise UsageError(f"A and B have different shapes: A is {reports[0].n_layer} layers x {reports[0].n_head} "
                         f"heads, B is {reports[1].n_layer} layers x {reports[1].n_head} heads")
    comparison = Comparison(reports[0], reports[1], targets=targets, zone=zone, drift_threshold=drift_threshold,
                            healthy=healthy)
    check_same_measurement(*reports, force=force)
    return comparison


# ---- command line ---------------------------------------------------------------------------------------------------


_SPEC_HELP = "expected LAYERS:HEADS such as 5-22:9-15, L5:H9,H12 or *:9-15"


def _text_spec(spec: str, what: str) -> HeadSpec:
    """One text spec in the grammar of :mod:`alibi_surgery.diagnosis.selection`, its errors led by ``what``."""
    try:
        return parse_spec(spec)
    except SpecError as exc:
        if exc.kind == "empty":
            raise UsageError(f"{what}: empty selection") from None
        if exc.kind == "reversed":
            raise UsageError(f"{what}: reversed range {exc.part!r} in {spec.strip()!r}") from None
        raise UsageError(f"{what}: bad selection {spec.strip()!r} ({_SPEC_HELP}): {exc}") from None


def _json_groups(path: Path, what: str) -> list:
    if not path.is_file():
        raise UsageError(f"{what} file does not exist: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{what}: cannot read {path} as JSON: {exc}") from None
    key = what.lstrip("-")
    if isinstance(data, dict) and data.get("format") == PLAN_FORMAT:  # a surgery plan (plan --json)
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
            groups.append((((int(layer), int(layer)),), tuple((h, h) for h in heads)))
    except (TypeError, ValueError):
        raise UsageError(f"{what}: {path} does not hold a selection {{layer: [heads]}}") from None
    return groups


def parse_selection_spec(specs, what: str = "--targets") -> HeadSpec | None:
    """Parse ``--targets`` / ``--zone`` values: each a head spec (the one grammar of
    :mod:`alibi_surgery.diagnosis.selection`: ``5-22:9-15``, ``L5:H9,H12``, ``*:9-15``; several specs add up), or a
    ``.json`` file holding ``{layer: [heads]}``, an object with such a ``targets`` / ``zone`` entry (for
    ``--targets`` / ``--zone``), or a surgery plan (its ``selection`` / ``zone``). Returns a
    :class:`~alibi_surgery.diagnosis.selection.HeadSpec` whose ``resolve(n_layer, n_head, what)`` gives the checked
    selection once the reports' shape is known, or None for no spec."""
    if specs is None:
        return None
    if isinstance(specs, str):
        specs = [specs]
    spec = HeadSpec(())
    for text in specs:
        if text.strip().lower().endswith(".json"):
            spec += HeadSpec(tuple(_json_groups(Path(text.strip()), what)))
        else:
            spec += _text_spec(text, what)
    if not spec.groups:
        raise UsageError(f"{what}: empty selection")
    return spec


def run_compare(args) -> None:
    """The ``compare`` command: check outputs and options, compare, write the files, then print the summary."""
    inputs = [x for x in (args.a, args.b, *(getattr(args, "more", None) or [])) if x is not None]
    panels = getattr(args, "panels", None)
    if len(inputs) < 2:
        raise UsageError("compare needs two inputs (A B), or with --panels a stock model and at least one condition "
                         "(STOCK A ...)" if panels else "compare needs two inputs: A (before) and B (after)")
    if len(inputs) > 2 and not panels:
        raise UsageError(f"{len(inputs)} inputs given: compare takes two (A B), or a stock model and several "
                         f"conditions with --panels OUT.png")
    if len(inputs) > 2 and (args.heatmap or args.table):
        raise UsageError(f"--{'heatmap' if args.heatmap else 'table'} shows one pair: with several conditions use "
                         f"--panels (and --json)")
    outputs = check_output_paths({"json": args.json, "heatmap": args.heatmap, "panels": panels},
                                 overwrite=args.overwrite, figures=("heatmap", "panels"),
                                 inputs={chr(ord("A") + i): x for i, x in enumerate(inputs[:26])})
    if panels:
        from .panels import check_panel_options

        check_panel_options(args.panel_scale, args.annotate_threshold)
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
    healthy = check_healthy_definition(getattr(args, "healthy", "ours"))
    plan = getattr(args, "plan", None)
    if plan:
        try:
            fmt = json.loads(Path(plan).read_text(encoding="utf-8")).get("format")
        except OSError:
            raise UsageError(f"--plan file does not exist or cannot be read: {plan}") from None
        except (ValueError, AttributeError):
            fmt = None
        if fmt != PLAN_FORMAT or not plan.strip().lower().endswith(".json"):
            raise UsageError(f"--plan: {plan} is not a surgery plan .json file")
    target_spec = parse_selection_spec(args.targets or ([plan] if plan else None), "--targets")
    zone_spec = parse_selection_spec(args.zone or ([plan] if plan else None), "--zone")
    prompts = read_prompts(getattr(args, "prompt", None), getattr(args, "prompts_file", None),
                           field=getattr(args, "text_field", "text"))

    sources = [_resolve_source(x, chr(ord("A") + i) if i < 26 else f"input {i + 1}") for i, x in enumerate(inputs)]
    shape = next((s.shape for s in sources if s.shape), None)
    if shape is None and (target_spec or zone_spec):
        raise UsageError(f"cannot read the number of layers and heads from {args.a}'s config.json")
    targets = target_spec.resolve(*shape, what="targets") if target_spec else None
    zone = zone_spec.resolve(*shape, what="zone") if zone_spec else None
    given = [s.report if s.report is not None else s.model for s in sources]
    options = dict(targets=targets, zone=zone, drift_threshold=args.drift_threshold, force=args.force,
                   device=args.device, dtype=args.dtype, backend=args.backend, batch_size=args.batch_size,
                   max_length=args.max_length, prompts=prompts, exclude_first_query=args.exclude_first_query,
                   normalize_entropy=args.normalize_entropy, progress=not args.quiet)
    if len(given) > 2:
        from .panels import compare_many

        comparisons = compare_many(given[0], given[1:], **options)
    else:
        comparisons = [compare(*given, **options)]
    for c in comparisons:
        c.healthy = healthy
    comparison = comparisons[0]
    panel_data = None
    if panels:
        from .panels import panels_dict

        labels = [f"{x} [arm {s.arm}]" if s.arm else str(x) for x, s in zip(inputs[1:], sources[1:])]
        panel_data = panels_dict(comparisons, labels, scale=args.panel_scale,
                                 annotate_threshold=args.annotate_threshold)
    if "json" in outputs:  # files first, then the terminal: a closed pipe can never cost a file
        if len(comparisons) > 1:
            from .panels import write_panels_json

            write_panels_json(panel_data, outputs["json"])
        else:
            comparison.to_json(outputs["json"])
    if "heatmap" in outputs:
        save_delta_heatmap(comparison, outputs["heatmap"])
    if "panels" in outputs:
        from ..viz.panel_figures import save_panels

        save_panels(panel_data, outputs["panels"])
    if len(comparisons) > 1:
        from .panels import format_panels

        print(format_panels(panel_data))
        for path in outputs.values():
            print(f"wrote {path}")
        return
    print(comparison.format_summary())
    if args.table:
        print(comparison.format_table(max_rows=args.table_rows or None))
    for path in outputs.values():
        print(f"wrote {path}")

"""What a surgery pass depends on, in three objects instead of two dozen loose arguments.

* :class:`RepairSettings`: everything that changes what training computes (recipe, seed, checkpoint
  schedule). It is saved in every checkpoint, and ``resume=True`` refuses a checkpoint made with other settings
  (:func:`same_settings`).
* :class:`PlanOptions`: which heads the pass works on (``heads``, ``band``, ``layers``, ``freeze``, ``include``, a
  saved ``report``, the diagnosis ``prompts``, ``allow_empty``, the memory ``budget``). A resumed pass reads its plan
  back from the checkpoint, so these are not compared on resume.
* :class:`RunOptions`: where the data comes from and how the pass runs (``corpus``, ``eval_text``, ``eval_prompts``,
  ``device``, ``dtype``, ``backend``, ``save_dtype``, ``progress``).

:class:`RepairJob` holds the three; :meth:`RepairJob.from_options` builds one from the keyword arguments that
:func:`~alibi_surgery.surgery.repair.repair_pass` accepts (each field name of the three is a keyword; anything else
is a ``TypeError``, as for any Python call).

The arms (:attr:`RepairSettings.arm`, recorded in ``run.json``, ``report.json`` and every checkpoint): ``treatment``
(re-initialise the targets and train them, the default), ``gradient-only`` (``reinit=False``: train the targets from
their current values, the paper's control), and the ``control`` ones, ``reinit-only``, ``random-healthy`` and
``ablate`` (:mod:`alibi_surgery.surgery.controls`; docs/surgery.md, "Control arms").
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import UsageError

__all__ = ["RepairSettings", "PlanOptions", "RunOptions", "RepairJob", "same_settings", "settings_differences",
           "CONTROLS", "ARMS"]

CONTROLS = ("reinit-only", "random-healthy", "ablate")  # the arms the control option names
ARMS = ("treatment", "gradient-only", *CONTROLS)


@dataclasses.dataclass
class RepairSettings:
    """Everything a run depends on (saved in every checkpoint; a resumed run must use the same)."""

    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of all steps spent in linear warm-up
    epochs: int = 1
    patience: int | None = None  # checkpoints without held-out improvement before stopping
    max_grad_norm: float = 1.0
    init: str = "xavier_uniform"
    seed: int = 0
    save_every_steps: int | None = None
    checkpointing: bool = True
    stochastic_rounding: bool = False  # alias of optimizer_precision="stochastic" (check() keeps the two in step)
    diag_max_length: int | None = 128
    optimizer_precision: str = "master"  # master, stochastic or bf16 (HeadSlicedAdamW's precision)
    schedule: str = "default"  # default (lr_at) or paper (paper_lr)
    reinit: bool = True  # False: the paper's gradient-only control (train the heads from their current values)
    eval_convention: str = "tokens"  # how eval_prompts' per-text losses combine (analysis.perplexity)
    control: str | None = None  # a control arm (CONTROLS); None: treatment, or gradient-only with reinit=False
    save_every_epochs: int = 1  # checkpoint at the end of every N-th epoch (and of the last)
    sink_penalty: float = 0.0  # adds this times the targets' mean first-token mass to the loss (0: none)
    objective: str = "repair"  # repair (the language-model loss) or sparsify (mean entropy under a loss constraint)
    loss_slack: float = 0.05  # sparsify: the loss may rise this many nats per token above the model's own
    geco_rate: float = 0.05  # sparsify: step of the GECO multiplier's log per optimizer step, per nat of excess
    train: str = "slices"  # what trains: slices (the selected heads') or full (every parameter; sparsify only)

    @property
    def arm(self) -> str:
        """The arm this run is (:data:`ARMS`, or ``sparsify``)."""
        if self.objective == "sparsify":
            return "sparsify"
        return self.control or ("treatment" if self.reinit else "gradient-only")

    @property
    def trains(self) -> bool:
        """Whether the arm trains (``reinit-only`` and ``ablate`` do not)."""
        return self.arm not in ("reinit-only", "ablate")

    def check(self) -> None:
        from ..analysis.perplexity import CONVENTIONS
        from .optim import PRECISIONS
        from .schedule import SCHEDULES

        if self.stochastic_rounding and self.optimizer_precision == "master":
            self.optimizer_precision = "stochastic"
        if self.stochastic_rounding and self.optimizer_precision != "stochastic":
            raise UsageError(f"stochastic_rounding=True is optimizer_precision='stochastic'; it contradicts "
                             f"optimizer_precision={self.optimizer_precision!r}")
        self.stochastic_rounding = self.optimizer_precision == "stochastic"
        for name, value, choices in (("optimizer_precision", self.optimizer_precision, PRECISIONS),
                                     ("eval_convention", self.eval_convention, CONVENTIONS),
                                     ("schedule", self.schedule, SCHEDULES)):
            if value not in choices:
                raise UsageError(f"unknown {name}={value!r}; choose one of {', '.join(choices)}")
        if self.control is not None and self.control not in CONTROLS:
            raise UsageError(f"unknown control={self.control!r}; choose one of {', '.join(CONTROLS)}")
        if self.control is not None and not self.reinit:
            raise UsageError(f"control={self.control!r} contradicts reinit=False (the gradient-only arm): choose one "
                             f"arm")
        for name, least in (("seq_len", 1), ("batch_size", 1), ("grad_accum", 1), ("epochs", 0), ("patience", 1),
                            ("save_every_steps", 1), ("save_every_epochs", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise UsageError(f"{name}={value}: must be >= {least}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"seed={self.seed!r}: must be a whole number >= 0")
        if self.seed >= 2 ** 63:
            raise UsageError(f"seed={self.seed}: must be below 2**63")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"warmup={self.warmup}: must be a fraction in [0, 1)")
        for name, value, rule in (("lr", self.lr, "a finite number >= 0"),
                                  ("max_grad_norm", self.max_grad_norm, "a finite number > 0"),
                                  ("weight_decay", self.weight_decay, "a finite number >= 0"),
                                  ("sink_penalty", self.sink_penalty, "a finite number >= 0")):
            if not math.isfinite(value) or value < 0 or (value == 0 and name == "max_grad_norm"):
                raise UsageError(f"{name}={value}: must be {rule}")
        if self.objective not in ("repair", "sparsify"):
            raise UsageError(f"unknown objective={self.objective!r}; choose repair or sparsify")
        if self.objective == "sparsify" and (self.reinit or self.control is not None):
            raise UsageError("objective='sparsify' trains the heads from their current values: reinit=False and no "
                             "control")
        if self.train not in ("slices", "full"):
            raise UsageError(f"unknown train={self.train!r}; choose slices or full")
        if self.train == "full" and self.objective != "sparsify":
            raise UsageError("train='full' is sparsify's: repair trains the selected heads' slices")
        for name, value in (("loss_slack", self.loss_slack), ("geco_rate", self.geco_rate)):
            if not math.isfinite(value) or value <= 0:
                raise UsageError(f"{name}={value}: must be a finite number > 0")
        if self.sink_penalty and not self.trains:
            raise UsageError(f"sink_penalty={self.sink_penalty} needs training, and the {self.arm} arm trains "
                             f"nothing")


def same_settings(saved: dict, settings: RepairSettings) -> bool:
    """Whether a checkpoint's recorded settings are ``settings``, both normalised by :meth:`RepairSettings.check`;
    options added since the checkpoint was written take their defaults (an older run still resumes)."""
    return not settings_differences(saved, settings)


def settings_differences(saved: dict, settings: RepairSettings) -> list[str]:
    """``name=then (now now)`` for each setting where a checkpoint's recorded ``saved`` differs from ``settings``
    (see :func:`same_settings`)."""
    names = {f.name for f in dataclasses.fields(RepairSettings)}
    then = RepairSettings(**{k: v for k, v in saved.items() if k in names})
    then.check()
    settings.check()
    a, b = dataclasses.asdict(then), dataclasses.asdict(settings)
    return [f"{k}={a[k]!r} (now {b[k]!r})" for k in a if a[k] != b[k]]


@dataclasses.dataclass
class PlanOptions:
    """Which heads a pass works on (:func:`~alibi_surgery.surgery.plan.make_plan`'s modes), the diagnosis that
    decides it (``report``: a HeadReport or a diagnosis JSON path; else a fresh diagnosis with ``prompts``, default
    the built-in set), ``allow_empty`` and the memory ``budget`` (bytes) the plan must fit."""

    report: object = None
    heads: str | None = "auto"
    band: str | None = None
    layers: str | None = None
    freeze: str | None = None
    include: str | None = None
    prompts: list | None = None
    allow_empty: bool = False
    budget: int | None = None


@dataclasses.dataclass
class RunOptions:
    """The data and the machinery of a pass: training ``corpus``, held-out ``eval_text`` (packed) and
    ``eval_prompts`` (texts scored alone), ``device``, ``dtype``, attention ``backend``, the dtype of ``OUT/final``
    (``save_dtype``, default the input checkpoint's), ``progress`` bars, and how functional recovery is measured
    (``ablation_draws``, ``ablation_texts``, ``ablation_bootstrap``: :mod:`~alibi_surgery.surgery.functional`), and
    ``distributed``: ``"none"`` (one process) or ``"fsdp"`` (every rank of the process group together:
    :mod:`~alibi_surgery.surgery.sharded_train`)."""

    corpus: object = None
    eval_text: object = None
    eval_prompts: list | None = None
    device: str | None = None
    dtype: str | None = None
    backend: str = "auto"
    save_dtype: str | None = None
    progress: bool = False
    ablation_draws: int = 20  # functional recovery's noise-floor draws per head (0: not measured)
    ablation_texts: int | None = 64  # at most this many held-out texts for it (None: all)
    ablation_bootstrap: int = 1000  # bootstrap resamples of its intervals (0: none)
    distributed: str = "none"  # none or fsdp

    def check(self) -> None:
        if self.distributed not in ("none", "fsdp"):
            raise UsageError(f"distributed={self.distributed!r}: must be 'none' or 'fsdp'")
        for name, least in (("ablation_draws", 0), ("ablation_texts", 1), ("ablation_bootstrap", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise UsageError(f"{name}={value!r}: must be a whole number >= {least}")


@dataclasses.dataclass
class RepairJob:
    """The settings, plan options and run options of one pass."""

    settings: RepairSettings = dataclasses.field(default_factory=RepairSettings)
    plan: PlanOptions = dataclasses.field(default_factory=PlanOptions)
    run: RunOptions = dataclasses.field(default_factory=RunOptions)

    @classmethod
    def from_options(cls, settings: RepairSettings | None = None, **options) -> "RepairJob":
        """A job from :func:`~alibi_surgery.surgery.repair.repair_pass`'s keywords: ``settings`` and the fields of
        :class:`PlanOptions` and :class:`RunOptions`. ``settings`` is checked (and normalised) here."""
        plan_names = {f.name for f in dataclasses.fields(PlanOptions)}
        run_names = {f.name for f in dataclasses.fields(RunOptions)}
        unknown = sorted(set(options) - plan_names - run_names)
        if unknown:
            raise TypeError(f"repair() got an unexpected keyword argument {unknown[0]!r}")
        settings = settings or RepairSettings()
        settings.check()
        run = RunOptions(**{k: v for k, v in options.items() if k in run_names})
        run.check()
        if run.distributed == "fsdp":
            from .sharded_train import fsdp_refusal

            refusal = fsdp_refusal(settings, run.dtype)
            if refusal:
                raise UsageError(refusal)
        return cls(settings, PlanOptions(**{k: v for k, v in options.items() if k in plan_names}), run)

    def prompts(self) -> list:
        """The diagnosis prompts: ``plan.prompts``, else the built-in set."""
        from ..diagnosis.prompts import DEFAULT_PROMPTS

        return list(self.plan.prompts or DEFAULT_PROMPTS)

"""Records of head ablation, the "does work" rule and the "revived" rule (the measurement is
:mod:`alibi_surgery.analysis.ablation`; the definitions are in docs/metrics.md, "Functional recovery").

One :class:`HeadAblation` per measured head: its output norm and, per ablation mode (``zero``: the head's input slice
of the output projection set to 0; ``mean``: set to its mean over the scored tokens), a :class:`ModeEffect`: the
increase of held-out loss (nats per scored token), the noise floor (95th percentile of the same increase when a
random rotation of the removed component is removed instead) and the bootstrap interval over texts.

The rules, one implementation each:

* :func:`does_work`: a head does work when the **lower bound** of its mean-ablation effect's 95% interval exceeds the
  noise floor (strictly); with the bootstrap skipped (``resamples=0``), the point estimate must. A head with zero
  output columns has effect, floor and interval exactly 0, so it never does work.
* :func:`revived`: after surgery, a head is revived when it is no longer collapsed (first-token mass not above the
  sink threshold: not ``dead`` or ``bos-sink`` as :func:`~alibi_surgery.diagnosis.report.classify` says) **and** it
  does work. :func:`recovery` counts both over a surgery's targets: ``collapsed -> not collapsed`` and
  ``revived (does work)``.

Limits: "does work" is relative to the texts measured on (a head can matter for text it was not shown); the floor's
95th percentile over ``R`` draws is coarse for small ``R`` (it interpolates between the two largest of 20 draws);
zero-ablation is reported but the rule reads the mean-ablation effect only (zero-ablation also removes the head's
constant write, which the next layers may rely on like a bias).
"""

from __future__ import annotations

import dataclasses
import math

from ..diagnosis.report import SICK, Thresholds, classify

__all__ = ["MODES", "ModeEffect", "HeadAblation", "Ablation", "Recovery", "does_work", "is_collapsed", "revived",
           "recovery", "FLOOR_QUANTILE"]

MODES = ("zero", "mean")
FLOOR_QUANTILE = 0.95  # the noise floor: this quantile of the random-direction effects


@dataclasses.dataclass(frozen=True)
class ModeEffect:
    """One ablation mode's figures for one head (nats per scored token). ``draws``: each random-direction draw's
    effect (the floor is their :data:`FLOOR_QUANTILE` quantile); ``interval``: the paired bootstrap 95% interval of
    ``effect`` over texts, None when skipped."""

    effect: float
    floor: float
    interval: tuple[float, float] | None
    draws: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {"effect": self.effect, "floor": self.floor,
                "interval": None if self.interval is None else list(self.interval), "draws": list(self.draws)}

    @classmethod
    def from_dict(cls, data: dict | None) -> "ModeEffect | None":
        """The inverse of :meth:`to_dict` (None stays None: a mode not measured)."""
        if data is None:
            return None
        interval = data["interval"]
        return cls(data["effect"], data["floor"], None if interval is None else tuple(interval),
                   tuple(data.get("draws", ())))


def does_work(mean: ModeEffect | None) -> bool | None:
    """The rule (docs/metrics.md): the mean-ablation effect's interval lower bound (its point estimate when the
    bootstrap was skipped) exceeds the noise floor. None when mean-ablation was not measured."""
    if mean is None:
        return None
    low = mean.effect if mean.interval is None else mean.interval[0]
    return bool(low > mean.floor)


@dataclasses.dataclass(frozen=True)
class HeadAblation:
    """One head: ``output_norm`` (mean over every token of ``||W_o[:, cols(h)] z_t||``, as diagnosis defines it) and
    the effect of each measured mode (None when not measured)."""

    layer: int
    head: int
    output_norm: float
    zero: ModeEffect | None = None
    mean: ModeEffect | None = None

    @property
    def does_work(self) -> bool | None:
        return does_work(self.mean)

    def to_dict(self) -> dict:
        out = {"layer": self.layer, "head": self.head, "output_norm": self.output_norm, "does_work": self.does_work}
        for mode in MODES:
            effect = getattr(self, mode)
            out[mode] = None if effect is None else effect.to_dict()
        return out


@dataclasses.dataclass
class Ablation:
    """Every measured head of one model on one set of texts, and how it was measured."""

    model: str
    modes: tuple[str, ...]
    texts: int
    tokens: int  # scored (predicted) tokens in all
    base_loss: float  # mean next-token NLL of the unablated model over those tokens
    floor_draws: int
    seed: int
    bootstrap: int
    heads: list[HeadAblation]

    def head(self, layer: int, head: int) -> HeadAblation:
        for record in self.heads:
            if (record.layer, record.head) == (layer, head):
                return record
        raise KeyError((layer, head))

    def to_dict(self) -> dict:
        return {"model": self.model, "modes": list(self.modes), "texts": self.texts, "tokens": self.tokens,
                "base_loss": self.base_loss, "floor_draws": self.floor_draws, "floor_quantile": FLOOR_QUANTILE,
                "seed": self.seed, "bootstrap": self.bootstrap,
                "rule": "does_work: mean-ablation effect's 95% interval lower bound (point estimate without "
                        "bootstrap) > noise floor",
                "does_work": sum(bool(h.does_work) for h in self.heads),
                "heads": [h.to_dict() for h in self.heads]}

    @classmethod
    def from_dict(cls, data: dict) -> "Ablation":
        """The inverse of :meth:`to_dict` (the derived ``does_work`` fields are recomputed, not read)."""
        heads = [HeadAblation(h["layer"], h["head"], h["output_norm"], ModeEffect.from_dict(h["zero"]),
                              ModeEffect.from_dict(h["mean"])) for h in data["heads"]]
        return cls(data["model"], tuple(data["modes"]), data["texts"], data["tokens"], data["base_loss"],
                   data["floor_draws"], data["seed"], data["bootstrap"], heads)

    def format_table(self) -> str:
        """One line per head: output norm, each mode's effect, floor and interval, and the verdict."""
        header = ["layer", "head", "out_norm"]
        for mode in self.modes:
            header += [f"{mode}_effect", f"{mode}_floor", f"{mode}_95%"]
        header.append("does_work")
        rows = [header]
        for h in self.heads:
            row = [f"L{h.layer}", f"H{h.head}", f"{h.output_norm:.4g}"]
            for mode in self.modes:
                e = getattr(h, mode)
                interval = "-" if e.interval is None else f"[{e.interval[0]:.4f}, {e.interval[1]:.4f}]"
                row += [f"{e.effect:.4f}", f"{e.floor:.4f}", interval]
            row.append("-" if h.does_work is None else "yes" if h.does_work else "no")
            rows.append(row)
        widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)

    def format_summary(self) -> str:
        line = (f"{self.texts} texts, {self.tokens} scored tokens, base loss {self.base_loss:.4f} nats; "
                f"{len(self.heads)} heads")
        if "mean" in self.modes:
            n = sum(bool(h.does_work) for h in self.heads)
            line += (f": {n} do work (mean-ablation effect's "
                     f"{'95% lower bound' if self.bootstrap else 'point estimate'} above the noise floor)")
        return line


def is_collapsed(bos_mass: float, thresholds: Thresholds = Thresholds()) -> bool:
    """Collapsed as diagnosis classifies it: ``dead`` or ``bos-sink`` (the entropy does not enter)."""
    return classify(bos_mass, math.inf, thresholds) in SICK


def revived(record: HeadAblation, bos_mass: float, thresholds: Thresholds = Thresholds()) -> bool:
    """After surgery: not collapsed (``bos_mass`` its first-token mass then) and does work (``record`` measured on
    the repaired model). False when mean-ablation was not measured."""
    return not is_collapsed(bos_mass, thresholds) and bool(record.does_work)


@dataclasses.dataclass(frozen=True)
class Recovery:
    """The two numbers a surgery report gives over its targets: how many of the heads collapsed before are not
    collapsed after, and how many of those are revived (do work, measured after)."""

    targets: int
    collapsed_before: int
    not_collapsed: int
    revived: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        return (f"collapsed -> not collapsed {self.not_collapsed}/{self.collapsed_before}, "
                f"revived (does work) {self.revived}/{self.collapsed_before}")


def recovery(before, after, ablation: Ablation, thresholds: Thresholds = Thresholds()) -> Recovery:
    """Count over the heads of ``ablation`` (measured on the repaired model; the surgery's targets): ``before`` and
    ``after`` are the diagnoses (:class:`~alibi_surgery.diagnosis.report.HeadReport`) of the model before and after
    surgery. A head counts in ``not_collapsed`` when collapsed before and not after, in ``revived`` when it also
    does work."""
    was = [h for h in ablation.heads if is_collapsed(float(before.bos_mass[h.layer, h.head]), thresholds)]
    fixed = [h for h in was if not is_collapsed(float(after.bos_mass[h.layer, h.head]), thresholds)]
    alive = [h for h in fixed if revived(h, float(after.bos_mass[h.layer, h.head]), thresholds)]
    return Recovery(len(ablation.heads), len(was), len(fixed), len(alive))

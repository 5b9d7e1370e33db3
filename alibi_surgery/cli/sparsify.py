"""``alibi-surgery sparsify MODEL --out DIR``: sparse-attention post-training (Draye et al., arXiv 2512.05865, with a
GECO-style constraint): lower the selected heads' mean row entropy while the language-model loss stays within
``--loss-slack`` of the model's own. A run of :func:`~alibi_surgery.surgery.repair.repair_pass` with
``objective="sparsify"``: the same plan grammar (every head by default), head slices, checkpoints, resume, lock and
report; the heads train from their current values (no re-initialisation, no control arm)."""

from __future__ import annotations

from ..errors import UsageError
from . import repair

__all__ = ["add_parser", "run", "ARGUMENT_NAMES"]

ARGUMENT_NAMES = repair.ARGUMENT_NAMES
_REPAIR_ONLY = (("control", "--control"), ("init", "--init"), ("recipe", "--recipe"), ("no_reinit", "--no-reinit"),
                ("passes", "--passes"))


def add_parser(sub) -> None:
    from ..surgery.settings import RepairSettings

    d = RepairSettings()
    p = repair.build_parser(
        sub, "sparsify", help="post-train heads to attend sparsely, the loss held within a slack",
        description="Lower the selected heads' mean attention entropy (every head by default) while the language-"
                    "model loss stays within --loss-slack of the model's own (a GECO-style multiplier). The "
                    "heads' slices train, or the whole model with --train full; checkpoints, resume and reports "
                    "as repair. The input directory is never written to.")
    p.set_defaults(heads="all")
    g = p.add_argument_group("sparsify")
    g.add_argument("--loss-slack", type=float, default=d.loss_slack, metavar="NATS",
                   help=f"how far the training loss may rise above the model's own, in nats per token (default "
                        f"{d.loss_slack:g})")
    g.add_argument("--geco-rate", type=float, default=d.geco_rate, metavar="R",
                   help=f"the multiplier's log moves by R x (loss - target) after every step (default {d.geco_rate:g})")
    g.add_argument("--train", default=d.train, metavar="slices|full",
                   help="what trains: the selected heads' slices (the default) or every parameter of the model "
                        "(the penalty still covers the selected heads)")


def run(args) -> None:
    for name, option in _REPAIR_ONLY:
        value = getattr(args, name, None)
        if value not in (None, False, 1) or (name == "no_reinit" and value):
            raise UsageError(f"{option} belongs to repair; sparsify trains the selected heads from their current "
                             f"values")
    args.no_reinit = True
    repair.run(args)

"""alibi-surgery: diagnose and repair collapsed attention heads in ALiBi transformers (BLOOM).

Public API:
    patch_bloom / unpatch_bloom / patched   swap fused ALiBi attention into a loaded BLOOM model, reversibly
    diagnose -> HeadReport                  per-head first-token mass, entropy and class, without T x T matrices
    HeadSlices                              trainable per-head weight slices; no full-matrix gradient exists
    HeadSlicedAdamW                         fused AdamW whose state covers the slices only
    chunked_lm_loss                         LM-head cross-entropy without the [tokens, vocab] logits
    plan / repair / compare                 surgery as the CLI runs it: the plan (dry run), the full procedure, and
                                            a before/after comparison of two diagnoses or models

``alibi_surgery.plan``, ``.repair`` and ``.compare`` are these functions; their modules are importable as
``alibi_surgery.plan`` etc. through ``importlib`` or ``from alibi_surgery.plan import Plan``.
"""

from .compare import Comparison, compare
from .diagnose import diagnose
from .errors import UsageError
from .loss import chunked_lm_loss
from .optim import HeadSlicedAdamW
from .patch import head_stats, patch_bloom, patched, unpatch_bloom
from .report import HeadReport, Thresholds
from .plan import Plan
from .repair import RepairSettings, repair
from .repair import plan_surgery as plan
from .slices import HeadSlices

__version__ = "0.1.0"
__all__ = ["patch_bloom", "unpatch_bloom", "patched", "head_stats", "diagnose", "HeadReport", "Thresholds",
           "UsageError", "HeadSlices", "HeadSlicedAdamW", "chunked_lm_loss", "plan", "Plan", "repair",
           "RepairSettings", "compare", "Comparison"]

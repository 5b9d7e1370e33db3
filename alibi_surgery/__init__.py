"""alibi-surgery: diagnose and repair collapsed attention heads in ALiBi transformers (BLOOM).

Public API:
    patch_bloom / unpatch_bloom / patched   swap fused ALiBi attention into a loaded BLOOM model, reversibly
    diagnose -> HeadReport                  per-head first-token mass, entropy and class, without T x T matrices
"""

from .diagnose import diagnose
from .errors import UsageError
from .patch import head_stats, patch_bloom, patched, unpatch_bloom
from .report import HeadReport, Thresholds

__version__ = "0.1.0"
__all__ = ["patch_bloom", "unpatch_bloom", "patched", "head_stats", "diagnose", "HeadReport", "Thresholds",
           "UsageError"]

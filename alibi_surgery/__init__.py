"""alibi-surgery: diagnose and repair collapsed attention heads in ALiBi transformers (BLOOM, MPT, Falcon-RW).

Public API:
    alibi_attention, alibi_attention_qkvpacked
                                            causal ALiBi attention in FlashAttention's layout (torch custom
                                            operators: torch.compile traces them), with optional head statistics
    patch / unpatch / patched               swap fused ALiBi attention into a loaded model of any registered family,
                                            reversibly (``patch_bloom`` / ``unpatch_bloom``: the same functions)
    diagnose -> HeadReport                  per-head first-token mass, entropy and class, without T x T matrices
    HeadSlices                              trainable per-head weight slices; no full-matrix gradient exists
    HeadSlicedAdamW                         fused AdamW whose state covers the slices only
    chunked_lm_loss                         LM-head cross-entropy without the [tokens, vocab] logits
    plan / repair / compare                 surgery as the CLI runs it: the plan (dry run), the full procedure, and
                                            a before/after comparison of two diagnoses or models
    prompt_perplexity / packed_perplexity   perplexity of an in-memory model over texts each scored alone
      -> Perplexity                         (conventions ``tokens`` and ``paper``), or over packed rows as repair
    ablate_heads -> Ablation                each head's zero/mean-ablation effect on held-out texts, its noise
                                            floor and interval, and whether it does work (docs/metrics.md)

``alibi_surgery.plan``, ``.repair`` and ``.compare`` are these functions; their modules are
``alibi_surgery.surgery.plan``, ``alibi_surgery.surgery.repair`` and ``alibi_surgery.analysis.compare``. The package
tree is described in docs/architecture.md.
"""

from . import families  # first: hands the adapters' lookup to attention.patch (attention sits below families)
from .analysis.compare import compare
from .attention.functional import AttentionStats, alibi_attention, alibi_attention_qkvpacked
from .analysis.comparison import Comparison
from .analysis.perplexity import Perplexity, packed_perplexity, prompt_perplexity
from .analysis.ablation import ablate_heads
from .analysis.ablation_report import Ablation
from .diagnosis.diagnose import diagnose
from .errors import UsageError
from .analysis.loss import chunked_lm_loss
from .surgery.optim import HeadSlicedAdamW
from .attention.patch import head_stats, patch, patch_bloom, patched, unpatch, unpatch_bloom
from .diagnosis.report import HeadReport, Thresholds
from .surgery.plan import Plan
from .surgery.repair import RepairSettings, repair
from .surgery.repair import plan_surgery as plan
from .surgery.slices import HeadSlices

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "patch_bloom", "unpatch_bloom", "patched", "head_stats", "diagnose", "HeadReport", "Thresholds",
           "UsageError", "HeadSlices", "HeadSlicedAdamW", "chunked_lm_loss", "plan", "Plan", "repair",
           "RepairSettings", "compare", "Comparison", "alibi_attention", "alibi_attention_qkvpacked",
           "AttentionStats", "prompt_perplexity", "packed_perplexity", "Perplexity", "ablate_heads", "Ablation"]

"""Gu et al.'s attention-sink metric (ICLR 2025, "When Attention Sink Emerges in Language Models"), on the first
token, without attention maps.

Their ``eval_sink_open_source.py`` scores key position k of a sequence of T tokens by the attention it receives,
averaged over the T - k queries that can see it, per (sequence, layer, head); a head is a sink on that sequence when
the score exceeds epsilon (0.3 by default); the sink rate is the percentage of (sequence, layer, head) triples that
are. For k = 0 the score is the mean first-token mass over every query row of the sequence, the first row (all its
mass on itself) included, which the fused kernels' per-sequence sums give exactly
(:func:`~alibi_surgery.attention.patch.first_token_sinks`). Reported by ``diagnose``: ``sink_share`` per head (the
fraction of prompts on which it is a sink), ``sink_rate`` for the model, ``metric.sink_epsilon``.

Limits: key position 0 here (every position: :mod:`~alibi_surgery.diagnosis.key_sinks`, ``diagnose --sinks``); a
prompt is scored whole, where their code truncates every prompt to 64 tokens (pass ``--max-length 64`` for the same).
"""

from __future__ import annotations

import torch

from ..errors import UsageError

__all__ = ["DEFAULT_SINK_EPSILON", "SINK_SHARE_TEXT", "check_sink_epsilon", "sink_rate"]

DEFAULT_SINK_EPSILON = 0.3  # Gu et al.'s
SINK_SHARE_TEXT = ("share of prompts on which the first token's received attention, averaged over every query row, "
                   "exceeds sink_epsilon (Gu et al.)")


def check_sink_epsilon(epsilon: float) -> float:
    """``epsilon`` if it lies in [0, 1), else a one-line UsageError (NaN refused too)."""
    if not (isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and 0.0 <= epsilon < 1.0):
        raise UsageError(f"sink_epsilon={epsilon}: must be in [0, 1) (Gu et al. use 0.3)")
    return float(epsilon)


def sink_rate(share: torch.Tensor) -> float:
    """The sink rate in percent (Gu et al.'s figure): the mean over heads of their sink share, times 100 (every head
    is scored on every prompt, so this is the share of (prompt, layer, head) triples)."""
    return float(share.double().mean()) * 100.0

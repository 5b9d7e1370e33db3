"""Bigram-recall text: the synthetic training data of the demonstration model (see docs/demo-model.md).

A sequence is ``<s>`` followed by ASCII bytes drawn from a byte-bigram chain estimated on real text (Python's own
documentation by default). With probability ``trigger_p`` a position holds a trigger byte (``\\x01``-``\\x03``), and the
byte after a trigger repeats the sequence's first byte (the one right after ``<s>``). Most positions are therefore
predictable from the current byte alone, and a long-range look-up is needed only after a trigger: the
"active-dormant" structure of Guo et al. (2024, Bigram-Backcopy), under which heads learn to park their attention on
the first token while they have nothing to do.

Limits: ASCII only (bytes >= 128 are dropped from the estimating text), so every sample is valid UTF-8 and maps one
byte to one token of :func:`alibi_surgery.io.random_model.byte_tokenizer`.
"""

from __future__ import annotations

import torch

from ..errors import UsageError

__all__ = ["RecallData", "TRIGGERS", "python_docs_text"]

TRIGGERS = b"\x01\x02\x03"


def python_docs_text() -> str:
    """The Python language reference's topic texts as shipped with the interpreter (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class RecallData:
    """Sampler of bigram-recall sequences (module docstring). ``text`` estimates the bigram chain."""

    def __init__(self, text: str, *, trigger_p: float = 0.05):
        if not 0.0 <= trigger_p < 0.5:
            raise UsageError(f"trigger probability must be in [0, 0.5), got {trigger_p}")
        data = bytes(b for b in text.encode("utf-8") if 4 <= b < 128)  # ASCII, no trigger bytes
        if len(data) < 2:
            raise UsageError("the text for the bigram chain is empty")
        seq = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        counts = torch.zeros(128, 128, dtype=torch.float64)
        counts.index_put_((seq[:-1], seq[1:]), torch.ones(len(seq) - 1, dtype=torch.float64), accumulate=True)
        seen = counts.sum(1) > 0
        counts[~seen] = seen.double()  # a byte never followed by anything restarts from any seen byte
        self.transition = (counts / counts.sum(1, keepdim=True)).float()
        self.start = (counts.sum(1) * seen).float()
        self.start /= self.start.sum()
        self.trigger_p = trigger_p

    def sample_bytes(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, length]`` byte values (no ``<s>``): the chain, triggers, and recalls of byte 0."""
        if length < 1:
            raise UsageError(f"sequence length must be >= 1, got {length}")
        triggers = torch.tensor(list(TRIGGERS))
        x = torch.empty(n, length, dtype=torch.long)
        x[:, 0] = torch.multinomial(self.start, n, replacement=True, generator=generator)
        prev = x[:, 0]
        for t in range(1, length):
            after_trigger = torch.isin(x[:, t - 1], triggers)
            nxt = torch.multinomial(self.transition[prev], 1, generator=generator)[:, 0]
            nxt = torch.where(after_trigger, x[:, 0], nxt)
            fire = (torch.rand(n, generator=generator) < self.trigger_p) & ~after_trigger & (t < length - 1)
            pick = triggers[torch.randint(0, len(triggers), (n,), generator=generator)]
            x[:, t] = torch.where(fire, pick, nxt)
            prev = torch.where(fire, prev, x[:, t])  # the chain continues from the last non-trigger byte
        return x

    def texts(self, n: int, length: int, generator: torch.Generator) -> list[str]:
        """``n`` samples of ``length`` bytes as strings (for corpus and held-out files)."""
        return [bytes(row).decode("ascii") for row in self.sample_bytes(n, length, generator).tolist()]

"""Which positions draw attention, per head, at any length: Gu et al.'s per-key sink score without attention maps.

For every prompt (run alone, as Gu et al.'s ``eval_sink_open_source.py`` feeds them), every layer and head, the
attention each key position receives is summed over the query rows in a key-side pass over the forward's
log-sum-exp (:mod:`alibi_surgery.kernels.received`: no T x T matrix), then divided by the number of query rows that
see the key (``T - j``): Gu et al.'s score of position j. A position is a sink of a head on a prompt when its score
exceeds ``epsilon`` (their 0.3). Beyond the first token this finds delimiters and newlines that models without a
BOS token use as sinks.

:func:`key_sinks` returns :class:`KeySinks`: per prompt the tokens and the scores ``[layers, heads, T]`` (float32,
on the CPU: O(L * H * T) per prompt), and per head the positions that score highest. ``alibi-surgery diagnose
--sinks N`` prints the N highest per head and writes them to the JSON report (``key_sinks``).
Limits: one prompt per forward (no padding); the fused backends only; no sliding-window model (the key-side pass
has no window).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..attention.patch import attention_modules, patch_state, patched
from ..errors import UsageError
from ..kernels.received import gu_scores

__all__ = ["KeySinks", "ReceivedSink", "key_sinks", "received_attention"]


class ReceivedSink:
    """Collects the attention received per key, ``[B, H, Tk]`` per layer, of one forward."""

    def __init__(self, n_layer: int):
        self.received: list = [None] * n_layer

    def add(self, layer: int, received: torch.Tensor, key_pos: torch.Tensor) -> None:
        self.received[layer] = gu_scores(received, key_pos).float().cpu()


@contextlib.contextmanager
def received_attention(model):
    """Collect the attention received per key from the forward run inside the block (model patched)."""
    _, attns = attention_modules(model)
    sink = ReceivedSink(len(attns))
    states = [patch_state(a) for a in attns]
    for state in states:
        state.received = sink
    try:
        yield sink
    finally:
        for state in states:
            state.received = None


@dataclasses.dataclass
class KeySinks:
    """Per prompt: ``tokens`` (strings) and ``scores`` float32 ``[layers, heads, T]`` (Gu et al.'s per-position
    score); ``epsilon`` their sink threshold."""

    tokens: list
    scores: list
    epsilon: float

    def top(self, layer: int, head: int, n: int) -> list[dict]:
        """The ``n`` (prompt, position) pairs of one head with the highest score, with their token strings."""
        values = torch.cat([s[layer, head] for s in self.scores])  # every (prompt, position), in order
        starts = torch.tensor([0] + [s.shape[-1] for s in self.scores]).cumsum(0)
        order = torch.sort(values, descending=True, stable=True).indices[:n]  # ties: the earlier (prompt, position)
        found = []
        for i in order.tolist():
            p = int(torch.searchsorted(starts, i, right=True)) - 1
            found.append({"prompt": p, "position": i - int(starts[p]), "token": self.tokens[p][i - int(starts[p])],
                          "score": round(float(values[i]), 6)})
        return found

    def rate_beyond_first(self) -> float:
        """Percent of (prompt, layer, head) triples with a sink at a position other than 0."""
        hits = sum(int((s[..., 1:] > self.epsilon).any(-1).sum()) for s in self.scores)
        triples = sum(s.shape[0] * s.shape[1] for s in self.scores)
        return 100.0 * hits / max(triples, 1)

    def to_dict(self, n: int) -> dict:
        n_layer, n_head = self.scores[0].shape[:2]
        return {"epsilon": self.epsilon, "sink_rate_beyond_first_token": self.rate_beyond_first(),
                "top": [{"layer": layer, "head": head, "positions": self.top(layer, head, n)}
                        for layer in range(n_layer) for head in range(n_head)]}

    def format(self, n: int) -> str:
        n_layer, n_head = self.scores[0].shape[:2]
        lines = [f"positions drawing the most attention (Gu et al.'s score; sinks above {self.epsilon:g}; "
                 f"{self.rate_beyond_first():.1f}% of (prompt, layer, head) have one past the first token):"]
        for layer in range(n_layer):
            for head in range(n_head):
                cells = [f"{x['position']} {x['token']!r} {x['score']:.3f}" for x in self.top(layer, head, n)]
                lines.append(f"  L{layer:<3} H{head:<3} " + ", ".join(cells))
        return "\n".join(lines)


def key_sinks(model, tokenizer, prompts: list[str], *, backend: str = "auto", max_length: int | None = None,
              epsilon: float = 0.3, progress: bool = False) -> KeySinks:
    """:class:`KeySinks` of ``model`` over ``prompts`` (one forward per prompt, the first ``max_length`` tokens)."""
    from tqdm.auto import tqdm

    if backend == "eager":
        raise UsageError("the attention received per key comes from the fused kernels: use backend auto, triton "
                         "or torch")
    tokens, scores = [], []
    device = next(model.parameters()).device
    with patched(model, backend), received_attention(model) as sink, torch.inference_mode():
        for prompt in tqdm(prompts, desc="key sinks", unit="prompt", disable=not progress):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, :max_length].to(device)
            try:
                model(ids, use_cache=False)
            except ValueError as exc:  # the key-side pass's own limits (a sliding window)
                raise UsageError(f"diagnose --sinks: {exc}") from None
            scores.append(torch.stack([r[0] for r in sink.received]))
            tokens.append([tokenizer.decode([t]) for t in ids[0].tolist()])
    return KeySinks(tokens, scores, epsilon)

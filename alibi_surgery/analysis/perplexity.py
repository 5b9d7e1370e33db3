"""Perplexity of a causal LM over a list of texts, each scored alone, under two conventions; and the packed figure.

``prompt_perplexity(model, tokenizer, texts)`` tokenises every text as ``diagnose`` does (the tokenizer's own framing:
BLOOM adds nothing, a tokenizer that prefixes ``<s>`` counts it; truncated to ``max_length`` tokens when given, never
padded), runs each one alone through the model (batch of one: no padding can change a number) and takes its mean
next-token loss ``loss_i`` over its ``T_i - 1`` predicted tokens, with :func:`~alibi_surgery.analysis.loss.chunked_lm_loss`
(float32, no ``[tokens, vocab]`` logits). The texts' figures then combine as ``convention`` says (:func:`combine`):

* ``tokens`` (the default): ``exp(sum_i loss_i (T_i - 1) / sum_i (T_i - 1))``, the true per-token perplexity: every
  predicted token weighs the same.
* ``paper``: ``exp(sum_i loss_i T_i / sum_i T_i)``, the figure of the paper's code (its ``loss * input_ids.size(1)``
  weighting): ``T_i`` counts the first token, which predicts nothing, so short texts weigh slightly more than their
  predicted tokens.

A text of fewer than 2 tokens (after truncation) predicts nothing: it is refused (one-line
:class:`~alibi_surgery.errors.UsageError` naming it) rather than skipped, so a figure always covers every text given.
The model runs on the fused ALiBi attention of ``backend`` (``auto``: triton on CUDA, torch elsewhere; ``eager``:
transformers' own attention) and is left as it was (patch state, train/eval mode) afterwards, so a training loop may
call this on its in-memory model at every checkpoint.

``packed_perplexity`` is the held-out figure ``repair --eval-text`` reports: the text's documents tokenised, joined by
EOS and cut into ``[n, seq_len]`` rows (:func:`~alibi_surgery.io.corpus.pack_text`), scored by
:func:`chunks_perplexity`. Every row has ``seq_len`` tokens, so both conventions give the same
number there. Limits: texts are scored one at a time (no batching); nothing is cached between calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from ..io.texts import read_texts  # re-exported: the reader of text lists (.txt lines, .jsonl, .json)

__all__ = ["CONVENTIONS", "TextLoss", "Perplexity", "check_convention", "combine", "encode_texts", "score_texts",
           "prompt_perplexity", "packed_perplexity", "read_texts"]

CONVENTIONS = ("tokens", "paper")


@dataclasses.dataclass(frozen=True)
class TextLoss:
    """One text's figures: ``tokens`` (``T_i``, after truncation) and ``loss`` (mean next-token NLL, nats)."""

    tokens: int
    loss: float


@dataclasses.dataclass
class Perplexity:
    """One model's perplexity. Scored texts: ``texts`` holds each one's :class:`TextLoss` (in input order). Packed
    text: ``texts`` is empty, ``chunks`` rows of ``seq_len`` tokens were scored."""

    model: str
    convention: str
    perplexity: float
    texts: list[TextLoss] = dataclasses.field(default_factory=list)
    chunks: int | None = None
    seq_len: int | None = None

    @property
    def tokens(self) -> int:
        """Tokens scored in all (the first token of each text or row included)."""
        return sum(t.tokens for t in self.texts) if self.chunks is None else self.chunks * self.seq_len

    def to_dict(self) -> dict:
        out = {"model": self.model, "perplexity": self.perplexity, "tokens": self.tokens}
        if self.chunks is None:
            out["prompts"] = [{"tokens": t.tokens, "loss": t.loss} for t in self.texts]
        else:
            out.update(chunks=self.chunks, seq_len=self.seq_len)
        return out


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise UsageError(f"unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    return convention


def combine(losses, convention: str = "tokens") -> float:
    """The perplexity of texts with these :class:`TextLoss` figures under ``convention`` (see the module
    docstring). Each text must have at least 2 tokens."""
    check_convention(convention)
    losses = list(losses)
    if not losses:
        raise UsageError("no texts to combine")
    offset = 1 if convention == "tokens" else 0
    weights = [t.tokens - offset for t in losses]
    return math.exp(sum(w * t.loss for w, t in zip(weights, losses)) / sum(weights))


def encode_texts(tokenizer, texts, max_length: int | None = None, *, name=None) -> list[list[int]]:
    """Token ids of each text, as ``diagnose`` tokenises prompts (truncated to ``max_length``); refuses an empty
    list, a blank text, ``max_length < 2`` and a text of fewer than 2 tokens. ``name(i)`` says how an error names
    text ``i`` (default ``"text i"``)."""
    from ..diagnosis.diagnose import check_prompts, encode_prompts

    name = name or (lambda i: f"text {i}")
    if max_length is not None and max_length < 2:
        raise UsageError(f"max length must be at least 2 (a text of 1 token predicts nothing), got {max_length}")
    texts = check_prompts(texts)
    encoded, _ = encode_prompts(tokenizer, texts, max_length, 1)
    for i, ids in enumerate(encoded):
        if len(ids) < 2:
            raise UsageError(f"{name(i)} has {len(ids)} token: it predicts nothing, so it has no loss; remove it "
                             f"or make it longer")
    return encoded


@contextlib.contextmanager
def _scoring(model, backend: str):
    """The model's base, in eval mode and patched with ``backend`` for the block; everything restored after."""
    from ..attention.backends import resolve_backend
    from ..attention.patch import attention_modules, patched

    family, attns = attention_modules(model)
    if backend == "eager" and family.eager_refusal():
        raise UsageError(f"backend='eager': {family.eager_refusal()}")
    base = family.base_model(model)
    device = next(base.parameters()).device
    concrete = "eager" if backend == "eager" else \
        resolve_backend(backend, device, head_dim=family.attention_shape(attns[0])[1])
    was_training = model.training
    model.eval()
    try:
        with patched(base, concrete), torch.no_grad():
            yield base, device
    finally:
        model.train(was_training)


def score_texts(model, encoded, *, backend: str = "auto", progress: bool = False) -> list[TextLoss]:
    """Each token-id list's :class:`TextLoss`, run alone through ``model`` (a causal LM of a registered family)."""
    from .loss import chunked_lm_loss

    weight = model.get_output_embeddings().weight.detach()
    out = []
    with _scoring(model, backend) as (base, device):
        for ids in tqdm(encoded, desc="perplexity", unit="text", disable=not progress):
            row = torch.tensor([ids], dtype=torch.long, device=device)
            hidden = base(input_ids=row, use_cache=False).last_hidden_state
            out.append(TextLoss(len(ids), float(chunked_lm_loss(hidden, weight, row))))
    return out


def prompt_perplexity(model, tokenizer, texts, *, convention: str = "tokens", max_length: int | None = None,
                      backend: str = "auto", progress: bool = False, name=None) -> Perplexity:
    """The perplexity of ``model`` (an in-memory causal LM) over ``texts`` (strings), each scored alone; see the
    module docstring. ``name(i)`` names text ``i`` in errors."""
    check_convention(convention)
    encoded = encode_texts(tokenizer, texts, max_length, name=name)
    losses = score_texts(model, encoded, backend=backend, progress=progress)
    return Perplexity(_model_name(model), convention, combine(losses, convention), losses)


def chunks_perplexity(model, chunks: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token loss) of ``model`` over packed ``[n, seq_len]`` chunks (no gradients), with the model as
    it is (patched or not, in its current mode): the trainer's held-out figure."""
    from ..families import family_for
    from .loss import chunked_lm_loss

    base = family_for(model.config).base_model(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(chunks), batch_size):
            ids = chunks[i:i + batch_size].to(model.device)
            hidden = base(ids, use_cache=False).last_hidden_state
            n = ids.numel() - ids.shape[0]
            total += float(chunked_lm_loss(hidden, model.get_output_embeddings().weight.detach(), ids)) * n
            count += n
    return math.exp(total / count)


def packed_perplexity(model, chunks: torch.Tensor, *, batch_size: int = 1, backend: str = "auto",
                      convention: str = "tokens") -> Perplexity:
    """``repair``'s held-out perplexity of ``model`` over packed ``[n, seq_len]`` rows (from
    :func:`~alibi_surgery.io.corpus.pack_text`); equal rows make both conventions one number."""
    check_convention(convention)
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    with _scoring(model, backend):
        ppl = chunks_perplexity(model, chunks, batch_size)
    return Perplexity(_model_name(model), convention, ppl, chunks=int(chunks.shape[0]), seq_len=int(chunks.shape[1]))


def _model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)

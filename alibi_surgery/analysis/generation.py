"""Generation quality: sampled completions of a prompt set, the paper's protocol by default.

:class:`GenerationSettings` defaults are the paper's (temperature 0.7, top-p 0.92, 100 new tokens, no repetition
penalty) plus top-k 50, which the paper's ``model.generate`` call inherited from transformers' defaults without
naming it (``top_k=0`` turns it off). The logits of each step are taken in float32, divided by the temperature,
cut to the ``top_k`` largest, then to the smallest set of tokens, most likely first, whose probability reaches
``top_p`` (the most likely token always stays), and one token is drawn from the softmax of what is left; that is the
order transformers applies the same three settings in. ``temperature=0`` is greedy decoding (argmax; no seed
needed).

Every prompt has its own random stream: a ``torch.Generator`` on the model's device seeded with
:func:`prompt_seed` ``(seed, index)``, the first 8 bytes of ``sha256(f"{seed}:{index}")`` read little-endian with
the top bit cleared (a 63-bit integer; ``index`` counts prompts from 0 in the order given). So a prompt's completion
depends only on the model, the settings, the seed and its position, not on which other prompts or models run with it,
and the same inputs give the same text again (on the same device, dtype and backend). Prompts are decoded one at a
time (batch 1, no padding) through the model's KV cache, with the fused attention patched in; a completion ends at
``max_new_tokens`` or at the first end-of-sequence token (kept in ``token_ids``, left out of the text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect

import torch
from tqdm.auto import tqdm

from ..errors import UsageError

__all__ = ["GenerationSettings", "prompt_seed", "filter_logits", "generate_completions", "completion_rows"]


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.7
    top_p: float = 0.92
    top_k: int = 50
    max_new_tokens: int = 100
    seed: int = 42
    repetition_penalty: float = 1.0  # recorded for the reader; nothing else is supported

    def check(self) -> "GenerationSettings":
        if not self.temperature >= 0:
            raise UsageError(f"temperature={self.temperature}: must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise UsageError(f"top_k={self.top_k}: must be >= 0 (0: off)")
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.repetition_penalty != 1.0:
            raise UsageError("only repetition_penalty 1.0 (none, the paper's protocol) is supported")
        return self


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` (see the module docstring)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def filter_logits(logits: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """float32 ``[vocab]`` logits after temperature, top-k and top-p; removed tokens are ``-inf``."""
    scores = logits.float() / settings.temperature
    if 0 < settings.top_k < scores.numel():
        kth = torch.topk(scores, settings.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1:
        ranked, order = torch.sort(scores, descending=True)
        before = ranked.softmax(-1).cumsum(-1) - ranked.softmax(-1)  # mass of the tokens ranked above each one
        drop = before >= settings.top_p  # a token is kept while the set above it has not reached top_p
        drop[0] = False
        scores = scores.clone()
        scores[order[drop]] = float("-inf")
    return scores


def _pick(logits: torch.Tensor, settings: GenerationSettings, generator) -> int:
    if settings.temperature == 0:
        return int(logits.argmax())
    probs = filter_logits(logits, settings).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])


def _complete(model, prompt_ids: list[int], settings: GenerationSettings, seed: int, eos: set[int]) -> list[int]:
    """New token ids after ``prompt_ids``, decoding through the KV cache."""
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    step = torch.tensor([prompt_ids], device=device)
    mask = torch.ones_like(step)
    # the cache argument is ``cache`` in transformers >= 5.2x, ``past_key_values`` before; it is updated in place
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {name: DynamicCache(config=model.config)}
    new: list[int] = []
    for _ in range(settings.max_new_tokens):
        out = model(input_ids=step, attention_mask=mask, use_cache=True, logits_to_keep=1, **cache)
        token = _pick(out.logits[0, -1], settings, generator)
        new.append(token)
        if token in eos:
            break
        step = torch.tensor([[token]], device=device)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    return new


def generate_completions(model, tokenizer, prompts: list[str], settings: GenerationSettings = GenerationSettings(),
                         *, progress: bool = False, desc: str = "generate") -> list[dict]:
    """One row per prompt: ``prompt_index``, ``prompt``, ``seed``, ``completion`` (the text of the new tokens, special
    tokens left out), ``token_ids`` (the new tokens), ``prompt_token_ids``, ``stop`` (``"eos"`` or ``"length"``).
    ``model`` is used as given: patch it first (:func:`~alibi_surgery.attention.patch.patch`) for fused attention."""
    settings.check()
    eos = _eos_ids(model, tokenizer)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise UsageError(f"prompt {i} has no tokens")
    rows = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i, (prompt, ids) in enumerate(tqdm(list(zip(prompts, encoded)), desc=desc, unit="prompt",
                                                   disable=not progress)):
                seed = prompt_seed(settings.seed, i)
                new = _complete(model, ids, settings, seed, eos)
                rows.append({"prompt_index": i, "prompt": prompt, "seed": seed,
                             "completion": tokenizer.decode(new, skip_special_tokens=True), "token_ids": new,
                             "prompt_token_ids": list(ids), "stop": "eos" if new and new[-1] in eos else "length"})
    finally:
        model.train(was_training)
    return rows


def completion_rows(rows: list[dict], model_name: str, settings: GenerationSettings) -> list[dict]:
    """``rows`` as written to a model's JSONL: each with the model and the settings."""
    return [dict(row, model=model_name, settings=dataclasses.asdict(settings)) for row in rows]

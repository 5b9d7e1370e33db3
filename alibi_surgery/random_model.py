"""Random-weight BLOOM checkpoints for tests, benchmarks and the quick start (nothing is downloaded).

``write_random_bloom(dir, shape)`` writes a complete Hugging Face model directory: ``config.json``, safetensors
weights (sharded when larger than ``max_shard_size``) and a byte-level tokenizer. Shapes follow the BLOOM family
(``SHAPES``); ``n_layer`` and ``vocab_size`` may be reduced. Random weights show no learned collapse.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UsageError

__all__ = ["SHAPES", "bloom_config", "byte_tokenizer", "write_random_bloom"]

# name: (n_layer, hidden_size, n_head); vocabulary 250,880 for all of them.
SHAPES = {
    "tiny": (2, 128, 4),
    "bloom-560m": (24, 1024, 16),
    "bloom-1b1": (24, 1536, 16),
    "bloom-1b7": (24, 2048, 16),
    "bloom-3b": (30, 2560, 32),
    "bloom-7b1": (30, 4096, 32),
    "bloom": (70, 14336, 112),
}
BLOOM_VOCAB = 250880
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def bloom_config(shape: str = "tiny", *, n_layer: int | None = None, vocab_size: int | None = None):
    """A ``BloomConfig`` of a family shape, optionally with fewer layers or a smaller vocabulary."""
    from transformers import BloomConfig

    if shape not in SHAPES:
        raise UsageError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    layers, hidden, heads = SHAPES[shape]
    vocab = vocab_size or (512 if shape == "tiny" else BLOOM_VOCAB)
    if vocab < 256 + len(SPECIALS):
        raise UsageError(f"vocab_size must be >= {256 + len(SPECIALS)} to hold the byte tokenizer")
    return BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=n_layer or layers, n_head=heads,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def byte_tokenizer(*, add_bos: bool = False):
    """A byte-level tokenizer (256 byte tokens after 4 specials), as a transformers fast tokenizer. With ``add_bos``
    it prefixes every encoded text with ``<s>`` (as LLaMA-style tokenizers do; BLOOM's does not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="left")


def write_random_bloom(out_dir, shape: str = "tiny", *, n_layer: int | None = None, vocab_size: int | None = None,
                       seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size: str = "2GB") -> Path:
    """Write a random-weight BLOOM model directory and return its path. Refuses a non-empty directory."""
    from transformers import BloomForCausalLM

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"output directory is not empty: {out}")
    config = bloom_config(shape, n_layer=n_layer, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = BloomForCausalLM(config).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    byte_tokenizer().save_pretrained(out)
    return out

"""Random-weight BLOOM checkpoints for tests, benchmarks and the quick start (nothing is downloaded).

``write_random_bloom(dir, shape)`` writes a complete Hugging Face model directory: ``config.json``, safetensors
weights (sharded when larger than ``max_shard_size``) and a byte-level tokenizer. Shapes follow the BLOOM family
(``SHAPES``); ``n_layer`` and ``vocab_size`` may be reduced. Random weights show no learned collapse.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from .files import filling, writing
from .loading import quiet_transformers

__all__ = ["SHAPES", "bloom_config", "byte_tokenizer", "write_random_bloom", "write_sharded_random_bloom"]

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

    out = _check_empty(out_dir)
    config = bloom_config(shape, n_layer=n_layer, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = BloomForCausalLM(config).to(dtype)
    with writing(out, "directory"):
        out.mkdir(parents=True, exist_ok=True)
    with filling(out), quiet_transformers():
        model.save_pretrained(out, max_shard_size=max_shard_size)
        byte_tokenizer().save_pretrained(out)
    return out


def _check_empty(out_dir) -> Path:
    """A directory to write a model into: new, or empty but for this run's lock."""
    from .lock import LOCK_NAME

    out = Path(out_dir)
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise UsageError(f"output directory is not empty: {out}")
    return out


def _bloom_tensor_shapes(config):
    """(name as BloomForCausalLM saves it, shape, init) of every tensor, in file order; init is "normal", "one" or
    "zero" (BLOOM's own initialisation: normal(0, initializer_range) weights, zero biases, unit layernorm gains)."""
    h = config.hidden_size
    yield "transformer.word_embeddings.weight", (config.vocab_size, h), "normal"
    yield "transformer.word_embeddings_layernorm.weight", (h,), "one"
    yield "transformer.word_embeddings_layernorm.bias", (h,), "zero"
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        yield p + "input_layernorm.weight", (h,), "one"
        yield p + "input_layernorm.bias", (h,), "zero"
        yield p + "self_attention.query_key_value.weight", (3 * h, h), "normal"
        yield p + "self_attention.query_key_value.bias", (3 * h,), "zero"
        yield p + "self_attention.dense.weight", (h, h), "normal"
        yield p + "self_attention.dense.bias", (h,), "zero"
        yield p + "post_attention_layernorm.weight", (h,), "one"
        yield p + "post_attention_layernorm.bias", (h,), "zero"
        yield p + "mlp.dense_h_to_4h.weight", (4 * h, h), "normal"
        yield p + "mlp.dense_h_to_4h.bias", (4 * h,), "zero"
        yield p + "mlp.dense_4h_to_h.weight", (h, 4 * h), "normal"
        yield p + "mlp.dense_4h_to_h.bias", (h,), "zero"
    yield "transformer.ln_f.weight", (h,), "one"
    yield "transformer.ln_f.bias", (h,), "zero"


def write_sharded_random_bloom(out_dir, shape: str = "tiny", *, n_layer: int | None = None,
                               vocab_size: int | None = None, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                               shard_bytes: int = 2 * 2**30, progress: bool = False) -> Path:
    """Write a random BLOOM checkpoint of any family shape as sharded safetensors, tensor by tensor.

    Never holds more than one shard (``shard_bytes``) plus the tensor being drawn, so a bloom-7b1-shaped (or, with
    few layers, a 176B-shaped) checkpoint can be made on a small machine. Weights are drawn in row chunks from
    normal(0, initializer_range) with a seeded generator; biases are 0 and layernorm gains 1, as BLOOM initialises.
    The directory (``config.json``, ``model-XXXXX-of-YYYYY.safetensors``, ``model.safetensors.index.json``, a byte
    tokenizer) loads with stock ``BloomForCausalLM.from_pretrained``. Refuses a non-empty directory.
    """
    import json

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = _check_empty(out_dir)
    config = bloom_config(shape, n_layer=n_layer, vocab_size=vocab_size)
    config.dtype = str(dtype).replace("torch.", "")
    with writing(out, "directory"):
        out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    elem = torch.finfo(dtype).bits // 8
    shards: list[list[str]] = [[]]
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = 0

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, out / f"shard-{len(shards):05d}.tmp", metadata={"format": "pt"})
            shards.append([])
        pending, pending_bytes = {}, 0

    specs = list(_bloom_tensor_shapes(config))
    for name, shp, init in tqdm(specs, desc="write", unit="tensor", disable=not progress):
        t = torch.empty(shp, dtype=dtype)
        if init == "normal":
            rows = max(1, (64 * 2**20) // (4 * shp[1]))  # draw 64 MiB of fp32 at a time
            for r in range(0, shp[0], rows):
                t[r:r + rows] = torch.randn(min(rows, shp[0] - r), shp[1], generator=gen) * config.initializer_range
        else:
            t.fill_(1.0 if init == "one" else 0.0)
        size = t.numel() * elem
        if pending and pending_bytes + size > shard_bytes:
            flush()
        pending[name] = t
        shards[-1].append(name)
        pending_bytes += size
        total += size
    flush()
    shards = [s for s in shards if s]
    weight_map = {}
    for i, names in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out / f"shard-{i:05d}.tmp").rename(out / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    with quiet_transformers():
        config.save_pretrained(out)
        byte_tokenizer().save_pretrained(out)
    return out

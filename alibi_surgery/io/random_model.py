"""Random-weight checkpoints of every registered family, for tests, benchmarks and the quick start (nothing is
downloaded).

``write_random_model(dir, shape)`` writes a complete Hugging Face model directory: ``config.json``, safetensors
weights (sharded when larger than ``max_shard_size``) and a byte-level tokenizer. ``write_sharded_random_model``
writes any size tensor by tensor in bounded memory. Shapes (``SHAPES``) name a family and its public sizes;
``n_layer`` and ``vocab_size`` may be reduced. Random weights show no learned collapse. The MPT and Falcon-RW sizes
are from public config tables (mpt-30b's head_dim 112 from a third-party table), not checked against config.json
files here. ``write_random_bloom`` / ``write_sharded_random_bloom`` / ``bloom_config`` are the first names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from .files import filling, writing
from .loading import dtype_name, quiet_transformers

__all__ = ["SHAPES", "shape_config", "bloom_config", "byte_tokenizer", "write_random_model", "write_random_bloom",
           "write_sharded_random_model", "write_sharded_random_bloom"]

# name -> (family, n_layer, hidden_size, n_head, vocabulary), from one table per family
_TABLES = {
    "bloom": ("tiny 2 128 4 512; bloom-560m 24 1024 16 250880; bloom-1b1 24 1536 16 250880; "
              "bloom-1b7 24 2048 16 250880; bloom-3b 30 2560 32 250880; bloom-7b1 30 4096 32 250880; "
              "bloom 70 14336 112 250880"),
    "mpt": "tiny-mpt 2 128 4 512; mpt-7b 32 4096 32 50432; mpt-30b 48 7168 64 50432",
    "falcon": "tiny-falcon 2 128 4 512; falcon-rw-1b 24 2048 32 50304; falcon-rw-7b 36 4096 64 65024",
    # models diagnosed through the attention interface (tiny shapes only; extra config fields below)
    "llama": "tiny-llama 2 128 4 512", "mistral": "tiny-mistral 2 128 4 512", "gemma3_text": "tiny-gemma3 2 128 4 512",
}
_EXTRA = {  # grouped-query attention everywhere; a sliding window shorter than ordinary prompts; Gemma3's scaling
    "tiny-llama": dict(num_key_value_heads=2, intermediate_size=256),
    "tiny-mistral": dict(num_key_value_heads=2, intermediate_size=256, sliding_window=8),
    "tiny-gemma3": dict(num_key_value_heads=2, intermediate_size=256, head_dim=32, sliding_window=8,
                        query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"]),
}
SHAPES = {name: (family, *map(int, dims)) for family, table in _TABLES.items()
          for name, *dims in (row.split() for row in table.split(";"))}
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def _family(name: str):
    from ..families import FAMILIES, interface_family

    return FAMILIES.get(name) or interface_family(name)


def shape_config(shape: str = "tiny", *, n_layer: int | None = None, vocab_size: int | None = None):
    """A config of a named shape (its family's config class), optionally with fewer layers or a smaller vocabulary.
    Token ids: ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3 (the byte tokenizer's)."""
    if shape not in SHAPES:
        raise UsageError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    family, layers, hidden, heads, vocab = SHAPES[shape]
    vocab = vocab_size or vocab
    if vocab < 256 + len(SPECIALS):
        raise UsageError(f"vocab_size must be >= {256 + len(SPECIALS)} to hold the byte tokenizer")
    extra = dict(_EXTRA.get(shape, {}))
    if n_layer and "layer_types" in extra:
        extra["layer_types"] = (extra["layer_types"] * n_layer)[:n_layer]
    return _family(family).make_config(n_layer=n_layer or layers, hidden=hidden, n_head=heads, vocab=vocab,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=3, **extra)


bloom_config = shape_config


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


def write_random_model(out_dir, shape: str = "tiny", *, n_layer: int | None = None, vocab_size: int | None = None,
                       seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size: str = "2GB") -> Path:
    """Write a random-weight model directory of a named shape (the family's own initialisation) and return its
    path. Refuses a non-empty directory."""
    from ..families import family_for

    out = _check_empty(out_dir)
    config = shape_config(shape, n_layer=n_layer, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = family_for(config).model_class()(config).to(dtype)
    with writing(out, "directory"):
        out.mkdir(parents=True, exist_ok=True)
    with filling(out), quiet_transformers():
        model.save_pretrained(out, max_shard_size=max_shard_size)
        byte_tokenizer(add_bos=family_for(config).interface).save_pretrained(out)  # LLaMA-style: <s> first
    return out


def _check_empty(out_dir) -> Path:
    """A directory to write a model into: new, or empty but for this run's lock."""
    from .lock import LOCK_NAME

    out = Path(out_dir)
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise UsageError(f"output directory is not empty: {out}")
    return out


write_random_bloom = write_random_model


def _tensor_specs(config):
    """(name as the causal LM saves it, shape, init) of every parameter, in model order, a tied LM head once; init
    is "normal" for matrices (normal(0, initializer_range)), "one" for 1-D weights (norm gains), "zero" for biases."""
    from ..families import family_for

    with torch.device("meta"):
        model = family_for(config).model_class()(config)
    for name, p in model.named_parameters():
        init = "zero" if name.endswith("bias") else "one" if p.dim() == 1 else "normal"
        yield name, tuple(p.shape), init


def write_sharded_random_model(out_dir, shape: str = "tiny", *, n_layer: int | None = None,
                               vocab_size: int | None = None, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                               shard_bytes: int = 2 * 2**30, progress: bool = False) -> Path:
    """Write a random checkpoint of any named shape as sharded safetensors, tensor by tensor.

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
    config = shape_config(shape, n_layer=n_layer, vocab_size=vocab_size)
    config.dtype = dtype_name(dtype)
    with writing(out, "directory"):
        out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
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

    specs = list(_tensor_specs(config))
    for name, shp, init in tqdm(specs, desc="write", unit="tensor", disable=not progress):
        t = torch.empty(shp, dtype=dtype)
        if init == "normal":
            rows = max(1, (64 * 2**20) // (4 * shp[1]))  # draw 64 MiB of fp32 at a time
            for r in range(0, shp[0], rows):
                t[r:r + rows] = torch.randn(min(rows, shp[0] - r), shp[1], generator=gen) * std
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
        byte_tokenizer(add_bos=_family(SHAPES[shape][0]).interface).save_pretrained(out)
    return out


write_sharded_random_bloom = write_sharded_random_model

"""Layer-streamed diagnosis: one BLOOM block in memory at a time, read straight from (sharded) safetensors.

``diagnose_streamed(model_dir, tokenizer, prompts)`` never instantiates the model. It reads ``config.json`` and the
safetensors index (or the single ``model.safetensors``), gathers only the embedding rows the prompts use, applies
the embedding layernorm, then for each block opens just that block's tensors, runs every prompt batch through it
with the fused statistics, and frees it. Peak memory is about one block (in the compute dtype) plus the hidden
states of all prompts; the 250,880-row embedding matrix is never loaded whole.

The result is the HeadReport that :func:`~alibi_surgery.diagnosis.diagnose.diagnose` gives for the same checkpoint, prompts
and backend: the same modules run on the same inputs in the same order (bit-identical on CPU in fp32 with the torch
backend). Limits: the fused backends only (``triton``/``torch``), no ``eager``; tensor names with or without the
``transformer.`` prefix that ``BloomForCausalLM`` writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..attention.backends import resolve_backend
from .diagnose import build_report, check_options, encode_prompts, padded_batches
from ..errors import UsageError
from ..io.checkpoint import check_finite, verify_checkpoint
from ..io.loading import load_config, resolve_model_dir
from ..attention.patch import head_stats, patched
from .report import HeadReport, Thresholds

__all__ = ["CheckpointIndex", "diagnose_streamed", "diagnose_path", "block_bytes", "model_bytes", "free_bytes", "should_stream"]


class CheckpointIndex:
    """Where each tensor of a safetensors BLOOM checkpoint lives (names without the ``transformer.`` prefix)."""

    def __init__(self, model_dir: str | Path):
        self.dir = resolve_model_dir(str(model_dir))
        self.config = load_config(str(model_dir))
        self.files = {name: (e.file, e.stored) for name, e in verify_checkpoint(self.dir, self.config).items()}

    def load(self, names: list[str], device, dtype) -> dict[str, torch.Tensor]:
        """The named tensors (stripped names), opening each shard once, converted to ``dtype`` on ``device``."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.files]
        if missing:
            raise UsageError(f"{self.dir}: tensor {missing[0]} is missing from the checkpoint")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n][0], []).append(n)
        out = {}
        for file, group in by_file.items():
            with safe_open(file, "pt") as f:
                for n in group:
                    out[n] = f.get_tensor(self.files[n][1]).to(device=device, dtype=dtype)
        check_finite(out.items(), str(self.dir))
        return out

    def embedding_rows(self, ids: torch.Tensor, device, dtype) -> torch.Tensor:
        """``word_embeddings.weight[ids]`` reading only the rows in ``ids`` (sorted unique), as ``[*ids.shape, H]``."""
        from safetensors import safe_open

        file, stored = self.files["word_embeddings.weight"]
        unique, inverse = torch.unique(ids.cpu(), return_inverse=True)
        with safe_open(file, "pt") as f:
            table = f.get_slice(stored)
            n_rows = table.get_shape()[0]
            if int(unique[-1]) >= n_rows:
                raise UsageError(f"token id {int(unique[-1])} is outside the embedding table ({n_rows} rows)")
            rows = torch.cat([table[int(i):int(i) + 1] for i in unique])
        check_finite([("word_embeddings.weight (used rows)", rows)], str(self.dir))
        return rows.to(device=device, dtype=dtype)[inverse.to(device)]


def block_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of one BLOOM block's parameters in ``dtype``."""
    h = config.hidden_size
    n = 3 * h * h + 3 * h + h * h + h + 4 * h * h + 4 * h + 4 * h * h + h + 4 * h  # qkv, dense, mlp, 2 layernorms
    return n * torch.finfo(dtype).bits // 8


def model_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the whole base model's parameters (blocks, embeddings, layernorms) in ``dtype``."""
    h = config.hidden_size
    return block_bytes(config, dtype) * config.n_layer + (config.vocab_size * h + 4 * h) * torch.finfo(dtype).bits // 8


def free_bytes(device: torch.device) -> int:
    """Memory available for new allocations: ``MemAvailable`` on CPU, ``cudaMemGetInfo`` free on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def should_stream(config, dtype: torch.dtype, device: torch.device, headroom: float = 1.25) -> bool:
    """True when loading the whole model (with 25% headroom for activations) would not fit the free memory."""
    return model_bytes(config, dtype) * headroom > free_bytes(device)


def _block_names(layer: int, block) -> list[str]:
    return [f"h.{layer}.{name}" for name, _ in block.named_parameters()]


def diagnose_streamed(model_dir, tokenizer, prompts, *, batch_size: int = 8, max_length: int | None = None,
                      backend: str = "auto", device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      exclude_first_query: bool = False, normalize_entropy: bool = False,
                      thresholds: Thresholds = Thresholds(), progress: bool = False) -> HeadReport:
    """Diagnose a BLOOM checkpoint block by block (see the module docstring). ``dtype``: the compute dtype
    (default: float32 on CPU, bfloat16 on CUDA); weights are converted to it block by block."""
    from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

    prompts = check_options(prompts, backend, batch_size, max_length)
    if backend == "eager":
        raise UsageError("streamed diagnosis needs a fused backend (triton or torch), not eager")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ckpt = CheckpointIndex(model_dir)
    config = ckpt.config
    concrete = resolve_backend(backend, device, head_dim=config.hidden_size // config.n_head)
    options = dict(exclude_first_query=exclude_first_query, normalize_entropy=normalize_entropy)
    with torch.inference_mode():
        encoded, batches = encode_prompts(tokenizer, prompts, max_length, batch_size)
        norm = ckpt.load(["word_embeddings_layernorm.weight", "word_embeddings_layernorm.bias"], device, dtype)
        hidden, masks = [], []
        for ids, mask in padded_batches(tokenizer, encoded, batches, device):
            x = ckpt.embedding_rows(ids, device, dtype)
            x = torch.nn.functional.layer_norm(x, (config.hidden_size,), norm["word_embeddings_layernorm.weight"],
                                               norm["word_embeddings_layernorm.bias"], config.layer_norm_epsilon)
            hidden.append(x)
            # the patched attention reads key validity off the last query row of BLOOM's additive 4D mask
            last_row = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(mask == 0,
                                                                                        torch.finfo(dtype).min)
            masks.append((mask, last_row[:, None, None, :], build_alibi_tensor(mask, config.n_head, dtype)))
        sums = torch.zeros(config.n_layer, config.n_head, 3, dtype=torch.float64)
        for layer in tqdm(range(config.n_layer), desc="diagnose (streamed)", unit="block", disable=not progress):
            with torch.device("meta"):
                block = BloomBlock(config, layer_idx=layer)
            weights = ckpt.load(_block_names(layer, block), device, dtype)
            block.load_state_dict({k.split(".", 2)[2]: v for k, v in weights.items()}, assign=True)
            block.eval()
            del weights
            with patched(block, concrete), head_stats(block, **options) as sink:
                for i, (_, mask4d, alibi) in enumerate(masks):
                    hidden[i] = block(hidden[i], alibi, mask4d, use_cache=False)[0]
            sums[layer] = sink.sums[0]
            del block
    return build_report(sums, encoded, model_name=str(model_dir), dtype=dtype, device=device, backend=concrete,
                        max_length=max_length, thresholds=thresholds, streamed=True, **options)


def diagnose_path(model: str, prompts, *, device: torch.device, dtype: torch.dtype, stream: bool = False,
                  announce=None, **options) -> HeadReport:
    """Diagnose the checkpoint at ``model``: streamed when asked, or when the whole model would not fit the free
    memory (then ``announce(message)`` is called first); else loaded whole. ``options`` go to diagnose()."""
    from .diagnose import diagnose
    from ..io.loading import load_bloom, load_tokenizer

    config = CheckpointIndex(model).config
    if stream or should_stream(config, dtype, device):
        if not stream and announce is not None:
            announce(f"streaming block by block: {model} needs {model_bytes(config, dtype) / 2**30:.1f} GiB in "
                     f"{str(dtype).replace('torch.', '')}, more than the free memory on {device}")
        return diagnose_streamed(model, load_tokenizer(model), prompts, device=device, dtype=dtype, **options)
    net, tokenizer = load_bloom(model, dtype=str(dtype).replace("torch.", ""), device=str(device))
    return diagnose(net, tokenizer, prompts, **options)

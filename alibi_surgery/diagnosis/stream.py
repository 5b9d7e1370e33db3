"""Layer-streamed diagnosis: one block in memory at a time, read straight from (sharded) safetensors.

``diagnose_streamed(model_dir, tokenizer, prompts)`` never instantiates the model. It reads ``config.json`` and the
safetensors index (or the single ``model.safetensors``), gathers only the embedding rows the prompts use and lets
the family's adapter finish the embedding (BLOOM's embedding layernorm), then for each block builds the family's
block on the meta device, opens just that block's tensors, runs every prompt batch through it with the fused
statistics, and frees it. Peak memory is about one block (in the compute dtype) plus the hidden states of all
prompts; the embedding matrix (250,880 rows for BLOOM) is never loaded whole.

Inside an initialised process group (``torchrun``) each rank streams every block over its share of the prompt
batches and the sums are added over ranks at the end, as in :func:`~alibi_surgery.diagnosis.diagnose.diagnose`.

The result is the HeadReport that :func:`~alibi_surgery.diagnosis.diagnose.diagnose` gives for the same checkpoint,
prompts and backend: the same modules run on the same inputs in the same order (bit-identical on CPU in fp32 with the
torch backend). Limits: the fused backends only (``triton``/``torch``), no ``eager``; tensor names with or without the
``transformer.`` prefix that the causal LMs write.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..allocator import release_after
from ..attention.backends import resolve_backend
from .dormancy import DEFAULT_THRESHOLD, DormancyCounter
from ..families.base import training_context
from .sinks import DEFAULT_SINK_EPSILON, check_sink_epsilon
from .diagnose import build_report, check_options, encode_prompts, padded_batches, rank_batches
from ..distributed import is_main, rank_guard, sum_across
from ..errors import UsageError
from ..io.shards import CheckpointIndex
from ..io.loading import dtype_name
from ..attention.patch import head_stats, patched
from .extremes import DEFAULT_DORMANT_FRACTION, ExtremeSink, attention_extremes, check_dormant_fraction
from .report import HeadReport, Thresholds

__all__ = ["CheckpointIndex", "diagnose_streamed", "diagnose_path", "block_bytes", "model_bytes", "free_bytes",
           "should_stream"]


def block_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of one block's parameters in ``dtype``."""
    from ..families import family_for

    return family_for(config).block_params(config) * torch.finfo(dtype).bits // 8


def model_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the whole model's parameters in ``dtype`` (a tied LM head counted once)."""
    from ..families import family_for

    return family_for(config).params(config) * torch.finfo(dtype).bits // 8


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


class _Tensors:
    """What an adapter's ``embed`` reads: ``tensors(names)`` and ``tensors.rows(name, ids)``."""

    def __init__(self, ckpt: CheckpointIndex, device, dtype):
        self.ckpt, self.device, self.dtype = ckpt, device, dtype

    def __call__(self, names):
        return self.ckpt.load(list(names), self.device, self.dtype)

    def rows(self, name, ids):
        return self.ckpt.embedding_rows(name, ids, self.device, self.dtype)


def diagnose_streamed(model_dir, tokenizer, prompts, *, batch_size: int = 8, max_length: int | None = None,
                      backend: str = "auto", device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      exclude_first_query: bool = False, normalize_entropy: bool = False,
                      thresholds: Thresholds = Thresholds(), progress: bool = False,
                      dormancy_threshold: float = DEFAULT_THRESHOLD,
                      dormant_fraction: float = DEFAULT_DORMANT_FRACTION,
                      sink_epsilon: float = DEFAULT_SINK_EPSILON) -> HeadReport:
    """Diagnose a checkpoint block by block (see the module docstring). ``dtype``: the compute dtype
    (default: float32 on CPU, bfloat16 on CUDA); weights are converted to it block by block. The extreme-token
    metrics and the first-token sink share (:mod:`~alibi_surgery.diagnosis.sinks`) are measured too: each block's
    residual input is the hidden states fed to it."""
    prompts = check_options(prompts, backend, batch_size, max_length)
    check_dormant_fraction(dormant_fraction)
    check_sink_epsilon(sink_epsilon)
    if backend == "eager":
        raise UsageError("streamed diagnosis needs a fused backend (triton or torch), not eager")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ckpt = CheckpointIndex(model_dir)
    config, family = ckpt.config, ckpt.family
    if family.interface:
        raise UsageError(f"streamed diagnosis covers the ALiBi families only, not {family.name}: load the model whole")
    layout = family.layout(config)
    concrete = resolve_backend(backend, device, head_dim=layout.head_dim)
    options = dict(exclude_first_query=exclude_first_query, normalize_entropy=normalize_entropy)
    tensors = _Tensors(ckpt, device, dtype)
    dormancy = DormancyCounter(dormancy_threshold)
    encoded, batches = encode_prompts(tokenizer, prompts, max_length, batch_size)
    batches = rank_batches(encoded, batches)  # this rank's share (all of them in a single process)
    with rank_guard("streamed diagnosis"), torch.inference_mode():
        hidden, inputs, masks = [], [], []
        for ids, mask in padded_batches(tokenizer, encoded, batches, device):
            hidden.append(family.embed(tensors, ids, config, device, dtype))
            inputs.append(family.block_inputs(mask, config, dtype))
            masks.append(mask.bool())
        sums = torch.zeros(layout.n_layer, layout.n_head, 3, dtype=torch.float64)
        sinks = torch.zeros(layout.n_layer, layout.n_head, dtype=torch.float64)
        extremes = ExtremeSink(layout.n_layer, layout.n_head)
        for layer in tqdm(range(layout.n_layer), desc="diagnose (streamed)", unit="block",
                          disable=not (progress and is_main())):
            with torch.device("meta"):
                block = family.block_class()(config, layer_idx=layer)
            names = family.block_names(layer, block)
            weights = ckpt.load(names, device, dtype)
            # checkpoint names are "<blocks>.<layer>.<name in the block>"
            block.load_state_dict({k.split(".", 2)[2]: v for k, v in weights.items()}, assign=True)
            block.eval()
            del weights
            dormancy.add(*family.mlp_weights(block))
            block_extremes = ExtremeSink(1, layout.n_head)
            with patched(block, concrete), head_stats(block, **options, sink_epsilon=sink_epsilon) as sink, \
                    attention_extremes(block, block_extremes), \
                    release_after(family.attention_modules(block), device.type == "cpu"):
                for i, (args, kwargs) in enumerate(inputs):
                    block_extremes.add_residual(0, hidden[i], masks[i])
                    out = block(hidden[i], *args, **kwargs)
                    hidden[i] = out[0] if isinstance(out, tuple) else out
            sums[layer], sinks[layer] = sink.sums[0], sink.sinks[0]
            extremes.merge(layer, block_extremes)
            del block
    sum_across(sums, sinks, *extremes.sum_tensors())  # every rank's batches: one all_reduce (none in one process)
    return build_report(sums, encoded, model_name=str(model_dir), dtype=dtype, device=device, backend=concrete,
                        max_length=max_length, thresholds=thresholds, streamed=True, family=family.name,
                        mlp_dormancy=dormancy.result(), extremes=extremes, dormant_fraction=dormant_fraction,
                        context=training_context(config), sinks=(sinks, sink_epsilon), **options)


def diagnose_path(model: str, prompts, *, device: torch.device, dtype: torch.dtype, stream: bool = False,
                  announce=None, **options) -> HeadReport:
    """Diagnose the checkpoint at ``model``: streamed when asked, or when the whole model would not fit the free
    memory (then ``announce(message)`` is called first); else loaded whole. ``options`` go to diagnose()."""
    from .diagnose import diagnose
    from ..io.loading import load_model, load_tokenizer

    index = CheckpointIndex(model)
    config = index.config
    if index.family.interface:  # no block runner for these: always loaded whole
        if stream:
            raise UsageError(f"streamed diagnosis covers the ALiBi families only; {model} is a {index.family.name} "
                             f"model: drop --stream to load it whole")
    elif stream or should_stream(config, dtype, device):
        if not stream and announce is not None:
            announce(f"streaming block by block: {model} needs {model_bytes(config, dtype) / 2**30:.1f} GiB in "
                     f"{str(dtype).replace('torch.', '')}, more than the free memory on {device}")
        return diagnose_streamed(model, load_tokenizer(model), prompts, device=device, dtype=dtype, **options)
    net, tokenizer = load_model(model, dtype=dtype_name(dtype), device=str(device))
    return diagnose(net, tokenizer, prompts, **options)

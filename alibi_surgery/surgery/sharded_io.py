"""Checkpoints and the final model of an FSDP2 surgery (:mod:`.sharded`), written by every rank together.

* :func:`save_sharded` writes the trained head parameters and their AdamW state with Distributed Checkpoint
  (``torch.distributed.checkpoint``: each rank its own shards, one ``.metadata`` for all) into ``.tmp-NAME``, then
  rank 0 writes ``meta`` as the completion marker and moves the directory into place: a checkpoint is complete or
  absent. A rank whose write fails makes the save raise on every rank (DCP gathers the ranks' results), and rank 0
  removes the partial directory. The frozen weights are not in it (they are the input model's).
* :func:`load_sharded` restores them into a model sharded over any world size (DCP reshards on load) and returns
  ``meta``.
* :func:`write_final` gathers the model one module at a time (:meth:`HeadParams.full_state`), rank 0 writes it as
  safetensors shards of at most ``max_shard_bytes`` with transformers' index, the config and the tokenizer, into
  ``.tmp-NAME`` and then into place: stock ``from_pretrained`` loads it.

Every function is collective: call it on every rank. Limits: the ranks share one file system (a local disk for
one node, a network file system across nodes); a tied output embedding is written once, under its first name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from ..distributed import barrier, is_main
from ..errors import WriteError
from ..io.files import atomic_write_text, replace_dir
from .sharded import COLS, ROW_BIAS, ROWS, HeadParams

__all__ = ["save_sharded", "load_sharded", "write_final", "META_FILE"]

META_FILE = "trainer_state.json"
_HEAD = (ROWS, ROW_BIAS, COLS)


def _staging(final: Path) -> Path:
    """``.tmp-NAME`` beside ``final``, emptied by rank 0; every rank returns once it exists."""
    tmp = final.with_name(f".tmp-{final.name}")
    if is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    return tmp


def _states(root: nn.Module, optimizer) -> dict:
    """The head parameters' (sharded) state and the optimizer's, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(root, optimizer)
    return {"model": {k: v for k, v in model_state.items() if k.rsplit(".", 1)[-1] in _HEAD},
            "optim": optim_state}


def save_sharded(final, root: nn.Module, optimizer, meta: dict, before_marker=None) -> Path:
    """Write a checkpoint of ``root`` (an FSDP module with :class:`HeadParams`) and ``optimizer`` at ``final``;
    ``before_marker()`` (tests: a pause) runs on every rank once the shards are written, before the marker."""
    import torch.distributed.checkpoint as dcp

    final = Path(final)
    tmp = _staging(final)
    try:
        dcp.save(_states(root, optimizer), checkpoint_id=str(tmp))  # a rank's failure is raised on every rank
    except BaseException as exc:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        failures = getattr(exc, "failures", None)  # DCP's CheckpointException (a BaseException): rank -> (exc, tb)
        if not failures:
            raise
        rank, (first, _) = min(failures.items())
        more = f" and {len(failures) - 1} more" if len(failures) > 1 else ""
        raise WriteError(f"writing checkpoint {final} failed on rank {rank}{more}: {type(first).__name__}: "
                         f"{first}") from None
    if before_marker is not None:
        before_marker()
    barrier()
    if is_main():
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1) + "\n")  # last: marks it complete
        replace_dir(tmp, final)
    barrier()
    return final


def load_sharded(path, root: nn.Module, optimizer) -> dict:
    """Restore :func:`save_sharded`'s checkpoint at ``path`` into ``root`` and ``optimizer`` (any world size);
    returns its ``meta``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    state = _states(root, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    return meta


def write_final(final, model: nn.Module, heads: HeadParams, tokenizer=None, *,
                max_shard_bytes: int = 2 * 10**9, dtype=None) -> Path:
    """Write ``model`` (the causal LM inside the FSDP root) with the trained values folded in at ``final``, its
    floating-point tensors in ``dtype`` (default: as they are)."""
    from safetensors.torch import save_file

    final = Path(final)
    tmp = _staging(final)
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current and is_main():
            name = f"part-{len(shards):05d}.safetensors"
            save_file(current, str(tmp / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
        current, size = {}, 0

    tied = _tied_names(model)
    for key, tensor in heads.full_state(model):
        if key in tied:
            continue
        if not is_main():
            continue  # every rank gathers (a collective); rank 0 alone keeps and writes
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[key] = tensor.contiguous().cpu()
        size += nbytes
    flush()
    if is_main():
        n = len(shards)
        weight_map = {}
        for i, (name, keys) in enumerate(shards):
            target = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (tmp / name).rename(tmp / target)
            weight_map.update({k: target for k in keys})
        if n > 1:
            total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            atomic_write_text(tmp / "model.safetensors.index.json",
                              json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config = model.config
        if dtype is not None:
            import copy

            config = copy.deepcopy(config)
            config.dtype = dtype
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, final)
    barrier()
    return final


def _tied_names(model: nn.Module) -> set:
    """Names of parameters that stock ``save_pretrained`` leaves out because they are tied to another (the output
    embedding of a model with ``tie_word_embeddings``)."""
    config = getattr(model, "config", None)
    tie = getattr(config, "tie_word_embeddings", False)
    if not tie or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return set()
    out = model.get_output_embeddings()
    return {f"{name}.weight" for name, module in model.named_modules() if module is out}


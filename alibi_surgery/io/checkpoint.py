"""Checking a safetensors checkpoint (of any registered family) before any of it is used.

:func:`verify_checkpoint` reads only the safetensors headers (a few KiB per shard) and refuses, with one line naming
the file and the tensor:

* a shard the index names but the directory lacks;
* a header that is not safetensors (bad length, not JSON, offsets outside the file);
* a truncated shard: fewer bytes than its header promises;
* a model tensor that is missing, or whose shape differs from what ``config.json`` implies.

:func:`check_finite` finds NaN or infinite weights, tensor by tensor, in bounded memory. Both are run by
:func:`~alibi_surgery.io.loading.load_model` and by streamed diagnosis, so no command trains on, or diagnoses, a broken
model. Pickle files are never opened here or anywhere else in the package.

:func:`stored_dtype` tells the dtype a checkpoint's weights are stored in, and :func:`cast_checkpoint` rewrites a
directory's safetensors files in another dtype (one shard in memory at a time): ``repair`` saves ``final/`` in the
input's dtype, whatever it trained in.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, NamedTuple

import torch

from ..errors import UsageError
from .loading import DTYPES, dtype_name, safetensors_code

__all__ = ["TensorEntry", "verify_checkpoint", "read_header", "check_finite", "stored_dtype", "cast_checkpoint",
           "PREFIX"]

PREFIX = "transformer."  # the causal LM's names for BLOOM, MPT and Falcon (Family.prefix); a base-model save has none
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
# safetensors code -> floating dtype, from the one dtype table (float64 too: a checkpoint may hold it)
_FLOAT_DTYPES = {safetensors_code(d): d for d in (*DTYPES.values(), torch.float64)}
_DTYPE_BYTES = {**{code: d.itemsize for code, d in _FLOAT_DTYPES.items()}, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class TensorEntry(NamedTuple):
    """Where one tensor lives and the shape its header gives."""

    file: Path
    stored: str  # the name in the file (with or without the ``transformer.`` prefix)
    shape: tuple


def read_header(file: Path) -> dict:
    """The tensor entries of one safetensors file's header; UsageError if the file is not complete safetensors."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise UsageError(f"{file} is not a safetensors file: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise UsageError(f"{file} is truncated or not safetensors: its header claims {n} bytes, the file has "
                             f"{size}")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise UsageError(f"{file} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise UsageError(f"{file} is not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            shape = tuple(int(s) for s in entry["shape"])
            width = _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{file}: tensor {name} has a malformed safetensors header entry") from None
        count = 1
        for s in shape:
            count *= s
        if stop - begin != count * width or begin < 0:
            raise UsageError(f"{file}: tensor {name} claims {stop - begin} bytes for shape {list(shape)} "
                             f"({entry['dtype']})")
        end = max(end, stop)
    if 8 + n + end > size:
        raise UsageError(f"{file} is truncated: {size} bytes, but its header needs {8 + n + end}")
    return header


def _shards(model_dir: Path) -> dict[str, str]:
    """Stored tensor name -> shard file name, from the index or the single ``model.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{index} is not a safetensors index: {exc}") from None
        return weight_map
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise UsageError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    return {name: single.name for name in read_header(single)}


def expected_shapes(config) -> dict[str, tuple]:
    """Every base-model tensor ``config`` implies (names without the ``transformer.`` prefix) -> shape."""
    from ..families import family_for

    family = family_for(config)
    with torch.device("meta"):
        model = family.base_model(family.model_class()(config))
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def verify_checkpoint(model_dir, config) -> dict[str, TensorEntry]:
    """Check every shard header of a checkpoint against ``config``; returns base-model tensor name (no prefix)
    -> :class:`TensorEntry`. Reads headers only."""
    from ..families import family_for

    model_dir = Path(model_dir)
    prefix = family_for(config).prefix
    weight_map = _shards(model_dir)
    headers: dict[str, dict] = {}
    entries: dict[str, TensorEntry] = {}
    for stored, shard in weight_map.items():
        file = model_dir / shard
        if shard not in headers:
            if not file.is_file():
                raise UsageError(f"{model_dir}: shard {shard} named in the index is missing")
            headers[shard] = read_header(file)
        if stored not in headers[shard]:
            raise UsageError(f"{file}: tensor {stored} named in the index is not in the file")
        name = stored[len(prefix):] if stored.startswith(prefix) else stored
        entries[name] = TensorEntry(file, stored, tuple(headers[shard][stored]["shape"]))
    for name, shape in expected_shapes(config).items():
        if name not in entries:
            raise UsageError(f"{model_dir}: tensor {name} is missing from the checkpoint")
        if entries[name].shape != shape:
            raise UsageError(f"{entries[name].file.name}: tensor {entries[name].stored} has shape "
                             f"{list(entries[name].shape)}, but config.json implies {list(shape)}")
    return entries


def check_finite(named: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """UsageError naming the first tensor holding NaN or inf. Scans in 16M-element pieces (bounded extra memory)."""
    for name, t in named:
        flat = t.detach().reshape(-1)
        for piece in flat.split(1 << 24):
            if not torch.isfinite(piece).all():
                bad = int((~torch.isfinite(flat)).sum())
                raise UsageError(f"{where}: weight {name} holds {bad} NaN/inf value(s); refusing to use this model")


def stored_dtype(model_dir) -> torch.dtype | None:
    """The floating dtype holding most of the weights of the checkpoint in ``model_dir`` (headers only), or None
    when it has no floating tensors."""
    model_dir = Path(model_dir)
    counts: dict[str, int] = {}
    for shard in sorted(set(_shards(model_dir).values())):
        for entry in read_header(model_dir / shard).values():
            if entry["dtype"] in _FLOAT_DTYPES:
                n = 1
                for d in entry["shape"]:
                    n *= int(d)
                counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + n
    return _FLOAT_DTYPES[max(counts, key=counts.get)] if counts else None


def cast_checkpoint(model_dir, dtype: torch.dtype) -> None:
    """Rewrite every safetensors file in ``model_dir`` with its floating tensors in ``dtype`` (one file in memory at
    a time; files already in ``dtype`` are left alone), and record the dtype in ``config.json`` and the index's
    ``total_size``. For a directory being prepared (not yet moved into place): files are rewritten in place."""
    from safetensors.torch import load_file, save_file

    model_dir = Path(model_dir)
    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        header = read_header(file)
        names = {e["dtype"] for e in header.values() if e["dtype"] in _FLOAT_DTYPES}
        if names and any(_FLOAT_DTYPES[n] != dtype for n in names):
            tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in load_file(file).items()}
            save_file(tensors, file, metadata={"format": "pt"})
            header = read_header(file)
        total += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2) + "\n")
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    name = dtype_name(dtype)
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "dtype":
            config[key] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

"""Loading a model directory of a registered family for the CLI, with one-line errors for every bad input.

Only safetensors weights are read (pickle ``.bin`` checkpoints are refused, with how to convert them), and remote
code is never run (``trust_remote_code=False`` is passed explicitly; the model class is always the family's own
transformers class, e.g. ``BloomForCausalLM``, whatever ``auto_map`` a config names). A hub id works only when the
local Hugging Face cache already holds it: nothing is downloaded. Before any weight is used, :func:`load_model`
checks the shard headers against ``config.json`` (truncation, missing tensors, wrong shapes) and the loaded weights
for NaN/inf. ``load_bloom`` is the same function under its first name.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from ..errors import UsageError

__all__ = ["parse_dtype", "parse_device", "resolve_model_dir", "load_model", "load_bloom", "load_config",
           "load_tokenizer", "quiet_transformers", "DTYPES", "dtype_name", "safetensors_code"]

# The one dtype table: every name the package accepts for a dtype. Byte widths are ``dtype.itemsize``, the name in
# config.json and reports :func:`dtype_name`, the safetensors code :func:`safetensors_code`.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def quiet_transformers():
    """No transformers log lines, progress bars ("Loading weights", "Writing model shards") or Python warnings
    inside the block; the previous settings come back after it. Every transformers load and save the package makes
    runs inside one, so the Python API prints nothing unless asked (``progress=True``)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name config.json and the reports use)."""
    return str(dtype).replace("torch.", "")


def safetensors_code(dtype: torch.dtype) -> str:
    """A floating dtype's code in a safetensors header: ``torch.bfloat16`` -> ``"BF16"``, ``torch.float32`` ->
    ``"F32"``."""
    return "BF16" if dtype == torch.bfloat16 else f"F{8 * dtype.itemsize}"


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``None`` means float32 on CPU and bfloat16 on CUDA."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unsupported dtype {name!r}; choose one of float32, float16, bfloat16")
    return DTYPES[name]


def parse_device(name: str | None) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unsupported device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_model_dir(model: str) -> Path:
    """A local directory, or a hub id already in the local cache; checks that it is a safetensors model of a
    registered family."""
    path = Path(model)
    if not path.exists():
        path = _from_cache(model)
    if not path.is_dir():
        raise UsageError(f"model path is not a directory: {model}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"no config.json in {model}: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise UsageError(f"config.json in {model} is not valid JSON: {exc}") from None
    from ..families import family_for

    family_for(config if isinstance(config, dict) else {}, model)
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise UsageError(f"{model} holds only pickle weights (.bin), which are refused: convert them to "
                             f"safetensors first (load in transformers, then save_pretrained(..., "
                             f"safe_serialization=True))")
        raise UsageError(f"no safetensors weights in {model}")
    return path


def _from_cache(model: str) -> Path:
    if model.count("/") == 1 and not model.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, local_files_only=True))
        except Exception:
            raise UsageError(f"model path does not exist: {model} (nor is it a hub id in the local cache)") \
                from None
    raise UsageError(f"model path does not exist: {model}")


def load_tokenizer(model: str):
    """The tokenizer of a model directory (one-line error when there is none)."""
    from transformers import AutoTokenizer

    path = resolve_model_dir(model)
    for name in ("tokenizer_config.json", "config.json"):
        try:
            auto_map = json.loads((path / name).read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if "AutoTokenizer" in auto_map:
            raise UsageError(f"the tokenizer in {model} needs custom code (auto_map in {name}), which alibi-surgery "
                             f"never runs: give it a directory with a standard tokenizer.json")
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception:
        raise UsageError(f"no usable tokenizer in {model} (tokenizer.json / tokenizer_config.json)") from None


def load_model(model: str, *, dtype: str | None = None, device: str | None = None):
    """Load ``(model, tokenizer)`` from a model directory, in eval mode, on the requested device and dtype."""
    from ..families import family_for
    from .checkpoint import check_finite, verify_checkpoint

    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    path = resolve_model_dir(model)
    config = load_config(model)
    verify_checkpoint(path, config)
    tokenizer = load_tokenizer(model)
    try:
        with quiet_transformers():
            net = family_for(config, model).model_class().from_pretrained(
                path, dtype=dt, use_safetensors=True, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise UsageError(f"could not load the weights in {model}: {_first_line(exc)}") from None
    net = net.to(dev).eval()
    check_finite(net.named_parameters(), str(model))  # on the device: fast on a GPU
    net.config._name_or_path = str(model)
    return net, tokenizer


load_bloom = load_model


def load_config(model: str):
    """The transformers config of a model directory, of its family's config class (one-line error when
    transformers rejects it)."""
    from ..families import family_for

    path = resolve_model_dir(model)
    family = family_for(json.loads((path / "config.json").read_text(encoding="utf-8")), model)
    try:
        with quiet_transformers():
            return family.config_class().from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise UsageError(f"config.json in {model} is not a usable {family.name} config: {_first_line(exc)}") \
            from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""Loading a BLOOM model directory for the CLI, with one-line errors for every bad input.

Only safetensors weights are read (pickle ``.bin`` checkpoints are refused), and ``trust_remote_code`` is never set.
A hub id works only when the local Hugging Face cache already holds it: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UsageError

__all__ = ["parse_dtype", "parse_device", "resolve_model_dir", "load_bloom"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


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
    """A local directory, or a hub id already in the local cache; checks that it is a safetensors BLOOM."""
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
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "bloom":
        raise UsageError(f"{model} is a {model_type or 'unknown'} model, not BLOOM: alibi-surgery needs BLOOM's "
                         f"ALiBi attention")
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
    """The tokenizer of a BLOOM model directory (one-line error when there is none)."""
    from transformers import AutoTokenizer

    path = resolve_model_dir(model)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
        raise UsageError(f"no usable tokenizer in {model} (tokenizer.json / tokenizer_config.json)") from None


def load_bloom(model: str, *, dtype: str | None = None, device: str | None = None):
    """Load ``(model, tokenizer)`` from a BLOOM directory, in eval mode, on the requested device and dtype."""
    from transformers import BloomForCausalLM

    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    path = resolve_model_dir(model)
    tokenizer = load_tokenizer(model)
    try:
        net = BloomForCausalLM.from_pretrained(path, dtype=dt, use_safetensors=True, local_files_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"could not load the weights in {model}: {first}") from None
    net.config._name_or_path = str(model)
    return net.to(dev).eval(), tokenizer

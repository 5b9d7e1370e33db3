"""Triton kernels for ALiBi attention, with a plain-torch reference beside each.

Imported as ``alibi_surgery.kernels`` (the directory is mapped into the package by the build; it is never importable
as a top-level ``kernels``, a name that belongs to Hugging Face's kernel hub).
"""

from .alibi import alibi_slopes, key_positions
from .attention_fwd import alibi_attention_fwd, pick_config
from .reference import alibi_attention_blocked

__all__ = ["alibi_slopes", "key_positions", "alibi_attention_fwd", "alibi_attention_blocked", "pick_config"]

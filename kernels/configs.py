"""Launch configurations of the attention kernels per GPU architecture, and the kernels' head-dim limit.

One place for the tile sizes, warps and pipeline stages each launcher picks (forward, and both backward passes),
for the interpreter (``arch`` None) and for sm_80/86/89/90. A configuration becomes the default on an architecture
only where it was timed faster there; every configuration returned compiles with 0 spills on sm_80/86/89/90
(``python -m alibi_surgery.kernels.compile_report``, re-checked by ``tests/kernels/test_aot.py``).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

__all__ = ["FwdConfig", "BwdConfig", "pick_config", "pick_bwd_config", "interpreting", "arch_of", "kernel_supports",
           "check_head_dim", "SUPPORTED_HEAD_DIMS", "cdiv", "block_d"]


class FwdConfig(NamedTuple):
    """Tile sizes and launch options chosen by :func:`pick_config`."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids: plain integer arithmetic on the host (``triton.cdiv`` is a constexpr
    function since Triton 3.9, several microseconds a call in every launch)."""
    return -(-a // b)


def block_d(head_dim: int) -> int:
    """The kernels' BLOCK_D: ``head_dim`` rounded up to a power of two (80 -> 128)."""
    return 1 << (head_dim - 1).bit_length()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_config(head_dim: int, dtype: torch.dtype, arch: int | None = None, with_stats: bool = False,
                window: bool = False) -> FwdConfig:
    """Tile sizes for one launch. ``arch`` is the compute capability as 80/86/89/90 (None: the interpreter);
    ``window``: the sliding-window variant (constexpr HAS_WINDOW), whose three key loops need more registers.

    fp16/bf16 on sm_90: the fastest spill-free tiles of a timed sweep on an H100 (``bench/tune_attention.py``,
    bf16, T = 2048, 8,192 tokens; docs/benchmarks.md). Elsewhere untimed spill-free tiles, with 2 pipeline stages
    on sm_86/sm_89 for their 99 KB of shared memory. fp32 uses IEEE (FMA) dot products, whose register appetite forces small tiles. Every
    configuration returned here compiles with 0 spills on sm_80/86/89/90 (``ptxas -v``, re-checked by a unit test).
    """
    wide = block_d(head_dim) > 64
    if arch is None:
        return FwdConfig(64, 64, 4, 1)
    if window and wide:  # untimed; the plain tiles spilled 24 bytes (sm_80 fp32) and 48-96 bytes (sm_90, 4 warps)
        if dtype == torch.float32:
            return FwdConfig(32, 16, 8, 1)
        if arch == 90:
            return FwdConfig(64, 64, 8, 3)
    if dtype == torch.float32:
        if wide and arch in (86, 89):  # 2 stages spilled 24-36 bytes at d = 80/96 once the bias took its origin
            return FwdConfig(32, 16, 8, 1)
        return FwdConfig(32, 16, 8, 2) if wide else FwdConfig(32, 32, 8, 2)
    if arch == 90:  # timed on an H100; at d = 64 the plain kernel's best tile spills 16 bytes with statistics
        if wide:
            return FwdConfig(64, 64, 4, 3)
        return FwdConfig(128, 64, 8, 3) if with_stats else FwdConfig(64, 128, 4, 2)
    if arch in (86, 89):  # untimed (no such GPU here): spill-free tiles within 99 KB of shared memory
        # At d > 64, 4 warps sat at 255 registers and spilled 12 bytes once padded rows were zeroed: 8 warps.
        return FwdConfig(64, 64, 8, 2) if wide else FwdConfig(128, 64, 8, 2)
    return FwdConfig(64, 64, 8, 3) if wide else FwdConfig(128, 64, 8, 3)  # sm_80, untimed


SUPPORTED_HEAD_DIMS = "a multiple of 16 from 16 to 128"


def kernel_supports(head_dim: int) -> str | None:
    """None when the Triton attention kernels (forward and backward) run ``head_dim``, else why not, in one line.
    The one statement of the kernels' head-dim limit: backend choice and the launchers all ask it."""
    if head_dim % 16 == 0 and 16 <= head_dim <= 128:
        return None
    return f"the triton kernels need head_dim to be {SUPPORTED_HEAD_DIMS}, got {head_dim}"


def check_head_dim(head_dim: int) -> None:
    """Raise ValueError unless :func:`kernel_supports` ``head_dim``."""
    reason = kernel_supports(head_dim)
    if reason is not None:
        raise ValueError(reason)


class BwdConfig(NamedTuple):
    """Tile sizes and launch options of the two backward kernels (chosen by :func:`pick_bwd_config`)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def pick_bwd_config(head_dim: int, dtype: torch.dtype, arch: int | None = None,
                    alibi_bf16: bool = False) -> tuple[BwdConfig, BwdConfig]:
    """(dkdv, dq) configurations for one launch; ``arch`` as 80/86/89/90, None for the interpreter; ``alibi_bf16``
    the kernels' ALIBI_BF16 (Falcon-RW's bias).

    fp16/bf16 on sm_90: the fastest spill-free tiles of a timed sweep on an H100 (``bench/tune_attention.py``:
    dK/dV first with dQ fixed, then dQ). Elsewhere 8-warp tiles, 2 stages on sm_86/sm_89 (99 KB of shared memory). fp32 runs IEEE dots and needs small
    tiles. Each returned configuration compiles with 0 spills on every architecture (re-checked by a unit test).
    """
    if arch is None:
        return BwdConfig(64, 64, 4, 1), BwdConfig(64, 64, 4, 1)  # big tiles: fewer interpreted steps
    wide = block_d(head_dim) > 64
    if dtype == torch.float32:
        return BwdConfig(16, 32, 8, 1), BwdConfig(16, 32, 8, 1)
    if arch == 90:  # timed on an H100
        if wide:
            return BwdConfig(32, 128, 8, 3), BwdConfig(128, 64, 8, 3)
        return BwdConfig(32, 64, 4, 2), BwdConfig(64, 64, 4, 3)
    stages = 2 if arch in (86, 89) else 3  # untimed (no such GPU here): the spill-free 8-warp tiles
    if wide:
        return BwdConfig(32, 64, 8, stages), BwdConfig(64, 32, 8, stages)
    # Falcon's bf16 rounding kept live in the dK/dV loop spilled 8-12 bytes at 64 x 64
    return BwdConfig(32 if alibi_bf16 else 64, 64, 8, stages), BwdConfig(64, 32, 8, stages)


def arch_of(device: torch.device) -> int:
    """Compute capability of a CUDA device as 80/86/89/90."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor

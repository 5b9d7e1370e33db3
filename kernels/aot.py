"""Ahead-of-time compilation of the kernels for real GPU targets, on a machine without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` lowers a kernel to PTX and a cubin with the
``ptxas`` that ships with Triton; its ``ptxas -v`` log reports registers, spills and stack. The interpreter proves the
maths; this proves that the same source really compiles for sm_80/86/89/90, within the register file and shared
memory. Needs only the ``triton`` wheel (its bundled ptxas), no CUDA driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .configs import block_d

__all__ = ["ARCHS", "SMEM_LIMIT", "CompileResult", "aot_compile", "fwd_signature", "compile_fwd", "bwd_signature", "compile_bwd", "adamw_signature",
           "compile_adamw"]

ARCHS = (80, 86, 89, 90)
# Largest dynamic shared memory one block may opt into, in bytes (CUDA programming guide, compute capabilities).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass(frozen=True)
class CompileResult:
    kernel: str
    arch: int
    config: dict
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    dtype_name: str = ""
    variant: str = ""

    @property
    def smem_limit(self) -> int:
        return SMEM_LIMIT[self.arch]

    @property
    def ok(self) -> bool:
        return self.spill_stores == 0 and self.spill_loads == 0 and self.shared_bytes <= self.smem_limit


def _parse_ptxas_log(text: str) -> dict:
    number = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    if "Used" not in text:
        raise RuntimeError("no ptxas -v report was captured")
    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack_bytes=number(r"(\d+) bytes stack frame"))


def aot_compile(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int,
                divisible: tuple[str, ...] = ()) -> CompileResult:
    """Compile ``fn`` for ``sm_<arch>`` and read back its resource usage.

    ``divisible`` names the arguments that the JIT would see as multiples of 16 (16-byte aligned pointers, strides
    of head_dim-multiple rows) and so specialise with ``tt.divisibility``; without it loads are not vectorised and
    the register report would not describe the kernel that really runs.
    """
    if not hasattr(fn, "cache_key"):
        raise RuntimeError("ahead-of-time compilation needs the JIT: unset TRITON_INTERPRET")
    # constexpr parameters left out take their defaults, as a JIT launch would (ASTSource needs every one)
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                    attrs={(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible})
    # Triton itself runs `ptxas -v` (with its own flags) to build the cubin; have it print that log, and bypass
    # the compile cache so that ptxas really runs.
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages))
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    report = _parse_ptxas_log(log.getvalue())
    config = dict(constexprs, num_warps=num_warps, num_stages=num_stages)
    return CompileResult(fn.__name__, arch, config, shared_bytes=compiled.metadata.shared, **report)


def fwd_signature(dtype: torch.dtype) -> dict:
    """Runtime-argument types of ``_alibi_fwd_kernel`` for inputs of ``dtype``."""
    from .attention_fwd import _alibi_fwd_kernel

    t = _TRITON_TYPE[dtype]
    pointers = dict(Q=t, K=t, V=t, O=t, LSE="fp32", KPOS="i32", KSTART="i32", SLOPES="fp32", STATS="fp32",
                    ROWS="fp32")
    sig = {}
    for name in _alibi_fwd_kernel.arg_names:
        if name in pointers:
            sig[name] = "*" + pointers[name]
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif not name.isupper():
            sig[name] = "i32"
    return sig


def _bias_variant(alibi_bf16: bool, window: bool = False, row_stats: bool = False, stats_grad: bool = False) -> str:
    """The ``variant`` of an attention result: "" for BLOOM's bias, "alibi-bf16" for Falcon-RW's rounded one,
    "window" for the sliding window (with BLOOM's bias), "row-stats" / "stats-grad" for the statistics with
    gradients (forward and backward)."""
    flags = (("alibi-bf16", alibi_bf16), ("window", window), ("row-stats", row_stats), ("stats-grad", stats_grad))
    return "+".join(n for n, on in flags if on)


def compile_fwd(arch: int, head_dim: int, dtype: torch.dtype, with_stats: bool,
                alibi_bf16: bool = False, window: bool = False, row_stats: bool = False) -> CompileResult:
    """Compile the forward kernel with exactly the configuration the launcher picks on ``arch`` (``alibi_bf16``:
    the Falcon-RW bias, constexpr ``ALIBI_BF16``; ``window``: the sliding window, constexpr ``HAS_WINDOW``;
    ``row_stats``: the per-row statistics whose gradients the backward takes, constexpr ``ROW_STATS``; the
    other score options and grouped-query attention's group size are runtime values). The group size ``n_group``
    is compiled as a runtime integer (GQA's case; the JIT specialises the value 1 of multi-head attention)."""
    from .attention_fwd import _alibi_fwd_kernel, pick_config

    cfg = pick_config(head_dim, dtype, arch, with_stats, window)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, WITH_STATS=with_stats, EXCLUDE_FIRST=False, NORMALIZE_ENTROPY=False,
                      UPCAST=False, IEEE=dtype == torch.float32, ALIBI_BF16=alibi_bf16, HAS_WINDOW=window,
                      ROW_STATS=row_stats)
    sig = fwd_signature(dtype)
    divisible = tuple(a for a in sig if sig[a].startswith("*") or a.startswith("stride_"))
    result = aot_compile(_alibi_fwd_kernel, sig, constexprs, arch, cfg.num_warps, cfg.num_stages, divisible)
    return dataclasses.replace(result, dtype_name=_TRITON_TYPE[dtype],
                               variant=_bias_variant(alibi_bf16, window, row_stats=row_stats))


def bwd_signature(kernel, dtype: torch.dtype) -> dict:
    """Runtime-argument types of a backward kernel (``_alibi_bwd_kernel`` or ``_bwd_delta_kernel``)."""
    t = _TRITON_TYPE[dtype]
    pointers = dict(Q=t, K=t, V=t, DO=t, DQ=t, DK=t, DV=t, O=t, LSE="fp32", DELTA="fp32", KPOS="i32", KSTART="i32",
                    SLOPES="fp32", GSTAT="fp32")
    sig = {}
    for name in kernel.arg_names:
        if name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif not name.isupper():
            sig[name] = "i32"
    return sig


def compile_bwd(arch: int, head_dim: int, dtype: torch.dtype, which: str, alibi_bf16: bool = False,
                stats_grad: bool = False) -> CompileResult:
    """Compile one backward pass (``which``: ``"dkdv"``, ``"dq"`` or ``"delta"``) with the configuration its
    launcher picks; the result is named ``_alibi_bwd_<which>``. ``stats_grad``: with the statistics' gradients
    (constexpr ``STATS_GRAD``)."""
    from .attention_bwd import DELTA_BLOCK, _alibi_bwd_kernel, _bwd_delta_kernel, pick_bwd_config

    width = block_d(head_dim)
    if which == "delta":
        kernel, num_warps, num_stages = _bwd_delta_kernel, 4, 1
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=width, BLOCK_M=DELTA_BLOCK)
    else:
        kernel = _alibi_bwd_kernel
        cfg = pick_bwd_config(head_dim, dtype, arch, alibi_bf16)[0 if which == "dkdv" else 1]
        num_warps, num_stages = cfg.num_warps, cfg.num_stages
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=width, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          DKDV=which == "dkdv", UPCAST=False, IEEE=dtype == torch.float32, ALIBI_BF16=alibi_bf16,
                          STATS_GRAD=stats_grad)
    sig = bwd_signature(kernel, dtype)
    divisible = tuple(a for a in sig if sig[a].startswith("*") or a.startswith("stride_"))
    result = aot_compile(kernel, sig, constexprs, arch, num_warps, num_stages, divisible)
    return dataclasses.replace(result, kernel=f"_alibi_bwd_{which}", dtype_name=_TRITON_TYPE[dtype],
                               variant=_bias_variant(alibi_bf16, stats_grad=stats_grad and which != "delta"))


def adamw_signature(dtype: torch.dtype, grad_dtype: torch.dtype | None = None, bf16_state: bool = False) -> dict:
    """Runtime-argument types of ``_adamw_kernel`` for params of ``dtype``, gradients of ``grad_dtype`` and fp32
    moments (bf16 with ``bf16_state``)."""
    from .adamw import _adamw_kernel

    state = "bf16" if bf16_state else "fp32"
    pointers = dict(P=_TRITON_TYPE[dtype], G=_TRITON_TYPE[grad_dtype or dtype], M=state, V=state, MASTER="fp32",
                    SCALE="fp32", TABLE="i64", BLOCK_TENSOR="i32")
    return {name: "*" + pointers[name] if name in pointers else "i32" if name in ("seed", "step") else "fp32"
            for name in _adamw_kernel.arg_names if name in pointers or not name.isupper()}


def compile_adamw(arch: int, dtype: torch.dtype, master: bool = False, stochastic: bool = False,
                  grad_scale: bool = False, vec: int | None = None, bf16_state: bool = False) -> CompileResult:
    """Compile the AdamW kernel as the launcher runs it for params (and gradients) of ``dtype``; ``bf16_state``:
    bf16 moments (the paper's optimizer). ``vec`` defaults to the widest vector, which every BLOOM head-slice
    layout gets (its sizes are multiples of 16)."""
    from .adamw import BLOCK, MAX_VEC, NUM_STAGES, NUM_WARPS, _adamw_kernel

    constexprs = dict(BLOCK=BLOCK, VEC=vec or MAX_VEC, HAS_MASTER=master, HAS_SCALE=grad_scale,
                      STOCHASTIC=stochastic, BF16_STATE=bf16_state)
    sig = adamw_signature(dtype, bf16_state=bf16_state)
    divisible = tuple(a for a in sig if sig[a].startswith("*"))
    result = aot_compile(_adamw_kernel, sig, constexprs, arch, NUM_WARPS, NUM_STAGES, divisible)
    variant = "+".join([n for n, on in (("master", master), ("sr", stochastic), ("bf16m", bf16_state),
                                        ("scale", grad_scale)) if on]) or "plain"
    return dataclasses.replace(result, dtype_name=_TRITON_TYPE[dtype], variant=variant)

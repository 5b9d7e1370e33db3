"""One-launch, multi-tensor AdamW step over strided slices of weight matrices (Triton), with a torch reference.

The trainable tensors are views into a model's weights: per selected head, rows of ``query_key_value.weight``
(a contiguous ``[3d, hidden]`` block), the same rows of its bias, and columns of ``dense.weight`` (``[hidden, d]``
with row stride ``n_head * d``). Updating them updates the model in place; nothing else in the matrices is read
or written. Gradients and optimizer state are flat buffers: tensor i occupies ``buf[offsets[i]:offsets[i] + numel]``
in the row-major order of its shape (see :meth:`SliceLayout.views`).

Maths (``torch.optim.AdamW``, non-amsgrad, single-tensor path), in fp32 for every parameter dtype:

    p = p * (1 - lr * wd);  m = lerp(m, g, 1 - b1);  v = b2 * v + (1 - b2) * g * g
    p = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),    bc1 = 1 - b1^step,  bc2 = 1 - b2^step

The scalars are computed on the host in float64 and rounded once to fp32, as torch does when it applies a Python
number to an fp32 tensor; ``lr`` and ``weight_decay`` are ordinary fp32 arguments, so a schedule never recompiles.
sqrt and the divisions are IEEE round-to-nearest (``sqrt_rn``, ``div_rn``), so fp32 results track torch to a few ulp.

Parameter dtypes:
    * fp32: updated in place (a ``master`` copy is allowed but redundant);
    * bf16: with ``master`` the update runs on the fp32 master and the param gets it rounded to nearest; without,
      the param is upcast, updated in fp32 and written back rounded to nearest, or stochastically rounded;
    * fp16: needs ``master`` (its 10-bit mantissa loses most AdamW updates);
    * bf16 with bf16 ``exp_avg``/``exp_avg_sq`` (the constexpr ``BF16_STATE``, chosen by the moments' dtype; no
      master, bf16 gradients): ``torch.optim.AdamW`` on bf16 parameters, the paper's optimizer. Each of torch's
      in-place operations rounds its fp32 result to bf16 (decay, lerp, ``v * b2``, addcmul, sqrt, the division,
      ``+ eps``, the update into the weights), and the kernel rounds at the same points, with ``lerp`` and
      ``addcmul`` as the single fused multiply-adds torch's kernels compute. Matches torch's CPU path bit for bit in
      the interpreter (tested: within one bf16 ulp per element per step); on a GPU, where both sides' compilers may
      fuse differently, the same bound is expected but untested here.
Gradients are in the params' dtype or fp32. ``grad_scale`` (a 1-element fp32 device tensor, e.g. a global-norm
clip from :func:`clip_scale`) multiplies every gradient inside the kernel, so clipping needs no host sync.

Stochastic rounding (bf16 without master): a uniform random 16-bit integer is added to the low half of the fp32
bit pattern, which is then truncated, so the result is one of the two neighbouring bf16 values with probabilities
proportional to proximity (unbiased). The random numbers are ``tl.randint`` (Philox) keyed by ``(seed, step)`` with
the element's flat index as counter: a given (seed, step, element) always rounds the same way, and a constant seed
still draws fresh numbers every step. The torch reference uses a ``torch.Generator`` seeded from (seed, step): same
distribution, a different stream. NaN is kept; values past the largest bf16 may round up to inf.

Launch: :class:`SliceLayout`, built once, holds a small int64 table (element offset of each tensor from the
lowest-addressed one, row length, row stride, flat offset, numel, first block) and a block -> tensor map, so one
kernel launch covers every tensor: each program updates one ``BLOCK``-element chunk of one tensor. When every
offset, row length and row stride is a multiple of ``VEC`` (up to 4 elements; all of BLOOM's are), each thread
moves ``VEC`` contiguous elements at once (vector loads and stores) and divides by the row length once per vector.
Limits: 1-D or 2-D params with a unit inner stride, at most 2**31 - 1 elements each, pairwise disjoint (checked);
the layout must be rebuilt if the weights move (the launcher checks the data pointers).
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from .configs import cdiv, interpreting

__all__ = ["SliceLayout", "adamw_step", "adamw_step_triton", "adamw_step_reference", "global_grad_norm",
           "clip_scale", "BLOCK", "INTERPRETER_BLOCK", "NUM_WARPS", "NUM_STAGES", "MAX_VEC"]

BLOCK = 1024  # elements per program on a GPU
# On CPU tensors (only the interpreter runs them) a program costs ~30 ms of Python whatever its size, so a layout
# takes 64x larger blocks there: bloom-1b7's 8 repaired heads (8.4 M elements) were 8,200 programs a step (2026-12-07).
# The update is elementwise and the stochastic rounding's counter is the element's index: any block gives the same bits.
INTERPRETER_BLOCK = 1 << 16
NUM_WARPS = 4
NUM_STAGES = 1  # no loops to pipeline
MAX_VEC = 4  # elements per vector: 16-byte fp32 state accesses (8 for bf16 measured no faster on H100)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_I32_MAX = 2**31 - 1


class SliceLayout:
    """Addresses of ``params`` (views into weight matrices) and their places in the flat buffers.

    Attributes: ``numel`` (total elements), ``offsets`` (start of each tensor in the flat buffers), ``numels``,
    ``shapes``, ``vec`` (elements per vector access), ``n_blocks`` (programs per launch), ``base_index`` (the
    lowest-addressed param, whose pointer the kernel gets), and the device tables ``table`` (int64 ``[n, 6]``, in
    units of ``vec`` elements except the last column) and ``block_tensor`` (int32). ``block``: elements per program,
    a power of two; by default :data:`BLOCK` (what the AOT report compiles), or :data:`INTERPRETER_BLOCK` for CPU
    tensors.
    """

    def __init__(self, params: list[torch.Tensor], block: int | None = None):
        params = list(params)
        if not params:
            raise ValueError("params must not be empty")
        if block is None:
            cpu = isinstance(params[0], torch.Tensor) and params[0].device.type == "cpu"
            block = INTERPRETER_BLOCK if cpu else BLOCK
        if block < MAX_VEC or block & (block - 1):
            raise ValueError(f"block must be a power of two >= {MAX_VEC}, got {block}")
        dtype, device = params[0].dtype, params[0].device
        if dtype not in _DTYPES:
            raise ValueError(f"params must be float32, bfloat16 or float16, got {dtype}")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or p.dtype != dtype or p.device != device:
                raise ValueError(f"params[{i}] must be a tensor of {dtype} on {device}, like params[0]")
            if p.dim() not in (1, 2) or p.numel() == 0:
                raise ValueError(f"params[{i}] must be a non-empty 1-D or 2-D tensor, got shape {list(p.shape)}")
            if p.stride(-1) != 1 and p.shape[-1] > 1:
                raise ValueError(f"params[{i}] must have a unit inner stride, got strides {list(p.stride())}")
            if p.numel() > _I32_MAX:
                raise ValueError(f"params[{i}] has {p.numel()} elements, more than 2**31 - 1")
        esize = params[0].element_size()
        self.base_index = min(range(len(params)), key=lambda i: params[i].data_ptr())
        base = params[self.base_index].data_ptr()
        self.dtype, self.device, self.block = dtype, device, block
        self.shapes = tuple(p.shape for p in params)
        self._identity = [(p.data_ptr(), p.shape, p.stride()) for p in params]
        self.numels = tuple(p.numel() for p in params)
        self.offsets = (0, *itertools.accumulate(self.numels[:-1]))
        self.numel = sum(self.numels)

        rows = []  # (element offset from base, row count, row length, row stride)
        for i, p in enumerate(params):
            delta = p.data_ptr() - base
            if delta % esize:
                raise ValueError(f"params[{i}] is not a whole number of elements away from params[{self.base_index}]")
            n_rows, row_len = (1, p.shape[0]) if p.dim() == 1 else p.shape
            stride = p.stride(0) if p.dim() == 2 and n_rows > 1 else row_len
            if stride < row_len:
                raise ValueError(f"params[{i}] overlaps itself (row stride {stride} < row length {row_len})")
            rows.append((delta // esize, n_rows, row_len, stride))
        _check_disjoint(rows)

        g = 0
        for addr, _, row_len, stride in rows:
            g = math.gcd(g, addr, row_len, stride)
        for off in self.offsets:
            g = math.gcd(g, off)
        self.vec = min(MAX_VEC, g & -g)  # largest power of two dividing them all
        table, block_tensor, first = [], [], 0
        for i, (addr, n_rows, row_len, stride) in enumerate(rows):
            n_blocks = cdiv(self.numels[i], block)
            v = self.vec
            table.append([addr // v, row_len // v, stride // v, self.offsets[i] // v, self.numels[i] // v, first])
            block_tensor += [i] * n_blocks
            first += n_blocks
        self.n_blocks = first
        self.table = torch.tensor(table, dtype=torch.int64, device=device)
        self.block_tensor = torch.tensor(block_tensor, dtype=torch.int32, device=device)

    def __len__(self) -> int:
        return len(self.numels)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's slice of a flat buffer, shaped like its param (views, not copies)."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"flat buffer must be 1-D with {self.numel} elements, got shape {list(flat.shape)}")
        return [flat[o:o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes)]

    def check_params(self, params: list[torch.Tensor]) -> None:
        """ValueError unless ``params`` are the very tensors (addresses, shapes, strides) the layout was built on."""
        if (len(params) != len(self) or params[0].dtype != self.dtype
                or [(p.data_ptr(), p.shape, p.stride()) for p in params] != self._identity):
            raise ValueError("params do not match the layout (moved, reshaped or reordered?): rebuild SliceLayout")


def _check_disjoint(rows) -> None:
    """ValueError unless no two tensors can share an element. Tensors whose address ranges overlap (column slices
    of one matrix) must share the row stride S and cover disjoint arcs of the residues modulo S."""
    spans = sorted((addr, addr + (n - 1) * s + length, i) for i, (addr, n, length, s) in enumerate(rows))
    for k, (_, end, i) in enumerate(spans):
        for start_j, _, j in spans[k + 1:]:
            if start_j >= end:
                break
            if not _interleave(rows[i], rows[j]):
                raise ValueError(f"params[{min(i, j)}] and params[{max(i, j)}] overlap")


def _interleave(a, b) -> bool:
    strided = [r for r in (a, b) if r[1] > 1]
    if not strided or any(r[3] != strided[0][3] for r in strided):
        return False
    s = strided[0][3]
    c = (b[0] - a[0]) % s  # a covers residues [0, len_a), b covers [c, c + len_b), relative to a's start
    return a[2] <= c and c + b[2] <= s


@triton.jit
def _rne_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), still as fp32; NaN passes through. Done on the bit
    pattern, so it is the same on GPUs and in the interpreter (whose own fp32 -> bf16 cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit(do_not_specialize=["seed", "step"])
def _adamw_kernel(
    P, G, M, V, MASTER, SCALE, TABLE, BLOCK_TENSOR,
    decay, w1, beta2, w2, step_size, bc2_sqrt, eps, seed, step,
    BLOCK: tl.constexpr, VEC: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_SCALE: tl.constexpr,
    STOCHASTIC: tl.constexpr, BF16_STATE: tl.constexpr = False,
):
    pid = tl.program_id(0)
    row = TABLE + tl.load(BLOCK_TENSOR + pid).to(tl.int64) * 6
    addr = tl.load(row + 0)  # columns 0-4 count VEC-element vectors
    row_len = tl.load(row + 1).to(tl.int32)
    row_stride = tl.load(row + 2)
    flat = tl.load(row + 3)
    n_vec = tl.load(row + 4).to(tl.int32)
    chunk = pid - tl.load(row + 5).to(tl.int32)

    vi = chunk * (BLOCK // VEC) + tl.arange(0, BLOCK // VEC)  # vector index within the tensor (int32)
    ok = (vi < n_vec)[:, None]
    r = vi // row_len  # one division per vector: a vector never crosses a row
    lane = tl.arange(0, VEC)[None, :]
    p_off = ((addr + r.to(tl.int64) * row_stride + (vi - r * row_len)) * VEC)[:, None] + lane
    f_off = ((flat + vi) * VEC)[:, None] + lane

    g = tl.load(G + f_off, mask=ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(SCALE)
    m = tl.load(M + f_off, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(V + f_off, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASTER:
        w = tl.load(MASTER + f_off, mask=ok, other=0.0)
    else:
        w = tl.load(P + p_off, mask=ok, other=0.0).to(tl.float32)

    if BF16_STATE:  # torch.optim.AdamW on bf16 tensors: each of its in-place operations rounds to bf16
        if HAS_SCALE:
            g = _rne_bf16(g)  # torch's clip scales the bf16 gradients in place
        w = _rne_bf16(w * decay)
        m = _rne_bf16(tl.fma(w1, g - m, m))  # lerp as torch's kernels run it: one fused multiply-add
        v = _rne_bf16(tl.fma(w2 * g, g, _rne_bf16(v * beta2)))  # addcmul, fused as torch's CPU kernel runs it
        denom = _rne_bf16(_rne_bf16(tl.div_rn(_rne_bf16(tl.sqrt_rn(v)), bc2_sqrt)) + eps)
        w = w - tl.div_rn(step_size * m, denom)  # rounded with the store below
        tl.store(M + f_off, m.to(tl.bfloat16), mask=ok)  # exact: m and v hold bf16 values
        tl.store(V + f_off, v.to(tl.bfloat16), mask=ok)
    else:
        w = w * decay
        m = m + w1 * (g - m)  # lerp(m, g, w1), in the form torch evaluates it for w1 < 0.5
        v = v * beta2 + (w2 * g) * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        w = w - tl.div_rn(step_size * m, denom)
        tl.store(M + f_off, m, mask=ok)
        tl.store(V + f_off, v, mask=ok)

    if HAS_MASTER:
        tl.store(MASTER + f_off, w, mask=ok)
    if P.dtype.element_ty == tl.bfloat16:
        # Round on the fp32 bit pattern (add, then drop the low half), so the cast below is exact: the same
        # rounding on GPUs and in the interpreter (whose own fp32 -> bf16 cast truncates).
        if STOCHASTIC:
            bits = w.to(tl.uint32, bitcast=True)
            key = (seed.to(tl.uint64) << 32) | step.to(tl.uint64)
            add = tl.randint(key, f_off.to(tl.uint32)).to(tl.uint32, bitcast=True) & 0xFFFF
            w = tl.where(w == w, (bits + add) & 0xFFFF0000, bits).to(tl.float32, bitcast=True)  # NaN passes
        else:
            w = _rne_bf16(w)
    tl.store(P + p_off, w.to(P.dtype.element_ty), mask=ok)


def _scalars(lr, beta1, beta2, eps, weight_decay, step) -> dict:
    """The kernel's scalar arguments, in float64 (the launch rounds each once to fp32)."""
    lr, beta1, beta2, eps, weight_decay = map(float, (lr, beta1, beta2, eps, weight_decay))
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    return dict(decay=1 - lr * weight_decay, w1=1 - beta1, beta2=beta2, w2=1 - beta2, step_size=lr / bc1,
                bc2_sqrt=bc2**0.5, eps=eps)


def _check(layout, params, grad, exp_avg, exp_avg_sq, master, lr, beta1, beta2, eps, weight_decay, step,
           grad_scale, stochastic_rounding, seed) -> bool:
    """Validate one step's arguments; returns whether the moments are bf16 (the bf16-state variant)."""
    layout.check_params(params)
    n, dev = layout.numel, layout.device
    bf16_state = exp_avg.dtype == torch.bfloat16
    state = (torch.bfloat16,) if bf16_state else (torch.float32,)
    if bf16_state and (layout.dtype != torch.bfloat16 or master is not None or stochastic_rounding):
        raise ValueError("bf16 moments go with bfloat16 params rounded to nearest, without a master copy")
    for name, t, dtypes in (("grad", grad, state if bf16_state else (layout.dtype, torch.float32)),
                            ("exp_avg", exp_avg, state), ("exp_avg_sq", exp_avg_sq, state),
                            ("master", master, (torch.float32,))):
        if t is None and name == "master":
            continue
        if t.dim() != 1 or t.numel() != n or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D buffer of {n} elements, got shape {list(t.shape)}")
        if t.dtype not in dtypes or t.device != dev:
            raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))} on {dev}, got {t.dtype} on {t.device}")
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.dtype != torch.float32
                                   or grad_scale.device != dev):
        raise ValueError(f"grad_scale must be a 1-element float32 tensor on {dev}")
    if layout.dtype == torch.float16 and master is None:
        raise ValueError("float16 params need an fp32 master copy")
    if stochastic_rounding and (layout.dtype != torch.bfloat16 or master is not None):
        raise ValueError("stochastic_rounding applies to bfloat16 params without a master copy")
    if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"need lr, eps, weight_decay >= 0 and betas in [0, 1), got {lr}, {eps}, {weight_decay}, "
                         f"({beta1}, {beta2})")
    if not (isinstance(step, int) and 1 <= step <= _I32_MAX and isinstance(seed, int) and 0 <= seed <= _I32_MAX):
        raise ValueError(f"step must be an int in [1, 2**31) and seed an int in [0, 2**31), got {step}, {seed}")
    return bf16_state


def adamw_step_triton(layout: SliceLayout, params, grad, exp_avg, exp_avg_sq, master=None, *, lr, beta1=0.9,
                      beta2=0.999, eps=1e-8, weight_decay=0.01, step, grad_scale=None, stochastic_rounding=False,
                      seed=0) -> None:
    """One AdamW step for every tensor of ``layout`` in one kernel launch (CUDA, or CPU under the interpreter).

    Args:
        params: the tensors ``layout`` was built on, updated in place.
        grad: flat ``[layout.numel]`` gradients, params' dtype or fp32. exp_avg, exp_avg_sq: flat fp32 state,
            updated in place. master: None or the flat fp32 master weights, updated in place.
        step: the 1-based step number after this update (bias corrections). grad_scale: None or a 1-element fp32
            device tensor multiplied into the gradients. stochastic_rounding / seed: see the module docstring.
    """
    bf16_state = _check(layout, params, grad, exp_avg, exp_avg_sq, master, lr, beta1, beta2, eps, weight_decay,
                        step, grad_scale, stochastic_rounding, seed)
    _adamw_kernel[(layout.n_blocks,)](
        params[layout.base_index], grad, exp_avg, exp_avg_sq, exp_avg if master is None else master,
        exp_avg if grad_scale is None else grad_scale, layout.table, layout.block_tensor,
        **_scalars(lr, beta1, beta2, eps, weight_decay, step), seed=seed, step=step,
        BLOCK=layout.block, VEC=layout.vec, HAS_MASTER=master is not None, HAS_SCALE=grad_scale is not None,
        STOCHASTIC=bool(stochastic_rounding), BF16_STATE=bf16_state, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )


@torch.no_grad()
def adamw_step_reference(layout: SliceLayout, params, grad, exp_avg, exp_avg_sq, master=None, *, lr, beta1=0.9,
                         beta2=0.999, eps=1e-8, weight_decay=0.01, step, grad_scale=None, stochastic_rounding=False,
                         seed=0) -> None:
    """:func:`adamw_step_triton` in plain torch, tensor by tensor, with ``torch.optim.AdamW``'s own operations
    (fp32 matches it bit for bit; tested on CPU and CUDA). With bf16 moments the operations run on the bf16 tensors
    themselves, as torch's single-tensor path does for CPU tensors (its foreach path runs the same operations). Stochastic rounding draws from a ``torch.Generator`` seeded with
    (seed, step): the same distribution as the kernel, not the same numbers."""
    bf16_state = _check(layout, params, grad, exp_avg, exp_avg_sq, master, lr, beta1, beta2, eps, weight_decay,
                        step, grad_scale, stochastic_rounding, seed)
    s = _scalars(lr, beta1, beta2, eps, weight_decay, step)
    gen = None
    if stochastic_rounding:
        gen = torch.Generator(device=layout.device)
        gen.manual_seed(_splitmix64(seed << 32 | step))  # CPU generators keep only 32 bits of a seed: mix first
    masters = layout.views(master) if master is not None else [None] * len(layout)
    for p, g, m, v, w in zip(params, layout.views(grad), layout.views(exp_avg), layout.views(exp_avg_sq), masters):
        if bf16_state:  # torch's operations on the bf16 tensors themselves: each one rounds to bf16
            if grad_scale is not None:
                g = (g.float() * grad_scale.reshape(())).to(g.dtype)  # as torch's clip scales bf16 grads in place
            w = p
        else:
            g = g.float()
            if grad_scale is not None:
                g = g * grad_scale.reshape(())
        if w is None:
            w = p if p.dtype == torch.float32 else p.float()
        if weight_decay != 0:
            w.mul_(s["decay"])
        m.lerp_(g, s["w1"])
        v.mul_(beta2).addcmul_(g, g, value=s["w2"])
        denom = (v.sqrt() / s["bc2_sqrt"]).add_(eps)
        w.addcdiv_(m, denom, value=-s["step_size"])
        if stochastic_rounding:
            noise = torch.randint(0, 1 << 16, w.shape, generator=gen, device=w.device, dtype=torch.int32)
            bits = (w.view(torch.int32) + noise) & -(1 << 16)
            w = torch.where(torch.isnan(w), w, bits.view(torch.float32))
        if w.data_ptr() != p.data_ptr():
            p.copy_(w)  # round to nearest (exact when stochastically rounded already)


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a 64-bit integer whose every bit depends on every bit of ``x``."""
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def adamw_step(layout: SliceLayout, params, grad, exp_avg, exp_avg_sq, master=None, *, backend: str | None = None,
               **hyper) -> None:
    """AdamW step with the Triton kernel on CUDA or under the interpreter, else torch (``backend`` forces one);
    ``hyper`` are the keyword arguments of :func:`adamw_step_triton`."""
    if backend is None:
        backend = "triton" if grad.is_cuda or interpreting() else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    step_fn = adamw_step_triton if backend == "triton" else adamw_step_reference
    step_fn(layout, params, grad, exp_avg, exp_avg_sq, master, **hyper)


def global_grad_norm(grad: torch.Tensor) -> torch.Tensor:
    """L2 norm of the flat gradient buffer as a 0-d fp32 device tensor, accumulated in fp32 (no host sync)."""
    return torch.linalg.vector_norm(grad, dtype=torch.float32)


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` on the device, as ``torch.nn.utils.clip_grad_norm_`` scales; pass it
    as ``grad_scale``. A non-finite norm gives 0 or NaN: check ``norm`` if steps must be skipped."""
    return torch.clamp(max_norm / (norm.float() + 1e-6), max=1.0)

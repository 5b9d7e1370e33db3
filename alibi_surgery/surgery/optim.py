"""``HeadSlicedAdamW``: AdamW over a :class:`~alibi_surgery.HeadSlices`, state for the selected slices only.

State is three flat fp32 buffers the size of the slices (``exp_avg``, ``exp_avg_sq`` and, for bf16/fp16 slices, a
master copy), never the whole matrices. One step is one launch of the multi-tensor kernel in
:mod:`alibi_surgery.kernels.adamw` (on CUDA or under ``TRITON_INTERPRET=1``; the torch path elsewhere does the
same maths), preceded, when ``max_grad_norm`` is set, by one fp32 norm over the flat gradient buffer whose clip
factor the kernel reads on the device (no host synchronisation).

Low-precision slices, ``precision`` (:data:`PRECISIONS`):

* ``"master"`` (the default): an fp32 master copy carries the updates and the model's bf16/fp16 weights receive it
  rounded to nearest;
* ``"stochastic"`` (bf16 only; also ``stochastic_rounding=True``): no master copy; each update is rounded to one of
  the two neighbouring bf16 values with probability proportional to proximity, which keeps small updates unbiased in
  expectation and saves 4 bytes per trained element (2.3 GiB for 300 heads of bloom-7b1);
* ``"bf16"`` (bf16 only): the paper's optimizer, ``torch.optim.AdamW`` on bf16 parameters: both moments are bf16
  and every operation of the update rounds to bf16, the last one straight into the weights, so an update smaller
  than half a bf16 ulp of the weight is lost (at lr 5e-5 most single updates of a freshly re-initialised row are).
  4 bytes of state per element. The torch path runs torch's own operations on the slices (bit-identical to
  ``torch.optim.AdamW`` with gradient masks); the Triton kernel rounds at the same points (within one bf16 ulp).
  The gradient-norm clip is computed in fp32 over the slices, where torch's ``clip_grad_norm_`` sums bf16 norms.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..kernels.adamw import SliceLayout, adamw_step, clip_scale, global_grad_norm
from .slices import HeadSlices

__all__ = ["HeadSlicedAdamW", "PRECISIONS"]

PRECISIONS = ("master", "stochastic", "bf16")
_HYPER = ("lr", "betas", "eps", "weight_decay", "max_grad_norm", "stochastic_rounding", "seed", "precision")


class HeadSlicedAdamW:
    """AdamW (decoupled weight decay, bias correction, optional global-norm clip) on ``slices``.

    Args:
        slices: the :class:`HeadSlices` to train; its flat ``grad`` buffer is read, its tensors updated in place
            (and written back into the model when they are copies).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``; ``lr`` may be changed per step (``step(lr=...)``
            or the ``lr`` attribute), e.g. from a schedule, without recompiling anything.
        max_grad_norm: clip the global L2 norm of all slice gradients to this value (None: no clipping).
        master_weights: keep an fp32 master copy (default: yes for bf16/fp16 slices unless stochastic rounding).
        stochastic_rounding: bf16 slices without a master copy, stochastically rounded (``precision="stochastic"``).
        seed: stochastic-rounding seed; each step draws fresh numbers from (seed, step).
        backend: ``"triton"`` or ``"torch"``; default Triton on CUDA or under the interpreter, torch otherwise.
        precision: ``"master"``, ``"stochastic"`` or ``"bf16"`` (see the module docstring); default ``"stochastic"``
            when ``stochastic_rounding`` else ``"master"``. fp32 slices train in fp32 whatever it says, except
            ``"bf16"``, which needs bf16 slices.
    """

    def __init__(self, slices: HeadSlices, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, max_grad_norm: float | None = None, master_weights: bool | None = None,
                 stochastic_rounding: bool = False, seed: int = 0, backend: str | None = None,
                 precision: str | None = None):
        if not isinstance(slices, HeadSlices):
            raise UsageError(f"HeadSlicedAdamW needs a HeadSlices, got {type(slices).__name__}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise UsageError(f"max_grad_norm must be positive, got {max_grad_norm}")
        precision = precision or ("stochastic" if stochastic_rounding else "master")
        if precision not in PRECISIONS:
            raise UsageError(f"unknown optimizer precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if stochastic_rounding and precision != "stochastic":
            raise UsageError(f"stochastic_rounding is optimizer precision 'stochastic', not {precision!r}")
        stochastic_rounding = precision == "stochastic"
        bf16_state = precision == "bf16"
        if bf16_state and (slices.dtype != torch.bfloat16 or master_weights):
            raise UsageError(f"optimizer precision 'bf16' needs bf16 slices without a master copy, got {slices.dtype}")
        low = slices.dtype in (torch.bfloat16, torch.float16)
        if master_weights is None:
            master_weights = low and not stochastic_rounding and not bf16_state
        if master_weights and stochastic_rounding:
            raise UsageError("stochastic_rounding replaces the master copy: do not ask for both")
        self.slices, self.precision = slices, precision
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(betas), float(eps), float(weight_decay)
        self.max_grad_norm, self.stochastic_rounding, self.seed = max_grad_norm, bool(stochastic_rounding), int(seed)
        self.backend = backend
        self.layout = SliceLayout(slices.tensors)
        device, n = slices.grad.device, slices.numel
        state_dtype = torch.bfloat16 if bf16_state else torch.float32
        self.exp_avg = torch.zeros(n, dtype=state_dtype, device=device)
        self.exp_avg_sq = torch.zeros(n, dtype=state_dtype, device=device)
        self.master = None
        if master_weights and slices.dtype != torch.float32:
            self.master = torch.empty(n, dtype=torch.float32, device=device)
            with torch.no_grad():
                for view, t in zip(self.layout.views(self.master), slices.tensors):
                    view.copy_(t)
        self.step_count = 0
        self._check_hyper()

    def _check_hyper(self):
        b1, b2 = self.betas
        if not (self.lr >= 0 and self.eps >= 0 and self.weight_decay >= 0 and 0 <= b1 < 1 and 0 <= b2 < 1):
            raise UsageError(f"need lr, eps, weight_decay >= 0 and betas in [0, 1), got lr={self.lr}, "
                             f"eps={self.eps}, weight_decay={self.weight_decay}, betas={self.betas}")

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments and master copy), excluding the gradients."""
        return sum(t.numel() * t.element_size() for t in (self.exp_avg, self.exp_avg_sq, self.master) if t is not None)

    @torch.no_grad()
    def step(self, lr: float | None = None) -> torch.Tensor | None:
        """One update from ``slices.grad``. Returns the pre-clip global gradient norm (a device tensor) when
        clipping, else None. Does not zero the gradients."""
        if lr is not None:
            self.lr = float(lr)
            self._check_hyper()
        self.step_count += 1
        norm = scale = None
        if self.max_grad_norm is not None:
            norm = global_grad_norm(self.slices.grad)
            scale = clip_scale(norm, self.max_grad_norm).reshape(1)
        adamw_step(self.layout, self.slices.tensors, self.slices.grad, self.exp_avg, self.exp_avg_sq, self.master,
                   backend=self.backend, lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                   weight_decay=self.weight_decay, step=self.step_count, grad_scale=scale,
                   stochastic_rounding=self.stochastic_rounding, seed=self.seed)
        self.slices.write_back()
        return norm

    def zero_grad(self) -> None:
        self.slices.zero_grad()

    def _layout_key(self) -> list:
        return [[s.layer, s.head, s.kind, list(t.shape)] for s, t in zip(self.slices.specs, self.slices.tensors)]

    def state_dict(self, device=None) -> dict:
        """Everything needed to resume bit-exactly: step, hyper-parameters, the slice layout and the fp32 buffers
        (copies on the buffers' device; with ``device``, the buffers moved there, which shares them when they are
        there already: for a save that writes them at once, without a second device copy of the state)."""
        move = (lambda t: t.clone()) if device is None else (lambda t: t.to(device))
        return {"step": self.step_count, **{k: getattr(self, k) for k in _HYPER}, "slices": self._layout_key(),
                "exp_avg": move(self.exp_avg), "exp_avg_sq": move(self.exp_avg_sq),
                "master": None if self.master is None else move(self.master)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output. The slices must be the same (layer, head, kind, shape) list."""
        if state.get("slices") != self._layout_key():
            raise UsageError("optimizer state was saved for a different head selection or model shape")
        if (state["master"] is None) != (self.master is None):
            raise UsageError("optimizer state and this optimizer disagree on keeping an fp32 master copy")
        if state["exp_avg"].dtype != self.exp_avg.dtype:
            raise UsageError("optimizer state and this optimizer disagree on the optimizer precision")
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        if self.master is not None:
            self.master.copy_(state["master"])
        self.step_count = int(state["step"])
        for k in _HYPER:
            if k in state:  # a state saved before "precision" existed keeps this optimizer's (checked above)
                setattr(self, k, tuple(state[k]) if k == "betas" else state[k])
        self._check_hyper()

    def __repr__(self) -> str:
        return (f"HeadSlicedAdamW(lr={self.lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
                f"step={self.step_count}, state={self.state_bytes / 2**20:.1f} MiB, "
                f"{'master' if self.master is not None else 'direct' if self.precision == 'master' else self.precision})")

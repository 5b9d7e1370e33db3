"""Multi-tensor AdamW over head slices of BLOOM-shaped weights: Triton (interpreter) and the torch reference.

Ground truth is ``torch.optim.AdamW`` (single-tensor path) on independent fp32 copies of the slices; the weight
matrices are NaN outside the slices, so a stray read shows up in the results and a stray write in a bitwise check.
"""

from __future__ import annotations

import functools

import pytest
import torch

from alibi_surgery.kernels.adamw import (BLOCK, INTERPRETER_BLOCK, SliceLayout, adamw_step, clip_scale,
                                         global_grad_norm)
from helpers import BACKENDS, INTERPRETING, needs_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu")

LRS = (1e-2, 5e-3, 2e-2, 1e-3, 8e-3)  # a schedule: lr changes every step
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


class FakeModel:
    """Per layer a qkv weight ``[3Hd, hidden]``, its bias and a dense weight ``[hidden, Hd]``, NaN outside the
    trainable head slices; ``params`` are views of those slices (qkv rows, bias rows, dense columns per head)."""

    def __init__(self, n_layer=2, n_head=3, d=16, hidden=48, heads=(0, 2), dtype=torch.float32, seed=0,
                 reverse=False):
        gen = torch.Generator().manual_seed(seed)
        shapes = [(3 * n_head * d, hidden), (3 * n_head * d,), (hidden, n_head * d)]  # qkv weight, bias, dense

        def index(k, h):
            return (slice(None), slice(h * d, (h + 1) * d)) if k == 2 else slice(3 * h * d, 3 * (h + 1) * d)

        self.mats, self.masks, self.params = [], [], []
        for _ in range(n_layer):
            for k, shape in enumerate(shapes):
                mat, mask = torch.full(shape, float("nan"), dtype=dtype), torch.zeros(shape, dtype=torch.bool)
                for h in heads:
                    mat[index(k, h)] = torch.randn(mat[index(k, h)].shape, generator=gen).to(dtype)
                    mask[index(k, h)] = True
                self.mats.append(mat.to(DEVICE))
                self.masks.append(mask)
            self.params += [self.mats[k - 3][index(k, h)] for h in heads for k in range(3)]
        if reverse:
            self.params.reverse()
        self.outside = [m.clone() for m in self.mats]
        self.layout = SliceLayout(self.params, block=BLOCK)  # the GPUs' block (CPU tensors default to a larger one)

    def assert_outside_untouched(self):
        for mat, before, mask in zip(self.mats, self.outside, self.masks):
            mat, before = mat.cpu(), before.cpu()
            bits = torch.int32 if mat.dtype == torch.float32 else torch.int16
            assert torch.equal(mat.view(bits)[~mask], before.view(bits)[~mask]), "an element outside the slices changed"

    def state(self, master=False):
        n = self.layout.numel
        buf = [torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)]
        return buf + [torch.cat([p.float().flatten() for p in self.params]) if master else None]


def grads(layout, steps, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(layout.numel, generator=gen).to(DEVICE, dtype) for _ in range(steps)]


def torch_adamw(params, layout, grad_list, lrs=LRS, max_norm=None, **hyper):
    """torch.optim.AdamW on fp32 copies; returns (params, exp_avg list, exp_avg_sq list)."""
    hyper = {**HYPER, **hyper}
    ref = [p.detach().float().clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ref, lr=lrs[0], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                            weight_decay=hyper["weight_decay"], foreach=False)
    for grad, lr in zip(grad_list, lrs):
        for r, g in zip(ref, layout.views(grad)):
            r.grad = g.float().clone()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=False)
        opt.param_groups[0]["lr"] = lr
        opt.step()
    return ref, [opt.state[r]["exp_avg"] for r in ref], [opt.state[r]["exp_avg_sq"] for r in ref]


def run(model, backend, grad_list, lrs=LRS, state=None, **kw):
    exp_avg, exp_avg_sq, master = state or model.state()
    for step, (grad, lr) in enumerate(zip(grad_list, lrs), 1):
        adamw_step(model.layout, model.params, grad, exp_avg, exp_avg_sq, master, backend=backend, lr=lr,
                   step=step, **{**HYPER, **kw})
    return exp_avg, exp_avg_sq, master


def assert_close_fp32(ours, ref, exact=False):
    for a, b in zip(ours, ref):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, hidden, heads, reverse, vec", [
    pytest.param(16, 48, (0, 2), False, 4, id="d16-aligned"),
    pytest.param(80, 34, (1, 2), True, 2, id="d80-vec2-reversed"),
    pytest.param(16, 33, (2,), False, 1, id="d16-odd-hidden"),
])
def test_matches_torch_adamw_fp32(backend, d, hidden, heads, reverse, vec):
    model = FakeModel(d=d, hidden=hidden, heads=heads, reverse=reverse)
    assert model.layout.vec == vec
    grad_list = grads(model.layout, len(LRS))
    ref, ref_m, ref_v = torch_adamw(model.params, model.layout, grad_list)
    exp_avg, exp_avg_sq, _ = run(model, backend, grad_list)
    exact = backend == "torch"  # the reference runs torch's own operations
    assert_close_fp32(model.params, ref, exact)
    assert_close_fp32(model.layout.views(exp_avg), ref_m, exact)
    assert_close_fp32(model.layout.views(exp_avg_sq), ref_v, exact)
    model.assert_outside_untouched()


@needs_triton
@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
def test_triton_matches_reference_with_small_blocks(master):
    """Many programs per tensor (block 128), grad scaling and an fp32 master copy: kernel vs torch reference."""
    models = [FakeModel(d=16, hidden=40, heads=(0, 2), seed=3) for _ in range(2)]
    for m in models:
        m.layout = SliceLayout(m.params, block=128)
    grad_list = grads(models[0].layout, 3)
    scale = torch.tensor([0.37], device=DEVICE)
    states = [run(m, backend, grad_list, lrs=LRS[:3], state=m.state(master), grad_scale=scale)
              for m, backend in zip(models, ("triton", "torch"))]
    assert_close_fp32(models[0].params, models[1].params)
    for a, b in zip(*states):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    models[0].assert_outside_untouched()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_with_master(backend, dtype):
    model = FakeModel(dtype=dtype, heads=(1, 2))
    grad_list = grads(model.layout, len(LRS), dtype)
    _, _, master = state = model.state(master=True)
    ref, _, _ = torch_adamw(model.layout.views(master), model.layout, grad_list)
    run(model, backend, grad_list, state=state)
    assert_close_fp32(model.layout.views(master), ref)
    for p, w in zip(model.params, model.layout.views(master)):
        assert torch.equal(p, w.to(dtype))  # params are the master rounded to nearest
    model.assert_outside_untouched()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_without_master_rounds_to_nearest(backend):
    model = FakeModel(dtype=torch.bfloat16)
    grad = grads(model.layout, 1, torch.bfloat16)
    ref, _, _ = torch_adamw(model.params, model.layout, grad, lrs=(3e-2,))
    run(model, backend, grad, lrs=(3e-2,))
    for p, r in zip(model.params, ref):
        assert torch.equal(p, r.detach().to(torch.bfloat16))
    model.assert_outside_untouched()


def _bf16_neighbours(x: torch.Tensor):
    """(toward zero, away from zero) bf16 neighbours of fp32 values, as fp32."""
    low = x.view(torch.int32) & -(1 << 16)
    return low.view(torch.float32), (low + (1 << 16)).view(torch.float32)


@needs_triton
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_any_block_gives_the_same_bits(rounding):
    """CPU tensors default to INTERPRETER_BLOCK (one program per tensor here), GPUs to BLOCK: the update is
    elementwise and stochastic rounding's counter is the element's index, so the block never changes a bit."""
    assert SliceLayout([torch.zeros(8)]).block == INTERPRETER_BLOCK  # the CPU default
    models = [FakeModel(dtype=torch.bfloat16, d=16, hidden=40, heads=(0, 2), seed=4) for _ in range(3)]
    for m, block in zip(models, (64, BLOCK, INTERPRETER_BLOCK)):
        m.layout = SliceLayout(m.params, block=block)
    assert models[0].layout.n_blocks > models[1].layout.n_blocks > models[2].layout.n_blocks == len(models[2].params)
    grad_list = grads(models[0].layout, 2, torch.bfloat16)
    for m in models:
        run(m, "triton", grad_list, lrs=(1e-3, 2e-3), stochastic_rounding=rounding == "stochastic", seed=3)
    for m in models[1:]:
        for a, b in zip(m.params, models[0].params):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_stochastic_rounding(backend):
    """Always a neighbour of the exact result, unbiased given the position between neighbours, reproducible."""
    model = FakeModel(dtype=torch.bfloat16, heads=(0, 1, 2))
    start = [p.clone() for p in model.params]
    grad = grads(model.layout, 1, torch.bfloat16)
    lr = 1e-3  # updates of a fraction of a bf16 ulp: round-to-nearest would mostly leave params unchanged
    exact = torch.cat([r.detach().flatten() for r in torch_adamw(model.params, model.layout, grad, lrs=(lr,))[0]])
    low, high = _bf16_neighbours(exact)
    frac = (exact - low) / (high - low)
    slack = [_bf16_neighbours(exact + exact.abs() * k) for k in (-1e-6, 1e-6)]  # fp32 differences from torch

    def sr_step(seed, step=1):
        for p, s in zip(model.params, start):
            p.copy_(s)
        exp_avg, exp_avg_sq, _ = model.state()
        adamw_step(model.layout, model.params, grad[0], exp_avg, exp_avg_sq, backend=backend, lr=lr, step=step,
                   stochastic_rounding=True, seed=seed, **HYPER)
        return torch.cat([p.float().flatten() for p in model.params])

    ups = []
    for seed in range(4):
        out = sr_step(seed)
        assert ((out == low) | (out == high) | sum((out == a) | (out == b) for a, b in slack).bool()).all()
        ups.append((out == high).float())
    ups = torch.stack(ups)
    for subset in (frac < 0.5, frac >= 0.5, torch.ones_like(frac, dtype=torch.bool)):
        bias = (ups[:, subset] - frac[subset]).mean().item()
        assert abs(bias) < 0.02, f"stochastic rounding is biased: {bias:.4f} on {int(subset.sum())} elements"
    assert torch.equal(sr_step(7), sr_step(7))
    assert not torch.equal(sr_step(7), sr_step(8))
    assert not torch.equal(sr_step(7, step=1), sr_step(7, step=2))
    model.assert_outside_untouched()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_is_a_global_norm_clip(backend):
    model = FakeModel(heads=(0, 2))
    grad_list = grads(model.layout, 3)
    max_norm = 20.0  # below the gradient norm: every step is clipped
    ref, _, _ = torch_adamw(model.params, model.layout, grad_list, lrs=LRS[:3], max_norm=max_norm)
    exp_avg, exp_avg_sq, _ = model.state()
    for step, (grad, lr) in enumerate(zip(grad_list, LRS), 1):
        norm = global_grad_norm(grad)
        assert norm.dim() == 0 and norm.dtype == torch.float32 and norm.item() > max_norm
        adamw_step(model.layout, model.params, grad, exp_avg, exp_avg_sq, backend=backend, lr=lr, step=step,
                   grad_scale=clip_scale(norm, max_norm), **HYPER)
    assert_close_fp32(model.params, ref)
    model.assert_outside_untouched()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_equals_prescaled_grads(backend):
    models = [FakeModel(heads=(2,)) for _ in range(2)]
    grad = grads(models[0].layout, 1)[0]
    scale = torch.tensor(0.25, device=DEVICE)
    run(models[0], backend, [grad], grad_scale=scale)
    run(models[1], backend, [grad * scale])
    assert_close_fp32(models[0].params, models[1].params, exact=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_global_grad_norm(dtype):
    grad = torch.randn(5000).to(DEVICE, dtype) * 3
    norm = global_grad_norm(grad)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    torch.testing.assert_close(norm, torch.linalg.vector_norm(grad.double()).float(), rtol=1e-5, atol=0)
    assert clip_scale(norm, 1e9).item() == 1.0
    torch.testing.assert_close(clip_scale(norm, 1.0), 1.0 / (norm + 1e-6))


def test_layout_rejects_bad_params():
    w = torch.randn(96, 32)
    with pytest.raises(ValueError, match="like params"):
        SliceLayout([w[:48], w[48:].to(torch.bfloat16)])
    with pytest.raises(ValueError, match="unit inner stride"):
        SliceLayout([w.t()[:, :16]])
    with pytest.raises(ValueError, match="overlap"):
        SliceLayout([w[:50], w[40:]])
    with pytest.raises(ValueError, match="overlap"):
        SliceLayout([w[:, :20], w[:, 16:]])
    with pytest.raises(ValueError, match="overlap"):
        SliceLayout([w[:, :16], w[10, :]])
    with pytest.raises(ValueError, match="1-D or 2-D"):
        SliceLayout([w.view(2, 48, 32)])
    with pytest.raises(ValueError, match="empty"):
        SliceLayout([])
    bias = torch.randn(40)
    layout = SliceLayout([w[:, :16], w[:, 16:], bias[8:]])  # interleaved column slices, another allocation
    assert layout.offsets == (0, 96 * 16, 96 * 32) and layout.numel == 96 * 32 + 32 and len(layout) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_launcher_rejects_bad_input(backend):
    model = FakeModel(heads=(1,))
    n = model.layout.numel
    zeros = functools.partial(torch.zeros, device=DEVICE)
    good = dict(grad=zeros(n), exp_avg=zeros(n), exp_avg_sq=zeros(n))

    def step(params=None, master=None, **kw):
        args = {**good, **{k: v for k, v in kw.items() if k in good}}
        hyper = {**HYPER, "lr": 1e-3, "step": 1, **{k: v for k, v in kw.items() if k not in good}}
        adamw_step(model.layout, params or model.params, args["grad"], args["exp_avg"], args["exp_avg_sq"], master,
                   backend=backend, **hyper)

    for bad in (dict(grad=zeros(n + 1)), dict(exp_avg=zeros(n - 1)), dict(exp_avg_sq=zeros(2, n)),
                dict(grad=zeros(n, dtype=torch.float16)), dict(exp_avg=zeros(n, dtype=torch.bfloat16)),
                dict(exp_avg=zeros(2 * n)[::2]), dict(master=zeros(n + 8)), dict(grad_scale=zeros(2)),
                dict(stochastic_rounding=True),
                dict(step=0), dict(beta1=1.0), dict(lr=-1.0)):
        with pytest.raises(ValueError):
            step(**bad)
    with pytest.raises(ValueError, match="layout"):
        step(params=[p.clone() for p in model.params])
    half = FakeModel(heads=(1,), dtype=torch.float16)
    with pytest.raises(ValueError, match="master"):
        adamw_step(half.layout, half.params, zeros(n, dtype=torch.float16), zeros(n), zeros(n),
                   backend=backend, lr=1e-3, step=1)
    with pytest.raises(ValueError, match="backend"):
        adamw_step(model.layout, model.params, **good, backend="cuda", lr=1e-3, step=1)
    model.assert_outside_untouched()

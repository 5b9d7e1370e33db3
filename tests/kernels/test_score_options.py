"""The score options of MPT and Falcon-RW (``softmax_scale``, ``bias_scale``, ``alibi_bf16``), both backends, against
an independent float64 reference that materialises the T x T scores from the formula

    s_ij = softmax_scale * q_i . k_j + bias_hj

with the bias built by transformers itself: BLOOM's ``build_alibi_tensor`` (times ``bias_scale``) for the unrounded
bias, Falcon's ``build_alibi_tensor`` (bf16 slopes times the int64 positions, product rounded to bf16) for
``alibi_bf16``, divided by sqrt(d) exactly as ``FalconModel.forward`` does for Falcon-RW. Forward output, the
gradients of q, k and v (through the dispatcher and its autograd), and the fused statistics are checked, with left
padding, T = 1, 97 and 300 (positions above 256, which bf16 itself rounds), head_dim 80. Three heads are taken from a
16-head schedule so that every slope is a non-power of two and the rounding of the product is really exercised.
Finally the whole Falcon-RW attention of a tiny ``FalconModel`` (SDPA, fp32) is compared with ours.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.bloom import modeling_bloom
from transformers.models.falcon import modeling_falcon

from alibi_surgery.attention.backends import run_attention as alibi_attention
from alibi_surgery.kernels.alibi import alibi_slopes, key_positions
from alibi_surgery.kernels.alibi import first_real_key
from helpers import BACKENDS, left_padded_mask

D = 80
SCHEDULE, HEADS = 16, [0, 6, 13]  # slopes 2^-0.5, 2^-3.5, 2^-7 of BLOOM's 16-head schedule
SQRT_D = math.sqrt(D)
# name: (options, reference bias kind, its multiplier)
OPTIONS = {
    "mpt-scale": (dict(softmax_scale=0.3), "bloom", 1.0),
    "falcon-rw": (dict(softmax_scale=1 / SQRT_D, bias_scale=1 / SQRT_D, alibi_bf16=True), "falcon", None),
    "bf16-bias": (dict(alibi_bf16=True), "falcon", 1.0),
    "bias-scale": (dict(softmax_scale=0.2, bias_scale=0.5), "bloom", 0.5),
}
# (T, left paddings, option names): an odd length for every option, one token for each family's options, positions
# above 256 for Falcon's bf16 bias (the interpreter's cost grows with T squared: the long case runs once)
SHAPES = [(1, [0, 0], ["mpt-scale", "falcon-rw"]), (97, [0, 13], list(OPTIONS)), (300, [0, 21], ["falcon-rw"])]
CASES = [pytest.param(T, pads, name, id=f"T{T}-{name}") for T, pads, names in SHAPES for name in names]
# statistics variants, alternated over the options
VARIANTS = {"mpt-scale": {}, "falcon-rw": dict(exclude_first_query=True, normalize_entropy=True),
            "bf16-bias": dict(normalize_entropy=True), "bias-scale": dict(exclude_first_query=True)}
TOL = 2e-5  # fp32 against float64, relative to the largest reference value


def reference_bias(kind: str, multiplier: float | None, mask2d: torch.Tensor) -> torch.Tensor:
    """[B, H, T] float32 bias, built by transformers (falcon, multiplier None: FalconModel's ``alibi / sqrt(d)``)."""
    build = modeling_falcon.build_alibi_tensor if kind == "falcon" else modeling_bloom.build_alibi_tensor
    alibi = build(mask2d, SCHEDULE, torch.float32).view(mask2d.shape[0], SCHEDULE, -1)[:, HEADS]
    return alibi / SQRT_D if multiplier is None else alibi * multiplier


def dense(q, k, v, mask2d, scale, bias):
    """float64 attention from the materialised scores: (out [B, q_len, H, d], probs [B, H, q_len, k_len]); rows
    with no visible key give 0."""
    q_len, k_len = q.shape[2], k.shape[2]
    s = scale * (q @ k.transpose(-1, -2)) + bias.double()[:, :, None, :]
    rows = torch.arange(q_len)[:, None] + k_len - q_len
    visible = mask2d.bool()[:, None, None, :] & (torch.arange(k_len)[None, :] <= rows)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2), p


def reference_stats(p, mask2d, q_len, exclude_first_query, normalize_entropy):
    """Per-head sums (first-token mass, entropy, rows) by the paper's formulas over the real query rows."""
    qpos = key_positions(mask2d)[:, -q_len:].long()[:, None, :]  # [B, 1, q_len]
    counted = qpos > 0 if exclude_first_query else qpos >= 0
    first = first_real_key(key_positions(mask2d)).long()
    p0 = p.gather(-1, first.view(-1, 1, 1, 1).expand(*p.shape[:3], 1)).squeeze(-1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    if normalize_entropy:
        ent = torch.where(qpos > 0, ent / torch.log((qpos + 1).double().clamp_min(2.0)), 0.0)
    counted = counted.expand_as(p0)
    return torch.stack([torch.where(counted, x, 0.0).sum((0, 2)) for x in (p0, ent, counted.double())], -1)


def problem(T, pads, q_len=None, seed=0):
    gen = torch.Generator().manual_seed(seed + T)
    mask2d = left_padded_mask(2, T, pads)
    q_len = q_len or T
    q = torch.randn(2, 3, q_len, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 3, T, D, generator=gen, dtype=torch.float64) for _ in range(2))
    real_q = mask2d[:, T - q_len:].bool()  # [B, q_len]
    do = torch.randn(2, q_len, 3, D, generator=gen, dtype=torch.float64) * real_q[:, :, None, None]
    return mask2d, q, k, v, do, real_q


def max_rel(ours, ref) -> float:
    """Largest error relative to the reference's scale (at least 1: a gradient that is exactly 0, as dq at T = 1,
    is matched to fp32 rounding)."""
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,pads,name", CASES)
def test_forward_backward_stats_match_dense_reference(T, pads, name, backend):
    options, kind, multiplier = OPTIONS[name]
    mask2d, q, k, v, do, real_q = problem(T, pads)
    scale = options.get("softmax_scale") or 1 / SQRT_D
    key_pos, slopes = key_positions(mask2d), alibi_slopes(SCHEDULE)[HEADS]

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, p = dense(*leaves, mask2d, scale, reference_bias(kind, multiplier, mask2d))
    (ref * do).sum().backward()

    ours = [t.float().requires_grad_() for t in (q, k, v)]
    out, _, _ = alibi_attention(*ours, key_pos, slopes, backend, **options)
    (out.double() * do).sum().backward()
    rows = real_q[:, :, None, None]
    assert (out[~real_q] == 0).all()  # padded query rows: exactly 0
    assert max_rel(out * rows, ref.detach() * rows) < TOL, name
    for what, a, b in zip("qkv", ours, leaves):
        assert max_rel(a.grad, b.grad) < TOL, f"d{what}"

    variant = dict(dict(exclude_first_query=False, normalize_entropy=False), **VARIANTS[name])
    with torch.no_grad():
        _, _, stats = alibi_attention(*(t.float() for t in (q, k, v)), key_pos, slopes, backend, with_stats=True,
                                      **variant, **options)
    expected = reference_stats(p.detach(), mask2d, T, **variant)
    sums = stats.sum(0).double()
    assert torch.equal(sums[:, 2], expected[:, 2])
    if expected[0, 2] > 0:  # means over the counted rows, as diagnosis reports them
        assert (sums[:, :2] / sums[:, 2:] - expected[:, :2] / expected[:, 2:]).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_with_options(backend):
    """q_len < k_len (a KV-cache step) with Falcon's options: positions > 256 behind a cache, left padding."""
    options, kind, multiplier = OPTIONS["falcon-rw"]
    mask2d, q, k, v, do, real_q = problem(290, [0, 40], q_len=3)
    ref, _ = dense(q, k, v, mask2d, 1 / SQRT_D, reference_bias(kind, multiplier, mask2d))
    out, _, _ = alibi_attention(q.float(), k.float(), v.float(), key_positions(mask2d), alibi_slopes(SCHEDULE)[HEADS],
                                backend, **options)
    assert max_rel(out, ref) < TOL


@pytest.mark.parametrize("bad", [dict(softmax_scale=0.0), dict(softmax_scale=float("nan")),
                                 dict(softmax_scale=-1.0), dict(bias_scale=float("inf"))])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_scales_are_refused(bad, backend):
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="scale"):
        alibi_attention(q, q, q, key_positions(torch.ones(1, 4)), alibi_slopes(1), backend, **bad)


def _tiny_falcon(n_head: int, seed: int = 0):
    from transformers import FalconConfig, FalconModel

    torch.manual_seed(seed)
    config = FalconConfig(vocab_size=64, hidden_size=n_head * D, num_hidden_layers=1, num_attention_heads=n_head,
                          alibi=True, multi_query=False, new_decoder_architecture=False, parallel_attn=True,
                          bias=True, attn_implementation="sdpa")
    return FalconModel(config).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_transformers_falcon_rw_sdpa(backend):
    """Ground truth: the attention context of a tiny Falcon-RW ``FalconModel`` (fp32, SDPA: the path whose ALiBi is
    right), read at the input of ``dense``, against ours on the same fused QKV with Falcon's options. 10 heads, of
    which three are compared (slopes 2^-1, 2^-0.5, 2^-1.5: the interpreter's cost grows with heads); 300 tokens with
    left padding (positions above 256). The rounding matters: the unrounded bias misses by over 100x more."""
    n_head, T, heads = 10, 300, [0, 8, 9]
    model = _tiny_falcon(n_head)
    attn = model.h[0].self_attention
    seen = {}
    hooks = [attn.query_key_value.register_forward_hook(lambda m, a, out: seen.__setitem__("qkv", out)),
             attn.dense.register_forward_hook(lambda m, a, out: seen.__setitem__("context", a[0]))]
    mask2d = left_padded_mask(2, T, [0, 37])
    with torch.no_grad():
        model(torch.randint(0, 64, (2, T)), attention_mask=mask2d)
    for h in hooks:
        h.remove()
    qkv = seen["qkv"].view(2, T, n_head, 3, D)[:, :, heads]  # Falcon-RW's per-head interleaved layout, as BLOOM's
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    ref = seen["context"].view(2, T, n_head, D)[:, :, heads]
    real = mask2d.bool()[..., None, None]
    args = (q, k, v, key_positions(mask2d), alibi_slopes(n_head)[heads], backend)
    out, _, _ = alibi_attention(*args, softmax_scale=1 / SQRT_D, bias_scale=1 / SQRT_D, alibi_bf16=True)
    err = ((out - ref) * real).abs().max().item()
    assert err < 1e-5 * ref.abs().max().item(), err
    if backend == "torch":  # the same for both backends
        plain, _, _ = alibi_attention(*args, softmax_scale=1 / SQRT_D, bias_scale=1 / SQRT_D)
        assert ((plain - ref) * real).abs().max().item() > 100 * err

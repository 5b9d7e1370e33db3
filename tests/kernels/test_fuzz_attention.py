"""Property-based tests: both attention backends against transformers' eager ``BloomAttention``.

Hypothesis draws a whole attention problem (batch 1-4; k_len 1-300 and q_len == k_len, or q_len < k_len behind a
KV cache as in decoding; head_dim in {16, 32, 48, 64, 80, 96, 128}; 1-40 heads or 112; an arbitrary left padding
per row, rows of nothing but padding included; ordinary or extreme logits, up to 3e4, near the fp16 range; fp32,
fp16 or bf16; the two statistics variants; in a third of the cases the score options of MPT and Falcon-RW:
``softmax_scale`` None or 0.02-0.5, ``bias_scale`` 1, 1/sqrt(d) or 0.05-2, ``alibi_bf16`` on or off) and checks,
for the ``torch`` and ``triton`` backends:

* forward output, and the gradients of the fused QKV and of the cached prefix keys and values, against eager BLOOM;
* the fused per-head statistics against the paper's formulas applied to eager BLOOM's attention probabilities;
* statistics finite for every valid row, outputs and gradients finite for fully padded rows.

Ground truth is transformers' own ``BloomAttention.forward`` in fp32. Only its two projections are replaced: the fused
QKV comes straight from the strategy and ``dense`` is the identity, so 112 heads of 128 cost no 600M-parameter
weights. With score options its ``inv_norm_factor`` is set to ``softmax_scale`` and it is given the bias of
transformers' ``build_alibi_tensor`` (Falcon's, rounded in bf16, for ``alibi_bf16``) times ``bias_scale``; ours then
runs through the dispatcher ``run_attention`` with BLOOM's head split (the BLOOM patch has no options), and with the
default options through ``patch_bloom``. In fp16/bf16 the inputs are rounded to that dtype first and the fp32
reference runs on the rounded values, as flash-attention's tests do: input rounding moves an extreme logit by far
more than any kernel error, and it is the same for every implementation. Tolerances:

* fp32: ``1e-5 * scale + 16 * eps32 * cond * scale``, where ``cond`` is the largest absolute pre-softmax logit term
  (``sum_i |q_i k_i|`` times the scores' scale, plus the largest ALiBi bias). Two fp32 evaluations in different
  orders differ by about ``eps32 * cond`` in each logit, and softmax passes that on to the output, so extreme logits
  widen the bound.
* fp16 / bf16: the project's rule, our error against the fp32 reference at most 2x eager PyTorch's own error in that
  dtype, on top of the fp32 bound (the reference itself is only that exact); the gradients get ``1e-3 * scale`` more,
  as their rounding is summed over up to 300 keys.

Profiles (tests/conftest.py): ``ci`` (default) runs 150 derandomised examples per backend; ``HYPOTHESIS_PROFILE=long``
runs 1,000 random examples per backend with the size cap doubled. The cap (``TILES``) bounds the 64 x 64 tiles of
one example, since the Triton interpreter's cost grows with them: batch and length shrink as the head count grows, so
the triton backend meets 112 heads at up to 64 tokens, and 300 tokens when batch x heads is 1 (up to 2 in the long
profile). The torch backend's cap allows 4 x 112 heads at 128 tokens, and 300 tokens up to 4 x 20 heads.
``--hypothesis-show-statistics`` prints the counts.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.bloom.modeling_bloom import BloomAttention, build_alibi_tensor
from transformers.models.falcon.modeling_falcon import build_alibi_tensor as falcon_alibi_tensor

from alibi_surgery import head_stats, patch_bloom
from alibi_surgery.attention.backends import run_attention
from alibi_surgery.kernels.alibi import alibi_slopes, key_positions
from alibi_surgery.kernels.alibi import first_real_key
from helpers import bloom_config, causal_4d_mask, left_padded_mask, needs_triton

HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS32 = torch.finfo(torch.float32).eps
LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
# Most 64 x 64 tiles (batch * heads * query blocks * key blocks) one example may take: the interpreter spends ~80 ms
# per (batch, head) program on forward + backward + statistics, so this bounds an example's cost. The torch backend
# can afford more. Heads are drawn uniformly from 1-40, with 112 three times as likely as any one of them.
TILES = {"triton": 32, "torch": 2000}
HEADS = [*range(1, 41), 112, 112, 112]
TILE = 64


@dataclasses.dataclass
class Case:
    batch: int
    n_head: int
    head_dim: int
    q_len: int
    k_len: int
    pads: list
    dtype: torch.dtype
    max_logit: float | None  # None: ordinary N(0, 1) inputs; else q and k scaled so the largest |logit| is this
    exclude_first_query: bool
    normalize_entropy: bool
    seed: int
    softmax_scale: float | None = None
    bias_scale: float = 1.0
    alibi_bf16: bool = False

    @property
    def past(self) -> int:
        return self.k_len - self.q_len

    @property
    def options(self) -> dict:
        """The score options, as the dispatcher takes them ({} for BLOOM's scores)."""
        names = ("softmax_scale", "bias_scale", "alibi_bf16")
        return {n: getattr(self, n) for n, default in zip(names, (None, 1.0, False)) if getattr(self, n) != default}

    def scaled(self, qk: float) -> float:
        """A q.k product times the scores' scale."""
        return qk / math.sqrt(self.head_dim) if self.softmax_scale is None else qk * self.softmax_scale


@st.composite
def cases(draw, tiles: int) -> Case:
    """One attention problem of at most ``tiles`` (x4 in the long profile) 64 x 64 tiles."""
    tiles *= 2 if LONG else 1
    n_head = draw(st.sampled_from(HEADS))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    batch = draw(st.integers(1, max(1, min(4, tiles // n_head))))
    blocks = max(1, math.isqrt(tiles // (batch * n_head)))
    k_len = draw(st.integers(1, min(300, blocks * TILE)))
    q_len = draw(st.one_of(st.just(k_len), st.integers(1, k_len)))  # decode: q_len < k_len behind a KV cache
    pads = draw(st.lists(st.one_of(st.just(0), st.just(k_len), st.integers(0, k_len)), min_size=batch,
                         max_size=batch))
    dtype = draw(st.sampled_from(DTYPES))
    max_logit = draw(st.one_of(st.none(), st.floats(100.0, 3.0e4)))
    flags_and_seed = draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**31 - 1))
    # Score options last, so that the shapes drawn above (and the run time) stay those of BLOOM-only cases. Two thirds
    # of the ci profile's cases keep BLOOM's scores and run through patch_bloom (hypothesis favours the first branch).
    options = draw(st.one_of(st.just((None, 1.0, False)), st.tuples(
        st.one_of(st.none(), st.floats(0.02, 0.5)),
        st.one_of(st.just(1.0), st.just(1 / math.sqrt(head_dim)), st.floats(0.05, 2.0)),
        st.booleans())))
    return Case(batch, n_head, head_dim, q_len, k_len, pads, dtype, max_logit, *flags_and_seed, *options)


class _Given(nn.Module):
    """Stands in for ``query_key_value``: returns the drawn fused QKV whatever the hidden states."""

    def __init__(self, fused: torch.Tensor):
        super().__init__()
        self.fused = fused

    def forward(self, hidden):
        return self.fused


def _attention(case: Case, fused: torch.Tensor) -> BloomAttention:
    with torch.device("meta"):  # no projection weights are ever allocated
        attn = BloomAttention(bloom_config(case.n_head * case.head_dim, case.n_head), layer_idx=0)
    attn.query_key_value = _Given(fused)
    attn.dense = nn.Identity()
    if case.softmax_scale is not None:
        attn.inv_norm_factor = case.softmax_scale  # the scores' scale of eager BLOOM's baddbmm
    return attn.eval()


def _alibi(case: Case, mask2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``[B * H, 1, k_len]`` bias eager BLOOM adds, built by transformers: BLOOM's, or Falcon's (bf16 rounding)
    for ``alibi_bf16``, times ``bias_scale`` in fp32."""
    if not case.options:
        return build_alibi_tensor(mask2d, case.n_head, dtype)
    build = falcon_alibi_tensor if case.alibi_bf16 else build_alibi_tensor
    return (build(mask2d, case.n_head, torch.float32) * case.bias_scale).to(dtype)


def _inputs(case: Case):
    """fp32 leaves: fused QKV of the new tokens [B, q_len, H*3*d], the cached prefix k, v [B, H, past, d], and the
    upstream gradient (zero on padded query rows: in BLOOM those rows feed only other padded rows)."""
    gen = torch.Generator().manual_seed(case.seed)
    B, H, d, T = case.batch, case.n_head, case.head_dim, case.k_len
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for _ in range(3))
    if case.max_logit is not None:  # rescale q and k so the largest scaled |q.k| is max_logit
        largest = case.scaled((q @ k.transpose(-1, -2)).abs().amax().item())
        factor = math.sqrt(case.max_logit / max(largest, 1e-6))
        q, k = q * factor, k * factor
    new = slice(case.past, T)
    fused = torch.stack([q[:, :, new], k[:, :, new], v[:, :, new]], dim=3)  # [B, H, q_len, 3, d]
    fused = fused.permute(0, 2, 1, 3, 4).reshape(B, case.q_len, H * 3 * d)  # BLOOM's per-head (q, k, v) layout
    mask2d = left_padded_mask(B, T, case.pads)
    upstream = torch.randn(B, case.q_len, H * d, generator=gen) * mask2d[:, new, None]
    return fused, k[:, :, :case.past], v[:, :, :case.past], upstream, mask2d, (q, k)


def _cache(case: Case, k_past, v_past) -> DynamicCache | None:
    """A KV cache holding the prefix (decode), or None when every key is a new token."""
    if not case.past:
        return None
    cache = DynamicCache()
    cache.update(k_past, v_past, 0)
    return cache


def _run(case: Case, attn: BloomAttention, fused, k_past, v_past, mask2d, upstream, dtype, *, probs: bool):
    """One forward and backward as BloomModel runs attention: ``(out, grads, attention probs or None)``."""
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (fused, k_past, v_past)]
    attn.query_key_value.fused = leaves[0]
    cache = _cache(case, leaves[1], leaves[2])
    hidden = torch.zeros(case.batch, case.q_len, 0, dtype=dtype)
    out, p = attn(hidden, torch.zeros((), dtype=dtype), _alibi(case, mask2d, dtype),
                  causal_4d_mask(mask2d, case.q_len, dtype), layer_past=cache, use_cache=cache is not None,
                  output_attentions=probs)
    (out.float() * upstream).sum().backward()
    grads = [t.grad.float() if t.grad is not None else torch.zeros(t.shape) for t in leaves]
    return out.detach().float(), grads, None if p is None else p.detach().float()


def _run_direct(case: Case, backend: str, fused, k_past, v_past, mask2d, upstream=None, **stats_options):
    """Ours through the dispatcher with the case's score options, split and cached as BloomAttention does:
    ``(out [B, q_len, H * d], grads or None, stats or None)``; gradients when ``upstream`` is given."""
    grad = upstream is not None
    leaves = [t.detach().to(case.dtype).clone().requires_grad_(grad) for t in (fused, k_past, v_past)]
    B, H, d, n = case.batch, case.n_head, case.head_dim, case.q_len
    qkv = leaves[0].view(B, n, H, 3, d)  # BLOOM's per-head (q, k, v) layout
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    k, v = torch.cat([leaves[1], k], 2), torch.cat([leaves[2], v], 2)
    with torch.set_grad_enabled(grad):
        out, _, stats = run_attention(q, k, v, key_positions(mask2d), alibi_slopes(H), backend, **case.options,
                                        **stats_options)
    out = out.reshape(B, n, H * d)
    if not grad:
        return out.float(), None, stats
    (out.float() * upstream).sum().backward()
    grads = [t.grad.float() if t.grad is not None else torch.zeros(t.shape) for t in leaves]
    return out.detach().float(), grads, stats


def _stats_reference(case: Case, probs: torch.Tensor, mask2d: torch.Tensor):
    """Per-head (mean first-token mass, mean entropy, rows) from attention probabilities [B, H, q_len, k_len], by the
    paper's formulas, over valid query rows (first token = each row's first real key)."""
    p = probs.double()
    key_pos = key_positions(mask2d)
    qpos = key_pos[:, case.past:].long()[:, None, :]  # [B, 1, q_len]: ALiBi position of each query row
    counted = qpos >= 0
    if case.exclude_first_query:
        counted &= qpos > 0
    first = first_real_key(key_pos).long().clamp(max=case.k_len - 1)
    bos = p.gather(-1, first.view(-1, 1, 1, 1).expand(*p.shape[:3], 1)).squeeze(-1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    if case.normalize_entropy:
        ent = torch.where(qpos > 0, ent / torch.log((qpos + 1).double().clamp_min(2.0)), 0.0)
    rows = counted.expand_as(bos)
    n = rows.sum((0, 2)).double()
    mean = lambda x: torch.where(rows, x, 0.0).sum((0, 2)) / n.clamp_min(1)  # noqa: E731
    return mean(bos), mean(ent), n


def _conditioning(case: Case, q: torch.Tensor, k: torch.Tensor) -> float:
    """Largest scaled sum_i |q_i k_i| over (query, key) pairs, plus the largest ALiBi bias."""
    terms = case.scaled((q[:, :, case.past:].abs() @ k.abs().transpose(-1, -2)).amax().item())
    # every ALiBi slope is below 1; bf16 rounds slope, position and product up by at most 2^-9 each
    return terms + case.k_len * case.bias_scale * (1.01 if case.alibi_bf16 else 1.0)


def _check(name, ours, ref, eager, valid, dtype, cond, extra=0.0):
    """ours and eager against the fp32 reference over ``valid`` positions; returns (error, allowed)."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if not valid.any():
        return 0.0, 0.0
    sel = valid.expand_as(ref)
    scale = max(ref[sel].abs().max().item(), 1.0)
    err = (ours - ref)[sel].abs().max().item()
    allowed = 1e-5 * scale + 16 * EPS32 * cond * scale  # what fp32 arithmetic itself can promise
    if dtype != torch.float32:
        allowed += 2 * _eager_error(eager, ref, sel, dtype, scale) + extra * scale
    assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} ({dtype}, cond {cond:.3g})"
    return err, allowed


def _eager_error(eager, ref, sel, dtype, scale) -> float:
    """Eager's own low-precision error over ``sel``, from its finite entries. With the additive mask BloomModel
    builds, a fully masked fp16 query row whose every ``score + finfo.min`` overflows to -inf becomes NaN, and the
    NaN reaches eager's key and value gradients although that row's upstream gradient is 0 (ours stay finite). The
    finite entries still measure the precision's error; with none finite, the output rounding (eps * scale)
    stands in."""
    diff = (eager - ref)[sel]
    finite = diff[torch.isfinite(diff)]
    if finite.numel():
        return finite.abs().max().item()
    return torch.finfo(dtype).eps * scale


def check_case(case: Case, backend: str) -> None:
    fused, k_past, v_past, upstream, mask2d, (q, k) = _inputs(case)
    cond = _conditioning(case, q, k)
    if case.dtype != torch.float32:  # every run sees the same rounded inputs (flash-attention's convention)
        fused, k_past, v_past, upstream = (t.to(case.dtype).float() for t in (fused, k_past, v_past, upstream))
    valid_q = mask2d[:, case.past:].bool()  # [B, q_len]: real query rows
    valid_k = mask2d.bool() & valid_q.any(-1, keepdim=True)  # keys of rows with at least one real query

    ref_out, ref_grads, ref_probs = _run(case, _attention(case, fused), fused, k_past, v_past, mask2d, upstream,
                                         torch.float32, probs=True)
    low = case.dtype != torch.float32
    eager_out, eager_grads, eager_probs = (_run(case, _attention(case, fused), fused, k_past, v_past, mask2d,
                                                upstream, case.dtype, probs=True) if low
                                           else (ref_out, ref_grads, ref_probs))
    if case.options:
        out, grads, _ = _run_direct(case, backend, fused, k_past, v_past, mask2d, upstream)
    else:
        ours_mod = patch_bloom(_attention(case, fused), backend)
        out, grads, _ = _run(case, ours_mod, fused, k_past, v_past, mask2d, upstream, case.dtype, probs=False)

    _check("output", out, ref_out, eager_out, valid_q[..., None], case.dtype, cond)
    # Gradients: fused QKV rows of real queries; prefix keys/values of rows that have a real query.
    for name, g, r, e, valid in (
            ("d fused qkv", grads[0], ref_grads[0], eager_grads[0], valid_q[..., None]),
            ("d cached k", grads[1], ref_grads[1], eager_grads[1], valid_k[:, None, :case.past, None]),
            ("d cached v", grads[2], ref_grads[2], eager_grads[2], valid_k[:, None, :case.past, None])):
        _check(name, g, r, e, valid, case.dtype, cond, extra=1e-3)

    # Statistics, by the inference path diagnosis uses (no autograd).
    variant = dict(exclude_first_query=case.exclude_first_query, normalize_entropy=case.normalize_entropy)
    if case.options:
        plain, _, stats = _run_direct(case, backend, fused, k_past, v_past, mask2d, with_stats=True, **variant)
        sums = stats.sum(0).double()
    else:
        ours_mod.query_key_value.fused = fused.to(case.dtype)
        cache = _cache(case, k_past.to(case.dtype), v_past.to(case.dtype))
        with torch.no_grad(), head_stats(ours_mod, **variant) as sink:
            plain = ours_mod(torch.zeros(case.batch, case.q_len, 0, dtype=case.dtype),
                             torch.zeros((), dtype=case.dtype), build_alibi_tensor(mask2d, case.n_head, case.dtype),
                             causal_4d_mask(mask2d, case.q_len, case.dtype), layer_past=cache,
                             use_cache=cache is not None)[0]
        sums = sink.sums[0]
    assert torch.isfinite(plain).all(), "inference output: non-finite values (fully padded rows included)"
    assert torch.isfinite(sums).all(), "statistics: non-finite values"
    ref_bos, ref_ent, ref_n = _stats_reference(case, ref_probs, mask2d)
    low_bos, low_ent, _ = _stats_reference(case, eager_probs, mask2d)
    assert torch.equal(sums[:, 2], ref_n), f"counted rows {sums[:, 2].tolist()} != {ref_n.tolist()}"
    if ref_n[0] == 0:
        assert (sums == 0).all()
        return
    bos, ent = sums[:, 0] / sums[:, 2], sums[:, 1] / sums[:, 2]
    every = torch.ones(case.n_head, dtype=torch.bool)
    _check("first-token mass", bos, ref_bos, low_bos, every, case.dtype, cond)
    _check("entropy", ent, ref_ent, low_ent, every, case.dtype, cond)


@given(case=cases(TILES["torch"]))
def test_torch_backend_matches_eager_bloom(case):
    check_case(case, "torch")


def _triton_shard(shard: int, shards: int = 2):
    """One of ``shards`` tests that share the profile's examples for the triton backend, so that ``-n 2`` runs
    them side by side. Under the derandomised ci profile each shard has its own fixed seed (one derandomised seed
    per function would give every shard the same examples); the long profile stays random."""

    @given(case=cases(TILES["triton"]))
    def test(case):
        check_case(case, "triton")

    ci = settings.default.derandomize
    # ci: 5 examples a shard at the profile's 64 (10 in all; 16 until 2026-12-07), the suite's longest tests held
    # under its time budget
    test = settings(settings.default, max_examples=max(1, int(0.16 * settings.default.max_examples) // shards),
                    derandomize=False)(seed(1 + shard)(test)) if ci else \
        settings(settings.default, max_examples=max(1, settings.default.max_examples // shards))(test)
    test.__name__ = test.__qualname__ = f"test_triton_backend_matches_eager_bloom_{shard}"
    return pytest.mark.slow(needs_triton(test))


test_triton_backend_matches_eager_bloom_0 = _triton_shard(0)
test_triton_backend_matches_eager_bloom_1 = _triton_shard(1)

"""chunked_lm_loss against independent references: transformers' own BloomForCausalLM loss, and autograd through
the fully materialised ``F.cross_entropy(F.linear(h, W).float())``. Shapes stay tiny (CPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import BloomForCausalLM

import alibi_surgery.analysis.loss as loss_mod
from alibi_surgery.analysis.loss import chunked_lm_loss, default_chunk_tokens
from helpers import bloom_config, left_padded_mask

VOCAB = 300


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return BloomForCausalLM(bloom_config(64, 4, n_layer=2, vocab=VOCAB)).eval()


def batch_case(batch=3, seq=12, pads=(0, 4, 2), seed=1):
    """input_ids, attention_mask (left padding) and labels: -100 on the pads and on a few scattered positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, seq), generator=g)
    mask = left_padded_mask(batch, seq, pads)
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.rand(batch, seq, generator=g) < 0.2] = -100
    return ids, mask, labels


def reference_loss(h, w, labels):
    """Autograd ground truth written independently of transformers' padding trick: slice, don't pad."""
    logits = F.linear(h, w).float()[:, :-1]
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 7, 1000, None])
def test_matches_transformers_loss(lm, chunk):
    ids, mask, labels = batch_case()
    with torch.no_grad():
        expected = lm(ids, attention_mask=mask, labels=labels).loss
        hidden = lm.transformer(ids, attention_mask=mask).last_hidden_state
    got = chunked_lm_loss(hidden, lm.lm_head.weight.detach(), labels, chunk_tokens=chunk)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_gradient_fp32(lm, chunk):
    ids, mask, labels = batch_case()
    w = lm.lm_head.weight.detach()
    with torch.no_grad():
        base = lm.transformer(ids, attention_mask=mask).last_hidden_state
    h_ref = base.clone().requires_grad_()
    ref = reference_loss(h_ref, w, labels)
    (3 * ref).backward()
    h = base.clone().requires_grad_()
    got = chunked_lm_loss(h, w, labels, chunk_tokens=chunk)
    (3 * got).backward()  # backward scales by grad_output
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-7)
    assert lm.lm_head.weight.grad is None


def test_gradient_noncontiguous_peaky_hidden():
    torch.manual_seed(2)
    w = torch.randn(500, 32) / 32**0.5
    base = 4 * torch.randn(9, 2, 32).transpose(0, 1)  # [2, 9, 32], non-contiguous; sharp softmax
    labels = torch.randint(0, 500, (2, 9))
    labels[1, :3] = -100
    h_ref = base.clone().requires_grad_()
    reference_loss(h_ref, w, labels).backward()
    h = base.detach().requires_grad_()
    chunked_lm_loss(h, w, labels, chunk_tokens=5).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_tolerance_rule(dtype):
    """Error against the fp32 reference at most twice that of the same full computation done in ``dtype``."""
    torch.manual_seed(3)
    w32 = torch.randn(400, 64) / 8
    h32 = 2 * torch.randn(2, 10, 64)
    labels = torch.randint(0, 400, (2, 10))
    labels[0, :4] = -100

    def full(h, w):
        h = h.clone().requires_grad_()
        loss = reference_loss(h, w, labels)
        loss.backward()
        return loss.detach(), h.grad.float()

    loss32, grad32 = full(h32, w32)
    loss_lp, grad_lp = full(h32.to(dtype), w32.to(dtype))
    h = h32.to(dtype).requires_grad_()
    got = chunked_lm_loss(h, w32.to(dtype), labels, chunk_tokens=3)
    got.backward()
    assert got.dtype == torch.float32 and h.grad.dtype == dtype
    assert (got - loss32).abs() <= 2 * (loss_lp - loss32).abs() + 1e-6
    assert (h.grad.float() - grad32).abs().max() <= 2 * (grad_lp - grad32).abs().max() + 1e-6


def test_seq_one_and_all_ignored_give_nan_like_transformers(lm):
    ids = torch.randint(4, VOCAB, (2, 5))
    w = lm.lm_head.weight.detach()
    with torch.no_grad():
        hidden = lm.transformer(ids).last_hidden_state
        assert torch.isnan(lm(ids[:, :1], labels=ids[:, :1]).loss)
        assert torch.isnan(lm(ids, labels=torch.full_like(ids, -100)).loss)
    for h, labels in [(hidden[:, :1], ids[:, :1]), (hidden, torch.full_like(ids, -100)),
                      (hidden, ids.masked_fill(torch.arange(5) > 0, -100))]:  # only the never-scored first label
        h = h.clone().requires_grad_()
        got = chunked_lm_loss(h, w, labels)
        assert torch.isnan(got)
        got.backward()
        assert torch.equal(h.grad, torch.zeros_like(h))  # as autograd through F.cross_entropy gives


def test_int32_labels_and_custom_ignore_index():
    torch.manual_seed(4)
    w = torch.randn(50, 16)
    h = torch.randn(2, 6, 16)
    labels = torch.randint(0, 50, (2, 6))
    labels[0, 2] = -1
    expected = F.cross_entropy(F.linear(h, w)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-1)
    got = chunked_lm_loss(h, w, labels.int(), ignore_index=-1, chunk_tokens=4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_no_gradient_work_without_grad(monkeypatch):
    calls = []
    real = loss_mod._grad_hidden
    monkeypatch.setattr(loss_mod, "_grad_hidden", lambda g, w: calls.append(g.shape) or real(g, w))
    torch.manual_seed(5)
    w = torch.randn(60, 16)
    h = torch.randn(2, 7, 16, requires_grad=True)
    labels = torch.randint(0, 60, (2, 7))
    expected = reference_loss(h, w, labels).detach()
    plain = chunked_lm_loss(h.detach(), w, labels, chunk_tokens=4)
    with torch.no_grad():
        under_no_grad = chunked_lm_loss(h, w, labels, chunk_tokens=4)
    assert calls == [] and plain.grad_fn is None and under_no_grad.grad_fn is None
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(under_no_grad, expected, rtol=1e-5, atol=0)
    chunked_lm_loss(h, w, labels, chunk_tokens=4).backward()
    assert len(calls) == 3  # 12 scored positions in chunks of 4


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_live_lm_head_weight_is_accepted_without_grad_mode(lm, mode):
    """Straight after from_pretrained the tied LM head requires grad; evaluating the loss with it under no_grad or
    inference_mode needs no gradient, so it must just compute transformers' loss."""
    ids, mask, labels = batch_case()
    assert lm.lm_head.weight.requires_grad
    with mode():
        expected = lm(ids, attention_mask=mask, labels=labels).loss
        hidden = lm.transformer(ids, attention_mask=mask).last_hidden_state
        got = chunked_lm_loss(hidden, lm.lm_head.weight, labels, chunk_tokens=7)
    assert got.grad_fn is None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


class _LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op allocates (every temporary included; views of
    and in-place writes to an op's inputs are not allocations and are skipped)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_full_logits_never_allocated(monkeypatch):
    vocab, batch, seq, chunk = 4000, 2, 40, 16
    torch.manual_seed(6)
    w = torch.randn(vocab, 32) / 32**0.5
    labels = torch.randint(0, vocab, (batch, seq))
    shapes = []
    real = loss_mod._logits
    monkeypatch.setattr(loss_mod, "_logits", lambda h, w: shapes.append(tuple(h.shape)) or real(h, w))

    h = torch.randn(batch, seq, 32, requires_grad=True)
    with _LargestOutput() as ours:
        chunked_lm_loss(h, w, labels, chunk_tokens=chunk).backward()
    assert ours.largest == chunk * vocab < batch * seq * vocab  # one chunk of logits, the largest thing
    assert sum(s[0] for s in shapes) == batch * (seq - 1) and max(s[0] for s in shapes) == chunk

    h2 = torch.randn(batch, seq, 32, requires_grad=True)
    with _LargestOutput() as full:  # the detector does see the materialised reference
        reference_loss(h2, w, labels).backward()
    assert full.largest >= batch * (seq - 1) * vocab


def test_default_chunk_is_128_mib_of_fp32_logits():
    assert default_chunk_tokens(250880) == 133  # 133 * 250880 * 4 bytes = 133.5 MB
    assert default_chunk_tokens(10**9) == 16
    assert default_chunk_tokens(300) * 300 * 4 <= 2**27


def _bad_input_message(lm, **change):
    w = lm.lm_head.weight.detach()
    args = {"hidden": torch.randn(2, 5, 64), "weight": w, "labels": torch.randint(0, VOCAB, (2, 5))}
    args.update({k: (v(w) if callable(v) else v) for k, v in change.items()})
    with pytest.raises(ValueError) as err:
        chunked_lm_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_errors(lm):
    assert "requires grad" in _bad_input_message(lm, weight=lm.lm_head.weight)  # the live, tied weight
    assert "labels shape" in _bad_input_message(lm, labels=torch.randint(0, VOCAB, (2, 4)))
    assert "hidden_size" in _bad_input_message(lm, hidden=torch.randn(2, 5, 32))
    assert "integer" in _bad_input_message(lm, labels=torch.zeros(2, 5))
    assert "dtype" in _bad_input_message(lm, weight=lambda w: w.bfloat16())
    assert "hidden must be" in _bad_input_message(lm, hidden=torch.randn(10, 64))
    assert "chunk_tokens" in _bad_input_message(lm, chunk_tokens=0)
    assert "outside" in _bad_input_message(lm, labels=torch.full((2, 5), VOCAB))


def test_causal_lm_labels_mask_targets_predicted_from_padding():
    from alibi_surgery.analysis.loss import causal_lm_labels

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert causal_lm_labels(ids, mask).tolist() == [[-100, -100, -100, 8], [9, 10, 11, 12]]
    assert torch.equal(causal_lm_labels(ids), ids)

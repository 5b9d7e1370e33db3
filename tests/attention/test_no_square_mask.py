"""Under the patch no ``T x T`` tensor is built by anyone (issue 31): transformers' causal mask (``[B, 1, T, T]``,
Falcon's ``[B, H, T, T]`` with ALiBi folded in) is replaced by its last row. Every aten op's output is recorded
(a ``TorchDispatchMode``) during a left-padded forward at an odd length; none may have two dimensions of ``T``.
The unpatched model is recorded too, so the test is seen to catch the mask. The patched logits are checked against
the model's own SDPA forward, and the family's eager fallback (``output_attentions``, attention dropout) gets the
whole causal mask back."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from alibi_surgery.attention.patch import patched
from family_cases import bloom_config, falcon_config, mpt_config

T = 509  # odd, above the torch backend's query tile (256), within MPT's max_seq_len, no hidden/vocab size


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.square = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and sum(size == T for size in t.shape) >= 2:
                self.square.append((str(func), tuple(t.shape)))
        return out


def _model(make_config, attn):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = make_config(2)
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def _inputs():
    ids = torch.randint(4, 300, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :17] = 0  # left padding: SDPA can no longer skip its mask
    return ids, mask


@pytest.mark.parametrize("make_config, attn", [(bloom_config, "eager"), (mpt_config, "eager"),
                                               (falcon_config, "eager"), (falcon_config, "sdpa")],
                         ids=["bloom", "mpt", "falcon-eager", "falcon-sdpa"])  # BLOOM and MPT have no SDPA path
def test_no_tensor_of_two_sequence_dimensions_under_the_patch(make_config, attn):
    model = _model(make_config, attn)
    ids, mask = _inputs()
    with torch.no_grad():
        with _Shapes() as stock:
            reference = model(ids, attention_mask=mask).logits
        assert stock.square, "the unpatched model builds no T x T tensor: this test would not catch one"
        with patched(model, "torch"), _Shapes() as ours:
            logits = model(ids, attention_mask=mask).logits
    assert ours.square == [], ours.square[:3]
    if not (make_config is falcon_config and attn == "eager"):  # Falcon's eager attention is wrong upstream
        real = mask.bool()
        torch.testing.assert_close(logits[real], reference[real], atol=2e-4, rtol=2e-4)
    assert model.config._attn_implementation == attn


@pytest.mark.parametrize("make_config", [bloom_config, mpt_config], ids=["bloom", "mpt"])
def test_the_eager_fallback_gets_the_whole_causal_mask(make_config):
    """output_attentions runs the family's own attention for that call: with the compact mask it would attend to
    the future; the fallback rebuilds the causal mask, so its maps and logits equal the unpatched model's."""
    model = _model(make_config, "eager")
    ids, mask = _inputs()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_attentions=True)
        with patched(model, "torch"), pytest.warns(UserWarning):
            got = model(ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(got.logits, want.logits)
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b)
        assert a[0, :, 0, 1:].abs().max() == 0  # causal: the first row (unpadded) sees only itself


def test_other_models_in_the_process_keep_the_stock_mask():
    patched_model, other = _model(bloom_config, "eager"), _model(bloom_config, "eager")
    ids, mask = _inputs()
    with torch.no_grad(), patched(patched_model, "torch"):
        with _Shapes() as seen:
            other(ids, attention_mask=mask)
    assert seen.square, "an unpatched model lost its own mask"
    import transformers.masking_utils as masking
    import transformers.models.bloom.modeling_bloom as modeling

    from alibi_surgery.attention import compact_mask

    live = {k for k, ref in compact_mask._PATCHED.get(modeling.__name__, {}).items() if ref() is not None}
    assert id(patched_model.config) not in live
    if not live:  # no other test's patched BLOOM alive in this process: the stock function is back
        assert modeling.create_causal_mask is masking.create_causal_mask

"""One check of the Triton kernels' head-dim limit (a multiple of 16 from 16 to 128), used by backend choice and
patching: ``triton`` refuses an unsupported head_dim in one line, ``auto`` on CUDA falls back to ``torch`` with a
warning, and a model with such a head_dim (BLOOM hidden 120, 3 heads: head_dim 40) runs under ``auto``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import BloomForCausalLM

import alibi_surgery.attention.patch as patch_mod
from alibi_surgery import UsageError, patch_bloom
from alibi_surgery.attention.backends import resolve_backend
from helpers import bloom_config, left_padded_mask

CUDA = torch.device("cuda")  # constructing the device object needs no GPU


@pytest.mark.parametrize("head_dim", [40, 144, 8, 120])
def test_auto_on_cuda_falls_back_to_torch_with_one_line_warning(head_dim):
    with pytest.warns(UserWarning) as caught:
        assert resolve_backend("auto", CUDA, head_dim=head_dim) == "torch"
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"head_dim {head_dim}" in message and "multiple of 16" in message and "\n" not in message
    assert message.endswith("falling back to the torch backend")


@pytest.mark.parametrize("device", [CUDA, torch.device("cpu")])
@pytest.mark.parametrize("head_dim", [40, 144])
def test_triton_refuses_unsupported_head_dim(head_dim, device):
    """Refused on any device: the head-dim check comes before the CUDA-device check."""
    with pytest.raises(UsageError) as err:
        resolve_backend("triton", device, head_dim=head_dim)
    message = str(err.value)
    assert f"this model has head_dim {head_dim}" in message and "use backend='torch'" in message and "--" not in message
    assert "\n" not in message


@pytest.mark.parametrize("head_dim", [None, 64, 80, 128])
def test_supported_head_dims_unchanged(head_dim):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", CUDA, head_dim=head_dim) == "triton"
        assert resolve_backend("triton", CUDA, head_dim=head_dim) == "triton"
        assert resolve_backend("auto", torch.device("cpu"), head_dim=head_dim) == "torch"
        assert resolve_backend("torch", CUDA, head_dim=head_dim) == "torch"
    assert resolve_backend("torch", CUDA, head_dim=40) == "torch"  # torch and eager have no limit
    assert resolve_backend("eager", CUDA, head_dim=40) == "eager"


def _head_dim_40_model() -> BloomForCausalLM:
    torch.manual_seed(0)
    return BloomForCausalLM(bloom_config(120, 3, n_layer=2)).eval()


def test_patch_refuses_triton_up_front_and_leaves_the_model_alone():
    model = _head_dim_40_model()
    with pytest.raises(UsageError, match="this model has head_dim 40; use backend='torch'"):
        patch_bloom(model, "triton")
    assert all("forward" not in block.self_attention.__dict__ for block in model.transformer.h)


def test_auto_model_with_head_dim_40_matches_eager(monkeypatch):
    """Runs and matches eager on real rows; the patched forward resolves its backend with the model's head_dim, once
    per device for the whole model (so the CUDA fallback warns once, not once per layer and call)."""
    calls = []
    real = patch_mod.resolve_backend
    monkeypatch.setattr(patch_mod, "resolve_backend", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
    ref = _head_dim_40_model()
    ours = patch_bloom(copy.deepcopy(ref), "auto")
    ids = torch.randint(4, 300, (2, 20))
    mask = left_padded_mask(2, 20, [0, 6])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # on CPU nothing falls back: auto means torch
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
        ours(ids, attention_mask=mask)
    valid = mask.bool()
    assert (got[valid] - want[valid]).abs().max() <= 1e-4 * want[valid].abs().max()
    assert calls == [(("auto", torch.device("cpu"), 40), {})]

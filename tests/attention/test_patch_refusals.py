"""``patch()`` and ``patched()`` refuse what the CLI refuses, in one line, before anything changes.

The refusals are the families' own (``Family.refusal``, the interface family's soft-capping and other checks): a
rotary or multi-query Falcon, an MPT option transformers' port silently ignores, attention-logit soft-capping. Each
case builds the model from its transformers config class and checks that no module was touched.
"""

from __future__ import annotations

import pytest
import torch

from alibi_surgery import UsageError, patch, patched
from alibi_surgery.attention.patch import _STATE


def _falcon(**options):
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, **options)
    return FalconForCausalLM(config)


def _mpt(attn_config):
    from transformers import MptConfig, MptForCausalLM

    return MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=50, attn_config=attn_config))


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          attn_logit_softcapping=50.0))


CASES = [
    pytest.param(lambda: _falcon(alibi=False, multi_query=False), "rotary position embeddings", id="rotary-falcon"),
    pytest.param(lambda: _falcon(alibi=True, multi_query=True), "multi-query attention", id="multi-query-falcon"),
    pytest.param(lambda: _falcon(alibi=True, multi_query=False, new_decoder_architecture=True, num_kv_heads=2),
                 "new decoder architecture", id="new-decoder-falcon"),
    pytest.param(lambda: _mpt({"qk_ln": True}), "qk_ln", id="mpt-qk-ln"),
    pytest.param(lambda: _mpt({"attn_type": "multiquery_attention"}), "attn_type", id="mpt-attn-type"),
    pytest.param(_gemma2, "soft-caps attention logits", id="gemma2-softcap"),
]


def _untouched(model, implementation):
    for module in model.modules():
        assert _STATE not in module.__dict__ and "forward" not in module.__dict__, type(module).__name__
    assert model.config._attn_implementation == implementation


@pytest.mark.parametrize("build,words", CASES)
@pytest.mark.parametrize("how", ["patch", "patched"])
def test_refused_in_one_line_before_anything_changes(build, words, how):
    torch.manual_seed(0)
    model = build().eval()
    implementation = model.config._attn_implementation
    with pytest.raises(UsageError, match=words) as info:
        if how == "patch":
            patch(model, "torch")
        else:
            with patched(model, "torch"):
                pass
    assert "\n" not in str(info.value)
    _untouched(model, implementation)

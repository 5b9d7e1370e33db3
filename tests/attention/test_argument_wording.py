"""Refusals raised from the Python API name Python arguments (``backend='torch'``), not command-line flags; the CLI
words the same errors with its flags by one rule (:func:`alibi_surgery.cli.console.flag_wording`)."""

from __future__ import annotations

import pytest
import torch

from alibi_surgery import UsageError, alibi_attention, packed_perplexity
from alibi_surgery.attention import backends
from alibi_surgery.cli.console import flag_wording
from alibi_surgery.cli.main import _command_parser, build_parser
from alibi_surgery.diagnosis.extremes import check_dormant_fraction
from alibi_surgery.diagnosis.dormancy import check_threshold


def _refusal(call) -> str:
    with pytest.raises(UsageError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "--" not in message, message
    return message


def test_unsupported_head_dim_names_the_argument():
    q = torch.randn(1, 4, 2, 24)  # head_dim 24: not a multiple of 16
    assert _refusal(lambda: alibi_attention(q, q, q, backend="triton")).endswith(
        "this model has head_dim 24; use backend='torch'")


def test_triton_without_cuda_names_the_argument(monkeypatch):
    monkeypatch.setattr(backends, "interpreting", lambda: False)
    message = _refusal(lambda: backends.resolve_backend("triton", torch.device("cpu")))
    assert message == "the triton backend needs a CUDA device (got cpu); use backend='torch' on CPU"


def test_eager_refusal_and_thresholds_name_the_arguments():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    falcon = FalconForCausalLM(FalconConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                            alibi=True, multi_query=False, new_decoder_architecture=False)).eval()
    message = _refusal(lambda: packed_perplexity(falcon, torch.randint(0, 50, (1, 8)), backend="eager"))
    assert message.startswith("backend='eager': transformers' Falcon attention adds the ALiBi bias twice")
    assert _refusal(lambda: check_threshold(-0.5)) == "dormancy_threshold=-0.5: must be >= 0"
    assert _refusal(lambda: check_dormant_fraction(2.0)) == "dormant_fraction=2.0: must be in (0, 1]"


@pytest.mark.parametrize("message, worded", [
    ("the triton backend needs head_dim 16..128; use backend='torch'",
     "the triton backend needs head_dim 16..128; use --backend torch"),
    ("backend='eager': no eager path (attn_implementation='eager', output_attentions=True)",
     "--backend eager: no eager path (attn_implementation='eager', output_attentions=True)"),
    ("dormancy_threshold=-0.1: must be >= 0", "--dormancy-threshold -0.1: must be >= 0"),
    ("use exclude_first_query=True or max_length=4", "use --exclude-first-query or --max-length 4"),
    ("window=3 and slopes=None are not options of diagnose", "window=3 and slopes=None are not options of diagnose"),
])
def test_cli_maps_python_arguments_to_its_flags(message, worded):
    assert flag_wording(message, _command_parser(build_parser(), "diagnose")) == worded


def test_cli_prints_the_library_refusal_with_flags(tmp_path, capsys, monkeypatch):
    """End to end: the library's ``backend='torch'`` reaches the terminal as ``--backend torch``."""
    from alibi_surgery.cli.main import main

    def refuse(*args, **kwargs):
        backends.check_triton_head_dim(40)

    monkeypatch.setattr("alibi_surgery.cli.diagnose.diagnose_each", refuse)
    assert main(["diagnose", str(tmp_path), "--backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("this model has head_dim 40; use --backend torch"), err

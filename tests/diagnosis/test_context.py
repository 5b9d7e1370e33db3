"""The training context a config records, and diagnose's warning for prompts longer than it (loaded, streamed, CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, FalconConfig, LlamaConfig, MptConfig

from alibi_surgery import diagnose
from alibi_surgery.diagnosis.stream import diagnose_streamed
from alibi_surgery.families import training_context
from alibi_surgery.io.random_model import byte_tokenizer
from helpers import bloom_config

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "short", "def f(x):\n    return x * 2\n", "SELECT 1;"]


def test_training_context_reads_the_first_recorded_field():
    assert training_context(BloomConfig()) is None  # transformers' BloomConfig records no context
    assert training_context(BloomConfig(seq_length=2048)) == (2048, "seq_length")
    assert training_context(MptConfig(max_seq_len=512)) == (512, "max_seq_len")
    assert training_context(FalconConfig(max_position_embeddings=1024)) == (1024, "max_position_embeddings")
    assert training_context(LlamaConfig(max_position_embeddings=4096)) == (4096, "max_position_embeddings")
    # a dict as read from config.json; seq_length wins over the position-table size; junk values are no context
    assert training_context({"seq_length": 128, "max_position_embeddings": 2048}) == (128, "seq_length")
    assert training_context({"seq_length": 0, "n_positions": 1024}) == (1024, "n_positions")
    assert training_context({"seq_length": True, "max_seq_len": "512"}) is None


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = bloom_config(64, 4, n_layer=2)
    config.seq_length = 12
    return BloomForCausalLM(config).eval()


def _expected(tokenizer, prompts, context):
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    longer = sum(n > context for n in lengths)
    return (f"{longer} of {len(prompts)} prompts are longer than the model's training context ({context} tokens, "
            f"config.json seq_length; longest {max(lengths)}): rows past it measure the model outside what it was "
            f"trained on; pass max_length={context} to stay inside")


def test_loaded_diagnosis_warns_past_the_context(model, tokenizer):
    assert sum(len(tokenizer(p)["input_ids"]) > 12 for p in PROMPTS) == 2  # the case is not vacuous
    with pytest.warns(UserWarning) as caught:
        report = diagnose(model, tokenizer, PROMPTS)
    messages = [str(w.message) for w in caught if "training context" in str(w.message)]
    assert messages == [_expected(tokenizer, PROMPTS, 12)]
    assert report.metadata["training_context"] == {"tokens": 12, "field": "seq_length"}
    with warnings.catch_warnings():  # truncated to the context, or a model that records none: no warning
        warnings.filterwarnings("error", ".*training context")
        diagnose(model, tokenizer, PROMPTS, max_length=12)
        plain = BloomForCausalLM(bloom_config(64, 4, n_layer=2)).eval()
        assert diagnose(plain, tokenizer, PROMPTS).metadata["training_context"] is None


def test_streamed_diagnosis_warns_too(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["seq_length"] == 12
    with pytest.warns(UserWarning) as caught:
        report = diagnose_streamed(tmp_path, tokenizer, PROMPTS)
    assert [str(w.message) for w in caught if "training context" in str(w.message)] == [
        _expected(tokenizer, PROMPTS, 12)]
    assert report.metadata["training_context"] == {"tokens": 12, "field": "seq_length"}


def test_cli_prints_one_warning_line(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p.replace("\n", " ") for p in PROMPTS) + "\n")
    env = dict(os.environ, PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-m", "alibi_surgery.cli", "diagnose", str(tmp_path / "m"),
                           "--prompts-file", str(prompts), "--quiet"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "training context" in line]
    texts = [p.replace("\n", " ") for p in PROMPTS]
    expected = _expected(tokenizer, texts, 12)  # the library's max_length=12, in the CLI's words
    assert lines == ["warning: " + expected.replace("pass max_length=12", "pass --max-length 12")]

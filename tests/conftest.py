"""Fixtures; helpers live in helpers.py (importable because pytest puts tests/ on sys.path)."""

import pytest
import torch
from transformers import BloomForCausalLM

from helpers import bloom_config


@pytest.fixture
def tiny_lm():
    """A 3-layer BLOOM language model (hidden 64, 4 heads of 16), random weights, fp32, eval mode."""
    torch.manual_seed(0)
    return BloomForCausalLM(bloom_config(64, 4, n_layer=3)).eval()

"""Fixtures; helpers live in helpers.py (importable because pytest puts tests/ on sys.path)."""

import os

if "PYTEST_XDIST_WORKER" in os.environ:  # one thread per worker: the workers already fill the cores
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from transformers import BloomForCausalLM

from helpers import bloom_config

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)


@pytest.fixture
def tiny_lm():
    """A 3-layer BLOOM language model (hidden 64, 4 heads of 16), random weights, fp32, eval mode."""
    torch.manual_seed(0)
    return BloomForCausalLM(bloom_config(64, 4, n_layer=3)).eval()

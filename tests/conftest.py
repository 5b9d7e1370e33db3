"""Fixtures; helpers live in helpers.py (importable because pytest puts tests/ on sys.path)."""

import os

if "PYTEST_XDIST_WORKER" in os.environ:  # one thread per worker: the workers already fill the cores
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import BloomForCausalLM

from helpers import bloom_config

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

# Hypothesis profiles: "ci" (the default) is derandomised, so CI runs the same examples every time; "long" is the
# local soak run (HYPOTHESIS_PROFILE=long), random and with a saved example database; to spread it over cores, run
# several processes with different --hypothesis-seed and FUZZ_EXAMPLES splitting the 1,000.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=64, derandomize=True, deadline=None, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("long", max_examples=int(os.environ.get("FUZZ_EXAMPLES", 1000)), deadline=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Longest first, so that ``-n 2`` never ends with one worker alone on a long test: ``slow`` tests, then the
    property-based ones, then the rest, each group in collection order."""
    def rank(item) -> int:
        if item.get_closest_marker("slow"):
            return 0
        return 1 if getattr(getattr(item, "obj", None), "is_hypothesis_test", False) else 2

    items.sort(key=rank)


@pytest.fixture(scope="session")
def forked_cli():
    """:class:`cli_fork.ForkedCli`: the CLI in its own process per run, the imports paid once per worker."""
    from cli_fork import ForkedCli

    cli = ForkedCli()
    yield cli
    cli.close()


@pytest.fixture
def tiny_lm():
    """A 3-layer BLOOM language model (hidden 64, 4 heads of 16), random weights, fp32, eval mode."""
    torch.manual_seed(0)
    return BloomForCausalLM(bloom_config(64, 4, n_layer=3)).eval()

"""pytest-benchmark plumbing for the CPU benchmarks (``pytest bench/ --benchmark-only``): bench/ on sys.path and a
``record`` fixture that appends a benchmark's median to ``bench/results/<op>.csv``."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def record(benchmark):
    """``record(op, row)``: append ``row`` plus the benchmark's median (ms) and round count to ``<op>.csv``."""
    from common import append_rows

    def _record(op: str, row: dict, ms_key: str = "ms", scale: float = 1e3) -> dict:
        stats = benchmark.stats.stats
        row = {**row, ms_key: round(stats.median * scale, 4), "rounds": stats.rounds, "timer": "pytest-benchmark"}
        append_rows(op, [row])
        return row

    return _record

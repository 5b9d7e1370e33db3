"""Ahead-of-time compilation for real GPUs (no GPU needed): every launcher configuration, 0 spills."""

from __future__ import annotations

import warnings

import pytest
import torch

from alibi_surgery.kernels.aot import ARCHS, aot_compile, fwd_signature
from alibi_surgery.kernels.attention_fwd import _alibi_fwd_kernel
from alibi_surgery.kernels.compile_report import compile_all, format_table, launcher_configs

pytestmark = pytest.mark.filterwarnings("ignore")


def test_every_forward_configuration_compiles_without_spills_for_sm80_to_sm90():
    configs = launcher_configs()
    assert {c[0] for c in configs} == set(ARCHS) == {80, 86, 89, 90}
    results = compile_all(configs, jobs=1)
    bad = [r for r in results if not r.ok]
    assert not bad, "\n" + format_table(bad)
    assert all(r.registers > 0 for r in results)  # the ptxas report was really read


def test_the_check_sees_spills_when_there_are_some():
    """An oversized fp32 tile must be reported as spilling, or the test above proves nothing."""
    warnings.filterwarnings("ignore")
    sig = fwd_signature(torch.float32)
    constexprs = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=128, WITH_STATS=True, EXCLUDE_FIRST=False,
                      NORMALIZE_ENTROPY=False, UPCAST=False, IEEE=True)
    result = aot_compile(_alibi_fwd_kernel, sig, constexprs, 89, 4, 2, tuple(a for a in sig if a.startswith("s")))
    assert result.spill_stores > 0 and not result.ok

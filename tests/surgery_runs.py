"""Shared by the tests that drive ``alibi-surgery repair`` as a subprocess (crash, lock, resume, write failures)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alibi_surgery.surgery import trainer
from alibi_surgery.io.random_model import write_random_bloom

WORDS = "the cat sat on a mat while dogs ran past the old red barn and birds sang".split()


def make_inputs(root: Path) -> Path:
    """A 2-layer random BLOOM and a corpus of 12 chunks of 16 tokens under ``root``."""
    write_random_bloom(root / "model", "tiny", n_layer=2, seed=4)
    (root / "corpus.txt").write_text(" ".join(WORDS[(5 * i) % len(WORDS)] for i in range(46)))
    return root


def repair_command(root: Path, out: Path, *extra, epochs: int = 1) -> list:
    """6 optimizer steps per epoch on two heads, a checkpoint every 2 steps."""
    return [sys.executable, "-m", "alibi_surgery.cli", "repair", str(root / "model"), "--out", str(out),
            "--corpus", str(root / "corpus.txt"), "--heads", "0:1;1:2", "--device", "cpu", "--backend", "torch",
            "--seq-len", "16", "--batch-size", "2", "--grad-accum", "1", "--epochs", str(epochs),
            "--save-every-steps", "2", "--quiet", *extra]


def cli_env(**extra) -> dict:
    """The environment of a user's run: no interpreter, no test hook, one thread (the same bits every run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", trainer.PAUSE_ENV)}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def start_paused(args: list, point: str, flag: Path) -> subprocess.Popen:
    """Start ``args`` with the test hook set to ``point`` and return once the run waits there (its pid is in
    ``flag``; delete ``flag`` to let it go on)."""
    env = cli_env(**{trainer.PAUSE_ENV: point, f"{trainer.PAUSE_ENV}_FILE": str(flag)})
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (flag.exists() and flag.read_text()):
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before pausing at {point}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"the run never reached {point}"
        time.sleep(0.1)
    return proc

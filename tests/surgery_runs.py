"""Shared by the tests that drive ``alibi-surgery repair`` as its own process (crash, lock, resume, write
failures): the inputs, the command, its environment, and a run held at a pause point."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from alibi_surgery.surgery import trainer
from cli_fork import SERVER_ENV
from alibi_surgery.io.random_model import write_random_bloom

WORDS = "the cat sat on a mat while dogs ran past the old red barn and birds sang".split()


def make_inputs(root: Path) -> Path:
    """A 2-layer random BLOOM and a corpus of 12 chunks of 16 tokens under ``root``."""
    write_random_bloom(root / "model", "tiny", n_layer=2, seed=4)
    (root / "corpus.txt").write_text(" ".join(WORDS[(5 * i) % len(WORDS)] for i in range(46)))
    return root


# The functional measurement at a test's size (the defaults, 20 draws on 64 texts, are most of a tiny run's time):
# still measured before and after, so resume and the reports keep their ablation parts.
SMALL_ABLATION = dict(ablation_draws=2, ablation_texts=4, ablation_bootstrap=20)
SMALL_ABLATION_ARGS = [a for k, v in SMALL_ABLATION.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def repair_command(root: Path, out: Path, *extra, epochs: int = 1) -> list:
    """6 optimizer steps per epoch on two heads, a checkpoint every 2 steps."""
    return [sys.executable, "-m", "alibi_surgery.cli", "repair", str(root / "model"), "--out", str(out),
            "--corpus", str(root / "corpus.txt"), "--heads", "0:1;1:2", "--device", "cpu", "--backend", "torch",
            "--seq-len", "16", "--batch-size", "2", "--grad-accum", "1", "--epochs", str(epochs),
            "--save-every-steps", "2", "--quiet", *SMALL_ABLATION_ARGS, *extra]


def cli_env(**extra) -> dict:
    """The environment of a user's run (the CLI server's, :data:`cli_fork.SERVER_ENV`: no interpreter, offline, one
    thread, so the same bits every run) without the test hook, plus ``extra``."""
    return {**{k: v for k, v in SERVER_ENV.items() if k != trainer.PAUSE_ENV}, **extra}


def start_paused(cli, args: list, point: str, flag: Path, ignore_sigint: bool = False):
    """Start ``args`` on ``cli`` (:class:`cli_fork.ForkedCli`) with the test hook set to ``point`` and return the
    process once the run waits there (its pid is in ``flag``; delete ``flag`` to let it go on)."""
    env = cli_env(**{trainer.PAUSE_ENV: point, f"{trainer.PAUSE_ENV}_FILE": str(flag)})
    proc = cli.popen(args, env=env, ignore_sigint=ignore_sigint)
    deadline = time.monotonic() + 600
    while not (flag.exists() and flag.read_text()):
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before pausing at {point}: {proc.communicate()[1]}")
        assert time.monotonic() < deadline, f"the run never reached {point}"
        time.sleep(0.1)
    return proc

"""Crash safety: a real ``alibi-surgery repair`` process killed with SIGKILL, then resumed.

Two kills, each at a known instant held by the test hook in trainer.py (``ALIBI_SURGERY_TEST_PAUSE``):

* ``train:5``: inside optimizer step 5, after its first backward pass;
* ``save:4``: half-way through writing checkpoint 4 (weights written; optimizer state and completion marker not).

After each kill: every complete checkpoint loads in stock transformers, with its optimizer state; the partial one is
never picked up; and ``--resume`` ends with final weights (and last optimizer state) bit-identical to an
uninterrupted run with the same seed. All three runs are their own processes (forked from one that imported the
CLI: tests/cli_fork.py) with the same environment.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alibi_surgery.surgery import trainer
from alibi_surgery.io.files import replace_dir
from alibi_surgery.io.lock import LOCK_NAME
from surgery_runs import cli_env, make_inputs, repair_command, start_paused

STEPS = 12  # 6 per epoch, 2 epochs; checkpoints at steps 2, 4, ..., 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("crash"))


def _command(root: Path, out: Path, *extra) -> list:
    return repair_command(root, out, "--lr", "1e-3", "--seed", "7", *extra, epochs=2)


def _finish(cli, root: Path, out: Path, *extra) -> None:
    result = cli.run(_command(root, out, *extra), env=cli_env())
    assert result.returncode == 0, result.stderr


def _kill_at(cli, root: Path, out: Path, point: str) -> None:
    """Start a repair, wait until it pauses at ``point``, SIGKILL it."""
    proc = start_paused(cli, _command(root, out), point, out.parent / f"paused-{point.replace(':', '-')}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (out / LOCK_NAME).is_file()  # a stale lock: the resumed run takes it over


@pytest.fixture(scope="module")
def uninterrupted(inputs, forked_cli):
    out = inputs / "reference"
    _finish(forked_cli, inputs, out)
    return out


def _complete(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith(trainer.CKPT_PREFIX))


def _assert_checkpoints_load(out: Path) -> None:
    from transformers import BloomForCausalLM

    for ckpt in _complete(out):
        state = json.loads((ckpt / trainer.STATE_FILE).read_text())
        assert state["position"]["step"] == int(ckpt.name.split("-")[1])
        optimizer = load_file(ckpt / trainer.OPT_FILE)
        assert optimizer["exp_avg"].numel() > 0
        model = BloomForCausalLM.from_pretrained(ckpt, local_files_only=True)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def _assert_bit_identical(out: Path, reference: Path) -> None:
    ours, ref = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == ref.keys()
    different = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not different, f"final weights differ from the uninterrupted run: {different[:3]}"
    last = f"{trainer.CKPT_PREFIX}{STEPS:08d}"
    a, b = load_file(out / "checkpoints" / last / trainer.OPT_FILE), \
        load_file(reference / "checkpoints" / last / trainer.OPT_FILE)
    assert all(torch.equal(a[k], b[k]) for k in b), "last optimizer state differs"


def test_the_reference_run_is_what_the_test_assumes(uninterrupted):
    names = [p.name for p in _complete(uninterrupted)]
    assert names == [f"step-{s:08d}" for s in range(2, STEPS + 1, 2)]


def test_sigkill_during_training_then_resume_is_bit_identical(inputs, uninterrupted, tmp_path, forked_cli):
    out = tmp_path / "out"
    _kill_at(forked_cli, inputs, out, "train:5")
    assert [p.name for p in _complete(out)] == ["step-00000002", "step-00000004"]
    assert not (out / "final").exists() and not (out / "report.json").exists()
    _assert_checkpoints_load(out)
    _finish(forked_cli, inputs, out, "--resume")
    _assert_checkpoints_load(out)
    _assert_bit_identical(out, uninterrupted)


def test_sigkill_while_writing_a_checkpoint_never_exposes_it(inputs, uninterrupted, tmp_path, forked_cli):
    out = tmp_path / "out"
    _kill_at(forked_cli, inputs, out, "save:4")
    partial = out / "checkpoints" / ".tmp-step-00000004"
    assert (partial / "model.safetensors").is_file() and not (partial / trainer.STATE_FILE).exists()
    assert [p.name for p in _complete(out)] == ["step-00000002"]
    assert trainer.newest_checkpoint(out / "checkpoints").name == "step-00000002"
    _assert_checkpoints_load(out)
    _finish(forked_cli, inputs, out, "--resume")
    assert not partial.exists()
    _assert_bit_identical(out, uninterrupted)


def test_replacing_a_directory_keeps_the_old_or_the_new(tmp_path):
    """replace_dir, the move every checkpoint and final model goes through: the old copy stays until the new one
    is in place, and a leftover from an earlier kill is cleared."""
    final, tmp = tmp_path / "final", tmp_path / ".tmp-final"
    final.mkdir()
    (final / "w").write_text("old")
    (tmp_path / ".old-final").mkdir()  # left by a kill between the two renames
    tmp.mkdir()
    (tmp / "w").write_text("new")
    replace_dir(tmp, final)
    assert (final / "w").read_text() == "new" and not tmp.exists()
    assert not (tmp_path / ".old-final").exists()

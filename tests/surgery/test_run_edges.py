"""Runs at the edges, each a real ``alibi-surgery repair`` process (forked from one that imported the CLI once:
tests/cli_fork.py): two runs into one ``--out``, passes that find
nothing left, ``--resume`` of finished runs, a write failure and Ctrl-C part-way through training.

Runs are held at a known instant by the test hook in trainer.py (``ALIBI_SURGERY_TEST_PAUSE``: the run writes its
pid to a file and waits until the file is deleted), so every race here is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alibi_surgery.io.lock import LOCK_NAME
from surgery_runs import cli_env, make_inputs, repair_command, start_paused


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("edges"))


@pytest.fixture
def run(forked_cli):
    """``run(args)``: the command in its own process, in a user's environment; a CompletedProcess."""
    return lambda args: forked_cli.run(args, env=cli_env())


@pytest.fixture
def paused(forked_cli):
    """``paused(root, out, point, *extra)``: start a repair and return ``(process, flag)`` once it waits at
    ``point`` (delete the flag file to let it go on)."""
    def start(root: Path, out: Path, point: str, *extra, ignore_sigint: bool = False):
        flag = out.parent / f"paused-{out.name}"
        return start_paused(forked_cli, repair_command(root, out, *extra), point, flag, ignore_sigint), flag
    return start


def _one_error_line(stderr: str) -> str:
    err = stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _snapshot(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in root.rglob("*")}


def test_a_second_run_into_the_same_out_is_refused_while_the_first_finishes(inputs, tmp_path, run, paused):
    out = tmp_path / "out"
    first, flag = paused(inputs, out, "train:1")
    pid = flag.read_text()
    before = _snapshot(out)
    for extra in ((), ("--overwrite",), ("--resume",)):
        second = run(repair_command(inputs, out, "--seed", "9", *extra))
        assert second.returncode == 2, second.stderr
        err = _one_error_line(second.stderr)
        assert "is in use by another run" in err and f"pid {pid}" in err, err
        assert _snapshot(out) == before, "the refused run changed the first run's directory"
    flag.unlink()
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert (out / "final" / "model.safetensors").is_file() and not (out / LOCK_NAME).exists()
    assert json.loads((out / "run.json").read_text())["settings"]["seed"] == 0  # the first run's, not the second's


def test_a_lock_left_by_a_killed_run_is_taken_over(inputs, tmp_path, run, paused):
    out = tmp_path / "out"
    proc, _ = paused(inputs, out, "train:3")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert (out / LOCK_NAME).is_file()  # stale: its holder is dead
    resumed = run(repair_command(inputs, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "final").is_dir() and not (out / LOCK_NAME).exists()


def _fake_report(root: Path, run) -> Path:
    """A diagnosis of the model in which head 0:1 is dead (bos_mass 0.99): pass 1 repairs it; a fresh diagnosis
    of the random model then finds nothing collapsed."""
    path = root / "fake-report.json"
    if not path.exists():
        result = run([sys.executable, "-m", "alibi_surgery.cli", "diagnose", str(root / "model"), "--json",
                       str(path), "--max-length", "128", "--quiet", "--device", "cpu", "--backend", "torch"])
        assert result.returncode == 0, result.stderr
        data = json.loads(path.read_text())
        assert data["summary"]["dead"] + data["summary"]["bos_sink"] == 0
        for head in data["heads"]:
            if (head["layer"], head["head"]) == (0, 1):
                head["bos_mass"], head["class"] = 0.99, "dead"
        path.write_text(json.dumps(data))
    return path


def test_passes_stop_when_a_later_pass_finds_nothing_and_resume_after_it(inputs, tmp_path, run):
    out = tmp_path / "out"
    args = [a for a in repair_command(inputs, out, "--passes", "3", "--from-report", str(_fake_report(inputs, run)))]
    args[args.index("--heads") + 1] = "auto"
    result = run(args)
    assert result.returncode == 0, result.stderr
    assert "pass 2 found nothing left to repair" in result.stdout
    assert f"wrote {out / 'final'} and {out / 'report.md'}" in result.stdout
    assert (out / "final" / "model.safetensors").is_file() and (out / "report.md").is_file()
    summary = json.loads((out / "report.json").read_text())
    assert len(summary["passes"]) == 1 and summary["passes_asked"] == 3 and "nothing" in summary["stopped"]
    assert not (out / "pass-2").exists()
    before = _snapshot(out)
    resumed = run(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "nothing to resume" in resumed.stdout
    assert _snapshot(out) == before


def test_resume_of_a_finished_single_pass_run_changes_nothing(inputs, tmp_path, run):
    out = tmp_path / "out"
    assert run(repair_command(inputs, out)).returncode == 0
    before = _snapshot(out)
    resumed = run(repair_command(inputs, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "nothing to resume" in resumed.stdout and _snapshot(out) == before


def test_resume_after_the_last_checkpoint_but_before_the_report_finishes_the_run(inputs, tmp_path, run):
    """Killed after the last checkpoint, before final/ and the report: --resume has no step left to train."""
    out = tmp_path / "out"
    assert run(repair_command(inputs, out)).returncode == 0
    for name in ("report.json", "report.md", "after.png"):
        (out / name).unlink()
    resumed = run(repair_command(inputs, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "report.json").is_file() and (out / "after.png").is_file()


def test_a_write_failure_mid_training_names_the_last_checkpoint_and_the_resume_command(inputs, tmp_path, run,
                                                                                       paused):
    out = tmp_path / "out"
    proc, flag = paused(inputs, out, "train:5")  # checkpoints 2 and 4 are complete
    limit = 4096  # bytes: every later checkpoint's weights are larger
    resource.prlimit(int(flag.read_text()), resource.RLIMIT_FSIZE, (limit, limit))
    flag.unlink()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr
    err = _one_error_line(stderr)
    assert "cannot write checkpoint" in err and "step-00000006" in err, err
    assert f"the last complete checkpoint is {out / 'checkpoints' / 'step-00000004'}" in err, err
    command = err.split("continue with: ", 1)[1]
    assert command.startswith("alibi-surgery repair ") and command.endswith(" --resume"), err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert not (out / LOCK_NAME).exists()
    resumed = run([sys.executable, "-m", "alibi_surgery.cli", *shlex.split(command)[1:]])  # as a shell reads it
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(inputs, tmp_path, sig, code, word, paused):
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send) end alike, even when the run was started with SIGINT
    ignored, as a shell starts a background job."""
    out = tmp_path / "out"
    proc, _ = paused(inputs, out, "train:5", ignore_sigint=True)  # as under `cmd &`
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == code, stderr
    err = _one_error_line(stderr)
    assert err.startswith(f"error: {word}; the last complete checkpoint is ") and "step-00000004" in err, err
    assert err.endswith("--resume") and "continue with: alibi-surgery repair" in err, err


def test_random_model_under_a_file_size_limit_fails_in_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "m"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    result = subprocess.run([sys.executable, "-m", "alibi_surgery.cli", "random-model", str(out), "--layers", "1"],
                            env=cli_env(), capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert result.returncode == 1, result.stderr
    err = _one_error_line(result.stderr)
    assert "cannot write" in err and str(out) in err and "File too large" in err, err
    assert not out.exists()

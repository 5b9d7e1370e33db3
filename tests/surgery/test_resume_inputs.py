"""``--resume`` continues the run it was started as, or refuses in one line (issue 31): another corpus, its reading
options, another plan, other diagnosis prompts or held-out texts, another model of the same shape. Each case resumes
one finished run (resuming a finished run checks its inputs too) as a real ``alibi-surgery repair`` process (tests/cli_fork.py), and
nothing in OUT may change."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from alibi_surgery.io.random_model import write_random_bloom
from surgery_runs import cli_env, make_inputs, repair_command


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, forked_cli):
    root = make_inputs(tmp_path_factory.mktemp("resume-inputs"))
    (root / "other.txt").write_text((root / "corpus.txt").read_text().upper())  # same size, other text
    (root / "prompts.txt").write_text("one prompt about cats\nanother about dogs\n")
    write_random_bloom(root / "twin", "tiny", n_layer=2, seed=5)  # the same shape, other weights
    out = root / "out"
    done = forked_cli.run(repair_command(root, out), env=cli_env())
    assert done.returncode == 0, done.stderr
    return root, out


def _swap(args: list, flag: str, value: str) -> list:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("change, needle", [
    (lambda a, r: _swap(a, "--corpus", str(r / "other.txt")), "--corpus sha256:"),
    (lambda a, r: a + ["--no-eos"], "eos=True (now False)"),
    (lambda a, r: a + ["--max-tokens", "64"], "--max-tokens None (now 64)"),
    (lambda a, r: _swap(a, "--heads", "0:1"), "--heads 0:1;1:2 (now 0:1)"),
    (lambda a, r: a + ["--prompts-file", str(r / "prompts.txt")], "prompts=sha256:"),
    (lambda a, r: [str(r / "twin") if x == str(r / "model") else x for x in a], "model=sha256:"),
])
def test_resume_refuses_other_inputs_in_one_line_and_writes_nothing(finished, change, needle, capsys):
    from alibi_surgery.cli.main import main

    root, out = finished
    before = _snapshot(out)
    args = change(repair_command(root, out, "--resume"), root)
    code = main(args[args.index("repair"):])  # in-process: the refusal comes before any work
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "other inputs" in err, err
    assert needle in err, err
    assert _snapshot(out) == before


def test_resume_with_the_same_inputs_from_elsewhere_is_accepted(finished, tmp_path, forked_cli):
    """The corpus is compared by content: the same text under another path resumes."""
    root, out = finished
    moved = tmp_path / "moved.txt"
    moved.write_bytes((root / "corpus.txt").read_bytes())
    args = _swap(repair_command(root, out, "--resume"), "--corpus", str(moved))
    result = forked_cli.run(args, env=cli_env())
    assert result.returncode == 0 and "nothing to resume" in result.stdout, result.stderr

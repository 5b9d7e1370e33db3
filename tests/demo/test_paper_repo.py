"""The paper-repository reader: the fixture's values come back as written there, and every broken file, variable or
setting is refused in one line naming the file and the variable."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from alibi_surgery.demo.paper_repo import freeze_spec, map_heads, map_spec, read_paper_repo
from alibi_surgery.errors import UsageError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "paper_repo"
MIRROR = Path("/work/.mirror/Palmerschallon+bloom-head-surgery/repo")


def test_the_fixture_reads_back_as_written():
    facts = read_paper_repo(FIXTURE)
    assert facts.diag_text.startswith("A lantern hangs by the door.") and facts.diag_text.endswith("runs high.")
    assert facts.pass1 == {0: {"reinit": [12, 13, 14, 15], "freeze": [9, 10, 11]},
                           1: {"reinit": [9, 10, 11, 12], "freeze": [13, 14, 15]}}
    assert facts.control == facts.pass1
    assert facts.pass2 == {1: {"reinit": [3, 5]}}
    assert facts.held_out[1] == "while True:\n    line = input()\n    if not line:\n        break"  # one text
    assert len(facts.train_texts) == 3 and len(facts.held_out) == 3
    assert facts.settings == {"epochs": 1, "lr": 1e-3, "batch_size": 2, "grad_accum": 1, "max_length": 32,
                              "checkpoint_interval": 1, "early_stop_patience": 2, "pass2_checkpoint_interval": 1,
                              "seed": 7}
    assert map_spec(facts.pass1) == "0:12,13,14,15;1:9,10,11,12"
    assert freeze_spec(facts.pass1) == "0:9,10,11;1:13,14,15"
    assert freeze_spec(facts.pass2) is None and map_heads(facts.pass2) == {1: [3, 5]}


@pytest.mark.skipif(not MIRROR.is_dir(), reason="no fetched copy of the paper's repository here")
def test_the_papers_own_repository_as_a_bare_git_dir():
    """The published figures the protocol relies on: 108 heads re-initialised and 18 frozen over layers 5-22, 39 in
    pass 2, 12 held-out prompts (the paper's appendix A), lr 5e-5, 15 epochs, batch 1 x 8, 512 tokens, seed 42."""
    facts = read_paper_repo(MIRROR)
    assert sum(map(len, map_heads(facts.pass1).values())) == 108
    assert sum(map(len, map_heads(facts.pass1, "freeze").values())) == 18
    assert sorted(facts.pass1) == list(range(5, 23))
    assert sum(map(len, map_heads(facts.pass2).values())) == 39
    assert len(facts.held_out) == 12 and facts.control == facts.pass1
    assert {k: facts.settings[k] for k in ("lr", "epochs", "batch_size", "grad_accum", "max_length", "seed")} == \
        {"lr": 5e-5, "epochs": 15, "batch_size": 1, "grad_accum": 8, "max_length": 512, "seed": 42}


def _copy(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(FIXTURE, repo)
    return repo


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


HEADBAND = "surgery/train_1b7_headband.py"
CASES = {
    "missing file": (lambda r: (r / "evaluation" / "evaluate_epoch3.py").unlink(),
                     "evaluation/evaluate_epoch3.py is missing"),
    "missing variable": (lambda r: _edit(r / HEADBAND, "DIAG_TEXT = (", "DIAG = ("),
                         f"{HEADBAND}: DIAG_TEXT: no module-level assignment"),
    "not a literal": (lambda r: _edit(r / "surgery/train_1b7_baseline.py", "SEED = 7", "SEED = int('7')"),
                      "surgery/train_1b7_baseline.py: SEED is not a literal value"),
    "syntax error": (lambda r: _edit(r / "surgery/train_1b7_pass2.py", "SURGERY = {", "SURGERY = {{"),
                     "surgery/train_1b7_pass2.py does not parse as Python"),
    "bad map": (lambda r: _edit(r / HEADBAND, "0: {'reinit': [12, 13, 14, 15]", "0: {'reinit': [12, -1]"),
                f"{HEADBAND}: SURGERY: layer 0 'reinit' must be a list of head indices >= 0"),
    "both": (lambda r: _edit(r / HEADBAND, "'freeze': [9, 10, 11]", "'freeze': [9, 10, 12]"),
             f"{HEADBAND}: SURGERY: layer 0 both re-initialises and freezes head 12"),
    "empty texts": (lambda r: _edit(r / "evaluation/evaluate_epoch3.py", '"Rain fell on the tin roof all night long."',
                                    '"  "'), "PPL_PROMPTS must be a non-empty list of non-empty strings"),
    "missing setting": (lambda r: _edit(r / HEADBAND, '"--lr", type=float, default=1e-3', '"--lr", type=float'),
                        f"{HEADBAND}: main() has no add_argument('--lr', default=...)"),
    "bad setting": (lambda r: _edit(r / HEADBAND, '"--epochs", type=int, default=1', '"--epochs", type=int, default=0'),
                    f"{HEADBAND}: --epochs default must be a positive integer, got 0"),
    "not utf-8": (lambda r: (r / HEADBAND).write_bytes(b"DIAG_TEXT = '\xff'\n"), f"{HEADBAND} is not UTF-8"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_broken_repository_is_refused_in_one_line(tmp_path, case):
    repo = _copy(tmp_path)
    change, expected = CASES[case]
    change(repo)
    with pytest.raises(UsageError) as err:
        read_paper_repo(repo)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"paper_repo={repo}: ") and expected in message, message


def test_not_a_directory(tmp_path):
    with pytest.raises(UsageError, match=r"^paper_repo=.*nowhere: not a directory"):
        read_paper_repo(tmp_path / "nowhere")


def test_a_bare_git_copy_reads_like_the_checkout(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("no git")
    work = _copy(tmp_path)
    env = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               HOME=str(tmp_path), PATH="/usr/bin:/bin")
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=work, check=True, env=env)
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, env=env)
    assert read_paper_repo(bare).to_dict() | {"source": ""} == read_paper_repo(work).to_dict() | {"source": ""}
    with pytest.raises(UsageError, match="evaluation/evaluate_epoch3.py is not in the repository's HEAD"):
        (work / "evaluation" / "evaluate_epoch3.py").unlink()
        subprocess.run(["git", "commit", "-qam", "y"], cwd=work, check=True, env=env)
        subprocess.run(["git", "push", "-q", str(bare), "HEAD"], cwd=work, check=True, env=env,
                       capture_output=True)
        read_paper_repo(bare)

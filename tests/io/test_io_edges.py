"""Input and output at the edges: closed pipes, file modes, prompt-file encodings and line breaks, output paths,
and the CLI's conveniences (``--version``, ``--debug`` after the command, defaults in ``--help``)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from alibi_surgery.errors import UsageError
from alibi_surgery.io.files import atomic_write_text, read_lines
from alibi_surgery.diagnosis.prompts import read_prompts
from alibi_surgery.io.random_model import write_random_bloom


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_bloom(tmp_path_factory.mktemp("io") / "m", "tiny", n_layer=1, seed=3)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def _cli(*args, cwd=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alibi_surgery.cli", *map(str, args)], env=kw.pop("env", _env()),
                          capture_output=True, text=True, timeout=300, cwd=cwd, **kw)


def test_a_closed_pipe_costs_the_text_not_the_json(model, tmp_path):
    out = tmp_path / "o.json"
    script = (f"{sys.executable} -m alibi_surgery.cli diagnose {model} --json {out} --csv {tmp_path / 'o.csv'} "
              f"--quiet --max-length 32 | head -c 1 >/dev/null; exit ${{PIPESTATUS[0]}}")
    result = subprocess.run(["bash", "-c", script], env=_env(PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert json.loads(out.read_text())["n_layer"] == 1
    assert len((tmp_path / "o.csv").read_text().splitlines()) == 5


def test_files_get_the_umask_mode(model, tmp_path):
    """umask 022: every file written, by our writer or by safetensors (which makes 0600 files), is 0644."""
    (tmp_path / "corpus.txt").write_text(" ".join(["alpha beta gamma delta"] * 40))
    run = tmp_path / "run"
    result = _cli("repair", model, "--out", run, "--corpus", tmp_path / "corpus.txt", "--heads", "0:1",
                  "--device", "cpu", "--backend", "torch", "--seq-len", "16", "--quiet",
                  preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr
    result = _cli("diagnose", model, "--json", tmp_path / "d.json", "--heatmap", tmp_path / "d.png", "--quiet",
                  "--max-length", "16", preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "corpus.txt"]
    assert any(p.name == "model.safetensors" and p.parent.name == "final" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_the_atomic_writer_honours_a_stricter_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "x.txt", "hello")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o640


def test_prompt_file_line_breaks_and_byte_order_mark(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufefffirst prompt\r\nsecond\u2028still second\fand still\n\n  \nthird\n".encode("utf-8"))
    assert read_prompts(None, path) == ["first prompt", "second\u2028still second\fand still", "third"]
    assert read_lines(path) == ["first prompt", "second\u2028still second\fand still", "", "  ", "third"]


@pytest.mark.parametrize("encoding,offset", [("utf-16", 0), ("latin-1", 3)])
def test_prompt_files_that_are_not_utf8_are_refused_with_the_byte_offset(tmp_path, encoding, offset):
    path = tmp_path / "p.txt"
    path.write_bytes("café au lait\n".encode(encoding))
    with pytest.raises(UsageError, match=rf"not UTF-8 text: .*offset {offset}\b"):
        read_prompts(None, path)


def test_a_prompts_directory_is_named_as_one(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        read_prompts(None, tmp_path)


def test_a_byte_order_mark_does_not_change_the_measurement(model, tmp_path, forked_cli):
    text = "The lighthouse keeper climbed the spiral stairs every evening at dusk.\n"
    plain, marked = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text(text, encoding="utf-8")
    marked.write_text(text, encoding="utf-8-sig")
    reports = []
    for name, path in (("a", plain), ("b", marked)):
        result = forked_cli.run(["diagnose", model, "--prompts-file", path, "--json", tmp_path / f"{name}.json",
                                 "--quiet", "--device", "cpu"])
        assert result.returncode == 0, result.stderr
        reports.append(json.loads((tmp_path / f"{name}.json").read_text()))
    assert reports[0]["metadata"]["prompt_tokens"] == reports[1]["metadata"]["prompt_tokens"]
    assert [h["bos_mass"] for h in reports[0]["heads"]] == [h["bos_mass"] for h in reports[1]["heads"]]


@pytest.mark.parametrize("suffix,magic", [(".jpg", b"\xff\xd8\xff"), (".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_the_heatmap_is_written_in_the_format_its_name_asks_for(model, tmp_path, suffix, magic, forked_cli):
    out = tmp_path / f"heads{suffix}"
    result = forked_cli.run(["diagnose", model, "--heatmap", out, "--quiet", "--max-length", "16"])
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:len(magic)] == magic


def test_version_debug_after_the_command_and_defaults_in_help(model, tmp_path):
    from alibi_surgery import __version__

    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"alibi-surgery {__version__}"
    result = _cli("diagnose", tmp_path / "nope", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "does not exist" in result.stderr
    text = " ".join(_cli("repair", "--help").stdout.split())
    for option, default in (("--seq-len", 512), ("--batch-size", 1), ("--lr", 5e-05), ("--epochs", 1),
                            ("--grad-accum", 8)):
        help_line = text[text.rindex(f"{option} "):][:160]  # the options list, after the usage line
        assert f"(default: {default})" in help_line, help_line


def test_a_corpus_file_named_twice_is_read_once_with_a_warning(tmp_path):
    """Issue 31: the same corpus file twice (or a file and its directory) was read twice, silently."""
    from alibi_surgery.io.corpus import corpus_files

    (tmp_path / "d").mkdir()
    a, b = tmp_path / "d" / "a.txt", tmp_path / "d" / "b.txt"
    a.write_text("alpha")
    b.write_text("beta")
    with pytest.warns(UserWarning, match=r"a\.txt is named twice .*: it is read once"):
        assert corpus_files([a, a]) == [a]
    with pytest.warns(UserWarning, match="named twice"):
        assert corpus_files([tmp_path / "d", a]) == [a, b]
    with pytest.warns(UserWarning, match="named twice"):
        assert corpus_files([a, str(tmp_path / "d" / ".." / "d" / "a.txt")]) == [a]

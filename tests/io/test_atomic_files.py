"""Figures go through the atomic writer: a failure part-way leaves the old file whole and nothing temporary behind."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from alibi_surgery.io.files import atomic_savefig  # noqa: E402


def _figure():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig


@pytest.mark.parametrize("name, magic", [("f.png", b"\x89PNG"), ("f.svg", b"<?xml"), ("f.pdf", b"%PDF"),
                                         ("f", b"\x89PNG")])
def test_a_figure_is_written_in_its_suffix_format_and_closed(tmp_path, name, magic):
    fig = _figure()
    atomic_savefig(fig, tmp_path / name)
    assert (tmp_path / name).read_bytes().startswith(magic)
    assert not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_failed_render_keeps_the_old_figure_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old figure")
    fig = _figure()

    def broken_savefig(fh, **kwargs):
        fh.write(b"\x89PNG half a figure")
        raise RuntimeError("renderer died")

    fig.savefig = broken_savefig
    with pytest.raises(RuntimeError, match="renderer died"):
        atomic_savefig(fig, target)
    assert target.read_bytes() == b"old figure"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    assert not plt.fignum_exists(fig.number)


def test_a_new_output_is_created_exclusively_so_a_concurrent_writer_is_not_overwritten(tmp_path):
    """Two runs check one free name, both work, both write: the second must be refused, the first file kept
    (issue 31: three diagnose runs into one new --json all said "wrote"). The race is staged by writing the file
    between the check and the write, as another process would."""
    from alibi_surgery.errors import WriteError
    from alibi_surgery.io.files import atomic_write_text, check_output_path

    path = tmp_path / "same.json"
    check_output_path(path)  # this run: the name is free
    path.write_text("the other run's report\n")  # another run finishes first
    with pytest.raises(WriteError, match="appeared while this run was working") as info:
        atomic_write_text(path, "ours\n")
    assert "\n" not in str(info.value) and path.read_text() == "the other run's report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["same.json"]  # no temporary file left


def test_after_its_first_write_a_run_replaces_its_own_output_and_overwrite_replaces_any(tmp_path):
    from alibi_surgery.io.files import atomic_write_text, check_output_path

    path = tmp_path / "out.json"
    check_output_path(path)
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second\n")  # the same run rewriting its own file
    assert path.read_text() == "second\n"
    check_output_path(path, overwrite=True)
    path.write_text("someone else\n")
    atomic_write_text(path, "third\n")  # --overwrite: replacing is what was asked
    assert path.read_text() == "third\n"


def test_a_check_with_overwrite_after_a_failed_run_lets_the_write_replace(tmp_path):
    """A run that checked a new name and failed before writing leaves no claim behind for a later call with
    overwrite (one Python session: a notebook calling the API again)."""
    from alibi_surgery.io.files import atomic_write_text, check_output_path

    path = tmp_path / "report.json"
    check_output_path(path)  # the first call fails before it writes
    path.write_text("written by hand meanwhile\n")
    check_output_path(path, overwrite=True)
    atomic_write_text(path, "replaced\n")
    assert path.read_text() == "replaced\n"

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

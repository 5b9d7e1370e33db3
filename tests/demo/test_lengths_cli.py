"""The length curve's command line parses its arguments: ``--help`` is help, not an output path."""

from __future__ import annotations

import pytest

from alibi_surgery.cli.lengths import main


@pytest.mark.parametrize("argv, status", [(["--help"], 0), ([], 2), (["--bogus", "out.png"], 2)])
def test_options_are_parsed_and_nothing_is_written(tmp_path, monkeypatch, argv, status):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == status
    assert list(tmp_path.iterdir()) == []

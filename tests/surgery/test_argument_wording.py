"""Surgery's refusals name the Python arguments of the call (``lr=nan``, ``out='/x'``, ``overwrite=True``); the CLI
prints the same refusals with its flags (``--lr nan``, ``--out /x``, ``--overwrite``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alibi_surgery import UsageError
from alibi_surgery.cli.console import flag_wording
from alibi_surgery.cli.main import _command_parser, build_parser, main
from alibi_surgery.io.outdir import check_out_dir
from alibi_surgery.surgery.memory_plan import plan_memory
from alibi_surgery.surgery.repair import RepairSettings, repair


def _refusal(call) -> str:
    with pytest.raises(UsageError) as info:
        call()
    message = str(info.value)
    assert "--" not in message, message
    return message


@pytest.mark.parametrize("settings, message", [
    (dict(lr=float("nan")), "lr=nan: must be a finite number >= 0"),
    (dict(max_grad_norm=0.0), "max_grad_norm=0.0: must be a finite number > 0"),
    (dict(epochs=-1), "epochs=-1: must be >= 0"),
    (dict(seed=-1), "seed=-1: must be a whole number >= 0"),
    (dict(seed=2 ** 63), "seed=9223372036854775808: must be below 2**63"),
    (dict(schedule="linear"), "unknown schedule='linear'; choose one of default, paper"),
    (dict(stochastic_rounding=True, optimizer_precision="bf16"),
     "stochastic_rounding=True is optimizer_precision='stochastic'; it contradicts optimizer_precision='bf16'"),
])
def test_repair_settings_name_their_fields(tmp_path, settings, message):
    """Refused by repair() before anything is read or written: the model directory need not exist."""
    assert _refusal(lambda: repair(tmp_path / "model", tmp_path / "out", settings=RepairSettings(**settings))) \
        == message
    assert not (tmp_path / "out").exists()


def test_repair_passes_and_out_dir_name_the_arguments(tmp_path):
    assert _refusal(lambda: repair(tmp_path, tmp_path / "out", passes=0)) == "passes=0: must be >= 1"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    model = tmp_path / "model"
    assert _refusal(lambda: check_out_dir(busy, model, resume=False, overwrite=False)) == (
        f"out={str(busy.resolve())!r} is not empty: pass resume=True to continue or overwrite=True to start again")
    assert _refusal(lambda: check_out_dir(busy, model, resume=False, overwrite=False, can_resume=False)).endswith(
        "is not empty: pass overwrite=True to start again")  # the demo has no resume
    assert "is the input model directory" in _refusal(lambda: check_out_dir(model / "x", model, resume=False,
                                                                            overwrite=True))


def test_plan_memory_names_its_arguments():
    assert _refusal(lambda: plan_memory("bloom-560m", batch=0)) == "batch=0: must be >= 1"
    assert _refusal(lambda: plan_memory("bloom-560m", heads="many")) == \
        "heads='many': must be a number of heads or 'auto'"


@pytest.mark.parametrize("command, message, worded", [
    ("repair", "lr=nan: must be a finite number >= 0", "--lr nan: must be a finite number >= 0"),
    ("repair", "out='/tmp/my run' is not empty: pass resume=True to continue or overwrite=True to start again",
     "--out /tmp/my run is not empty: pass --resume to continue or --overwrite to start again"),
    ("repair", "stochastic_rounding=True is optimizer_precision='stochastic'",
     "--stochastic-rounding is --optimizer-precision stochastic"),
    ("repair", "more than budget=1048576 (1.0 MiB): lower seq_len=16 or batch_size=2",
     "more than --budget 1048576 (1.0 MiB): lower --seq-len 16 or --batch-size 2"),
    ("plan-memory", "batch=0: must be >= 1", "--batch-size 0: must be >= 1"),  # its ARGUMENT_NAMES
    ("compare", "scale=0.0: must be a finite number > 0", "--panel-scale 0.0: must be a finite number > 0"),
])
def test_cli_words_them_as_its_flags(command, message, worded):
    from alibi_surgery.cli.main import COMMANDS

    names = getattr(COMMANDS[command], "ARGUMENT_NAMES", None)
    assert flag_wording(message, _command_parser(build_parser(), command), names) == worded


def test_cli_prints_the_flags_end_to_end(tmp_path: Path, capsys):
    assert main(["repair", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--corpus", "x.txt",
                 "--lr", "nan"]) == 2
    assert capsys.readouterr().err.strip() == "error: --lr nan: must be a finite number >= 0"
    assert main(["plan-memory", "bloom-560m", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --batch-size 0: must be >= 1"

"""The public surface: ``alibi_surgery.__all__``, the documented entry points and every CLI command."""

from __future__ import annotations

import subprocess
import sys

import alibi_surgery

PUBLIC = ["patch", "unpatch", "patch_bloom", "unpatch_bloom", "patched", "head_stats", "diagnose", "HeadReport",
          "Thresholds", "UsageError", "HeadSlices", "HeadSlicedAdamW", "chunked_lm_loss", "plan", "Plan", "repair",
          "RepairSettings", "compare", "Comparison", "alibi_attention", "alibi_attention_qkvpacked", "AttentionStats",
          "prompt_perplexity", "packed_perplexity", "Perplexity", "ablate_heads", "Ablation"]
COMMANDS = ["diagnose", "random-model", "repair", "compare", "demo", "family", "plan-memory", "perplexity", "drift",
            "generate", "ablate", "paper"]


def test_all_is_pinned_and_every_name_resolves():
    assert sorted(alibi_surgery.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(alibi_surgery, name) is not None, name
    assert callable(alibi_surgery.plan) and callable(alibi_surgery.repair) and callable(alibi_surgery.compare)
    assert alibi_surgery.patch_bloom is alibi_surgery.patch and alibi_surgery.unpatch_bloom is alibi_surgery.unpatch


def test_documented_entry_points():
    from alibi_surgery import demo

    assert (demo.model_dir() / "config.json").is_file()
    assert callable(demo.load_model)
    from alibi_surgery.cli import main

    assert callable(main)
    help_text = subprocess.run([sys.executable, "-m", "alibi_surgery.kernels.compile_report", "--help"],
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "usage" in help_text.stdout


def test_every_cli_command_has_help(capsys):
    import pytest

    from alibi_surgery.cli import main

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith("usage: alibi-surgery " + command), command

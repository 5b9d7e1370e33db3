"""Gu et al.'s per-position sink score from the key-side pass (issue 33, item 4) against their definition on
transformers' eager attention maps at T = 64, on tiny BLOOM (ALiBi) and Llama (rotary, grouped-query) models, and,
where a fetched copy of sail-sg/Attention-Sink exists, against their ``compute_attention_sink`` itself."""

from __future__ import annotations

import ast
import json
import subprocess

import numpy as np
import pytest
import torch

from alibi_surgery.diagnosis.key_sinks import key_sinks
from alibi_surgery.errors import UsageError
from alibi_surgery.io.loading import load_model, load_tokenizer
from alibi_surgery.io.random_model import write_random_model
from helpers import BACKENDS
from helpers import SINK_MIRROR as MIRROR, eager_attention_maps as _maps

TEXTS = ["the mill turns when the river runs high and the lantern hangs by the door, " * 4,
         "geese cross the pond at dawn; a tin roof and rain all night while the ferry waits.\n" * 4,
         "snow on the pass closes the road for a week and the baker opens the shop early. " * 4]
LENGTH = 64


@pytest.fixture(scope="module", params=["tiny", "tiny-llama"])
def model(request, tmp_path_factory):
    path = str(write_random_model(tmp_path_factory.mktemp(request.param) / "m", request.param, n_layer=2,
                                  vocab_size=300, seed=5))
    return path, load_tokenizer(path)


def _their_scores(maps: torch.Tensor) -> torch.Tensor:
    """Their importance score, written out: each probability over T - j (its key's column), summed over rows."""
    length = maps.shape[-1]
    return (maps / torch.arange(length, 0, -1, dtype=maps.dtype)).sum(-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_match_their_definition_on_eager_maps(model, backend):
    path, tok = model
    assert all(len(tok(t)["input_ids"]) >= LENGTH for t in TEXTS)
    net, _ = load_model(path, dtype="float32", device="cpu")
    ours = key_sinks(net, tok, TEXTS, backend=backend, max_length=LENGTH)
    wanted = [_their_scores(_maps(path, text, tok, LENGTH)) for text in TEXTS]  # [layers, heads, T] each
    for p, (text, want) in enumerate(zip(TEXTS, wanted)):
        assert ours.scores[p].shape == want.shape
        assert (ours.scores[p].double() - want).abs().max() < 1e-5
        assert ours.tokens[p] == [tok.decode([t]) for t in tok(text)["input_ids"][:LENGTH]]
    best = torch.stack(wanted)[:, 1, 0].flatten().argmax().item()  # the highest (prompt, position) of L1 H0
    assert (ours.top(1, 0, 3)[0]["prompt"], ours.top(1, 0, 3)[0]["position"]) == divmod(best, LENGTH)


def test_rates_equal_their_function(model, tmp_path):
    """Their ``compute_attention_sink`` (read with ast from a fetched copy, never imported; skipped without one) on the
    maps saved as they save them: its per-position sink rate equals ours at every position."""
    shown = subprocess.run(["git", f"--git-dir={MIRROR}", "show", "HEAD:eval_sink_open_source.py"],
                           capture_output=True, text=True)
    source = MIRROR / "eval_sink_open_source.py"
    text = source.read_text() if source.is_file() else shown.stdout
    if not text:
        pytest.skip(f"no copy of sail-sg/Attention-Sink at {MIRROR} (set ALIBI_SURGERY_SINK_REPO)")
    (fn,) = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "compute_attention_sink"]
    scope = {"np": np, "torch": torch}
    exec(compile(ast.Module([fn], []), "eval_sink_open_source.py", "exec"), scope)
    path, tok = model
    maps = torch.stack([_maps(path, t, tok, LENGTH) for t in TEXTS]).float()
    np.save(tmp_path / "scores.npy", maps.numpy())
    net, _ = load_model(path, dtype="float32", device="cpu")
    ours = key_sinks(net, tok, TEXTS, backend="torch", max_length=LENGTH)
    stacked = torch.stack(ours.scores)  # [prompts, layers, heads, T]
    values = stacked.flatten().double().sort().values
    gaps = values[1:] - values[:-1]
    mids = (values[1:] + values[:-1]) / 2
    eps = float(mids[torch.argmax(gaps - (mids - 0.3).abs())])  # far from every score: rounding cannot flip one
    theirs = scope["compute_attention_sink"](str(tmp_path / "scores.npy"), eps)
    mine = (stacked > eps).float().mean(dim=(0, 1, 2)) * 100
    torch.testing.assert_close(mine, theirs.float(), atol=1e-4, rtol=0)


def test_eager_backend_is_refused(model):
    path, tok = model
    net, _ = load_model(path, dtype="float32", device="cpu")
    with pytest.raises(UsageError, match="fused kernels"):
        key_sinks(net, tok, TEXTS[:1], backend="eager")


def test_diagnose_sinks_option_prints_and_writes_the_top_positions(model, tmp_path, capsys):
    from alibi_surgery.cli.main import main

    path, tok = model
    out = tmp_path / "report.json"
    assert main(["diagnose", path, "--sinks", "2", "--json", str(out), "--quiet", "--backend", "torch",
                 "--max-length", str(LENGTH), "--prompt", TEXTS[0], "--prompt", TEXTS[1]]) == 0
    printed = capsys.readouterr().out
    assert "positions drawing the most attention" in printed and "L1   H0" in printed
    data = json.loads(out.read_text())["key_sinks"]
    net, _ = load_model(path, dtype="float32", device="cpu")
    want = key_sinks(net, tok, TEXTS[:2], backend="torch", max_length=LENGTH)
    assert data["top"] == want.to_dict(2)["top"] and data["epsilon"] == 0.3
    assert all(len(entry["positions"]) == 2 for entry in data["top"])

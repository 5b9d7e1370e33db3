"""Gu et al.'s first-token sink share and sink rate (issue 33, item 4) against their definition applied to
transformers' eager attention maps, one prompt at a time as their ``eval_sink_open_source.py`` feeds them: the score
of key 0 is ``sum_i p_i0 / T`` (their ``(attention / ratios).sum(-2)`` with ``ratios[0] = T``), a head is a sink on
the prompt when it exceeds epsilon, the rate is the percentage of (prompt, layer, head) triples."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from alibi_surgery.diagnosis.diagnose import diagnose
from alibi_surgery.diagnosis.report import HeadReport
from alibi_surgery.diagnosis.stream import diagnose_streamed
from alibi_surgery.errors import UsageError
from alibi_surgery.io.loading import load_model, load_tokenizer
from alibi_surgery.io.random_model import write_random_model
from helpers import SINK_MIRROR, eager_attention_maps

PROMPTS = ["the mill turns when the river runs high and the lantern hangs by the door " * 2,
           "geese cross the pond at dawn", "a tin roof and rain all night while the ferry waits at the pier",
           "snow on the pass closes the road for a week", "short one", "the baker opens the shop before the bells"]
MIRROR = SINK_MIRROR
_maps = eager_attention_maps


def _scores(path: str, tok) -> torch.Tensor:
    """Their score of key 0 per (prompt, layer, head), written out here: sum over query rows of p_i0, over T."""
    out = []
    for prompt in PROMPTS:
        a = _maps(path, prompt, tok)
        out.append(a[..., :, 0].sum(-1) / a.shape[-1])
    return torch.stack(out)


def _epsilon(scores: torch.Tensor) -> float:
    """A threshold near 0.3 as far as possible from every score (so float32 rounding cannot flip an indicator)."""
    values = torch.cat([scores.flatten(), torch.tensor([0.0, 1.0], dtype=scores.dtype)]).sort().values
    mids = (values[1:] + values[:-1]) / 2
    gaps = values[1:] - values[:-1]
    best = torch.argmax(gaps - 0.5 * (mids - 0.3).abs())
    assert gaps[best] > 1e-4
    return float(mids[best])


@pytest.fixture(scope="module", params=["tiny", "tiny-llama"])
def model(request, tmp_path_factory):
    path = str(write_random_model(tmp_path_factory.mktemp(request.param) / "m", request.param, n_layer=2,
                                  vocab_size=300, seed=3))
    return request.param, path, load_tokenizer(path)


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_sink_share_and_rate_match_their_definition_on_eager_maps(model, backend):
    shape, path, tok = model
    scores = _scores(path, tok)
    eps = _epsilon(scores)
    want = (scores > eps).double().mean(0)  # [layers, heads]: share of prompts
    net, _ = load_model(path, dtype="float32", device="cpu")
    for exclude in (False, True):  # the first query row left out of the paper's metrics: added back for this one
        report = diagnose(net, tok, PROMPTS, batch_size=4, backend=backend, sink_epsilon=eps,
                          exclude_first_query=exclude)
        assert torch.equal(report.sink_share.double(), want), (report.sink_share, want)
        data = report.to_dict()
        assert data["sink_rate"] == pytest.approx(100 * float((scores > eps).double().mean()), abs=1e-9)
        assert data["metric"]["sink_epsilon"] == eps
        assert torch.equal(HeadReport.from_dict(data).sink_share, report.sink_share)
    if shape == "tiny":  # streamed diagnosis: the ALiBi families
        streamed = diagnose_streamed(path, tok, PROMPTS, batch_size=4, backend="torch", sink_epsilon=eps)
        assert torch.equal(streamed.sink_share.double(), want)


def test_their_function_gives_our_rate(model, tmp_path):
    """Their ``compute_attention_sink`` (read from a fetched sail-sg/Attention-Sink, a checkout or a bare git
    directory, with ast: never imported; skipped where there is no copy, as in CI) on the
    maps saved as their ``measure_attention_sink`` saves them: its entry for key 0 is our ``sink_rate``."""
    source = MIRROR / "eval_sink_open_source.py"
    if source.is_file():  # a checkout
        text = source.read_text()
    else:  # a bare git directory (the project's mirror)
        shown = subprocess.run(["git", f"--git-dir={MIRROR}", "show", "HEAD:eval_sink_open_source.py"],
                               capture_output=True, text=True)
        if shown.returncode:
            pytest.skip(f"no copy of sail-sg/Attention-Sink at {MIRROR} (set ALIBI_SURGERY_SINK_REPO)")
        text = shown.stdout
    tree = ast.parse(text)
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compute_attention_sink"]
    scope = {"np": np, "torch": torch}
    exec(compile(ast.Module([fn], []), str(source), "exec"), scope)
    shape, path, tok = model
    length = min(len(tok(p)["input_ids"]) for p in PROMPTS[:4])  # their code cuts every prompt to one length
    maps = torch.stack([_maps(path, p, tok, length) for p in PROMPTS[:4]]).float()
    np.save(tmp_path / "scores.npy", maps.numpy())
    eps = _epsilon(maps[..., :, 0].double().sum(-1) / length)
    theirs = float(scope["compute_attention_sink"](str(tmp_path / "scores.npy"), eps)[0])
    net, _ = load_model(path, dtype="float32", device="cpu")
    ours = diagnose(net, tok, PROMPTS[:4], backend="torch", sink_epsilon=eps, max_length=length).to_dict()
    assert ours["sink_rate"] == pytest.approx(theirs, abs=1e-4)


def test_sink_epsilon_is_checked():
    with pytest.raises(UsageError, match=r"sink_epsilon=1.5: must be in \[0, 1\)"):
        diagnose(None, None, ["x"], sink_epsilon=1.5)


def test_every_threshold_between_two_scores_splits_them_as_their_scores_do(model):
    """The per-prompt score itself, with and without the first query row in the sums: at every midpoint between two
    neighbouring scores (and so at any epsilon) the sink counts equal the indicator of their score."""
    from alibi_surgery.attention.patch import first_token_sinks
    from alibi_surgery.diagnosis.diagnose import stats_from_attention_probs

    _, path, tok = model
    scores = _scores(path, tok)  # [prompts, layers, heads]
    values = scores.flatten().sort().values
    cuts = ((values[1:] + values[:-1]) / 2)[(values[1:] - values[:-1]) > 1e-5]
    assert len(cuts) > 10
    for exclude in (False, True):
        stats = []
        for prompt in PROMPTS:
            a = _maps(path, prompt, tok).float()  # [layers, heads, T, T]
            mask = torch.ones(1, a.shape[-1], dtype=torch.long)
            stats.append(torch.stack([stats_from_attention_probs(a[layer][None], mask, exclude_first_query=exclude)[0]
                                      for layer in range(a.shape[0])]))  # [layers, heads, 3]
        for eps in cuts.tolist():
            got = torch.stack([first_token_sinks(torch.stack([s[layer] for s in stats]), eps, exclude)
                               for layer in range(scores.shape[1])])
            assert torch.equal(got, (scores > eps).sum(0).double()), (exclude, eps)

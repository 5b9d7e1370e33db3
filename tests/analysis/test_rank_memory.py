"""The N-device planner (issue 32, item 3): per-rank parts of an FSDP2 surgery step counted independently from a
model built on the meta device, the smallest world size, the data-parallel diagnosis, and the CLI.

The planner's agreement with resident memory is a benchmark (bench/bench_fsdp_memory.py, docs/scale.md), not a
unit test."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from alibi_surgery.errors import UsageError
from alibi_surgery.surgery.memory_plan import plan_memory
from alibi_surgery.surgery.rank_memory import fsdp_step_memory, plan_ranks, smallest_world_size

MIB = 2**20


def _config(**kw):
    return BloomConfig(n_layer=4, hidden_size=256, n_head=8, vocab_size=1024, **kw)


def test_fsdp_step_parts_against_a_meta_model():
    config = _config()
    with torch.device("meta"):
        model = BloomForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())  # tied head counted once: parameters() deduplicates
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    root = params - 4 * block
    d, h = 32, 256
    per_head = 3 * d * h + 3 * d + h * d  # qkv rows, their bias, output columns
    heads, world = 6, 3  # spread over 4 layers: 2, 2, 1, 1
    n = heads * per_head
    got = fsdp_step_memory(config, heads, world_size=world, seq_len=128, batch=2, dtype="bfloat16")
    assert got["sharded"] == math.ceil((params + n) / world) * 2
    assert got["gathered"] == (root + 2 * block) * 2
    assert got["grads"] == math.ceil(n / world) * 2 + 2 * (2 * per_head) * 2
    assert got["optimizer"] == 2 * math.ceil(n / world) * 2
    assert got["activations"] == (4 + 1 + 16) * 2 * 128 * h * 2  # every layer recorded from layer 0
    assert got["total"] == sum(got[k] for k in ("sharded", "gathered", "grads", "optimizer", "activations",
                                                "loss_chunk"))


def test_smallest_world_size_is_the_least_that_fits():
    config = _config()
    at = {w: fsdp_step_memory(config, 8, world_size=w, seq_len=64)["total"] for w in (1, 2, 3, 4, 5)}
    assert all(at[w] > at[w + 1] for w in (1, 2, 3, 4))
    budget = (at[3] + at[4]) // 2  # 4 devices fit, 3 do not
    assert smallest_world_size(config, 8, budget, seq_len=64) == 4
    assert smallest_world_size(config, 8, at[1], seq_len=64) == 1
    floor = fsdp_step_memory(config, 8, world_size=10**6, seq_len=64)  # no world size shrinks the gathered part
    assert smallest_world_size(config, 8, floor["gathered"], seq_len=64) is None


def test_plan_ranks_diagnosis_is_one_devices_and_surgery_shrinks_with_the_world(tmp_path):
    from alibi_surgery.io.random_model import write_random_model

    path = str(write_random_model(tmp_path / "m", "tiny", n_layer=2, vocab_size=512))
    one = plan_memory(path, heads="2", seq_len=64, device="cuda")
    two = plan_ranks(path, world_size=2, device_memory=64 * MIB, heads="2", seq_len=64)
    assert two["diagnosis"]["total"] == one["diagnosis"]["total"]
    half = plan_memory(path, heads="2", seq_len=64, n_prompts=4, device="cuda")  # each rank streams 8 / 2 prompts
    assert two["diagnosis_streamed"]["total"] == half["diagnosis_streamed"]["total"]
    assert two["surgery"]["sharded"] < plan_ranks(path, world_size=1, heads="2", seq_len=64)["surgery"]["sharded"]
    assert two["fits"] == {"diagnosis": True, "diagnosis_streamed": True, "surgery": True}
    assert two["smallest_world_size"] == 1
    with pytest.raises(UsageError, match="world_size must be a positive integer"):
        plan_ranks(path, world_size=0)


def test_cli_prints_the_ranks_and_exits_1_when_the_step_does_not_fit(capsys):
    from alibi_surgery.cli.main import main

    assert main(["plan-memory", "bloom", "--world-size", "16", "--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "per rank over 16 device(s)" in out and "smallest world size for the surgery step in 80.00 GiB: " in out
    assert main(["plan-memory", "bloom", "--world-size", "2", "--device-memory", "80GiB"]) == 1
    assert "does not fit --device-memory 80.00 GiB on each of 2 device(s)" in capsys.readouterr().err

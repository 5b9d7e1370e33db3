"""Data-parallel diagnosis (issue 32, item 1): two CPU ranks (gloo, a file store) against one process.

Bound: each rank runs the single process's own batches, so the per-batch float32 statistics are the same numbers;
only the float64 summation order differs (one all_reduce), and each report value is one float32 rounding of its
float64 sum: every statistic is within one float32 ulp (relative 2**-23), the classes identical.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import dist_ranks
from alibi_surgery.demo import model_dir
from alibi_surgery.diagnosis.diagnose import diagnose
from alibi_surgery.diagnosis.stream import diagnose_streamed
from alibi_surgery.distributed import share_of, world
from alibi_surgery.io.loading import load_model, load_tokenizer

# seven prompts (odd) of unequal lengths: batches of 2 give four batches of unequal cost
PROMPTS = ["the mill turns when the river runs high " * 3, "a lantern by the door",
           "geese cross the pond at dawn and the baker opens the shop " * 2, "rain on a tin roof all night long",
           "the ferry waits at the pier while the gulls circle over the nets " * 4, "short one here",
           "snow on the pass closes the road for a week and the village waits"]
ULP32 = 2.0 ** -23


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(dist_ranks.diagnosis_ranks, args=(2, str(out / "store"), str(model_dir()), PROMPTS, str(out)),
             nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], out


@pytest.fixture(scope="module")
def single():
    """The single-process reports, single-threaded as the ranks are."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, tok = load_model(str(model_dir()), dtype="float32", device="cpu")
        reports = {"memory": diagnose(net, tok, PROMPTS, batch_size=2, backend="torch").to_dict(),
                   "streamed": diagnose_streamed(str(model_dir()), load_tokenizer(str(model_dir())), PROMPTS,
                                                 batch_size=2, backend="torch").to_dict()}
        return json.loads(json.dumps(reports))  # as the ranks wrote theirs
    finally:
        torch.set_num_threads(threads)


def _same(a, b, where="report"):
    """Equal, floats within one float32 ulp."""
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=ULP32, abs_tol=1e-30) or (math.isnan(a) and math.isnan(b)), \
            f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_the_split_covers_every_batch_once_and_balances_the_cost():
    assert [share_of([5, 4, 3, 3, 3], r, 2) for r in range(2)] == [[0, 3], [1, 2, 4]]  # 8 and 10 (worked by hand)
    assert share_of([1.0, 2.0], 0, 1) == [0, 1] and world() == (0, 1)  # one process: everything
    rng = random.Random(0)
    for _ in range(50):
        costs = [rng.randint(1, 100) for _ in range(rng.randint(0, 12))]
        size = rng.randint(1, 4)
        shares = [share_of(costs, r, size) for r in range(size)]
        assert sorted(i for s in shares for i in s) == list(range(len(costs)))  # each item exactly once
        loads = [sum(costs[i] for i in s) for s in shares]
        assert max(loads, default=0) <= sum(costs) / size + max(costs, default=0)  # the greedy bound


def test_two_ranks_give_the_single_process_report_in_memory_and_streamed(ranks, single):
    seen, _ = ranks
    for job in ("memory", "streamed"):
        for rank in range(2):
            _same(seen[rank][job], single[job], f"{job} rank {rank}")
    heads = seen[0]["memory"]["heads"]
    assert len({h["class"] for h in heads}) > 1  # the demo model has collapsed heads: classes are tested


def test_the_cli_writes_once_on_rank_0_and_prints_nothing_elsewhere(ranks, single):
    seen, out = ranks
    assert [seen[r]["cli"]["code"] for r in range(2)] == [0, 0]
    assert "wrote" in seen[0]["cli"]["stdout"] and seen[1]["cli"]["stdout"] == ""
    assert seen[1]["cli"]["stderr"] == ""
    written = json.loads((out / "cli.json").read_text())
    _same(written["heads"], single["memory"]["heads"], "cli heads")


def test_a_rank_that_fails_stops_every_rank_with_one_line_naming_it(ranks):
    seen, out = ranks
    assert [seen[r]["failed"]["code"] for r in range(2)] == [1, 1]
    err = seen[0]["failed"]["stderr"].strip()
    assert err == "error: diagnosis failed on rank 1 of 2: RuntimeError: boom on purpose", err
    assert seen[1]["failed"]["stderr"] == "" and not (out / "never.json").exists()


def test_a_command_that_does_not_split_its_work_is_refused_under_ranks(ranks):
    seen, out = ranks
    assert [seen[r]["refused"]["code"] for r in range(2)] == [2, 2]
    err = seen[0]["refused"]["stderr"].strip()
    assert err.startswith("error: repair runs in one process, not under torchrun (WORLD_SIZE=2)") and \
        len(err.splitlines()) == 1, err
    assert seen[1]["refused"]["stderr"] == ""
    assert not (out / "repair0").exists() and not (out / "repair1").exists()


@pytest.mark.slow
def test_torchrun_runs_the_diagnose_command_over_two_ranks(tmp_path, single):
    """The README's command, as a user types it (``torchrun --standalone --nproc-per-node 2 -m alibi_surgery.cli``)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "alibi_surgery.cli",
                             "diagnose", str(model_dir()), "--prompts-file", str(prompts), "--batch-size", "2",
                             "--backend", "torch", "--device", "cpu", "--quiet", "--json", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1, result.stdout  # rank 0 only
    _same(json.loads((tmp_path / "r.json").read_text())["heads"], single["memory"]["heads"], "torchrun heads")

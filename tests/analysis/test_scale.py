"""The family command and the memory planner."""

import json
import subprocess
import sys

import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alibi_surgery.errors import UsageError
from alibi_surgery.analysis.scale_table import family_entry, family_json, family_table
from alibi_surgery.surgery.memory_plan import diagnosis_memory, heads_for, parse_bytes, plan_memory, spread_plan
from alibi_surgery.io.random_model import bloom_config, write_sharded_random_bloom
from alibi_surgery.diagnosis.report import HeadReport, Thresholds

CLI = [sys.executable, "-m", "alibi_surgery.cli"]


def _report(bos):
    bos = torch.tensor(bos, dtype=torch.float32)
    return HeadReport(bos, torch.full_like(bos, 2.0), 10, Thresholds(), {"model": "m"})


def test_family_table_counts_band_and_per_index_rates(tmp_path):
    path = write_sharded_random_bloom(tmp_path / "m", "tiny", vocab_size=512)
    # 2 layers x 4 heads: H2 collapsed in both layers, H3 in one (dead), H0/H1 healthy
    entry = family_entry(str(path), _report([[0.1, 0.2, 0.9, 0.99], [0.1, 0.2, 0.7, 0.3]]))
    assert entry.index_rates() == [0.0, 0.0, 1.0, 0.5] and entry.collapsed() == 3
    table = family_table([entry])
    assert "| m |" in table and "3/8 (37.5%)" in table and "H2: 1.00" in table and "H2–H3" in table
    data = family_json([entry])["models"][0]
    assert data["params"] == sum(p.numel() for p in
                                 __import__("transformers").BloomModel(bloom_config("tiny", vocab_size=512)).parameters())
    assert data["per_index_collapse_rate"] == [0.0, 0.0, 1.0, 0.5] and data["collapsed_share"] == 3 / 8


def test_family_cli_writes_table_heatmap_and_json(tmp_path):
    models = [write_sharded_random_bloom(tmp_path / n, "tiny", vocab_size=512, seed=i) for i, n in enumerate("ab")]
    proc = subprocess.run(CLI + ["family", *map(str, models), "--backend", "torch", "--quiet", "--json",
                                 str(tmp_path / "f.json"), "--heatmap", str(tmp_path / "f.png"), "--markdown",
                                 str(tmp_path / "f.md")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "f.json").read_text())
    assert [m["name"] for m in data["models"]] == ["a", "b"]
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "f.md").read_text().startswith("| model |")
    # a missing model is refused before anything runs or is written
    proc = subprocess.run(CLI + ["family", str(models[0]), str(tmp_path / "nope"), "--json", str(tmp_path / "g.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    assert not (tmp_path / "g.json").exists()


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1000") == 1000
    with pytest.raises(UsageError, match="memory size"):
        parse_bytes("lots")


def test_surgery_prediction_is_predict_memory_and_matches_the_h100_measurement():
    """bloom-7b1, 300 heads, bf16, seq 512, stochastic rounding: an H100 measured 19.39 GiB (docs/training.md)."""
    p = plan_memory("bloom-7b1", heads="300", seq_len=512, stochastic_rounding=True, budget=parse_bytes("24GiB"))
    assert abs(p["surgery"]["total"] / 2**30 - 19.39) < 0.05
    assert p["fits"] == {"diagnosis": True, "diagnosis_streamed": True, "surgery": True}
    big = plan_memory("bloom", budget=parse_bytes("24GiB"))
    assert big["fits"] == {"diagnosis": False, "diagnosis_streamed": True, "surgery": False}


def test_diagnosis_parts_by_hand():
    cfg = bloom_config("bloom-560m")
    h = 1024
    mem = diagnosis_memory(cfg, torch.float32, 512, 2, 8, streamed=True)
    # BLOOM's peak is its MLP: 4 resident + the tanh-GELU's 5 tensors of 4h (on a card: no torch-backend tiles)
    assert mem["hidden_states"] == 8 * 512 * h * 4 and mem["activations"] == (4 + 5 * 4) * 2 * 512 * h * 4
    assert mem["block"] == (12 * h * h + 13 * h) * 4 + 4 * h * h * 2
    full = diagnosis_memory(cfg, torch.bfloat16, 512, 1, 8, streamed=False)
    weights = (24 * (12 * h * h + 13 * h) + 250880 * h + 4 * h) * 2
    assert full["weights"] == weights and full["total"] == weights + full["activations"]
    # on CPU the mapped checkpoint pages count while loading: the whole file, or one block when streaming
    cpu = diagnosis_memory(cfg, torch.float32, 512, 1, 8, streamed=False, cpu=True)
    assert cpu["loading"] == weights and cpu["total"] == 2 * weights + weights
    cpu_stream = diagnosis_memory(cfg, torch.float32, 512, 1, 8, streamed=True, cpu=True)
    assert cpu_stream["block"] == (12 * h * h + 13 * h) * (4 + 2)
    no_conversion = diagnosis_memory(cfg, torch.bfloat16, 512, 1, 8, streamed=True, cpu=True)
    assert no_conversion["block"] == (12 * h * h + 13 * h) * 2


def test_heads_auto_and_spread():
    cfg = bloom_config("bloom-7b1")
    assert heads_for("bloom-7b1", cfg, "auto") == round(0.31 * 960)
    assert heads_for("/x/my-model", cfg, "auto") == round(0.40 * 960)
    plan = spread_plan(cfg, 300)
    assert plan.n_heads == 300 and min(plan.selection) == 0 and all(len(h) == 10 for h in plan.selection.values())
    for bad in ("0", "961", "many"):
        with pytest.raises(UsageError):
            heads_for("bloom-7b1", cfg, bad)


def test_plan_memory_cli(tmp_path):
    proc = subprocess.run(CLI + ["plan-memory", "bloom-3b", "--budget", "16GB", "--json", str(tmp_path / "p.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "diagnosis, streamed" in proc.stdout and "fits" in proc.stdout
    assert json.loads((tmp_path / "p.json").read_text())["n_head"] == 32
    proc = subprocess.run(CLI + ["plan-memory", "bloom-3b", "--budget", "huge"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot read 'huge'")


def test_plan_memory_small_models_real_sizes_and_the_budget_as_exit_status(tmp_path, capsys):
    """Issue 31: a tiny model read "0.00 B parameters" and "0.00 GiB"; a job over --budget exited 0; a negative
    --budget got argparse's usage instead of the one-line error."""
    from alibi_surgery.cli.main import main
    from alibi_surgery.io.random_model import write_random_bloom

    model = write_random_bloom(tmp_path / "tiny", "tiny", n_layer=2, seed=0)
    assert main(["plan-memory", str(model), "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "0.00" not in out and " K parameters" in out and ("KiB" in out or "MiB" in out), out
    assert main(["plan-memory", "bloom-560m", "--budget", "1GiB", "--seq-len", "2048"]) == 1
    captured = capsys.readouterr()
    assert "does NOT fit 1.00 GiB" in captured.out
    assert captured.err.strip() == "error: the surgery step does not fit --budget 1.00 GiB"
    assert main(["plan-memory", "bloom-560m", "--budget", "-1GiB"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: cannot read '-1GiB' as a memory size")


class _LiveBytes(TorchDispatchMode):
    """The peak bytes of the tensor storages that ops create under this mode and that are still referenced (freed
    through weakref finalizers): an allocator-free count of a job's working set. Storages that existed before (the
    weights: ``detach`` returns them) are left out."""

    def __init__(self, before: set):
        super().__init__()
        self.before, self.live, self.now, self.peak = before, {}, 0, 0

    def _free(self, key, n):
        self.live.pop(key, None)
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live or key in self.before or not storage.nbytes():
                    continue
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                weakref.finalize(storage, self._free, key, storage.nbytes())
                self.peak = max(self.peak, self.now)
        return out


@pytest.mark.parametrize("shape", ["tiny", "tiny-llama"])
def test_diagnosis_activations_match_the_live_tensors_of_a_real_diagnosis(shape, tmp_path):
    """Issue 31: the planner's diagnosis activations (fp32, CPU, torch backend, one prompt of 4,096 tokens) against
    the peak of the live tensor storages while ``diagnose`` runs on a 2-layer random model: BLOOM peaks in its
    tanh-GELU MLP (24 hidden values per token), Llama in its attention (9.5 values plus the score tiles, above its
    MLP's 10.5)."""
    from alibi_surgery import diagnose
    from alibi_surgery.io.loading import load_model
    from alibi_surgery.io.random_model import write_random_model

    seq = 4096
    path = write_random_model(tmp_path / shape, shape, n_layer=2, vocab_size=512, seed=0)
    model, tok = load_model(str(path), dtype="float32", device="cpu")
    before = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    with _LiveBytes(before) as live, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Llama: 4,096 tokens are past its config's training context
        diagnose(model, tok, ["x" * (seq + 10)], max_length=seq, backend="torch")
    predicted = plan_memory(str(path), heads="1", seq_len=seq, dtype="float32", device="cpu")["diagnosis"]
    assert abs(predicted["activations"] - live.peak) < 0.08 * live.peak, (predicted["activations"], live.peak)


def test_plan_memory_of_a_model_surgery_refuses_predicts_its_diagnosis(tmp_path, capsys):
    """Issue 31: plan-memory on a Llama checkpoint refused the whole plan (surgery is out of scope for it); now it
    predicts the in-memory diagnosis and says which jobs do not apply."""
    from alibi_surgery.cli.main import main
    from alibi_surgery.io.random_model import write_random_model

    path = write_random_model(tmp_path / "llama", "tiny-llama", n_layer=2, vocab_size=512, seed=0)
    assert main(["plan-memory", str(path), "--device", "cpu", "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "diagnosis, in memory" in out and "fits 1.00 GiB" in out
    assert "streamed  : not available (llama models are loaded whole)" in out
    assert "surgery step         : not available" in out
    p = plan_memory(str(path), budget=1, device="cpu")
    assert p["surgery"] is None and p["diagnosis_streamed"] is None and p["fits"] == {"diagnosis": False}


def test_cpu_diagnosis_gives_freed_memory_back_after_each_attention_and_changes_nothing(monkeypatch):
    """allocator.release_after: called once per attention call of a CPU diagnosis of an ALiBi model (not of an
    interface model, whose MLP reuses the freed blocks: docs/scale.md), the report identical, the hooks gone."""
    from transformers import BloomForCausalLM

    from alibi_surgery import allocator
    from alibi_surgery.diagnosis.diagnose import diagnose
    from alibi_surgery.io.random_model import byte_tokenizer

    torch.manual_seed(0)
    model = BloomForCausalLM(bloom_config("tiny", n_layer=2)).eval()
    tok, prompts = byte_tokenizer(), ["a first prompt of some length", "another one", "and a third"]
    calls = []
    plain = diagnose(model, tok, prompts, batch_size=2, backend="torch")
    monkeypatch.setattr(allocator, "release_freed", lambda: calls.append(1) or True)
    trimmed = diagnose(model, tok, prompts, batch_size=2, backend="torch")
    assert len(calls) == 2 * 2  # 2 layers x 2 batches
    assert torch.equal(plain.bos_mass, trimmed.bos_mass) and torch.equal(plain.entropy, trimmed.entropy)
    assert all(not m._forward_hooks for m in model.modules())

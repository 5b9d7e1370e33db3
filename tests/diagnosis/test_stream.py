"""Layer-streamed diagnosis and the sharded random-checkpoint writer."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from alibi_surgery.diagnosis import stream
from alibi_surgery.diagnosis.diagnose import diagnose
from alibi_surgery.errors import UsageError
from alibi_surgery.io.loading import load_bloom
from alibi_surgery.io.random_model import byte_tokenizer, write_random_bloom, write_sharded_random_bloom

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "x", "attention sinks " * 5, "ALiBi slopes"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "m"
    return write_sharded_random_bloom(out, "bloom-560m", n_layer=3, vocab_size=1024, dtype=torch.bfloat16,
                                      shard_bytes=8 * 2**20)


def test_writer_makes_a_sharded_checkpoint_stock_transformers_loads(sharded):
    from transformers import BloomForCausalLM

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and all((sharded / f).stat().st_size <= 8 * 2**20 + 2**16 for f in files[:-1])
    model = BloomForCausalLM.from_pretrained(sharded, dtype=torch.bfloat16)
    h = model.transformer.h[1]
    w = h.self_attention.query_key_value.weight.float()
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3  # BLOOM's init: normal(0, 0.02)
    assert torch.all(h.self_attention.query_key_value.bias == 0) and torch.all(h.input_layernorm.weight == 1)
    with safe_open(sharded / index["weight_map"]["transformer.h.2.mlp.dense_4h_to_h.weight"], "pt") as f:
        assert torch.equal(f.get_tensor("transformer.h.2.mlp.dense_4h_to_h.weight"),
                           model.transformer.h[2].mlp.dense_4h_to_h.weight)
    assert index["metadata"]["total_size"] == sum(p.numel() * 2 for p in model.transformer.parameters())


def test_writer_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        write_sharded_random_bloom(tmp_path, "tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("options", [{}, {"exclude_first_query": True, "normalize_entropy": True}])
def test_streamed_equals_in_memory_exactly(sharded, options):
    """Same checkpoint, fp32, torch backend, left-padded batches: bit-identical statistics."""
    model, tok = load_bloom(str(sharded), dtype="float32", device="cpu")
    ref = diagnose(model, tok, PROMPTS, backend="torch", batch_size=3, **options)
    got = stream.diagnose_streamed(sharded, tok, PROMPTS, backend="torch", batch_size=3, **options)
    assert torch.equal(got.bos_mass, ref.bos_mass) and torch.equal(got.entropy, ref.entropy)
    assert got.n_tokens == ref.n_tokens and got.metadata["rows_counted"] == ref.metadata["rows_counted"]
    for key in ("prompt_fingerprints", "prompt_set_fingerprint", "uniform_bos_mass"):  # what compare checks
        assert got.metadata[key] == ref.metadata[key] is not None, key


def test_streamed_triton_under_the_tolerance_rule(tmp_path):
    """The fused kernel (interpreter) streamed against the in-memory eager reference, fp32."""
    path = write_random_bloom(tmp_path / "t", "tiny", seed=3)
    model, tok = load_bloom(str(path), dtype="float32", device="cpu")
    ref = diagnose(model, tok, PROMPTS, backend="eager", batch_size=2)
    got = stream.diagnose_streamed(path, tok, PROMPTS, backend="triton", batch_size=2)
    torch.testing.assert_close(got.bos_mass, ref.bos_mass, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.entropy, ref.entropy, rtol=1e-4, atol=1e-5)


def test_prefixless_checkpoint_streams_too(tmp_path):
    """A BloomModel save (no ``transformer.`` prefix, single file) streams to the same numbers."""
    from transformers import BloomModel

    path = write_random_bloom(tmp_path / "full", "tiny", seed=5)
    model, tok = load_bloom(str(path), dtype="float32", device="cpu")
    bare = tmp_path / "bare"
    model.transformer.save_pretrained(bare)
    tok.save_pretrained(bare)
    assert BloomModel.from_pretrained(bare) is not None
    ref = diagnose(model, tok, PROMPTS, backend="torch")
    got = stream.diagnose_streamed(bare, tok, PROMPTS, backend="torch")
    assert torch.equal(got.bos_mass, ref.bos_mass)


def test_one_block_at_a_time_and_only_the_used_embedding_rows(sharded, monkeypatch):
    calls, rows = [], []
    load, emb = stream.CheckpointIndex.load, stream.CheckpointIndex.embedding_rows
    monkeypatch.setattr(stream.CheckpointIndex, "load",
                        lambda self, names, *a: calls.append(sorted(names)) or load(self, names, *a))
    monkeypatch.setattr(stream.CheckpointIndex, "embedding_rows",
                        lambda self, name, ids, *a: rows.append(ids.clone()) or emb(self, name, ids, *a))
    stream.diagnose_streamed(sharded, byte_tokenizer(), PROMPTS, backend="torch")
    blocks = [{n.split(".")[1] for n in c} for c in calls if c[0].startswith("h.")]
    assert blocks == [{"0"}, {"1"}, {"2"}]  # each load call reads exactly one block
    assert all("word_embeddings.weight" not in c for c in calls)  # the table is never loaded whole
    ckpt = stream.CheckpointIndex(sharded)
    ids = rows[0]
    with safe_open(ckpt.files["word_embeddings.weight"][0], "pt") as f:
        table = f.get_tensor("transformer.word_embeddings.weight")
    assert torch.equal(ckpt.embedding_rows("word_embeddings.weight", ids, "cpu", torch.bfloat16), table[ids])


def test_memory_model(sharded):
    from transformers import BloomModel

    ckpt = stream.CheckpointIndex(sharded)
    with torch.device("meta"):
        base = BloomModel(ckpt.config)
    per_block = sum(p.numel() for p in base.h[0].parameters()) * 2
    assert stream.block_bytes(ckpt.config, torch.bfloat16) == per_block
    assert stream.model_bytes(ckpt.config, torch.float32) == sum(p.numel() for p in base.parameters()) * 4
    assert stream.should_stream(ckpt.config, torch.float32, torch.device("cpu")) is False


def test_bad_inputs(sharded, tmp_path):
    with pytest.raises(UsageError, match="eager"):
        stream.diagnose_streamed(sharded, byte_tokenizer(), PROMPTS, backend="eager")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in sharded.iterdir():
        (broken / f.name).symlink_to(f)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    del index["weight_map"]["transformer.h.1.mlp.dense_h_to_4h.bias"]
    (broken / "model.safetensors.index.json").unlink()
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="h.1.mlp.dense_h_to_4h.bias is missing"):
        stream.diagnose_streamed(broken, byte_tokenizer(), PROMPTS, backend="torch")


def test_cli_stream_flag_and_automatic_streaming(sharded, tmp_path):
    base = [sys.executable, "-m", "alibi_surgery.cli", "diagnose", str(sharded), "--backend", "torch", "--quiet",
            "--prompt", PROMPTS[0], "--prompt", PROMPTS[2]]
    env_code = ("import sys, alibi_surgery.diagnosis.stream as s; s.free_bytes = lambda d: 1; "
                "from alibi_surgery.cli import main; sys.exit(main(sys.argv[1:]))")
    outs = {}
    for name, cmd in (("memory", base), ("flag", base + ["--stream"]),
                      ("auto", [sys.executable, "-c", env_code] + base[3:])):
        proc = subprocess.run(cmd + ["--json", str(tmp_path / f"{name}.json")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        if name == "auto":
            assert "streaming block by block" in proc.stderr
    heads = {k: [(h["bos_mass"], h["entropy"]) for h in v["heads"]] for k, v in outs.items()}
    assert heads["flag"] == heads["memory"] == heads["auto"]

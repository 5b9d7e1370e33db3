"""The bad-input matrix: the CLI driven as a user drives it, each run its own process (forked from one that
imported the CLI once: tests/cli_fork.py), with one broken input per case.

Every case must end with a non-zero exit, exactly one stderr line ``error: ...`` naming the problem (no traceback;
``--debug`` shows one), and no file created or modified anywhere: not in the inputs, not in the output location,
not in the working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alibi_surgery.io.random_model import write_random_bloom

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _copy_with(model: Path, dest: Path, edit=None) -> Path:
    """A copy of ``model`` whose single safetensors file went through ``edit(tensors) -> tensors``."""
    shutil.copytree(model, dest)
    if edit is not None:
        file = dest / "model.safetensors"
        save_file(edit(load_file(file)), file, metadata={"format": "pt"})
    return dest


def _poke(name: str, value: float):
    def edit(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[7] = value
        return tensors
    return edit


def _drop_rows(name: str):
    def edit(tensors):
        tensors[name] = tensors[name][:-3].clone()
        return tensors
    return edit


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every input the cases need, built once: a good model, broken variants of it, corpora, prompt files, and a
    complete surgery checkpoint of another model."""
    root = tmp_path_factory.mktemp("world")
    model = write_random_bloom(root / "model", "tiny", n_layer=2, seed=1)
    qkv = "transformer.h.0.self_attention.query_key_value.weight"
    if qkv not in load_file(model / "model.safetensors"):
        qkv = qkv.removeprefix("transformer.")
    prefix = qkv[: -len("h.0.self_attention.query_key_value.weight")]
    _copy_with(model, root / "truncated")
    data = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) * 3 // 5])
    _copy_with(model, root / "wrong-shape", _drop_rows(qkv))
    _copy_with(model, root / "nan", _poke(prefix + "h.1.mlp.dense_4h_to_h.weight", float("nan")))
    _copy_with(model, root / "inf", _poke(prefix + "word_embeddings_layernorm.weight", float("inf")))
    notok = _copy_with(model, root / "no-tokenizer")
    for f in notok.iterdir():
        if "token" in f.name or "special" in f.name:
            f.unlink()
    pickle = _copy_with(model, root / "pickle-only")
    torch.save(load_file(pickle / "model.safetensors"), pickle / "pytorch_model.bin")
    (pickle / "model.safetensors").unlink()
    badjson = _copy_with(model, root / "bad-json")
    (badjson / "config.json").write_text('{"model_type": "bloom", ')
    sharded = write_random_bloom(root / "sharded", "tiny", n_layer=2, seed=1, max_shard_size="200KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()

    from transformers import FalconConfig, Gemma2Config, GPTNeoConfig, GPTNeoForCausalLM, MptConfig

    GPTNeoForCausalLM(GPTNeoConfig(num_layers=2, attention_types=[[["global", "local"], 1]], hidden_size=32,
                                   num_heads=2, vocab_size=300)).save_pretrained(root / "gpt-neo")
    Gemma2Config(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=16, intermediate_size=64).save_pretrained(root / "gemma2")
    from alibi_surgery.io.random_model import write_random_model

    write_random_model(root / "llama", "tiny-llama", n_layer=1)
    falcon = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=300)
    FalconConfig(**falcon, alibi=False).save_pretrained(root / "falcon")  # rotary: FalconConfig's default
    FalconConfig(**falcon, alibi=True, multi_query=True).save_pretrained(root / "falcon-multi-query")
    for key, value in (("alibi", False), ("qk_ln", True), ("prefix_lm", True)):  # what transformers' MPT ignores
        MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=300,
                  attn_config={key: value}).save_pretrained(root / f"mpt-{key}")

    from transformers import BloomConfig, BloomForCausalLM

    from alibi_surgery.io.random_model import byte_tokenizer

    torch.manual_seed(0)  # head_dim 40: the triton kernel's limit is a multiple of 16 up to 128
    BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=120, n_layer=1, n_head=3, bos_token_id=1,
                                 eos_token_id=2, pad_token_id=3)).save_pretrained(root / "head-dim-40")
    byte_tokenizer().save_pretrained(root / "head-dim-40")
    (root / "prompts-utf16.txt").write_bytes("café au lait\n".encode("utf-16"))
    (root / "prompts-latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (root / "prompts-dir").mkdir()
    _two_prompt_sets(model, root)

    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "latin1.txt").write_bytes(("na\xefve caf\xe9 " * 50).encode("latin-1"))
    (corpus / "doc.txt").write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(400)))
    (corpus / "short.txt").write_text("alpha beta")
    (corpus / "blank.txt").write_text("  \n\n \n")
    (root / "prompts-empty.txt").write_text("\n   \n")
    (root / "prompts.txt").write_text("the lighthouse keeper climbed\n")
    import datasets

    docs = datasets.Dataset.from_dict({"text": [(corpus / "doc.txt").read_text()]})
    docs.save_to_disk(str(root / "saved-dataset"))
    datasets.DatasetDict({"train": docs, "test": docs}).save_to_disk(str(root / "saved-dataset-dict"))

    # A complete surgery checkpoint of another (3-layer) model, for --resume.
    other = write_random_bloom(root / "other-model", "tiny", n_layer=3, seed=2)
    from alibi_surgery.surgery.repair import RepairSettings, repair

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)  # as a user runs it: the optimizer's torch path on CPU
        repair(other, root / "other-run", corpus=[str(corpus / "doc.txt")], heads="0:1", device="cpu",
               backend="torch", progress=False, settings=RepairSettings(seq_len=16, batch_size=2, grad_accum=1,
                                                                        epochs=1, diag_max_length=16))
    assert any((root / "other-run" / "checkpoints").glob("step-*"))
    return root


def _two_prompt_sets(model: Path, root: Path) -> None:
    """Diagnoses of one model with two different prompt sets of equal token counts (the same words reversed)."""
    from alibi_surgery import diagnose
    from alibi_surgery.io.loading import load_bloom

    net, tokenizer = load_bloom(str(model))
    words = "the lighthouse keeper climbed the spiral stairs every evening at dusk".split()
    for name, prompts in (("a", [" ".join(words), "x = 1 + 2"]), ("b", [" ".join(words[::-1]), "y = 2 + 1"])):
        diagnose(net, tokenizer, prompts, backend="torch").to_json(root / f"diagnosis-{name}.json")


def _held(tmp: Path) -> Path:
    """An --out whose lock this test process holds, as a run in progress would."""
    from alibi_surgery.io.lock import DirLock

    out = tmp / "in-use"
    _HELD_LOCKS.append(DirLock(out).acquire())
    return out


_HELD_LOCKS: list = []


def _repair(w: Path, tmp: Path, *extra, model: str = "model", out=None, corpus="doc.txt") -> list:
    return ["repair", str(w / model), "--out", str(out or tmp / "out"), "--corpus", str(w / "corpus" / corpus),
            "--heads", "0:1", "--device", "cpu", "--backend", "torch", "--seq-len", "16", "--quiet", *extra]


def _lines(tmp: Path, *lines: str) -> Path:
    """A text file of ``lines`` in ``tmp``."""
    (tmp / "lines.txt").write_text("".join(f"{line}\n" for line in lines))
    return tmp / "lines.txt"


def _write(tmp: Path, name: str, text: str) -> Path:
    """A file ``name`` holding ``text`` in ``tmp``."""
    (tmp / name).write_text(text)
    return tmp / name


def _diagnose(w: Path, tmp: Path, *extra, model: str = "model") -> list:
    return ["diagnose", str(w / model), "--json", str(tmp / "report.json"), "--quiet", *extra]


def _ppl(w: Path, tmp: Path, *extra, lines=("first text to score", "second text"), model: str = "model") -> list:
    """``perplexity`` over a prompts file of ``lines`` written into ``tmp`` (None: no --prompts-file)."""
    source = []
    if lines is not None:
        (tmp / "texts.txt").write_text("".join(f"{line}\n" for line in lines))
        source = ["--prompts-file", str(tmp / "texts.txt")]
    return ["perplexity", str(w / model), *source, "--json", str(tmp / "ppl.json"), "--device", "cpu", "--quiet",
            *extra]


def _bare_corpus(args: list, corpus: str) -> list:
    """``args`` of :func:`_repair` with ``--corpus`` given as typed, not under the world's corpus directory."""
    args[args.index("--corpus") + 1] = corpus
    return args


def _generate(w: Path, tmp: Path, *extra, out=None) -> list:
    return ["generate", str(w / "model"), "--out", str(out or tmp / "gen"), "--prompts-file", str(w / "prompts.txt"),
            "--device", "cpu", "--backend", "torch", "--max-new-tokens", "2", "--quiet", *extra]


def _not_empty(tmp: Path) -> Path:
    out = tmp / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    return out


def _existing(tmp: Path) -> Path:
    (tmp / "old.csv").write_text("layer,head\n")
    return tmp / "old.csv"


def _companion(tmp: Path) -> str:
    """A --heatmap path whose extreme-token figure (OUT.extremes.png) already exists."""
    (tmp / "h.extremes.png").write_text("mine")
    return str(tmp / "h.png")


def _under_a_file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("x")
    return tmp / "a-file" / "out"


def _undiagnosed_run(w: Path, tmp: Path) -> Path:
    """A repair output with its baseline and plan but no diagnosed checkpoint."""
    run = tmp / "bare-run"
    run.mkdir()
    for name in ("baseline.json", "plan.json"):
        shutil.copy(w / "other-run" / name, run / name)
    return run


# name: (argv(world, tmp), text the message must contain)
CASES = {
    "missing model path": (lambda w, t: _diagnose(w, t, model="nope"), "does not exist"),
    "GPT-Neo (no attention interface)": (lambda w, t: _diagnose(w, t, model="gpt-neo"),
                                         "does not route its attention through the attention interface"),
    "Gemma2 (attention soft-capping)": (lambda w, t: _diagnose(w, t, model="gemma2"),
                                        "soft-caps attention logits (attn_logit_softcapping: 50.0)"),
    "surgery on an attention-interface model": (lambda w, t: _repair(w, t, model="llama"),
                                                "surgery on llama models is not supported"),
    "streamed diagnosis of an attention-interface model": (lambda w, t: _diagnose(w, t, "--stream", model="llama"),
                                                           "streamed diagnosis covers the ALiBi families only"),
    "rotary Falcon": (lambda w, t: _diagnose(w, t, model="falcon"), "Falcon config uses rotary position embeddings"),
    "multi-query Falcon": (lambda w, t: _diagnose(w, t, model="falcon-multi-query"),
                           "Falcon config uses multi-query attention"),
    "MPT with attn_config.alibi false": (lambda w, t: _diagnose(w, t, model="mpt-alibi"),
                                         "MPT config turns ALiBi off (attn_config.alibi: false)"),
    "MPT with attn_config.qk_ln": (lambda w, t: _diagnose(w, t, model="mpt-qk_ln"),
                                   "attn_config.qk_ln: true, which transformers' MPT port silently ignores"),
    "MPT with attn_config.prefix_lm": (lambda w, t: _repair(w, t, model="mpt-prefix_lm"),
                                       "attn_config.prefix_lm: true, which transformers' MPT port silently ignores"),
    "config not JSON": (lambda w, t: _diagnose(w, t, model="bad-json"), "not valid JSON"),
    "truncated safetensors": (lambda w, t: _diagnose(w, t, model="truncated"), "is truncated"),
    "tensor of the wrong shape": (lambda w, t: _diagnose(w, t, model="wrong-shape"), "config.json implies"),
    "shard missing from a sharded checkpoint": (lambda w, t: _diagnose(w, t, model="sharded"), "is missing"),
    "NaN weight (repair, before training)": (lambda w, t: _repair(w, t, model="nan"), "NaN/inf"),
    "inf weight (diagnose)": (lambda w, t: _diagnose(w, t, model="inf"), "NaN/inf"),
    "inf weight (streamed diagnose)": (lambda w, t: _diagnose(w, t, "--stream", model="inf"), "NaN/inf"),
    "no tokenizer": (lambda w, t: _diagnose(w, t, model="no-tokenizer"), "no usable tokenizer"),
    "pickle-only checkpoint": (lambda w, t: _diagnose(w, t, model="pickle-only"), "convert them to safetensors"),
    "empty prompt file": (lambda w, t: _diagnose(w, t, "--prompts-file", str(w / "prompts-empty.txt")),
                          "prompts file is empty"),
    "head out of range": (lambda w, t: _repair(w, t, "--heads", "0:4"), "head 4 is out of range 0..3"),
    "layer out of range": (lambda w, t: _repair(w, t, "--heads", "2:0"), "layer 2 is out of range 0..1"),
    "--heads overlapping --freeze": (lambda w, t: _repair(w, t, "--heads", "0:1-2", "--freeze", "0:2"),
                                     "both listed in --heads 0:1-2 and frozen by --freeze 0:2"),
    "empty corpus": (lambda w, t: _repair(w, t, corpus="blank.txt"), "corpus is empty"),
    "corpus shorter than one chunk": (lambda w, t: _repair(w, t, corpus="short.txt"), "too short"),
    "--out equal to the input": (lambda w, t: _repair(w, t, out=w / "model"), "is the input model directory"),
    "--out inside the input": (lambda w, t: _repair(w, t, out=w / "model" / "surgery"),
                               "is the input model directory, inside it or holds it"),
    "--out under a file (unwritable)": (lambda w, t: _repair(w, t, out=_under_a_file(t)),
                                        "a-file is a file, not a directory"),
    "--out not empty, no --overwrite": (lambda w, t: _repair(w, t, out=_not_empty(t)),
                                        "is not empty: pass --resume to continue or --overwrite to start again"),
    "--resume with another model's checkpoint": (lambda w, t: _repair(w, t, "--resume", out=w / "other-run"),
                                                 "was started from other inputs (model=sha256:"),
    "unknown --dtype": (lambda w, t: _repair(w, t, "--dtype", "float8"), "unsupported dtype 'float8'"),
    "unknown --device": (lambda w, t: _diagnose(w, t, "--device", "tpu"), "unsupported device 'tpu'"),
    "--device cuda without CUDA": (lambda w, t: _repair(w, t, "--device", "cuda"), "CUDA is not available"),
    "blank --prompt": (lambda w, t: _diagnose(w, t, "--prompt", "   "), "prompt 0 is empty"),
    "--json into a missing directory": (lambda w, t: ["diagnose", str(w / "model"), "--json",
                                                      str(t / "no" / "x.json"), "--quiet"], "does not exist"),
    "--csv file exists, no --overwrite": (lambda w, t: _diagnose(w, t, "--csv", str(_existing(t))),
                                          "already exists"),
    "unknown --backend": (lambda w, t: _diagnose(w, t, "--backend", "cudnn"), "unknown backend 'cudnn'"),
    "thresholds out of order": (lambda w, t: _diagnose(w, t, "--sink-threshold", "0.99"), "thresholds"),
    "missing corpus path": (lambda w, t: _repair(w, t, corpus="nope.txt"), "corpus path does not exist"),
    "--sink-epsilon 1.5": (lambda w, t: _diagnose(w, t, "--sink-epsilon", "1.5"), "--sink-epsilon 1.5: must be in [0, 1)"),
    "--sinks 0": (lambda w, t: _diagnose(w, t, "--sinks", "0"), "--sinks 0: must be >= 1"),
    "--sinks with --stream": (lambda w, t: _diagnose(w, t, "--sinks", "3", "--stream"),
                              "--sinks needs the model in memory; it cannot be combined with --stream"),
    "--sink-penalty -1": (lambda w, t: _repair(w, t, "--sink-penalty", "-1"),
                          "--sink-penalty -1.0: must be a finite number >= 0"),
    "--sink-penalty on an arm that trains nothing": (
        lambda w, t: _repair(w, t, "--sink-penalty", "1", "--control", "reinit-only"),
        "--sink-penalty 1.0 needs training, and the reinit-only arm trains nothing"),
    "repair --distributed fsdp --sink-penalty": (
        lambda w, t: _repair(w, t, "--distributed", "fsdp", "--sink-penalty", "0.5"),
        "--distributed fsdp trains without a sink penalty, not --sink-penalty 0.5"),
    "repair --distributed fsdp --dtype bfloat16": (
        lambda w, t: _repair(w, t, "--distributed", "fsdp", "--dtype", "bfloat16"),
        "--distributed fsdp trains in float32, not --dtype bfloat16"),
    "sparsify --train bogus": (lambda w, t: ["sparsify", *_repair(w, t, "--train", "bogus")[1:]],
                               "unknown --train bogus; choose slices or full"),
    "plan-memory --world-size 0": (lambda w, t: ["plan-memory", str(w / "model"), "--world-size", "0", "--json",
                                                  str(t / "plan.json")], "--world-size 0: must be >= 1"),
    "plan-memory --device-memory without --world-size": (
        lambda w, t: ["plan-memory", str(w / "model"), "--device-memory", "80GiB", "--json", str(t / "plan.json")],
        "--device-memory is the memory of each of --world-size N devices"),
    "plan-memory --device-memory unreadable": (
        lambda w, t: ["plan-memory", str(w / "model"), "--world-size", "2", "--device-memory", "lots"],
        "cannot read 'lots' as a memory size"),
    "--budget too small": (lambda w, t: _repair(w, t, "--budget", "1MiB"), "), more than --budget 1048576 (1.0 MiB): train fewer heads, lower --seq-len 16"),
    "UTF-16 prompts file": (lambda w, t: _diagnose(w, t, "--prompts-file", str(w / "prompts-utf16.txt")),
                            "not UTF-8 text"),
    "Latin-1 prompts file": (lambda w, t: _diagnose(w, t, "--prompts-file", str(w / "prompts-latin1.txt")),
                             "byte 0xe9 at offset 3 is invalid"),
    "prompts file is a directory": (lambda w, t: _diagnose(w, t, "--prompts-file", str(w / "prompts-dir")),
                                    "prompts file is a directory"),
    "Latin-1 corpus file": (lambda w, t: _repair(w, t, corpus="latin1.txt"), "not UTF-8 text"),
    "--eval-text is a directory": (lambda w, t: _repair(w, t, "--eval-text", str(w / "prompts-dir")),
                                   "--eval-text is a directory"),
    "--eval-prompts with a blank line": (lambda w, t: _repair(w, t, "--eval-prompts", str(_lines(t, "a text", "",
                                                                                                 "more"))),
                                         "line 2 is blank"),
    "malformed .jsonl prompts file": (lambda w, t: _diagnose(w, t, "--prompts-file", str(_write(
        t, "p.jsonl", '{"text": "one"}\n{"text": "two"\n'))), "p.jsonl:2: not a JSON line"),
    "perplexity: .json texts without the field": (lambda w, t: _ppl(w, t, "--prompts-file", str(_write(
        t, "p.json", '[{"text": "a text"},\n {"body": "b"}]')), lines=None), 'p.json:2: the object has no "text" field'),
    "--eval-prompts .jsonl with an empty text": (lambda w, t: _repair(w, t, "--eval-prompts", str(_write(
        t, "e.jsonl", '{"text": "a text"}\n{"text": " "}\n'))), "e.jsonl:2: the text is empty"),
    "--max-tokens 0": (lambda w, t: _repair(w, t, "--max-tokens", "0"), "--max-tokens 0: must be a whole number"),
    "--ablation-texts 0": (lambda w, t: _repair(w, t, "--ablation-texts", "0"),
                           "--ablation-texts 0: must be a whole number >= 1"),
    "--eval-prompts with a 1-token line": (lambda w, t: _repair(w, t, "--eval-prompts", str(_lines(t, "a text", "x"))),
                                           "--eval-prompts line 2 has 1 token: it predicts nothing"),
    "repair --out that holds the input model, --overwrite": (lambda w, t: _repair(w, t, "--overwrite", out=w),
                                                             "holds it: the input is never written to"),
    "generate --out that holds the input model": (lambda w, t: _generate(w, t, out=w),
                                                  "holds it: the input is never written to"),
    "unknown --eval-convention": (lambda w, t: _repair(w, t, "--eval-convention", "mean"),
                                  "unknown --eval-convention mean; choose one of tokens, paper"),
    "--json and --csv name one file": (lambda w, t: _diagnose(w, t, "--csv", str(t / "report.json")),
                                       "--json and --csv name the same file"),
    "--heatmap in an unknown format": (lambda w, t: _diagnose(w, t, "--heatmap", str(t / "heads.xyz")),
                                       "cannot write a figure as .xyz"),
    "--backend triton, head_dim 40": (lambda w, t: _diagnose(w, t, "--backend", "triton", model="head-dim-40"),
                                      "this model has head_dim 40; use --backend torch"),
    "--out in use by another run": (lambda w, t: _repair(w, t, out=_held(t)),
                                    f"is in use by another run (pid {os.getpid()}"),
    "--from-report not a diagnosis": (lambda w, t: _repair(w, t, "--from-report", str(w / "model" / "config.json")),
                                      "is not a diagnosis report"),
    "--optimizer-precision bf16 on float32 weights": (
        lambda w, t: _repair(w, t, "--optimizer-precision", "bf16"), "rounds every update into bfloat16 weights"),
    "unknown --optimizer-precision": (lambda w, t: _repair(w, t, "--optimizer-precision", "fp8"),
                                      "unknown --optimizer-precision fp8; choose one of"),
    "--stochastic-rounding with --optimizer-precision bf16": (
        lambda w, t: _repair(w, t, "--stochastic-rounding", "--optimizer-precision", "bf16", "--dtype", "bfloat16"),
        "contradicts --optimizer-precision bf16"),
    "--seed -1 (before anything is written)": (lambda w, t: _repair(w, t, "--seed", "-1"),
                                               "--seed -1: must be a whole number >= 0"),
    "--no-reinit with --init": (lambda w, t: _repair(w, t, "--no-reinit", "--init", "xavier_normal"),
                                "--init xavier_normal chooses how the heads are re-initialised, but --no-reinit"),
    "unknown --schedule": (lambda w, t: _repair(w, t, "--schedule", "linear"), "unknown --schedule linear; choose one of"),
    "unknown --recipe": (lambda w, t: _repair(w, t, "--recipe", "ours"), "unknown --recipe 'ours'"),
    "negative --lr under --recipe paper": (lambda w, t: _repair(w, t, "--recipe", "paper", "--lr", "-1"),
                                           "--lr -1.0: must be a finite number >= 0"),
    "--lr nan (before anything is written)": (lambda w, t: _repair(w, t, "--lr", "nan"),
                                              "--lr nan: must be a finite number >= 0"),
    "--lr inf": (lambda w, t: _repair(w, t, "--lr", "inf"), "--lr inf: must be a finite number >= 0"),
    "--max-grad-norm nan": (lambda w, t: _repair(w, t, "--max-grad-norm", "nan"),
                            "--max-grad-norm nan: must be a finite number > 0"),
    "--weight-decay nan": (lambda w, t: _repair(w, t, "--weight-decay", "nan"),
                           "--weight-decay nan: must be a finite number >= 0"),
    "random-model under a file": (lambda w, t: ["random-model", str(_under_a_file(t))],
                                  "a-file is a file, not a directory"),
    "perplexity: unknown --convention": (lambda w, t: _ppl(w, t, "--convention", "mean"),
                                         "unknown convention 'mean'; choose one of tokens, paper"),
    "perplexity: both --prompts-file and --text": (lambda w, t: _ppl(w, t, "--text", str(w / "corpus" / "doc.txt")),
                                                   "give exactly one of --prompts-file"),
    "perplexity: neither --prompts-file nor --text": (lambda w, t: _ppl(w, t, lines=None),
                                                      "give exactly one of --prompts-file"),
    "diagnose: a prompts file of blank lines": (lambda w, t: _diagnose(w, t, "--prompts-file", str(_lines(t, "", " "))),
                                                "prompts file is empty: "),
    "perplexity: a prompts file of blank lines (worded as diagnose)": (
        lambda w, t: _ppl(w, t, lines=("", " ")), "prompts file is empty: "),
    "perplexity: a blank line in the prompts file": (lambda w, t: _ppl(w, t, lines=("one text", "", "another")),
                                                     "line 2 is blank"),
    "perplexity: a prompt of 1 token": (lambda w, t: _ppl(w, t, lines=("one text", "x")),
                                        "texts.txt:2 has 1 token: it predicts nothing"),
    "perplexity: missing model": (lambda w, t: _ppl(w, t, model="nope"), "model path does not exist"),
    "perplexity: --seq-len with --prompts-file": (lambda w, t: _ppl(w, t, "--seq-len", "16"),
                                                  "--seq-len applies to --text only"),
    "drift: RUN_DIR not a repair output": (lambda w, t: ["drift", str(w / "model")], "is not a repair output"),
    "drift: RUN_DIR missing": (lambda w, t: ["drift", str(w / "nope")], "is not a directory"),
    "drift: run without diagnosed checkpoints": (lambda w, t: ["drift", str(_undiagnosed_run(w, t))],
                                                 "has no diagnosed checkpoint"),
    "drift: --json exists, no --overwrite": (lambda w, t: ["drift", str(w / "other-run"), "--json", str(_existing(t))],
                                             "already exists"),
    "drift: --trajectories in an unknown format": (lambda w, t: ["drift", str(w / "other-run"), "--trajectories",
                                                                 str(t / "t.xyz")], "cannot write a figure as .xyz"),
    "drift: negative --trend-threshold": (lambda w, t: ["drift", str(w / "other-run"), "--json", str(t / "d.json"),
                                                        "--trend-threshold", "-1"], "--trend-threshold -1.0: must be a finite number >= 0"),
    "compare --panels with one model only": (lambda w, t: ["compare", str(w / "diagnosis-a.json"), "--panels",
                                                           str(t / "p.png")], "at least one condition"),
    "compare three inputs without --panels": (lambda w, t: ["compare", *[str(w / "diagnosis-a.json")] * 3],
                                              "with --panels OUT.png"),
    "compare --panels with --panel-scale 0": (lambda w, t: ["compare", *[str(w / "diagnosis-a.json")] * 3, "--panels",
                                                            str(t / "p.png"), "--panel-scale", "0"],
                                              "--panel-scale 0.0: must be a finite number > 0"),
    "diagnose --histogram exists, no --overwrite": (lambda w, t: _diagnose(w, t, "--histogram", str(_existing(t))),
                                                    "already exists"),
    "--text-field the dataset lacks": (lambda w, t: _repair(w, t, "--text-field", "body",
                                                             corpus="../saved-dataset"),
                                       "has no column 'body' (columns: text); choose one with --text-field NAME"),
    "--split the dataset lacks": (lambda w, t: _repair(w, t, "--split", "validation", corpus="../saved-dataset-dict"),
                                  "has no split 'validation' (splits: train, test)"),
    "--split on a single dataset": (lambda w, t: _repair(w, t, "--split", "train", corpus="../saved-dataset"),
                                    "is a single dataset, without splits"),
    "dataset id not in the local cache": (lambda w, t: _bare_corpus(_repair(w, t), "no-user/no-such-corpus"),
                                          "nor is a dataset of that name in the local Hugging Face cache"),
    "--dormancy-threshold negative": (lambda w, t: _diagnose(w, t, "--dormancy-threshold", "-0.1"),
                                      "--dormancy-threshold -0.1: must be >= 0"),
    "--dormant-fraction 0": (lambda w, t: _diagnose(w, t, "--dormant-fraction", "0"),
                             "--dormant-fraction 0.0: must be in (0, 1]"),
    "--dormant-fraction above 1": (lambda w, t: _diagnose(w, t, "--dormant-fraction", "1.5"),
                                   "--dormant-fraction 1.5: must be in (0, 1]"),
    "diagnose --heatmap whose extremes figure exists": (lambda w, t: _diagnose(w, t, "--heatmap", _companion(t)),
                                                        "--heatmap (extremes) file already exists"),
    "generate without prompts": (lambda w, t: ["generate", str(w / "model"), "--out", str(t / "gen")], "no prompts"),
    "generate with --top-p 0": (lambda w, t: _generate(w, t, "--top-p", "0"), "--top-p 0.0: must be in (0, 1]"),
    "generate with a negative --temperature": (lambda w, t: _generate(w, t, "--temperature", "-1"),
                                               "--temperature -1.0: must be >= 0"),
    "generate with --max-new-tokens 0": (lambda w, t: _generate(w, t, "--max-new-tokens", "0"),
                                         "--max-new-tokens 0: must be >= 1"),
    "generate into a non-empty --out": (lambda w, t: _generate(w, t, out=_not_empty(t)), "is not empty"),
    "generate with a blank --prompt": (lambda w, t: _generate(w, t, "--prompt", " "), "prompt 0 is empty"),
    "generate --backend eager": (lambda w, t: _generate(w, t, "--backend", "eager"),
                                 "--backend must be auto, triton or torch for generate"),
    "compare across different prompt sets": (lambda w, t: ["compare", str(w / "diagnosis-a.json"),
                                                           str(w / "diagnosis-b.json")], "the prompt sets differ"),
}


def _snapshot(*roots: Path) -> dict:
    """Every file and directory under ``roots``: size, mtime and content hash."""
    seen = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                seen[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                seen[str(p)] = "dir"
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(case, world, tmp_path, forked_cli):
    if case == "--device cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make_args, needle = CASES[case]
    args = make_args(world, tmp_path)
    before = _snapshot(world, tmp_path)
    result = forked_cli.run(args, cwd=tmp_path)
    err = result.stderr.strip()
    assert result.returncode != 0, f"exit 0 for a bad input\n{result.stdout}\n{err}"
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err, err
    assert _snapshot(world, tmp_path) == before, "a file was created or modified"


def test_matrix_has_the_cases_the_issue_lists():
    assert len(CASES) >= 20


def test_debug_shows_the_traceback(world, tmp_path, forked_cli):
    result = forked_cli.run(["--debug", *_diagnose(world, tmp_path, model="truncated")], cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "is truncated" in result.stderr
    assert not (tmp_path / "report.json").exists()


def test_the_good_model_passes_the_same_checks(world, tmp_path, forked_cli):
    """The matrix's inputs are broken only where each case says: the untouched model diagnoses fine."""
    result = forked_cli.run(_diagnose(world, tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "report.json").read_text())["n_layer"] == 2

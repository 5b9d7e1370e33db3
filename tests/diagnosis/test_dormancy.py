"""MLP dormancy: in diagnose's JSON (loaded and streamed), through every family's adapter, and in repair reports
before and after; the figures recomputed here from the safetensors tensors, neuron by neuron."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from alibi_surgery.diagnosis.dormancy import checkpoint_dormancy, model_dormancy
from alibi_surgery.cli.main import main
from alibi_surgery.io.random_model import write_random_model

# family shape -> (up, down) tensor names of layer {i} in the checkpoint
NAMES = {"tiny": ("h.{i}.mlp.dense_h_to_4h.weight", "h.{i}.mlp.dense_4h_to_h.weight"),
         "tiny-mpt": ("blocks.{i}.ffn.up_proj.weight", "blocks.{i}.ffn.down_proj.weight"),
         "tiny-falcon": ("h.{i}.mlp.dense_h_to_4h.weight", "h.{i}.mlp.dense_4h_to_h.weight")}


def _key(tensors: dict, name: str) -> str:
    return next(k for k in tensors if k.endswith(name) and k[: -len(name)] in ("", "transformer."))


def _shrink(model_dir, shape: str, seed: int = 0) -> None:
    """Make some neurons dormant: scale down chosen up rows, down columns, or both, by different amounts per
    layer (some products land just below 0.01, some just above)."""
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    g = torch.Generator().manual_seed(seed)
    for i in range(2):
        up, down = (_key(tensors, n.format(i=i)) for n in NAMES[shape])
        n = tensors[up].shape[0]
        picked = torch.randperm(n, generator=g)[: 40 + 30 * i]
        for j, neuron in enumerate(picked.tolist()):
            scale = [1e-3, 3e-3, 1e-2, 3e-2][j % 4]
            if j % 3 == 0:
                tensors[up][neuron] *= scale
            elif j % 3 == 1:
                tensors[down][:, neuron] *= scale
            else:
                tensors[up][neuron] *= scale ** 0.5
                tensors[down][:, neuron] *= scale ** 0.5
    save_file(tensors, file, metadata={"format": "pt"})


def _expected(model_dir, shape: str, threshold: float = 0.01) -> tuple[list[float], float]:
    """Per-layer share and total, one neuron at a time, in float64, straight from the file."""
    tensors = load_file(model_dir / "model.safetensors")
    shares, dormant, total = [], 0, 0
    for i in range(2):
        up, down = (tensors[_key(tensors, n.format(i=i))].double() for n in NAMES[shape])
        count = 0
        for neuron in range(up.shape[0]):
            w = math.sqrt(float((up[neuron] ** 2).sum())) * math.sqrt(float((down[:, neuron] ** 2).sum()))
            count += w < threshold
        shares.append(count / up.shape[0])
        dormant, total = dormant + count, total + up.shape[0]
    return shares, dormant / total


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dormancy")
    out = {}
    for k, shape in enumerate(NAMES):
        out[shape] = write_random_model(root / shape, shape, n_layer=2, seed=k)
        _shrink(out[shape], shape, seed=k)
    return out


@pytest.mark.parametrize("shape", list(NAMES))
def test_every_family_against_the_weights(models, shape):
    from alibi_surgery.io.loading import load_model

    shares, total = _expected(models[shape], shape)
    assert 0 < total < 0.2
    for got in (checkpoint_dormancy(models[shape]), model_dormancy(load_model(str(models[shape]))[0])):
        assert got["per_layer"] == pytest.approx(shares, abs=0) and got["total"] == pytest.approx(total, abs=1e-15)
        assert got["threshold"] == 0.01 and got["neurons"] == [512, 512]


def test_threshold_option_and_stream_in_diagnose_json(models, tmp_path):
    model = models["tiny"]
    prompt = ["--prompt", "a long enough prompt for the diagnosis to mean something at all"]
    base = ["diagnose", str(model), "--backend", "torch", "--quiet", *prompt]
    assert main([*base, "--json", str(tmp_path / "a.json")]) == 0
    assert main([*base, "--json", str(tmp_path / "s.json"), "--stream"]) == 0
    assert main([*base, "--json", str(tmp_path / "t.json"), "--dormancy-threshold", "0.05"]) == 0
    a, s, t = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ast")
    shares, total = _expected(model, "tiny")
    assert a["mlp_dormancy"]["per_layer"] == pytest.approx(shares, abs=0)
    assert a["mlp_dormancy"]["total"] == pytest.approx(total, abs=1e-15)
    assert s["mlp_dormancy"] == a["mlp_dormancy"]  # the streamed path gives the same field
    shares5, total5 = _expected(model, "tiny", 0.05)
    assert t["mlp_dormancy"]["threshold"] == 0.05 and t["mlp_dormancy"]["per_layer"] == pytest.approx(shares5, abs=0)
    assert total5 > total
    from alibi_surgery.diagnosis.report import read_report  # read back and written again: still top-level
    again = read_report(tmp_path / "a.json").to_dict()
    assert again["mlp_dormancy"] == a["mlp_dormancy"] and "mlp_dormancy" not in again["metadata"]


def test_repair_report_before_and_after(models, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = models["tiny"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(["the cat sat on a mat while dogs ran past the old barn"] * 8))
    from alibi_surgery.surgery.repair import RepairSettings, repair

    report = repair(model, tmp_path / "out", corpus=[str(corpus)], heads="0:1", device="cpu", backend="torch",
                    settings=RepairSettings(seq_len=16, batch_size=2, grad_accum=4, epochs=1, diag_max_length=16))
    shares, total = _expected(model, "tiny")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())["mlp_dormancy"]
    for when in ("before", "after"):  # surgery trains attention slices only: the MLPs are untouched
        assert saved[when]["per_layer"] == pytest.approx(shares, abs=0) and saved[when]["total"] == report[
            "mlp_dormancy"][when]["total"]
    assert "MLP dormancy" in (tmp_path / "out" / "report.md").read_text()

"""Safe loading: only safetensors are ever read, pickle is refused with how to convert it, remote code never runs.

The traps are real: a ``pytorch_model.bin`` whose unpickling writes a marker file, and a config/tokenizer
``auto_map`` naming a module whose import writes one. Every loading path (in memory, streamed, the surgery's
checkpoints) must leave the markers absent.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from alibi_surgery.errors import UsageError
from alibi_surgery.io.loading import load_bloom, load_tokenizer, resolve_model_dir
from alibi_surgery.io.random_model import write_random_bloom
from alibi_surgery.diagnosis.stream import CheckpointIndex

PACKAGE = Path(__file__).resolve().parents[2]


class _Trap:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_bloom(tmp_path_factory.mktemp("safe") / "tiny", "tiny", n_layer=2)


def _with_pickle_trap(model: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(model, dest)
    marker = dest.parent / f"{dest.name}-unpickled"
    with open(dest / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"transformer.h.0.input_layernorm.weight": _Trap(marker)}, fh)
    return dest, marker


def test_the_pickle_trap_is_armed(model, tmp_path):
    """The trap really runs code when unpickled, so the tests below could fail."""
    _, marker = _with_pickle_trap(model, tmp_path / "armed")
    with open(tmp_path / "armed" / "pytorch_model.bin", "rb") as fh:
        pickle.load(fh)  # noqa: S301 - deliberately, to prove the trap fires
    assert marker.read_text() == "unpickled"


def test_a_pickle_beside_safetensors_is_never_opened(model, tmp_path):
    path, marker = _with_pickle_trap(model, tmp_path / "both")
    net, _ = load_bloom(str(path), device="cpu")
    CheckpointIndex(path).load(["h.0.input_layernorm.weight"], "cpu", net.dtype)
    assert not marker.exists()


def test_pickle_only_is_refused_with_how_to_convert(model, tmp_path):
    path, marker = _with_pickle_trap(model, tmp_path / "pickle-only")
    for f in path.glob("*.safetensors"):
        f.unlink()
    for load in (lambda: load_bloom(str(path), device="cpu"), lambda: CheckpointIndex(path)):
        with pytest.raises(UsageError, match=r"only pickle weights \(\.bin\), which are refused: convert them to "
                                             r"safetensors first .*safe_serialization=True"):
            load()
    assert not marker.exists()


def _with_remote_code(model: Path, dest: Path, where: str) -> tuple[Path, Path]:
    """A copy whose config.json or tokenizer_config.json names custom code that writes a marker on import."""
    shutil.copytree(model, dest)
    marker = dest.parent / f"{dest.name}-imported"
    (dest / "evil_code.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                       "from transformers import BloomForCausalLM as EvilModel\n"
                                       "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    file = dest / ("config.json" if where == "config" else "tokenizer_config.json")
    data = json.loads(file.read_text())
    data["auto_map"] = ({"AutoModelForCausalLM": "evil_code.EvilModel", "AutoConfig": "evil_code.EvilModel"}
                        if where == "config" else {"AutoTokenizer": ["evil_code.EvilTokenizer", None]})
    file.write_text(json.dumps(data))
    return dest, marker


def test_remote_code_in_config_is_never_run(model, tmp_path):
    path, marker = _with_remote_code(model, tmp_path / "config-code", "config")
    net, _ = load_bloom(str(path), device="cpu")
    assert type(net).__name__ == "BloomForCausalLM"  # transformers' own class, whatever auto_map says
    assert not marker.exists()


def test_remote_code_in_tokenizer_config_is_refused(model, tmp_path):
    path, marker = _with_remote_code(model, tmp_path / "tokenizer-code", "tokenizer")
    with pytest.raises(UsageError, match="custom code .*never run"):
        load_tokenizer(str(path))
    assert not marker.exists()


def test_no_unsafe_loading_call_in_the_package():
    """No pickle deserialisation and no trust_remote_code=True anywhere in the package or the kernels."""
    unsafe = re.compile(r"torch\.load\(|pickle\.loads?\(|trust_remote_code\s*=\s*True|weights_only\s*=\s*False")
    hits = [f"{p.relative_to(PACKAGE)}:{n}" for d in ("alibi_surgery", "kernels") for p in (PACKAGE / d).rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1) if unsafe.search(line)]
    assert not hits, hits


def test_resolve_model_dir_needs_safetensors(model, tmp_path):
    shutil.copytree(model, tmp_path / "none")
    for f in (tmp_path / "none").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UsageError, match="no safetensors weights"):
        resolve_model_dir(str(tmp_path / "none"))

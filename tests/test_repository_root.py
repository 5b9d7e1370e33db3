"""The repository root is safe to work in: nothing there shadows an installed package.

transformers (5.25 and later) imports Hugging Face's ``kernels`` package; a regular package named ``kernels`` at the
root (this project's kernels folder with an ``__init__.py``) would be imported instead whenever the root is first on
``sys.path``, as it is for ``python -c``, ``python -m`` and a notebook started there. Each check runs a fresh
interpreter with the root as its working directory.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_top_level_package_named_kernels():
    assert (ROOT / "kernels").is_dir(), "the layout names a top-level kernels/ folder"
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes the folder shadow HF's kernels"


def test_transformers_builds_a_model_from_the_root():
    code = ("import transformers; from transformers import BloomForCausalLM, BloomConfig; "
            "BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=64, n_head=4)); "
            "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec.origin)")
    done = _run("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    try:
        import importlib.metadata as metadata
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:  # transformers < 5.25 does not need it: the folder is a namespace portion
        return
    assert "site-packages" in done.stdout, f"'import kernels' from the root found {done.stdout.strip()}"


@pytest.mark.parametrize("args", [["-m", "alibi_surgery.demo.reproduce", "--help"], ["-m", "alibi_surgery", "--help"],
                                  ["-m", "alibi_surgery.cli", "--version"]])
def test_modules_run_from_the_root(args):
    done = _run(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), "printed nothing"


def test_package_kernels_come_from_the_kernels_folder():
    done = _run("-c", "import alibi_surgery.kernels.ops as o; print(o.__file__)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert pathlib.Path(done.stdout.strip()).resolve() == (ROOT / "kernels" / "ops.py").resolve()

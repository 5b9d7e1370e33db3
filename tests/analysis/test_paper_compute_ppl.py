"""``perplexity --prompts-file held.jsonl --convention paper`` equals the paper code's own ``compute_ppl`` on the same
multi-line texts, to 1e-5 relative.

The paper's function is read from a fetched copy of its repository (never copied into this project): the directory
named by ALIBI_SURGERY_PAPER_REPO (a checkout, or a bare git directory), else the project's mirror; its
``evaluation/evaluate_epoch3.py`` is parsed with ``ast``, the ``compute_ppl`` definition alone is executed with
torch and math, and run on the demo model. Skipped, with the reason, where no copy is available.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from alibi_surgery.cli import main

MIRROR = "/work/.mirror/Palmerschallon+bloom-head-surgery/repo"
SOURCE = "evaluation/evaluate_epoch3.py"

# texts written for this test: newlines, a blank line and indentation inside texts, as the paper's held-out set has
TEXTS = [
    "fn area(w: u32, h: u32) -> u32 {\n    w * h\n}",
    "The tide came in slowly.\n\nBy noon the causeway was under water, and the island was an island again.",
    "SELECT name\nFROM towns\nWHERE river IS NOT NULL;",
    "A short line of prose, all on one line.",
]


def _paper_source() -> str:
    where = os.environ.get("ALIBI_SURGERY_PAPER_REPO") or MIRROR
    root = Path(where)
    if (root / SOURCE).is_file():
        return (root / SOURCE).read_text(encoding="utf-8")
    if root.is_dir():
        result = subprocess.run(["git", f"--git-dir={root}", "show", f"HEAD:{SOURCE}"], capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout
    pytest.skip(f"no copy of the paper's repository with {SOURCE} at {where} (set ALIBI_SURGERY_PAPER_REPO)")


def _compute_ppl():
    """The paper's ``compute_ppl``, its definition alone, executed with torch and math in scope."""
    tree = ast.parse(_paper_source())
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compute_ppl"), None)
    if node is None:
        pytest.skip(f"{SOURCE} of the paper's repository defines no compute_ppl")
    namespace = {"torch": torch, "math": math}
    exec(compile(ast.Module([node], type_ignores=[]), SOURCE, "exec"), namespace)
    return namespace["compute_ppl"]


def test_paper_convention_equals_the_paper_codes_compute_ppl_on_multi_line_texts(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alibi_surgery import demo

    compute_ppl = _compute_ppl()
    model_dir = demo.model_dir()
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "ppl.json"
    assert main(["perplexity", str(model_dir), "--prompts-file", str(held), "--convention", "paper", "--json",
                 str(out), "--device", "cpu", "--dtype", "float32", "--quiet"]) == 0
    ours = json.loads(out.read_text())["models"][0]
    assert len(ours["prompts"]) == len(TEXTS)  # each multi-line text scored as one

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    paper, per_prompt = compute_ppl(model, tokenizer, "cpu", TEXTS)
    assert [p["tokens"] for p in per_prompt] == [p["tokens"] for p in ours["prompts"]]
    assert ours["perplexity"] == pytest.approx(paper, rel=1e-5)
    # and the same texts as a .json list give the same figure
    (tmp_path / "held.json").write_text(json.dumps(TEXTS))
    assert main(["perplexity", str(model_dir), "--prompts-file", str(tmp_path / "held.json"), "--convention",
                 "paper", "--json", str(tmp_path / "b.json"), "--device", "cpu", "--dtype", "float32", "--quiet"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["models"][0]["perplexity"] == \
        pytest.approx(ours["perplexity"], rel=1e-12)

"""What a repair pass was started from, so that ``resume`` continues that run and no other.

``fingerprint(model_path, job)`` is recorded in ``OUT/run.json`` when a pass starts; ``resume`` (and resuming a
finished run) recomputes it and refuses any difference (:func:`differences`), naming the input and both values. It
covers every input that shapes the run, beside the settings (compared on their own, from the checkpoints):

* ``model``: the input model directory's content (:func:`path_digest`: every non-hidden file, weights, config and
  tokenizer);
* ``corpus``, ``eval_text``: the content of every file or dataset directory the spec names (their paths may move),
  and the corpus's reading options (``text_field``, ``split``, ``eos``, ``max_tokens``);
* ``eval_prompts`` and ``prompts`` (the diagnosis prompts): a digest of the texts;
* the plan options ``heads``, ``band``, ``layers``, ``freeze``, ``include``, ``allow_empty`` and ``report`` (a
  report file's content, or an in-memory report's JSON); ``dtype``, ``save_dtype`` and the functional measurement's
  ``ablation_draws``, ``ablation_texts``, ``ablation_bootstrap``; ``distributed`` (an FSDP2 run's checkpoints hold
  the heads only: they resume under FSDP2, at any world size).

``device``, ``backend``, ``progress`` and ``budget`` may change between a run and its resumption (a run stopped on
one GPU continues on another). Limits: a file larger than :data:`FULL_BYTES` is digested from its size and
:data:`BLOCKS` evenly spaced blocks of :data:`BLOCK` bytes (two checkpoints of one shape differ there almost surely,
but a change confined to the bytes between blocks is not seen); a run recorded before fingerprints existed resumes
unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["fingerprint", "differences", "path_digest", "FULL_BYTES", "BLOCKS", "BLOCK"]

FULL_BYTES = 64 << 20  # files up to this size are hashed whole
BLOCKS, BLOCK = 64, 1 << 16  # larger ones: 64 blocks of 64 KiB, evenly spaced, and the size


def _file_digest(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        if size <= FULL_BYTES:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
            return
        for i in range(BLOCKS):
            fh.seek((size - BLOCK) * i // (BLOCKS - 1))
            h.update(fh.read(BLOCK))


def path_digest(path) -> str:
    """``sha256:<hex>`` of a file's content, or of a directory's non-hidden files (their relative names and
    contents, in sorted order); module docstring for large files."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        _file_digest(path, h)
    else:
        for f in sorted(p for p in path.rglob("*") if p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)):
            h.update(os.fsencode(f.relative_to(path).as_posix()) + b"\0")
            _file_digest(f, h)
    return "sha256:" + h.hexdigest()


def _texts_digest(texts) -> str | None:
    if texts is None:
        return None
    return "sha256:" + hashlib.sha256(json.dumps([str(t) for t in texts]).encode()).hexdigest()


def _corpus(spec) -> tuple[str | None, dict]:
    """(content digest, reading options) of a corpus spec (None: no corpus)."""
    from ..io.corpus import CorpusSpec, corpus_files
    from ..io.hf_datasets import dataset_kind

    if spec is None:
        return None, {}
    spec = CorpusSpec.of(spec)
    files = [p for p in spec.paths if dataset_kind(p) is None]
    sources = [Path(p) for p in spec.paths if dataset_kind(p) is not None] + (corpus_files(files) if files else [])
    h = hashlib.sha256()
    for source in sources:
        h.update(path_digest(source).encode())
    return "sha256:" + h.hexdigest(), spec.options()


def _report(report) -> str | None:
    if report is None:
        return None
    if isinstance(report, (str, Path)):
        return path_digest(report)
    return "sha256:" + hashlib.sha256(json.dumps(report.to_dict(), sort_keys=True).encode()).hexdigest()


def fingerprint(model_path, job) -> dict:
    """The inputs of a pass (module docstring) as a flat dict of JSON values."""
    corpus, options = _corpus(job.run.corpus)
    eval_text, _ = _corpus(job.run.eval_text)
    plan, run = job.plan, job.run
    return {"model": path_digest(model_path), "corpus": corpus, **options, "eval_text": eval_text,
            "eval_prompts": _texts_digest(run.eval_prompts), "prompts": _texts_digest(job.prompts()),
            "heads": plan.heads, "band": plan.band, "layers": plan.layers, "freeze": plan.freeze,
            "include": plan.include, "allow_empty": plan.allow_empty, "report": _report(plan.report),
            "dtype": run.dtype, "save_dtype": run.save_dtype, "ablation_draws": run.ablation_draws,
            "ablation_texts": run.ablation_texts, "ablation_bootstrap": run.ablation_bootstrap,
            "distributed": run.distributed}


def _show(value) -> str:
    if isinstance(value, str):
        return value[:19] + "…" if value.startswith("sha256:") else value
    return repr(value)


def differences(saved: dict | None, now: dict) -> list[str]:
    """``name=then (now now)`` for each input whose recorded value differs (digests shortened); none for a run
    recorded without a fingerprint."""
    if not saved:
        return []
    return [f"{k}={_show(saved.get(k))} (now {_show(now[k])})" for k in now if saved.get(k, now[k]) != now[k]]

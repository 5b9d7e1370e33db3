"""Training text for surgery: files, directories or globs, tokenised with the model's tokenizer and packed.

``load_corpus(specs, tokenizer, seq_len)`` reads every ``.txt``/``.md``/... text file named (directories are walked,
globs expanded, hidden files skipped), tokenises each file as the tokenizer frames a text (BLOOM's adds nothing; one
that prefixes ``<s>`` gets it at the start of every file), joins them with the tokenizer's EOS token, and cuts the
stream into ``[n_chunks, seq_len]`` int64 rows (the tail shorter than ``seq_len`` is dropped). Files are read by
:func:`~alibi_surgery.io.files.read_text` (UTF-8, a byte-order mark dropped; anything else a one-line error with
the byte offset). A ``.jsonl`` file is one document per line
(``{"text": ...}``, or the ``text_field`` of a :class:`CorpusSpec`). Order is sorted by path, so a corpus packs identically on
every run.

Datasets (:mod:`alibi_surgery.io.hf_datasets`) come before the text files, in the order named: a directory written by
``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``), a ``.parquet`` or ``.arrow`` file, or the id of a
dataset already in the local Hugging Face cache; a :class:`CorpusSpec` carries the column to read (``text_field``)
and the split. The documents of a dataset are the strings of that column, in row order, so the same documents as a
``.jsonl`` file and as a dataset pack to the same rows.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path

import torch

from ..errors import UsageError
from .files import read_lines, read_text

__all__ = ["CorpusSpec", "corpus_files", "corpus_documents", "load_corpus", "pack_text", "read_documents"]

@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Corpus paths (files, directories, globs, datasets) and how to read the datasets among them."""

    paths: tuple[str, ...]
    text_field: str = "text"
    split: str | None = None

    @classmethod
    def of(cls, specs) -> "CorpusSpec":
        if isinstance(specs, CorpusSpec):
            return specs
        return cls(tuple(str(s) for s in ([specs] if isinstance(specs, (str, Path)) else specs)))


TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".jsonl", ".json", ".csv", ".tsv", ".py", ".html", ""}


def corpus_files(specs) -> list[Path]:
    """Expand files, directories (recursively, text suffixes only) and globs into a sorted list of files."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    files: set[Path] = set()
    for spec in specs:
        spec = str(spec)
        matches = [Path(p) for p in sorted(glob.glob(spec, recursive=True))] if glob.has_magic(spec) else [Path(spec)]
        if not matches or not all(m.exists() for m in matches):
            raise UsageError(f"corpus path does not exist: {spec}")
        for m in matches:
            if m.is_dir():
                files.update(p for p in m.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                             and not any(part.startswith(".") for part in p.relative_to(m).parts))
            elif m.is_file():
                files.add(m)
    if not files:
        raise UsageError(f"the corpus holds no text files: {', '.join(map(str, specs))}")
    return sorted(files)


def read_documents(path, *, what: str = "corpus file", field: str = "text") -> list[str]:
    """The documents of one file: a ``.jsonl`` file holds one ``{field: ...}`` object per line (``{"text": ...}`` by
    default), any other file is one document."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        return [read_text(path, what=what)]
    docs = []
    for n, line in enumerate(read_lines(path, what=what), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{n} is not a JSON line") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise UsageError(f'{path}:{n} has no "{field}" string')
        docs.append(row[field])
    return docs


def pack_text(texts: list[str], tokenizer, seq_len: int, *, what: str = "corpus") -> torch.Tensor:
    """Tokenise ``texts``, join them with EOS and cut into ``[n, seq_len]`` rows; error if not one row fits."""
    if seq_len < 2:
        raise UsageError(f"seq_len={seq_len}: must be at least 2")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        if not text.strip():
            continue
        ids = tokenizer(text)["input_ids"]  # with the tokenizer's own framing (a <s> prefix, if it adds one)
        if eos is not None and ids and ids[-1] == eos:
            ids = ids[:-1]
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    if not stream:
        raise UsageError(f"the {what} is empty: its files hold no text")
    n = len(stream) // seq_len
    if n == 0:
        raise UsageError(f"the {what} is too short: {len(stream)} tokens, fewer than one chunk of "
                         f"seq_len={seq_len}")
    return torch.tensor(stream[:n * seq_len], dtype=torch.int64).view(n, seq_len)


def corpus_documents(specs, *, what: str = "corpus", walk: bool = True) -> tuple[list[str], list]:
    """The documents of ``specs`` (paths or a :class:`CorpusSpec`) and where they came from: datasets first, in the
    order named, then the text files (``walk``: directories and globs expanded as :func:`corpus_files` does; else
    each path must be one file, as ``--eval-text`` is)."""
    from .hf_datasets import dataset_kind, dataset_texts

    spec = CorpusSpec.of(specs)
    docs, sources, files = [], [], []
    for path in spec.paths:
        kind = dataset_kind(path)
        if kind is None:
            files.append(path)
            continue
        docs += dataset_texts(path, kind, spec.text_field, spec.split, what=what)
        sources.append(path)
    if files:
        paths = corpus_files(files) if walk else [Path(f) for f in files]
        docs += [d for f in paths for d in read_documents(f, what="corpus file" if walk else what,
                                                          field=spec.text_field)]
        sources += paths
    return docs, sources


def load_corpus(specs, tokenizer, seq_len: int, *, what: str = "corpus") -> tuple[torch.Tensor, list]:
    """Packed ``[n_chunks, seq_len]`` token rows and the files and datasets they came from."""
    docs, sources = corpus_documents(specs, what=what)
    return pack_text(docs, tokenizer, seq_len, what=what), sources

"""Training text for surgery: files, directories or globs, tokenised with the model's tokenizer and packed.

``load_corpus(specs, tokenizer, seq_len)`` reads every ``.txt``/``.md``/... text file named (directories are walked,
globs expanded, hidden files skipped), tokenises each file as the tokenizer frames a text (BLOOM's adds nothing; one
that prefixes ``<s>`` gets it at the start of every file), joins them with the tokenizer's EOS token, and cuts the
stream into ``[n_chunks, seq_len]`` int64 rows (the tail shorter than ``seq_len`` is dropped). Files are read by
:func:`~alibi_surgery.io.files.read_text` (UTF-8, a byte-order mark dropped; anything else a one-line error with
the byte offset). A ``.jsonl`` file is one document per line
(``{"text": ...}``). Order is sorted by path, so a corpus packs identically on
every run.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch

from ..errors import UsageError
from .files import read_lines, read_text

__all__ = ["corpus_files", "load_corpus", "pack_text", "read_documents"]

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


def read_documents(path, *, what: str = "corpus file") -> list[str]:
    """The documents of one file: a ``.jsonl`` file holds one ``{"text": ...}`` object per line, any other file is
    one document."""
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
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UsageError(f'{path}:{n} has no "text" string')
        docs.append(row["text"])
    return docs


def pack_text(texts: list[str], tokenizer, seq_len: int, *, what: str = "corpus") -> torch.Tensor:
    """Tokenise ``texts``, join them with EOS and cut into ``[n, seq_len]`` rows; error if not one row fits."""
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
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
        raise UsageError(f"the {what} is too short: {len(stream)} tokens, fewer than one chunk of --seq-len {seq_len}")
    return torch.tensor(stream[:n * seq_len], dtype=torch.int64).view(n, seq_len)


def load_corpus(specs, tokenizer, seq_len: int, *, what: str = "corpus") -> tuple[torch.Tensor, list[Path]]:
    """Packed ``[n_chunks, seq_len]`` token rows and the files they came from."""
    files = corpus_files(specs)
    return pack_text([d for f in files for d in read_documents(f)], tokenizer, seq_len, what=what), files

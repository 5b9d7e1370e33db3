"""Training text for surgery: files, directories, globs and datasets, tokenised with the model's tokenizer and packed.

``load_corpus(specs, tokenizer, seq_len)`` reads every ``.txt``/``.md``/... text file named (directories are walked,
globs expanded, hidden files skipped), tokenises each document as the tokenizer frames a text (BLOOM's adds nothing;
one that prefixes ``<s>`` gets it at the start of every document), ends each with the tokenizer's EOS token (unless
the :class:`CorpusSpec` says ``eos=False``), and cuts the stream into ``[n_chunks, seq_len]`` int64 rows (the tail
shorter than ``seq_len`` is dropped). Documents are read by :func:`~alibi_surgery.io.texts.read_texts`, the reader of
every text list: a ``.jsonl`` file is one document per line (``{"text": ...}``, or the ``text_field`` of the
:class:`CorpusSpec`), a ``.json`` file a list of documents (strings, or objects with the field), any other file one
document (UTF-8, a byte-order mark dropped; anything else a one-line error with the byte offset). Order is sorted by
path, so a corpus packs identically on every run.

Datasets (:mod:`alibi_surgery.io.hf_datasets`) come before the text files, in the order named: a directory written by
``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``), a ``.parquet`` or ``.arrow`` file, or the id of a
dataset already in the local Hugging Face cache; a :class:`CorpusSpec` carries the column to read (``text_field``)
and the split. The documents of a dataset are the strings of that column, in row order, so the same documents as a
``.jsonl`` file and as a dataset pack to the same rows.

Framing (``CorpusSpec.eos``): ``True`` (the default) ends every document with EOS, so the model sees where one
document stops; ``False`` joins documents with nothing but the tokenizer's own framing, for a model whose
pre-training never showed it EOS (the demo's rows are ``<s>`` + bytes, never ``</s>``: a corpus that adds ``</s>``
teaches it a new token and scores that token in the held-out figure). With ``eos=False`` and a tokenizer that adds
nothing (BLOOM's), documents run into each other.

``CorpusSpec.max_tokens``: only the first N tokens of the stream, in order (as the paper capped C4): sources are
read one after the other and reading stops once N tokens are packed, so a large dataset or directory is only read
as far as needed (a dataset is read in batches of rows; a file is read whole). Limits: the packed stream is held
in memory.
"""

from __future__ import annotations

import dataclasses
import glob
import warnings
from pathlib import Path

import torch

from ..errors import UsageError
from .texts import read_texts

__all__ = ["CorpusSpec", "corpus_files", "corpus_documents", "iter_documents", "load_corpus", "pack_text",
           "read_documents"]


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Corpus paths (files, directories, globs, datasets), how to read them and how to pack them: ``text_field`` (the
    documents' field in ``.jsonl``/``.json`` files, their column in datasets), ``split`` (of a dataset with several),
    ``eos`` (end every document with EOS; see the module docstring) and ``max_tokens`` (pack only the first N tokens
    of the corpus; None: all of it)."""

    paths: tuple[str, ...]
    text_field: str = "text"
    split: str | None = None
    eos: bool = True
    max_tokens: int | None = None

    def __post_init__(self):
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise UsageError(f"max_tokens={self.max_tokens}: must be a whole number of tokens >= 1")

    @classmethod
    def of(cls, specs) -> "CorpusSpec":
        if isinstance(specs, CorpusSpec):
            return specs
        return cls(tuple(str(s) for s in ([specs] if isinstance(specs, (str, Path)) else specs)))

    def options(self) -> dict:
        """How the corpus was read and packed (everything but the paths), for a run's record."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "paths"}


TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".jsonl", ".json", ".csv", ".tsv", ".py", ".html", ""}


def corpus_files(specs) -> list[Path]:
    """Expand files, directories (recursively, text suffixes only) and globs into a sorted list of files. A file
    named twice (the same path twice, a file and its directory, overlapping globs) is read once, with a warning."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    files: dict[Path, tuple[Path, str]] = {}  # resolved file -> (the path as first named, the spec that named it)
    for spec in specs:
        spec = str(spec)
        matches = [Path(p) for p in sorted(glob.glob(spec, recursive=True))] if glob.has_magic(spec) else [Path(spec)]
        if not matches or not all(m.exists() for m in matches):
            raise UsageError(f"corpus path does not exist: {spec}")
        for m in matches:
            found = sorted(p for p in m.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(m).parts)) if m.is_dir() \
                else [m] if m.is_file() else []
            for path in found:
                real = path.resolve()
                if real in files:
                    first = files[real][1]
                    warnings.warn(f"corpus file {path} is named twice ({first}{'' if first == spec else ', ' + spec})"
                                  f": it is read once", stacklevel=2)
                    continue
                files[real] = (path, spec)
    if not files:
        raise UsageError(f"the corpus holds no text files: {', '.join(map(str, specs))}")
    return sorted(path for path, _ in files.values())


def read_documents(path, *, what: str = "corpus file", field: str = "text") -> list[str]:
    """The documents of one file (:func:`~alibi_surgery.io.texts.read_texts` with ``plain="whole"``): a ``.jsonl``
    file holds one ``{field: ...}`` object per line, a ``.json`` file a list of them (or of strings), any other file
    is one document."""
    return read_texts(path, field=field, what=what, plain="whole")


def iter_documents(specs, *, what: str = "corpus", walk: bool = True):
    """Yield ``(document, source)`` for every document of ``specs`` (paths or a :class:`CorpusSpec`), in order:
    datasets first, in the order named, then the text files (``walk``: directories and globs expanded as
    :func:`corpus_files` does; else each path must be one file, as ``--eval-text`` is). Every path is checked
    before the first document; each source is read only when the documents before it have been consumed."""
    from .hf_datasets import dataset_kind, iter_dataset_texts

    spec = CorpusSpec.of(specs)
    kinds = [(path, dataset_kind(path)) for path in spec.paths]
    files = [path for path, kind in kinds if kind is None]
    paths = (corpus_files(files) if walk else [Path(f) for f in files]) if files else []
    for path, kind in kinds:
        if kind is not None:
            for doc in iter_dataset_texts(path, kind, spec.text_field, spec.split, what=what):
                yield doc, path
    for path in paths:
        for doc in read_documents(path, what="corpus file" if walk else what, field=spec.text_field):
            yield doc, path


def corpus_documents(specs, *, what: str = "corpus", walk: bool = True) -> tuple[list[str], list]:
    """The documents of ``specs`` (see :func:`iter_documents`) and the sources they came from, each named once."""
    docs, sources = [], []
    for doc, source in iter_documents(specs, what=what, walk=walk):
        docs.append(doc)
        if not sources or sources[-1] != source:
            sources.append(source)
    return docs, sources


def pack_text(texts, tokenizer, seq_len: int, *, what: str = "corpus", eos: bool = True,
              max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise ``texts`` (any iterable of strings, consumed only as far as needed), end each with EOS (``eos``),
    keep the first ``max_tokens`` tokens (None: all) and cut into ``[n, seq_len]`` rows; error if not one row
    fits. Blank texts are skipped."""
    if seq_len < 2:
        raise UsageError(f"seq_len={seq_len}: must be at least 2")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"max_tokens={max_tokens}: must be a whole number of tokens >= 1")
    end = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        if not text.strip():
            continue
        ids = tokenizer(text)["input_ids"]  # with the tokenizer's own framing (a <s> prefix, if it adds one)
        if end is not None and ids and ids[-1] == end:
            ids = ids[:-1]
        stream.extend(ids)
        if eos and end is not None:
            stream.append(end)
        if max_tokens is not None and len(stream) >= max_tokens:
            del stream[max_tokens:]
            break
    if not stream:
        raise UsageError(f"the {what} is empty: its files hold no text")
    n = len(stream) // seq_len
    if n == 0:
        cap = f" (max_tokens={max_tokens})" if max_tokens is not None and len(stream) == max_tokens else ""
        raise UsageError(f"the {what} is too short: {len(stream)} tokens{cap}, fewer than one chunk of "
                         f"seq_len={seq_len}")
    return torch.tensor(stream[:n * seq_len], dtype=torch.int64).view(n, seq_len)


def load_corpus(specs, tokenizer, seq_len: int, *, what: str = "corpus", walk: bool = True
                ) -> tuple[torch.Tensor, list]:
    """Packed ``[n_chunks, seq_len]`` token rows and the files and datasets they came from (with ``max_tokens``,
    those read before the cap was reached), framed and capped as the :class:`CorpusSpec` says."""
    spec = CorpusSpec.of(specs)
    sources: list = []

    def documents():
        for doc, source in iter_documents(spec, what=what, walk=walk):
            if not sources or sources[-1] != source:
                sources.append(source)
            yield doc

    chunks = pack_text(documents(), tokenizer, seq_len, what=what, eos=spec.eos, max_tokens=spec.max_tokens)
    return chunks, sources

"""Corpora from Hugging Face ``datasets``, read offline: the documents are one string column of a table.

Sources (:func:`dataset_kind` tells them apart; anything else is a text file or directory for
:mod:`~alibi_surgery.io.corpus`):

* ``saved``: a directory written by ``Dataset.save_to_disk`` (``state.json`` and ``dataset_info.json``) or
  ``DatasetDict.save_to_disk`` (``dataset_dict.json``), read with ``datasets.load_from_disk`` (memory-mapped);
* ``parquet``: a ``.parquet`` file, read with pyarrow;
* ``arrow``: a ``.arrow`` file, Arrow IPC in the stream format that ``datasets`` writes or the file format;
* ``hub``: a name that is no existing path, such as ``allenai/c4`` or ``allenai/c4:en`` (``NAME[:CONFIG]``), loaded
  with ``datasets.load_dataset`` in offline mode from what the local Hugging Face cache already holds.

Nothing is ever downloaded: ``datasets`` and ``huggingface_hub`` run with their offline switches on while a dataset is
read (the previous values come back afterwards), so a dataset that is not cached is a one-line error. ``split``
chooses the split of a ``DatasetDict`` directory or a cached dataset (default: ``train`` when there is one, else the
only split); files and single-table directories have no splits and refuse it. Every value of the column must be a
string (an empty one is skipped when packing, as an empty file is). Rows are read in batches
(:func:`iter_dataset_texts`), so a corpus capped at ``max_tokens`` stops reading early; ``.arrow`` files are
memory-mapped, ``.parquet`` files read by row group.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from ..errors import UsageError

__all__ = ["dataset_kind", "dataset_texts", "iter_dataset_texts", "offline"]

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".jsonl", ".json", ".csv", ".tsv", ".py", ".html"}


def dataset_kind(path) -> str | None:
    """``"saved"``, ``"parquet"``, ``"arrow"``, ``"hub"`` or None (not a dataset: a text file, directory or glob,
    or a missing path with a text file's suffix)."""
    p = Path(path)
    if p.is_dir():
        marks = {"state.json", "dataset_info.json", "dataset_dict.json"} & {c.name for c in p.iterdir()}
        return "saved" if "dataset_dict.json" in marks or {"state.json", "dataset_info.json"} <= marks else None
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        return suffix[1:]
    if p.exists() or suffix in _TEXT_SUFFIXES or not _ID.match(str(path)):
        return None
    return "hub"


@contextlib.contextmanager
def offline():
    """``datasets`` and ``huggingface_hub`` with their offline switches on inside the block."""
    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")  # read when the modules are first imported
    try:
        import datasets
        import huggingface_hub.constants as hub_constants
    except ImportError:
        raise UsageError("reading a dataset needs the datasets package: pip install datasets") from None
    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (hub_constants, "HF_HUB_OFFLINE")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in flags if hasattr(obj, name)]
    log = datasets.utils.logging
    verbosity, bars = log.get_verbosity(), datasets.is_progress_bar_enabled()
    try:
        for obj, name, _ in saved:
            setattr(obj, name, True)
        log.set_verbosity_error()  # no "using the latest cached version" lines, no progress bars
        datasets.disable_progress_bars()
        yield datasets
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        log.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
        for key, value in saved_env.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _pick_split(splits: list[str], split: str | None, where: str) -> str:
    if split is not None:
        if split not in splits:
            raise UsageError(f"{where} has no split {split!r} (splits: {', '.join(splits)}); choose one "
                             f"with split='NAME'")
        return split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise UsageError(f"{where} has several splits ({', '.join(splits)}); choose one with split='NAME'")


def _table(path: str, kind: str):
    """The pyarrow table of a ``.parquet`` or ``.arrow`` file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            return pq.read_table(path)
        with pa.memory_map(path) as source:
            try:
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except FileNotFoundError:
        raise UsageError(f"corpus path does not exist: {path}") from None
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{path} is not a readable .{kind} file: {str(exc).splitlines()[0]}") from None


_BATCH = 1024  # rows read at a time


def _load(path: str, kind: str, split: str | None):
    """``(columns, column -> iterator of row batches)`` of one dataset source."""
    if kind in ("parquet", "arrow"):
        if split is not None:
            raise UsageError(f"split={split!r}: {path} is a single table, without splits")
        if kind == "parquet":  # read in row batches, so that a capped corpus stops early
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                source = pq.ParquetFile(path)
            except FileNotFoundError:
                raise UsageError(f"corpus path does not exist: {path}") from None
            except (pa.ArrowException, OSError) as exc:
                raise UsageError(f"{path} is not a readable .parquet file: {str(exc).splitlines()[0]}") from None
            return source.schema_arrow.names, lambda field: (
                b.column(0).to_pylist() for b in source.iter_batches(batch_size=_BATCH, columns=[field]))
        table = _table(path, kind)  # memory-mapped
        return table.column_names, lambda field: (
            b.column(0).to_pylist() for b in table.select([field]).to_batches(max_chunksize=_BATCH))
    with offline() as datasets:
        if kind == "saved":
            data = datasets.load_from_disk(path)
        else:
            name, _, config = path.partition(":")
            try:
                data = datasets.load_dataset(name, config or None, download_mode="reuse_dataset_if_exists")
            except (OSError, ConnectionError, ValueError) as exc:  # not cached, or no such config
                raise UsageError(f"corpus path does not exist: {path} (nor is a dataset of that name in the local "
                                 f"Hugging Face cache: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                                 ) from None
    if isinstance(data, datasets.DatasetDict):
        data = data[_pick_split(list(data), split, path)]
    elif split is not None:
        raise UsageError(f"split={split!r}: {path} is a single dataset, without splits")
    return data.column_names, lambda field: (list(data[i:i + _BATCH][field]) for i in range(0, len(data), _BATCH))


def iter_dataset_texts(path, kind: str, text_field: str = "text", split: str | None = None, *,
                       what: str = "corpus"):
    """The strings of column ``text_field`` of one source, in row order, read a batch of rows at a time."""
    path = str(path)
    columns, batches = _load(path, kind, split)
    if text_field not in columns:
        raise UsageError(f"{what} {path} has no column {text_field!r} (columns: {', '.join(columns)}); choose one "
                         f"with text_field='NAME'")
    i = 0
    for batch in batches(text_field):
        for value in batch:
            if not isinstance(value, str):
                raise UsageError(f"{what} {path}: row {i} of column {text_field!r} is not a string "
                                 f"({type(value).__name__})")
            yield value
            i += 1


def dataset_texts(path, kind: str, text_field: str = "text", split: str | None = None, *,
                  what: str = "corpus") -> list[str]:
    """The strings of column ``text_field`` of one source, in row order (all of them)."""
    return list(iter_dataset_texts(path, kind, text_field, split, what=what))

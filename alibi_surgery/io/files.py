"""Every file the package reads from a user or writes for one goes through here.

Reading (:func:`read_text`, :func:`read_lines`): UTF-8, with or without a byte-order mark (the mark is dropped);
anything else is a one-line :class:`UsageError` naming the file and the byte offset of the first bad byte. Lines
split on ``\\n`` and ``\\r\\n`` only: a form feed, U+2028 or another Unicode line break inside a line stays in it.

Writing: :func:`check_output_paths` runs before any work (missing or unwritable directory, an existing file without
``--overwrite``, a directory, two options naming one file, an output that is an input, a figure format matplotlib
cannot write). :func:`atomic_write_bytes` writes a temporary file beside the target, syncs and renames it, so a
crash leaves the old file or the new one; the new file gets the mode a plain ``open`` would (0666 less the
umask). Text (:func:`atomic_write_text`) and figures (:func:`atomic_savefig`) go through it. :func:`replace_dir`
does the same for a whole directory, and :func:`filling` for files added to one; both give every file the umask's
mode, whatever the library that wrote it chose (safetensors writes 0600). Every ``OSError`` while writing becomes a
one-line :class:`WriteError` naming the path (:func:`writing`), and nothing partial is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UsageError, WriteError

__all__ = ["check_output_path", "check_output_paths", "figure_format", "atomic_write_text", "atomic_write_bytes",
           "atomic_savefig", "writing", "filling", "staged_dir", "replace_dir", "fsync_tree", "read_text", "read_lines",
           "file_mode"]

FIGURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "tif", "tiff", "eps", "ps")


def _input_file(path, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} is a directory, not a file: {path}")
    if not path.exists():
        raise UsageError(f"{what} does not exist: {path}")
    return path


def read_text(path, *, what: str = "input file") -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); one-line errors otherwise."""
    path = _input_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} cannot be read: {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UsageError(f"{what} is not UTF-8 text: {path}: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                         f"is invalid{hint}; convert it to UTF-8") from None


def read_lines(path, *, what: str = "input file") -> list[str]:
    """The lines of a UTF-8 file, split on ``\\n`` and ``\\r\\n`` only (no trailing empty line for a final
    newline)."""
    text = read_text(path, what=what)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def check_output_path(path, *, overwrite: bool = False, what: str = "output") -> Path:
    """Refuse, with a one-line error, an output whose directory is missing or which would replace a file."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{what} directory does not exist: {parent}")
    if path.is_dir():
        raise UsageError(f"{what} path is a directory: {path}")
    if path.exists() and not overwrite:
        raise UsageError(f"{what} file already exists: {path} (pass overwrite=True to replace it)")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what} directory is not writable: {parent}")
    (_NEW.discard if overwrite else _NEW.add)(_key(path))  # overwrite: replacing whatever is there is what was asked
    return path


_NEW: set = set()  # outputs checked as new (no overwrite): their first write must not replace a file


def _key(path: Path) -> str:
    return os.path.abspath(path)


def figure_format(path, what: str = "figure") -> str:
    """The image format a figure path asks for, from its suffix (none: PNG); refuses one matplotlib can't write."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    if suffix not in FIGURE_FORMATS:
        raise UsageError(f"{what} {path}: cannot write a figure as .{suffix}; use .png, .pdf, .svg or .jpg")
    return "jpeg" if suffix == "jpg" else "tiff" if suffix == "tif" else suffix


def check_output_paths(outputs: dict, *, overwrite: bool = False, inputs: dict | None = None,
                       figures: tuple = ("heatmap",)) -> dict:
    """:func:`check_output_path` for each ``{option: path}`` (None values skipped), then refuse two options naming
    one file, an output that is one of ``inputs`` (``{label: path}``), and a figure (``figures`` names those
    options) in a format matplotlib cannot write. Returns ``{option: Path}``."""
    checked = {k: check_output_path(v, overwrite=overwrite, what=f"--{k}") for k, v in outputs.items() if v}
    seen: dict[Path, str] = {}
    for key, path in checked.items():
        real = path.resolve()
        if real in seen:
            raise UsageError(f"--{seen[real]} and --{key} name the same file: {path}")
        seen[real] = key
        for label, given in (inputs or {}).items():
            if given is not None and Path(given).is_file() and Path(given).resolve() == real:
                raise UsageError(f"--{key} would overwrite input {label}: {path}")
        if key in figures:
            figure_format(path, what=f"--{key}")
    return checked


def file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0666 less the process umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def writing(path, what: str = "output"):
    """Turn any ``OSError`` raised inside the block into a one-line :class:`WriteError` naming ``path`` (or the
    file the OS names)."""
    from safetensors import SafetensorError  # its writer reports a failed write as this, not as OSError

    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        where = exc.filename or path
        raise WriteError(f"cannot write {what} {where}: {exc.strerror or exc}") from exc
    except SafetensorError as exc:
        text = str(exc)
        if "I/O error" not in text:
            raise
        raise WriteError(f"cannot write {what} {path}: {text.split('I/O error: ', 1)[-1]}") from exc


@contextlib.contextmanager
def filling(directory, what: str = "directory"):
    """Write files into the existing ``directory`` inside the block; if the block fails (any exception, Ctrl-C
    included) remove every entry it added, so nothing partial is left, and report an ``OSError`` as a
    :class:`WriteError`."""
    directory = Path(directory)
    before = set(os.listdir(directory))
    try:
        with writing(directory, what):
            yield directory
            mode = file_mode()
            for name in set(os.listdir(directory)) - before:
                for path in [directory / name, *(directory / name).rglob("*")]:
                    if path.is_file() and not path.is_symlink():
                        os.chmod(path, mode)
    except BaseException:
        for name in set(os.listdir(directory)) - before:
            entry = directory / name
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        raise


def _place(tmp: str, path: Path) -> None:
    """Move the finished ``tmp`` to ``path``. An output checked as new by :func:`check_output_path` is created
    exclusively (a hard link, which fails if the name exists): a file another run wrote there meanwhile is kept and
    this write is refused. Later writes of the same path by this process replace it."""
    key = _key(path)
    if key not in _NEW:
        os.replace(tmp, path)
        return
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this filesystem: create exclusively, then fill it by rename
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.replace(tmp, path)
        else:
            os.unlink(tmp)
    except FileExistsError:
        raise WriteError(f"{path} appeared while this run was working (another run wrote it?); it was not "
                         f"replaced: rerun with overwrite (--overwrite) or another name") from None
    _NEW.discard(key)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and move it into place (mode as :func:`file_mode`;
    :func:`_place`: never over a file that appeared after :func:`check_output_path` found the name free)."""
    path = Path(path)
    with writing(path, "file"):
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.",
                                   suffix=".tmp")
        try:
            os.fchmod(fd, file_mode())
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            _place(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_savefig(fig, path, dpi: int = 120) -> None:
    """Write a matplotlib figure at ``path`` atomically, in the format its suffix names (:func:`figure_format`; no
    suffix: PNG), and close it. The figure is rendered in memory first, so a failed render writes nothing."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=figure_format(path), dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


@contextlib.contextmanager
def staged_dir(final, what: str = "directory"):
    """Build a directory at ``.tmp-NAME`` beside ``final`` inside the block (the block creates it; a leftover of an
    earlier kill is cleared first), then move it into place with :func:`replace_dir`. If the block or the move
    fails (any exception, Ctrl-C included) the partial directory is removed, and an ``OSError`` is reported as a
    :class:`WriteError` naming ``final``. Only a kill -9 can leave a ``.tmp-`` directory, which nothing reads."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    try:
        with writing(final, what):
            if tmp.exists():
                shutil.rmtree(tmp)
            yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final`` so that a kill at any instant leaves either the old
    ``final`` or the new one, never a mixture: files are synced to disk, then renamed; an existing ``final`` is first
    renamed aside and deleted only after the new one is in place."""
    with writing(final, "directory"):
        fsync_tree(tmp)
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old.exists():
            shutil.rmtree(old)


def fsync_tree(root: Path) -> None:
    """Give every file under ``root`` the umask's mode (libraries such as safetensors write 0600 files) and sync it
    to disk, then the directory itself."""
    mode = file_mode()
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

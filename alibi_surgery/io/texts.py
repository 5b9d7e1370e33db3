"""The one reader of text lists: prompts, held-out texts and corpus documents, by the file's suffix.

``read_texts(path)`` returns the texts of one file, each a whole text (newlines inside a text are kept):

* ``.jsonl``: one JSON object per line, the text in its ``field`` (``"text"`` unless told); a blank line is skipped;
* ``.json``: one JSON list, of strings or of objects with the ``field``;
* anything else is plain UTF-8 text: ``plain="lines"`` (prompts files) makes every ``\\n`` or ``\\r\\n`` line one
  text, a blank line refused (``blank_lines="error"``, where each line is one text to score) or skipped
  (``"skip"``); ``plain="whole"`` (corpus files) makes the whole file one text.

Every file is read by :func:`~alibi_surgery.io.files.read_text` (UTF-8, a byte-order mark dropped). Bad input is a
one-line :class:`~alibi_surgery.errors.UsageError` naming ``FILE:LINE``: malformed JSON, a line or item that is not
an object with the field (or a string, in a ``.json`` list), a field that is not a string, and an empty or blank
text in a JSON file (a text to score or train on must hold something); a file that yields no text at all is refused
too, except in ``plain="whole"`` mode, where an empty file is an empty document that packing skips. The result is a
:class:`Texts`: a list of strings that also says where each one came from (``origins[i]``, ``"FILE:LINE"``), so
that later errors can name the line. Limits: a file is read whole into memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from .files import read_lines, read_text

__all__ = ["Texts", "read_texts", "text_format"]


class Texts(list):
    """A list of texts with ``origins``: where each one came from (``"FILE:LINE"``), in the same order."""

    def __init__(self, texts=(), origins=()):
        super().__init__(texts)
        self.origins = list(origins)

    def origin(self, i: int) -> str:
        """Where text ``i`` came from (``"text i"`` when that is unknown)."""
        return self.origins[i] if i < len(self.origins) else f"text {i}"


def text_format(path) -> str:
    """``"jsonl"``, ``"json"`` or ``"plain"``: how :func:`read_texts` reads ``path`` (by its suffix)."""
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".json": "json"}.get(suffix, "plain")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _pick(value, field: str, where: str, *, strings: bool) -> str:
    """The text of one JSON value: a string (when ``strings``), or an object's ``field`` string; not blank."""
    if isinstance(value, dict):
        if field not in value:
            keys = ", ".join(map(str, value)) or "none"
            raise UsageError(f'{where}: the object has no "{field}" field (fields: {keys}); choose one with '
                             f"text_field='NAME'")
        value = value[field]
        if not isinstance(value, str):
            raise UsageError(f'{where}: "{field}" is not a string ({type(value).__name__})')
    elif not (strings and isinstance(value, str)):
        wanted = "a string or an object" if strings else "an object"
        raise UsageError(f"{where}: {type(value).__name__} where {wanted} with a \"{field}\" string was expected")
    if not value.strip():
        raise UsageError(f"{where}: the text is empty")
    return value


def _jsonl(path: Path, field: str, what: str) -> Texts:
    out = Texts()
    for n, line in enumerate(read_lines(path, what=what), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{n}: not a JSON line ({exc.msg} at column {exc.colno})") from None
        out.append(_pick(value, field, f"{path}:{n}", strings=False))
        out.origins.append(f"{path}:{n}")
    return out


def _json(path: Path, field: str, what: str) -> Texts:
    """A JSON list, read item by item so that each item's line is known."""
    text = read_text(path, what=what)
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def bad(pos: int, msg: str) -> UsageError:
        return UsageError(f"{path}:{_line_of(text, pos)}: {msg}")

    def decode(pos: int):
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None

    pos = skip(0)
    if pos == len(text):
        raise UsageError(f"{what} is empty: {path}")
    if text[pos] != "[":
        value, _ = decode(pos)
        raise bad(pos, f"a .json file of texts must hold one list (of strings, or of objects with a \"{field}\" "
                       f"string), not a {type(value).__name__}")
    out = Texts()
    pos = skip(pos + 1)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            value, end = decode(pos)
            where = f"{path}:{_line_of(text, pos)}"
            out.append(_pick(value, field, where, strings=True))
            out.origins.append(where)
            pos = skip(end)
            if pos < len(text) and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise bad(pos, "expected ',' or ']' after a list item")
    if skip(pos) != len(text):
        raise bad(skip(pos), "extra data after the list")
    return out


def _plain_lines(path: Path, what: str, blank_lines: str) -> Texts:
    out = Texts()
    lines = read_lines(path, what=what)
    if lines and not any(line.strip() for line in lines):  # worded alike whether blank lines are refused or skipped
        raise UsageError(f"{what} is empty: {path} (it holds only blank lines)")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            if blank_lines == "error":
                raise UsageError(f"{what} {path}: line {n} is blank (each line is one text to score; remove it, or "
                                 f"give texts with blank lines as .jsonl or .json)")
            continue
        out.append(line)
        out.origins.append(f"{path}:{n}")
    return out


def read_texts(path, *, field: str = "text", what: str = "prompts file", plain: str = "lines",
               blank_lines: str = "error") -> Texts:
    """The texts of one file (see the module docstring): ``.jsonl`` and ``.json`` by ``field``; other files one text
    per line (``plain="lines"``, blank lines refused or, with ``blank_lines="skip"``, dropped) or one text in all
    (``plain="whole"``). ``what`` names the file in errors."""
    if plain not in ("lines", "whole"):
        raise UsageError(f"plain={plain!r}: must be 'lines' or 'whole'")
    if blank_lines not in ("error", "skip"):
        raise UsageError(f"blank_lines={blank_lines!r}: must be 'error' or 'skip'")
    if not isinstance(field, str) or not field:
        raise UsageError(f"text_field={field!r}: must be a field name")
    path = Path(path)
    kind = text_format(path)
    if kind == "plain" and plain == "whole":
        return Texts([read_text(path, what=what)], [f"{path}:1"])
    texts = {"jsonl": lambda: _jsonl(path, field, what), "json": lambda: _json(path, field, what),
             "plain": lambda: _plain_lines(path, what, blank_lines)}[kind]()
    if not texts and plain == "lines":
        raise UsageError(f"{what} is empty: {path}")
    return texts

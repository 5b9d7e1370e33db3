"""The terminal side of the command line: streams that survive a closed pipe, one-line warnings, resume hints.

:func:`setup_console` (called first by the CLI's ``main``):

* wraps stdout and stderr so that a reader that goes away (``alibi-surgery diagnose ... | head -c 1``, with or
  without ``PYTHONUNBUFFERED``) costs only the text: after a broken pipe further output goes to /dev/null and the
  work, and every file it writes, goes on;
* ignores ``SIGXFSZ``, so a file-size limit (``ulimit -f``) makes a write fail with ``EFBIG`` (reported as a
  one-line :class:`~alibi_surgery.errors.WriteError`) instead of killing the process mid-file;
* prints each warning as one ``warning: ...`` line, without the source line Python adds (and, after
  :func:`word_warnings`, with the command's flags for the library's ``name=value`` words).

:func:`resume_hint` turns the ``last_checkpoint`` a stopped ``repair`` carries into the text that names it and the
exact ``--resume`` command.

:func:`flag_wording` is the one rule by which the command line words the library's errors: the library names its
Python arguments as ``name=value`` (``use backend='torch'``), the CLI prints each one that is an option of the
command as that option (``use --backend torch``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import warnings

__all__ = ["setup_console", "resume_hint", "flag_wording", "word_warnings"]


class _PipeSafe:
    """A text stream whose reader may go away (``alibi-surgery diagnose ... | head``): after a broken pipe, further
    output is dropped (the file descriptor is pointed at /dev/null) and the work goes on; files are never lost."""

    def __init__(self, stream):
        self._stream = stream

    def _drop(self) -> None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def __getattr__(self, name):
        return getattr(self._stream, name)


# the running command's parser and ARGUMENT_NAMES (set by word_warnings): warnings are worded with its flags
_WORDING: tuple[argparse.ArgumentParser, dict | None] | None = None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message)
    if _WORDING is not None:
        text = flag_wording(text, *_WORDING)
    print(f"warning: {text}", file=sys.stderr)


def word_warnings(parser: argparse.ArgumentParser, names: dict[str, str] | None = None) -> None:
    """From now on, word each warning as :func:`flag_wording` words errors, with ``parser``'s options."""
    global _WORDING
    _WORDING = (parser, names)


def resume_hint(exc: BaseException, argv: list[str]) -> str:
    """For a run that stopped part-way: where it stands and the command that continues it."""
    if not hasattr(exc, "last_checkpoint"):
        return ""
    args = [a for a in argv if a not in ("--overwrite", "--resume")]
    command = shlex.join(["alibi-surgery", *args, "--resume"])
    where = f"the last complete checkpoint is {exc.last_checkpoint}" if exc.last_checkpoint else \
        "no checkpoint was complete yet"
    return f"; {where}; continue with: {command}"


# a Python argument as library messages name it: ``name=value``, value a literal (quoted or not)
_ARGUMENT = re.compile(r"(?<![\w.=-])([a-z][a-z0-9_]*)=('[^']*'|\"[^\"]*\"|[^\s,;:()\[\]]+)")


def flag_wording(message: str, parser: argparse.ArgumentParser, names: dict[str, str] | None = None) -> str:
    """``message`` with each ``name=value`` whose ``--name`` (underscores as dashes) is an option of ``parser``
    written as that option: ``--name value`` (quotes dropped), or ``--name`` alone for a switch given True.
    Anything else is left as it is, so a message reads the same from Python and, in the CLI's words, from the
    command line. ``names``: a command's Python arguments whose option is named otherwise (``{"batch":
    "batch_size"}``: ``batch=2`` is ``--batch-size 2``), from the command module's ``ARGUMENT_NAMES``."""
    actions = parser._option_string_actions
    names = names or {}

    def flag(match: re.Match) -> str:
        name, value = names.get(match.group(1), match.group(1)), match.group(2)
        option = "--" + name.replace("_", "-")
        if option not in actions:
            return match.group(0)
        if actions[option].nargs == 0:  # a switch: store_true and the like
            return option if value == "True" else match.group(0)
        if value[:1] in ("'", '"'):
            value = value[1:-1]
        return f"{option} {value}"

    return _ARGUMENT.sub(flag, message)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the signal arrives: every handler of Ctrl-C (checkpoint naming, cleanup) applies."""


def _terminated(signum, frame):
    raise Terminated()


def setup_console() -> None:
    """Pipe-safe stdout/stderr, SIGXFSZ ignored, SIGINT and SIGTERM raising (Terminated), one-line warnings (see
    the module docstring). Idempotent."""
    if not isinstance(sys.stdout, _PipeSafe):
        sys.stdout = _PipeSafe(sys.stdout)
    if not isinstance(sys.stderr, _PipeSafe):
        sys.stderr = _PipeSafe(sys.stderr)
    try:
        if hasattr(signal, "SIGXFSZ"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # Ctrl-C even where the shell started us with SIGINT ignored (a background job), and SIGTERM (what
        # schedulers send) the same way: the run stops at once, naming its last checkpoint and the resume command
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread (main() called from a worker thread): keep the defaults
        pass
    warnings.showwarning = _show_warning

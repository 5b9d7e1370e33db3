"""The ``alibi-surgery`` command line: the parser and one handler per command (``python -m alibi_surgery.cli``)."""

from .main import main

__all__ = ["main"]

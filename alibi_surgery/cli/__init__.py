"""The ``alibi-surgery`` command line (``python -m alibi_surgery.cli``): :mod:`.main` holds the top-level parser,
dispatch and error mapping; each command is one module with ``add_parser(sub)`` and ``run(args)``."""

from .main import main

__all__ = ["main"]

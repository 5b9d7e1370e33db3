"""``python -m alibi_surgery``: the command line (the same as the ``alibi-surgery`` script)."""

import sys

from .cli.main import main

sys.exit(main())

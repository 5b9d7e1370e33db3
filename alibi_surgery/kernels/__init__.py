"""``alibi_surgery.kernels``: the Triton kernels and their plain-torch twins, whose code lives in the repository's
top-level ``kernels/`` folder.

That folder has no ``__init__.py`` on purpose: a regular package named ``kernels`` at the repository root would
shadow Hugging Face's ``kernels`` package (which transformers imports) whenever the root is on ``sys.path``
(``python -m ...``, ``python -c``, a notebook in the checkout). Seen from the root it is only a namespace portion,
and a regular ``kernels`` installed in site-packages wins.

This file exists for source checkouts and editable installs only: it adds the top-level folder to this package's
search path. A built wheel maps ``kernels/`` to ``alibi_surgery/kernels/`` directly (pyproject.toml's
``package-dir``) and does not ship this file. Either way the package has no exports of its own: import the modules
(``from alibi_surgery.kernels.alibi import alibi_slopes``).
"""

from pathlib import Path as _Path

_SOURCE = _Path(__file__).resolve().parents[2] / "kernels"
if _SOURCE.is_dir() and str(_SOURCE) not in __path__:
    __path__.append(str(_SOURCE))

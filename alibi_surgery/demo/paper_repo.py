"""The paper's texts, head maps and training settings, read from a local copy of its repository (never run).

``read_paper_repo(path)`` reads a checkout of Schallon (2026)'s repository (a directory holding its files, or a bare
git directory, read at ``HEAD`` with ``git show``) and returns :class:`PaperFacts`. Each Python file is parsed with
:mod:`ast`; a value is taken only from a module-level assignment to a named variable, by ``ast.literal_eval`` of its
right-hand side (the training settings: from the literal ``default=`` of the ``parser.add_argument("--NAME", ...)``
calls of the script's ``main()``). Nothing is imported, executed or copied into this project. What is read, and from
where (``SOURCES``):

* ``diag_text``: ``DIAG_TEXT`` of ``surgery/train_1b7_headband.py``, the one diagnostic text of every diagnosis;
* ``pass1``: ``SURGERY`` of the same file, ``{layer: {"reinit": [heads], "freeze": [heads]}}``, the pass-1 map;
* ``pass2``: ``SURGERY`` of ``surgery/train_1b7_pass2.py`` (its ``reinit`` lists; the paper's pass-2 targets, shown
  beside ours: our pass 2 targets every head still collapsed after our pass 1);
* ``control``: ``SURGERY`` of ``surgery/train_1b7_baseline.py``, the C4 run's map (the paper's: pass 1's);
* ``train_texts``: ``PPL_TEXTS`` of ``surgery/train_1b7_headband.py``, the texts of the paper's "training PPL";
* ``held_out``: ``PPL_PROMPTS`` of ``evaluation/evaluate_epoch3.py``, the held-out texts (multi-line texts stay one);
* ``settings``: ``epochs``, ``lr``, ``batch_size``, ``grad_accum``, ``max_length``, ``checkpoint_interval`` and
  ``early_stop_patience`` of ``surgery/train_1b7_headband.py``'s ``main()``; ``pass2_checkpoint_interval`` of the
  pass-2 script's; ``seed``: ``SEED`` of the C4 script (the only seeded run).

Every problem (a missing directory, file, variable or argument; a value that is not a literal or has the wrong
shape) is a one-line :class:`~alibi_surgery.errors.UsageError` that starts ``paper_repo=PATH:`` and names the file and
the variable. Limits: only those files and names; a repository that moved them is refused, not searched.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
from pathlib import Path

from ..errors import UsageError

__all__ = ["PaperFacts", "read_paper_repo", "SOURCES", "map_spec", "freeze_spec", "map_heads"]

PASS1, PASS2, C4, EVAL = ("surgery/train_1b7_headband.py", "surgery/train_1b7_pass2.py",
                          "surgery/train_1b7_baseline.py", "evaluation/evaluate_epoch3.py")
SOURCES = {"diag_text": (PASS1, "DIAG_TEXT"), "pass1": (PASS1, "SURGERY"), "pass2": (PASS2, "SURGERY"),
           "control": (C4, "SURGERY"), "train_texts": (PASS1, "PPL_TEXTS"), "held_out": (EVAL, "PPL_PROMPTS"),
           "seed": (C4, "SEED")}
SETTINGS = ("epochs", "lr", "batch_size", "grad_accum", "max_length", "checkpoint_interval", "early_stop_patience")


@dataclasses.dataclass(frozen=True)
class PaperFacts:
    """What :func:`read_paper_repo` read (see the module docstring); ``source`` is the path it read from."""

    source: str
    diag_text: str
    pass1: dict
    pass2: dict
    control: dict
    train_texts: list
    held_out: list
    settings: dict

    def to_dict(self) -> dict:
        def maps(m):
            return {str(k): v for k, v in m.items()}

        return {"source": self.source, "diag_text": self.diag_text, "pass1": maps(self.pass1),
                "pass2": maps(self.pass2), "control": maps(self.control), "train_texts": list(self.train_texts),
                "held_out": list(self.held_out), "settings": dict(self.settings),
                "read_from": {k: f"{f}:{v}" for k, (f, v) in SOURCES.items()}}


class _Repo:
    """Reads files of a checkout directory or of a bare git directory (at HEAD)."""

    def __init__(self, path):
        self.path = Path(path)
        self.where = f"paper_repo={path}"
        if not self.path.is_dir():
            raise UsageError(f"{self.where}: not a directory (a checkout of the paper's repository)")
        self.bare = (self.path / "HEAD").is_file() and (self.path / "objects").is_dir()

    def text(self, rel: str) -> str:
        if self.bare:
            done = subprocess.run(["git", f"--git-dir={self.path}", "show", f"HEAD:{rel}"], capture_output=True)
            if done.returncode != 0:
                raise UsageError(f"{self.where}: {rel} is not in the repository's HEAD")
            data = done.stdout
        else:
            try:
                data = (self.path / rel).read_bytes()
            except FileNotFoundError:
                raise UsageError(f"{self.where}: {rel} is missing (expected the paper's file layout)") from None
            except OSError as exc:
                raise UsageError(f"{self.where}: cannot read {rel}: {exc.__class__.__name__}") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{self.where}: {rel} is not UTF-8 (byte {exc.start})") from None

    def tree(self, rel: str) -> ast.Module:
        try:
            return ast.parse(self.text(rel), rel)
        except SyntaxError as exc:
            raise UsageError(f"{self.where}: {rel} does not parse as Python (line {exc.lineno})") from None


def _literal(node, what: str):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise UsageError(f"{what} is not a literal value ({ast.unparse(node)[:40]!r}...)") from None


def _assigned(tree: ast.Module, name: str, what: str):
    """The literal value of the last module-level ``name = ...`` (or ``name: T = ...``)."""
    found = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            found = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name \
                and node.value is not None:
            found = node.value
    if found is None:
        raise UsageError(f"{what}: no module-level assignment")
    return _literal(found, what)


def _defaults(tree: ast.Module, where: str) -> dict:
    """``{name: default}`` of the literal ``parser.add_argument("--name", ..., default=LITERAL)`` calls in the
    module-level ``main()``."""
    main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
    if main is None:
        raise UsageError(f"{where}: no main() holding the training settings")
    out = {}
    for node in ast.walk(main):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument" \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            flag = node.args[0].value.lstrip("-").replace("-", "_")
            for kw in node.keywords:
                if kw.arg == "default":
                    try:
                        out[flag] = ast.literal_eval(kw.value)
                    except ValueError:
                        pass  # a default that is a name (e.g. SEED) is read elsewhere, not guessed
    return out


def _number(value, what: str, kind=int, positive: bool = True):
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or (
            positive and not value > 0):
        raise UsageError(f"{what} must be a positive {'number' if kind is float else 'integer'}, got {value!r}")
    return kind(value)


def _texts(value, what: str, *, one: bool = False):
    if one:
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"{what} must be a non-empty string")
        return value
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(t, str) and t.strip() for t in value):
        raise UsageError(f"{what} must be a non-empty list of non-empty strings")
    return list(value)


def _map(value, what: str, *, freeze: bool) -> dict:
    """A head map ``{layer: {"reinit": [heads], "freeze": [heads]}}`` checked and normalised (sorted lists; a
    missing ``freeze`` is empty)."""
    if not isinstance(value, dict) or not value:
        raise UsageError(f"{what} must be a non-empty dict {{layer: {{'reinit': [heads], ...}}}}")
    out = {}
    for layer, entry in value.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise UsageError(f"{what}: layer key {layer!r} is not an integer >= 0")
        if not isinstance(entry, dict) or "reinit" not in entry:
            raise UsageError(f"{what}: layer {layer} has no 'reinit' list")
        lists = {}
        for key in ("reinit", "freeze") if freeze else ("reinit",):
            heads = entry.get(key, [])
            if not isinstance(heads, (list, tuple, set)) or not all(
                    isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in heads):
                raise UsageError(f"{what}: layer {layer} '{key}' must be a list of head indices >= 0")
            lists[key] = sorted(set(heads))
        if freeze and set(lists["reinit"]) & set(lists["freeze"]):
            raise UsageError(f"{what}: layer {layer} both re-initialises and freezes head "
                             f"{min(set(lists['reinit']) & set(lists['freeze']))}")
        out[layer] = lists
    if not map_heads(out):
        raise UsageError(f"{what}: re-initialises no head")
    return dict(sorted(out.items()))


def read_paper_repo(path) -> PaperFacts:
    """The paper's facts from the repository at ``path`` (see the module docstring)."""
    repo = _Repo(path)
    trees: dict[str, ast.Module] = {}

    def value(rel: str, name: str):
        if rel not in trees:
            trees[rel] = repo.tree(rel)
        return _assigned(trees[rel], name, f"{repo.where}: {rel}: {name}")

    def where(key):
        rel, name = SOURCES[key]
        return f"{repo.where}: {rel}: {name}"

    diag = _texts(value(*SOURCES["diag_text"]), where("diag_text"), one=True)
    pass1 = _map(value(*SOURCES["pass1"]), where("pass1"), freeze=True)
    pass2 = _map(value(*SOURCES["pass2"]), where("pass2"), freeze=False)
    control = _map(value(*SOURCES["control"]), where("control"), freeze=True)
    train = _texts(value(*SOURCES["train_texts"]), where("train_texts"))
    held = _texts(value(*SOURCES["held_out"]), where("held_out"))
    seed = value(*SOURCES["seed"])
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"{where('seed')} must be an integer, got {seed!r}")
    defaults = _defaults(trees[PASS1], f"{repo.where}: {PASS1}")
    settings = {}
    for name in SETTINGS:
        if name not in defaults:
            raise UsageError(f"{repo.where}: {PASS1}: main() has no add_argument('--{name}', default=...)")
        settings[name] = _number(defaults[name], f"{repo.where}: {PASS1}: --{name} default",
                                 float if name == "lr" else int)
    p2 = _defaults(repo.tree(PASS2), f"{repo.where}: {PASS2}")
    if "checkpoint_interval" not in p2:
        raise UsageError(f"{repo.where}: {PASS2}: main() has no add_argument('--checkpoint_interval', default=...)")
    settings["pass2_checkpoint_interval"] = _number(p2["checkpoint_interval"],
                                                    f"{repo.where}: {PASS2}: --checkpoint_interval default")
    settings["seed"] = seed
    return PaperFacts(str(path), diag, pass1, pass2, control, train, held, settings)


def map_heads(head_map: dict, key: str = "reinit") -> dict[int, list[int]]:
    """The selection ``{layer: [heads]}`` of one list of a head map (layers listing none left out)."""
    return {layer: list(entry.get(key, [])) for layer, entry in head_map.items() if entry.get(key)}


def _spec(selection: dict[int, list[int]]) -> str | None:
    return ";".join(f"{layer}:{','.join(map(str, heads))}" for layer, heads in sorted(selection.items())) or None


def map_spec(head_map: dict) -> str:
    """The re-initialised heads of a map as a head spec (``5:14,15;6:9,10,...``) for ``repair(heads=...)``."""
    return _spec(map_heads(head_map))


def freeze_spec(head_map: dict) -> str | None:
    """The map's frozen heads as a head spec for ``repair(freeze=...)``, None when it freezes none."""
    return _spec(map_heads(head_map, "freeze"))

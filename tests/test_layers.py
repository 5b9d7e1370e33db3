"""The imports follow the layering docs/architecture.md draws: a package imports only from its own layer or below.

Every ``import`` and ``from ... import`` in the package and the kernels counts, at module level or inside a function
(a lazy import is a dependency all the same), except under ``if TYPE_CHECKING:`` (annotations only) and under
``if __name__ == "__main__":`` (a module run as a script is an entry point, the top of the stack).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ["errors", "allocator", "distributed", "kernels", "attention", "families", "io", "diagnosis", "viz",
          "analysis", "surgery", "demo", "cli"]  # lowest first; alibi_surgery/__init__.py and __main__.py: the top


def _layer_of(path: pathlib.Path, root: pathlib.Path = ROOT) -> str | None:
    rel = path.relative_to(root)
    if rel.parts[0] == "kernels":
        return "kernels"
    if len(rel.parts) == 2:
        return rel.stem if rel.stem in LAYERS else None
    return rel.parts[1]


def _package_parts(path: pathlib.Path, root: pathlib.Path) -> list[str]:
    rel = path.relative_to(root)
    inner = ["kernels"] if rel.parts[0] == "kernels" else list(rel.parts[1:-1])
    return ["alibi_surgery", *inner]


def _exempt(node: ast.If) -> bool:
    test = ast.unparse(node.test)
    return test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or test.replace("'", '"') == '__name__ == "__main__"'


def _imports(tree: ast.AST, package: list[str]):
    """``(line, imported module)`` of every import outside the exempt blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _exempt(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            else:
                names = [node.module]
            for name in names:
                yield node.lineno, name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        stack.extend(ast.iter_child_nodes(node))


def _sources():
    return sorted(p for p in [*ROOT.glob("alibi_surgery/**/*.py"), *ROOT.glob("kernels/*.py")]
                  if _layer_of(p) is not None)


def violations(sources, root: pathlib.Path = ROOT) -> list[str]:
    found = []
    for path in sources:
        layer = _layer_of(path, root)
        for line, module in _imports(ast.parse(path.read_text(), str(path)), _package_parts(path, root)):
            parts = module.split(".")
            if parts[0] != "alibi_surgery" or len(parts) < 2 or parts[1] not in LAYERS:
                continue
            if LAYERS.index(parts[1]) > LAYERS.index(layer):
                found.append(f"{path.relative_to(root)}:{line} ({layer}) imports {module} ({parts[1]})")
    return found


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("alibi_surgery/*/__init__.py")} | {"kernels"}
    assert packages <= set(LAYERS), sorted(packages - set(LAYERS))


def test_no_import_from_a_higher_layer():
    assert violations(_sources()) == []


@pytest.mark.parametrize("source,bad", [
    ("from ..families import family_of_module\n", True),
    ("def f():\n    from ..cli.main import main\n", True),  # lazy imports count
    ("import alibi_surgery.surgery.plan\n", True),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..surgery.plan import Plan\n", False),
    ("if __name__ == '__main__':\n    from alibi_surgery.cli.main import main\n", False),
    ("from ..kernels.alibi import key_positions\nfrom . import backends\n", False),
])
def test_the_check_can_fail(tmp_path, source, bad):
    """The check itself, on a module written where an attention module would be."""
    target = tmp_path / "alibi_surgery" / "attention" / "probe.py"
    target.parent.mkdir(parents=True)
    target.write_text(source)
    assert bool(violations([target], tmp_path)) is bad

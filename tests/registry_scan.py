"""The scan that keeps a registry's names out of the rest of the code: the tests of the prompt
methods (test_methods.py) and of the task kinds (test_taskkinds.py) each fail when a name is
compared, or a table keyed by every name is written, outside the registry's package."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "softprompt"


def name_comparisons(tree: ast.AST, names: set[str], near: str | None = None, exact: bool = False) -> list[int]:
    """Lines comparing with one of ``names`` (with ``near``: only where a side mentions it, e.g.
    ``method``), or holding a dict literal keyed by every name (``exact``: by those names alone,
    so that a table of other things that happens to reuse them, e.g. tune's search recipes
    "prompt", "prefix", "residual", passes)."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            consts = {n.value for s in sides for n in ast.walk(s) if isinstance(n, ast.Constant)}
            if consts & names and (near is None or any(near in ast.unparse(s) for s in sides)):
                bad.append(node.lineno)
        elif isinstance(node, ast.Dict) and node.keys and all(isinstance(k, ast.Constant) for k in node.keys):
            keys = {k.value for k in node.keys}
            if keys == names or (not exact and keys >= names):
                bad.append(node.lineno)
    return bad


def comparisons_outside(package: str, names: set[str], near: str | None = None,
                        exact: bool = False) -> dict[str, list[int]]:
    """:func:`name_comparisons` in every module of softprompt but the ``package`` that holds the registry."""
    found = {}
    for f in sorted(SRC.rglob("*.py")):
        if f.relative_to(SRC).parts[0] == package:
            continue
        lines = name_comparisons(ast.parse(f.read_text(encoding="utf-8")), names, near, exact)
        if lines:
            found[str(f.relative_to(SRC))] = lines
    return found

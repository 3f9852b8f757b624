"""The package's layout stays readable: every function fits one screen, classes and modules one
sitting, and no module imports itself back, directly, through others, or by a string handed to
importlib (AST only: nothing is imported).

Limits (tests and benchmarks aside): a function (or method) at most 80 lines, a class at most 250,
a module at most 400. Run with ``-s`` to see the largest of each."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "softprompt"
MAX_FUNCTION, MAX_CLASS, MAX_MODULE = 80, 250, 400


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    out = {}
    for f in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def _sizes() -> tuple[list, list, list]:
    """(lines, name) of every function, class and module, largest first."""
    functions, classes, modules = [], [], []
    for name, f in MODULES.items():
        text = f.read_text(encoding="utf-8")
        modules.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((size, f"{name}:{node.name}"))
            elif isinstance(node, ast.ClassDef):
                classes.append((size, f"{name}:{node.name}"))
    return sorted(functions, reverse=True), sorted(classes, reverse=True), sorted(modules, reverse=True)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if not level:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _edges(name: str, f: Path) -> set[str]:
    """The package's modules that module ``name`` imports (anywhere in it, lazily or not)."""
    is_package = f.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module)
            for a in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            target = node.args[0].value  # importlib.import_module(".x", __package__) counts as an import
            level = len(target) - len(target.lstrip("."))
            found.add(_resolve(name, is_package, level, target.lstrip(".") or None) if level else target)
    return {m for m in found if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_functions_classes_and_modules_fit_their_limits():
    functions, classes, modules = _sizes()
    print(f"\nlargest function {functions[0]}, class {classes[0]}, module {modules[0]}")
    assert [x for x in functions if x[0] > MAX_FUNCTION] == [], f"functions over {MAX_FUNCTION} lines"
    assert [x for x in classes if x[0] > MAX_CLASS] == [], f"classes over {MAX_CLASS} lines"
    assert [x for x in modules if x[0] > MAX_MODULE] == [], f"modules over {MAX_MODULE} lines"


def test_no_import_cycles():
    graph = {name: _edges(name, f) for name, f in MODULES.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles_including_importlib(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    f = tmp_path / "x.py"
    f.write_text("import importlib\nfrom . import errors\n"
                 "def later():\n    return importlib.import_module('.model', __package__)\n")
    assert _edges("softprompt.x", f) == {"softprompt.errors", "softprompt.model"}

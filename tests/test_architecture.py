"""The layout shows the architecture (docs/architecture.md): ``bas.core`` imports nothing above it,
and no module of ``bas`` imports itself back through others.

Every import counts, including those inside functions (a lazy import hides a circle, it does not
remove it); only ``if TYPE_CHECKING:`` blocks, which never run, are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bas"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def bas_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package ``bas`` under ``root``, by dotted name."""
    return {module_name(p, root): p for p in sorted((root / "bas").rglob("*.py"))}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The dotted names ``name`` imports anywhere in its file, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from bas.core import io` imports the module bas.core.io
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: the bas modules it imports}``: a name that is not a module counts as the module holding it."""
    modules = bas_modules(root)
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(name, path, modules):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (``[a, b, ..., a]``) per group of modules that import each other."""
    return [shortest_circle(graph, group) for group in import_groups(graph)]


def import_groups(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return groups


def shortest_circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"no circle through {start}")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a ``bas.core`` module of any bas module outside ``bas.core`` (a verb, the UI, bas-mini, the CLI, ``bas`` itself)."""
    in_core = lambda name: name == "bas.core" or name.startswith("bas.core.")
    return [f"{name} -> {target}" for name in sorted(graph) if in_core(name) for target in sorted(graph[name]) if not in_core(target)]


def test_core_imports_nothing_above_it():
    upward = upward_imports(import_graph())
    assert not upward, "bas.core imports modules above it (docs/architecture.md):\n" + "\n".join(upward)


def test_no_import_circles():
    graph = import_graph()
    found = [(shortest_circle(graph, group), group) for group in import_groups(graph)]
    assert not found, "import circles among bas modules:\n" + "\n".join(
        f"{' -> '.join(circle)}  (one of the circles among {', '.join(sorted(group))})" for circle, group in found
    )


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            {
                "bas/__init__.py": "",
                "bas/core/__init__.py": "",
                "bas/core/a.py": "def f():\n    from bas.ui import app\n",
                "bas/ui/__init__.py": "",
                "bas/ui/app.py": "from bas.core import a\n",
            },
            (["bas.core.a -> bas.ui.app"], [["bas.core.a", "bas.ui.app", "bas.core.a"]]),
        ),
        (
            {
                "bas/__init__.py": "",
                "bas/core/__init__.py": "",
                "bas/core/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bas.ui import b\n",
                "bas/ui/__init__.py": "",
                "bas/ui/b.py": "from ..core import a\n",
            },
            ([], []),
        ),
        (
            {"bas/__init__.py": "from .x import y\n", "bas/x.py": "import bas\n", "bas/core/__init__.py": "", "bas/core/c.py": "from .. import x\n"},
            (["bas.core.c -> bas.x"], [["bas", "bas.x", "bas"]]),
        ),
    ],
    ids=["lazy-import-counts", "type-checking-does-not", "relative-imports-resolve"],
)
def test_the_checks_find_what_they_look_for(tmp_path, files, expected):
    """The two checks above on small made-up packages: lazy and relative imports count, TYPE_CHECKING ones do not."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert (upward_imports(graph), circles(graph)) == expected

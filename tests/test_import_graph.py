"""The import graph of `src/deltatune` has no cycle: dependencies run one way.

Every `import` counts, module-level and inside functions (a function-level import is still a dependency; it only
hides the cycle until the call). Imports under `if TYPE_CHECKING:` are annotations, not dependencies, and do not count.
The one allowed exception: the registry loading the bundled methods (`registry._load_builtin_methods`), which
import the registry to register themselves.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "deltatune"
ALLOWED = {("deltatune.registry", "deltatune.methods")}
"""(importer, imported package): the registry's loading of the bundled methods, and everything under that package."""


def _module_name(path: Path, src: Path) -> str:
    parts = ("deltatune", *path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the deltatune modules it imports (`from pkg import name` names the submodule when there is one)."""
    paths = {_module_name(p, src): p for p in sorted(src.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base for alias in node.names]
            graph[name] |= {t for t in targets if t in paths and t != name and not _allowed(name, t)}
    return graph


def _allowed(importer: str, imported: str) -> bool:
    return any(importer == a and (imported == b or imported.startswith(b + ".")) for a, b in ALLOWED)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_deltatune_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (module -> imports within the cycle):\n" + "\n".join(
        " | ".join(f"{m} -> {sorted(t for t in import_graph()[m] if t in c)}" for m in c) for c in found
    )


def test_the_check_sees_function_level_imports_and_skips_annotations(tmp_path):
    pkg = tmp_path / "deltatune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from deltatune import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from deltatune.c import X\n")
    (pkg / "c.py").write_text("from .a import f\n")
    graph = import_graph(pkg)
    assert graph["deltatune.a"] == {"deltatune.b"} and graph["deltatune.b"] == set()
    assert graph["deltatune.c"] == {"deltatune.a"} and not cycles(graph)
    (pkg / "b.py").write_text("import deltatune.c\n")
    assert cycles(import_graph(pkg)) == [["deltatune.a", "deltatune.b", "deltatune.c"]]

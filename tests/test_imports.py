"""
The package's import graph has no cycle.

Read from the source (ast), so that an import inside a function counts as
much as one at the top of a module: both make one module need another.
Imports under C{if TYPE_CHECKING:} do not run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional

from twisted.trial.unittest import SynchronousTestCase

import aura_proxy

PACKAGE = Path(aura_proxy.__file__).parent


def module_names(package: Path) -> dict[str, Path]:
    """Every module of the package under C{package}, by dotted name."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements under C{node}, wherever they are, except the type checker's."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _imports(other)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _imports(child)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package: Path) -> dict[str, set[str]]:
    """Which of the package's modules each of its modules imports."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        needs: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _absolute(name, path.name == "__init__.py", node)
                # "from a import b" needs a, and a.b when b is a module.
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            needs.update(t for t in targets if t in modules and t != name)
        graph[name] = needs
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One cycle of C{graph} (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


class ImportGraphTests(SynchronousTestCase):
    """No module of aura_proxy needs, directly or not, a module that needs it."""

    def test_no_cycle(self) -> None:
        """The whole package's import graph, function-level imports included, is acyclic."""
        cycle = find_cycle(import_graph(PACKAGE))
        self.assertIsNone(cycle, "import cycle: " + " -> ".join(cycle or []))

    def test_entry_points_are_seen(self) -> None:
        """The graph sees the assembly's imports, the worker's and the twistd tap's, top-level or not."""
        graph = import_graph(PACKAGE)
        self.assertIn("aura_proxy.workers", graph["aura_proxy.assembly"])
        self.assertIn("aura_proxy.assembly", graph["aura_proxy.worker"])
        self.assertIn("aura_proxy.assembly", graph["aura_proxy.tap"])
        # The demo agent and the Redis log are imported inside functions.
        self.assertIn("aura_proxy.demo", graph["aura_proxy.assembly"])
        self.assertIn("aura_proxy.resume.redis", graph["aura_proxy.assembly"])

    def test_finds_a_function_level_cycle(self) -> None:
        """A cycle closed by an import inside a function is found (the one tap and workers had)."""
        package = Path(self.mktemp()) / "pkg"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "a.py").write_text("from pkg.b import thing\n")
        (package / "b.py").write_text("def thing():\n    from pkg import a\n")
        (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
        graph = import_graph(package)
        self.assertEqual(graph["pkg.c"], set())
        self.assertEqual(find_cycle(graph), ["pkg.a", "pkg.b", "pkg.a"])

"""The package's layering, read statically from the source (nothing is imported):

- no import circle anywhere in ``t2i_train/``;
- library modules never import the launchers (``t2i_train/cli``); only the ``python -m t2i_train.X`` shims
  import a launcher's ``main``;
- ``cli/`` holds no logic another module imports: outside ``cli/`` (the package, the tests, the benchmarks) a
  launcher module is imported for its ``main`` only; ``cli/common.py``, the launchers' shared argument handling
  and one-line errors, is the one launcher module tests import helpers from.

Every import counts as an edge of the graph, at module level or inside a function (a lazy import is a dependency
all the same, and a lazy circle is one refactor away from an ``ImportError`` at start-up); only imports under
``if TYPE_CHECKING:`` are left out, since they never run. An edge goes to the module imported, not to the packages
above it: ``from t2i_train.a.b import c`` is an edge to ``t2i_train.a.b.c`` when that is a module, else to
``t2i_train.a.b``.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "t2i_train"
CLI = f"{PACKAGE}.cli"
CLI_SHARED = f"{CLI}.common"


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module
    target: str  # the module imported (see the module docstring)
    names: tuple[
        str, ...
    ]  # the names taken from ``target`` by ``from target import ...`` (empty for ``import``)
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except the bodies of ``if TYPE_CHECKING:``."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    type_only = isinstance(node, ast.If) and is_type_checking(node.test)
    for child in node.orelse if type_only else ast.iter_child_nodes(node):
        yield from import_nodes(child)


def resolve(name: str, modules: set[str]) -> str | None:
    """``name`` or the deepest package module above it that is part of the package (None: outside it)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: set[str]) -> list[Import]:
    """The imports of package modules in ``path`` (module ``module``), relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = resolve(alias.name, modules)
                if target is not None:
                    found.append(Import(module, target, (), node.lineno))
            continue
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in modules:
                found.append(Import(module, submodule, (), node.lineno))
                continue
            target = resolve(base, modules)
            if target is not None:
                found.append(Import(module, target, (alias.name,), node.lineno))
    return found


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[Import]]:
    """Module -> the package modules it imports, and every import behind those edges."""
    modules = package_modules(root)
    names = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    every: list[Import] = []
    for module, path in modules.items():
        for imp in imports_of(module, path, names):
            every.append(imp)
            if imp.target != module:
                graph[module].add(imp.target)
    return graph, every


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``) per strongly connected component with a cycle (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [shortest_cycle(graph, component) for component in components]


def shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest cycle through the component's first module (breadth first, inside the component)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in {sorted(component)}")


def describe(cycle: list[str], imports: list[Import]) -> str:
    """``a -> b (a.py:12) -> ...``: each edge with the line that makes it."""
    lines = {(i.importer, i.target): i.line for i in reversed(imports)}
    steps = [cycle[0]]
    for a, b in itertools.pairwise(cycle):
        steps.append(f"{b} (line {lines[(a, b)]} of {a})")
    return " -> ".join(steps)


def is_launcher(module: str) -> bool:
    return module == CLI or module.startswith(CLI + ".")


def is_shim(module: str, path: Path) -> bool:
    """A ``python -m t2i_train.X`` shim: a top-level module of the package (or ``__main__``)."""
    return module.count(".") == 1 and path.parent == ROOT / PACKAGE


# ------------------------------------------------------------------------------------------------ the tests


def test_the_package_has_no_import_circle() -> None:
    graph, imports = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import circles in t2i_train/:\n" + "\n".join(describe(c, imports) for c in cycles)


def test_library_modules_do_not_import_the_launchers() -> None:
    modules = package_modules()
    _, imports = import_graph()
    wrong = [
        f"{i.importer} (line {i.line}) imports {i.target}" + (f".{i.names[0]}" if i.names else "")
        for i in imports
        if is_launcher(i.target)
        and not is_launcher(i.importer)
        and not (is_shim(i.importer, modules[i.importer]) and i.names == ("main",))
    ]
    assert not wrong, "library modules importing t2i_train.cli:\n" + "\n".join(wrong)


def reexported(path: Path) -> dict[str, str]:
    """Name -> the module it comes from, for the names a module takes from others at module level."""
    origins = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            origins.update({alias.asname or alias.name: node.module for alias in node.names})
    return origins


def test_launchers_hold_no_logic_other_modules_import() -> None:
    modules = package_modules()
    importers = {m: p for m, p in modules.items() if not is_launcher(m)}
    for folder in ("tests", "benchmarks"):
        importers.update({module_name(p): p for p in sorted((ROOT / folder).rglob("*.py"))})
    wrong = []
    for module, path in importers.items():
        for imp in imports_of(module, path, set(modules)):
            if not is_launcher(imp.target) or imp.target == CLI_SHARED:
                continue
            where = f"{module} (line {imp.line})"
            if (
                not imp.names
            ):  # ``import t2i_train.cli.x`` / ``from t2i_train.cli import x``: a whole launcher
                if imp.target != CLI:
                    wrong.append(f"{where} imports the module {imp.target}")
                continue
            origins = reexported(modules[imp.target])
            for name in imp.names:
                if name == "main":
                    continue
                if module.startswith("tests.") and name.startswith("check_"):
                    continue  # a test of the launcher's own argument checks (one-line errors) is its reader
                if name in origins and not is_launcher(origins[name]):
                    wrong.append(
                        f"{where} imports {name} through {imp.target}: import it from {origins[name]}"
                    )
                else:
                    wrong.append(f"{where} imports {name} from {imp.target}")
    assert not wrong, (
        "launcher logic imported outside t2i_train/cli (move it to a library module):\n" + "\n".join(wrong)
    )


# ------------------------------------------------------------------------------------------------ the checker


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        (
            {"a.py": "import t2i_train.b\n", "b.py": "from t2i_train.a import x\n"},
            ["t2i_train.a", "t2i_train.b"],
        ),
        (  # lazy, relative and a package __init__ all count
            {
                "a.py": "def f():\n    from .sub import y\n",
                "sub/__init__.py": "from . import c\n",
                "sub/c.py": "from ..a import f\n",
            },
            ["t2i_train.a", "t2i_train.sub", "t2i_train.sub.c"],
        ),
    ],
)
def test_the_checker_finds_a_circle(tmp_path: Path, files: dict[str, str], cycle: list[str]) -> None:
    _write(tmp_path, {"__init__.py": "", **files})
    graph, imports = import_graph(tmp_path)
    (found,) = find_cycles(graph)
    assert found == [*cycle, cycle[0]]
    assert describe(found, imports).startswith(cycle[0] + " -> ")


def test_the_checker_leaves_out_type_checking_imports_and_parent_packages(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from t2i_train.b import B\n",
        "b.py": "import t2i_train.a\n",
        "pkg/__init__.py": "from t2i_train.pkg.m import x\n",
        "pkg/m.py": "from t2i_train.pkg.n import y\n",  # not an edge to t2i_train.pkg
        "pkg/n.py": "y = 1\n",
    }
    _write(tmp_path, files)
    graph, _ = import_graph(tmp_path)
    assert find_cycles(graph) == []
    assert graph["t2i_train.pkg.m"] == {"t2i_train.pkg.n"}

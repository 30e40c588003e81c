"""The package's import graph has no cycle, counting every import a module can execute.

Each module of ``lbproxy/`` is parsed with ``ast`` (nothing is imported): every ``import``
and ``from ... import`` anywhere in the file counts, including those under
``if TYPE_CHECKING:`` and inside functions, because a cycle hidden there is still a cycle in
the design (and becomes a real one the day the import moves up). ``from lbproxy.a import b``
is an edge to ``lbproxy.a.b`` when that is a module, else to ``lbproxy.a``; relative imports
are resolved against the importing module's package. Importing ``lbproxy.a.b`` also runs the
package ``lbproxy.a``'s ``__init__``; that implicit edge is not counted: a package's
``__init__`` may re-export its submodules (``http1/`` and ``balance/`` do), which is a facade,
not a cycle. What an ``__init__`` imports explicitly is counted like any other module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "lbproxy"


Graph = dict[str, set[str]]


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every module and package under ``root`` (a package dir)."""
    names: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve_from(node: ast.ImportFrom, name: str, path: Path) -> str:
    """The absolute module named by ``from X import ...`` (relative forms resolved)."""
    if node.level == 0:
        return node.module or ""
    base = _package_of(name, path).split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(node: ast.AST, name: str, path: Path, known: Iterable[str]) -> list[str]:
    known = set(known)
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    source = _resolve_from(node, name, path)
    found = []
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        found.append(submodule if submodule in known else source)
    return found


def import_graph(root: Path) -> Graph:
    """Module -> the modules of the same package it imports (anywhere in its source)."""
    modules = module_names(root)
    graph: Graph = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for target in _targets(node, name, path, modules):
                if target in modules and target != name:
                    graph[name].add(target)
                elif target == name:
                    graph[name].add(name)  # a self-import is a cycle of one
    return graph


def strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module, or one module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(start: str) -> None:  # iterative, so a deep graph cannot hit the recursion limit
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return sorted(components)


def one_cycle(graph: Mapping[str, set[str]], component: list[str]) -> list[str]:
    """A concrete cycle through the component's first module (for the failure message)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth-first, so the cycle printed is a shortest one through start
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{component} is not a cycle")


def test_lbproxy_has_no_import_cycle() -> None:
    graph = import_graph(ROOT)
    assert "lbproxy.backend.chat" in graph and "lbproxy.proxy.listener" in graph
    components = strongly_connected(graph)
    for component in components:
        print(f"cycle: {' -> '.join(one_cycle(graph, component))}")
        print(f"  all modules of that cycle: {', '.join(component)}")
    assert not components, "import cycles: " + "; ".join(
        " -> ".join(one_cycle(graph, c)) for c in components
    )


# --- the checker itself, on small packages written for the test --------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for relative, source in {"__init__.py": "", **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return root


def test_counts_type_checking_function_level_and_relative_imports(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "a.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.b import B\n",
            "b.py": "def f():\n    from . import c\n",
            "c.py": "from .sub.d import x\n",
            "sub/__init__.py": "",
            "sub/d.py": "from .. import a\nimport pkg.sub\n",
            "e.py": "import os\nfrom pkg import sub\n",
        },
    )
    graph = import_graph(root)
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.c"}  # `from . import c` names the submodule pkg.c
    assert graph["pkg.c"] == {"pkg.sub.d"}
    assert graph["pkg.sub.d"] == {"pkg.a", "pkg.sub"}  # `from .. import a` climbs one level
    assert graph["pkg.e"] == {"pkg.sub"}  # the standard library is not part of the graph
    assert strongly_connected(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.sub.d"]]
    assert one_cycle(graph, ["pkg.a", "pkg.b", "pkg.c", "pkg.sub.d"]) == [
        "pkg.a",
        "pkg.b",
        "pkg.c",
        "pkg.sub.d",
        "pkg.a",
    ]


def test_a_name_from_a_module_is_an_edge_to_that_module(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "x.py": "from pkg.y import helper\n",
            "y.py": "helper = 1\n",
            "z.py": "from pkg import z\n",
        },
    )
    graph = import_graph(root)
    assert graph["pkg.x"] == {"pkg.y"}
    assert graph["pkg.y"] == set()
    assert strongly_connected(graph) == [["pkg.z"]]  # a module importing itself


def test_an_acyclic_package_has_no_component(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {"low.py": "", "mid.py": "from pkg import low\n", "top.py": "import pkg.mid, pkg.low\n"},
    )
    graph = import_graph(root)
    assert graph["pkg.top"] == {"pkg.mid", "pkg.low"}
    assert strongly_connected(graph) == []


def test_backend_protocols_import_only_values() -> None:
    """interfaces.py (the Protocols each side implements) names only events.py's values,
    and events.py imports nothing of the package: HAProxy's types-only headers."""
    graph = import_graph(ROOT)
    assert graph["lbproxy.backend.interfaces"] == {"lbproxy.backend.events"}
    assert graph["lbproxy.backend.events"] == set()


OUTSIDE_THE_CORE = ("lbproxy.proxy", "lbproxy.ops", "lbproxy.registry", "lbproxy.cluster")


def test_the_core_depends_on_no_io_layer() -> None:
    """``core/`` holds the sans-IO decisions: it may use ``config/`` and the top-level
    helpers, never the layers that do the I/O (not even for types)."""
    graph = import_graph(ROOT)
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("lbproxy.core")
        for target in targets
        if target.startswith(OUTSIDE_THE_CORE)
    )
    assert not wrong, wrong

"""Size limits of the code: modules at most 400 lines, functions at most 60 (parsed with ast)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.unit.test_import_graph import ROOT, module_names

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def over_limits(modules: dict[str, Path]) -> list[str]:
    """``module`` (too long) and ``module:Class.function`` (too long) names."""
    found = []
    for name, path in modules.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found.append(name)
        found += [f"{name}:{qual}" for qual in _long_functions(ast.parse(text))]
    return sorted(found)


def _long_functions(tree: ast.AST, prefix: str = "") -> list[str]:
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            found += _long_functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                found.append(f"{prefix}{node.name}")
            found += _long_functions(node, f"{prefix}{node.name}.")
    return found


def test_modules_and_functions_stay_within_the_limits() -> None:
    """No exceptions: a module or function that grows past a limit fails this test."""
    found = over_limits(module_names(ROOT))
    assert not found, f"over the limits: {sorted(found)}"


def test_long_modules_and_functions_are_found(tmp_path: Path) -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"class C:\n    def f(self):\n{body}\n", encoding="utf-8")
    (tmp_path / "short.py").write_text("def g():\n    return 1\n", encoding="utf-8")
    (tmp_path / "big.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1), encoding="utf-8")
    modules = {p.stem: p for p in tmp_path.glob("*.py")}
    assert over_limits(modules) == ["big", "long:C.f"]

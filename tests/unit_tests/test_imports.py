"""The package's import graph: no cycles, the store and errors at the bottom.

Every ``import`` inside ``langchain_mlx/`` counts, at module level, inside a
function or under ``TYPE_CHECKING`` (a lazy or type-only import still makes two
modules depend on each other: put what both need below both). That
``import langchain_mlx`` imports no mlx is checked in test_chat_models.py,
test_embeddings.py and test_errors.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import langchain_mlx

PACKAGE = Path(langchain_mlx.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = file
    return modules


def _imported(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """Every module ``file`` (module ``name``) imports, anywhere in it."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:  # `from pkg import module` names a module
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    """``langchain_mlx`` module -> the ``langchain_mlx`` modules it imports."""
    modules = _modules()
    return {
        name: {t for t in _imported(name, file, modules) if t in modules} - {name}
        for name, file in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if cycle := visit(node):
            return cycle
    return None


def test_the_check_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    # prepare imports gguf only inside functions
    assert "langchain_mlx.models.gguf" in graph["langchain_mlx.models.prepare"]
    assert "langchain_mlx.models.store" in graph["langchain_mlx.models.prepare"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, (
        " -> ".join(cycle or []) + ": move what they share into a module below both "
        "(types, a Protocol), so imports only go down"
    )


def test_store_and_errors_are_at_the_bottom_of_models() -> None:
    graph = import_graph()
    assert graph["langchain_mlx.models.errors"] == set()
    assert graph["langchain_mlx.models.store"] == {"langchain_mlx.models.errors"}


def test_test_models_are_not_shipped() -> None:
    modules = _modules()
    assert not any("tiny" in name for name in modules)
    for name, file in modules.items():
        imported = _imported(name, file, modules)
        assert not any(m.split(".")[0] == "tests" for m in imported), name

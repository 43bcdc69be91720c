"""The import graph of memllm (read with ast, nothing imported): no circles, and the CUDA/Triton fast paths
(memllm.context.cuda) are imported by memllm.context.kernels alone."""

from __future__ import annotations

import ast
from pathlib import Path

import memllm

ROOT = Path(memllm.__file__).parent
CUDA = "memllm.context.cuda"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """Modules imported anywhere in `tree` (function bodies included), except under TYPE_CHECKING.
    `from pkg import mod` (mod a module of `modules`) counts as importing pkg.mod alone: pkg is its parent."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names} & modules
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = imported(tree, name, path.name == "__init__.py", set(paths))
        # A package's __init__ runs before any of its modules: importing a.b.c imports a and a.b too; those
        # parent edges are not listed (every module would then sit in a circle with its package's __init__
        # whenever the __init__ re-exports from it).
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert "memllm.context.cache" in graph["memllm.context"]
    assert "memllm.config" in graph["memllm.context.cache"]


def test_no_import_circle_in_memllm():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_only_kernels_imports_the_cuda_fast_paths():
    graph = import_graph()
    outside = {
        name: sorted(t for t in targets if t == CUDA or t.startswith(CUDA + "."))
        for name, targets in graph.items()
        if name != "memllm.context.kernels" and not name.startswith(CUDA)
    }
    assert {name: t for name, t in outside.items() if t} == {}

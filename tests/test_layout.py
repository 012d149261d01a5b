"""The package's layers: no import cycles, and every import points down the layer order.

Reads the source (every import statement, at module level or inside a function), so a
cycle hidden behind a lazy import fails here too.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raysparse"

# Lower rank = lower layer. A module may import modules of its own or a lower rank only.
LAYERS: dict[str, int] = {
    "raysparse.errors": 0, "raysparse.paths": 0,
    "raysparse.data": 1, "raysparse.metrics": 1, "raysparse.sparsity.pattern": 1, "raysparse.tasks": 1,
    "raysparse.config": 2,
    "raysparse.models": 3,
    "raysparse.sparsity": 4,
    "raysparse.prune": 5, "raysparse.structured": 5,
    "raysparse.recover": 6,
    "raysparse.trial": 7,
    "raysparse.cluster": 8, "raysparse.profile": 8,
    "raysparse.search": 9,
    "raysparse.cli": 10,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """raysparse modules `name` imports anywhere in its source."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        found.update(t for t in targets if t in modules and t != name)
    return found


def layer_of(name: str) -> int | None:
    best = None
    for prefix, rank in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return None if best is None else best[1]


def test_no_module_imports_one_that_imports_it_back():
    modules = all_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items() if name != "raysparse"}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_point_down_the_layers():
    modules = all_modules()
    upward = []
    for name, path in modules.items():
        if name == "raysparse":  # the lazy public API names the top layers on purpose
            continue
        rank = layer_of(name)
        assert rank is not None, f"{name} belongs to no layer: add its package to LAYERS"
        for target in imports_of(name, path, modules):
            target_rank = layer_of(target)
            if target_rank is not None and target_rank > rank and not target.endswith("__init__"):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports pointing up the layers: " + ", ".join(sorted(upward))


def test_every_module_reads_in_one_sitting():
    long = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in all_modules().items()}
    too_long = {name: n for name, n in long.items() if n > 400}
    assert not too_long, f"modules over 400 lines: {too_long}"

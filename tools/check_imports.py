"""Fail on an import cycle among the project's modules, or on a stage importing another stage.

The four DVC stages stand side by side: they share only lower layers (``artifacts`` owns the
files that pass between them), never each other. Imports inside functions count too, so a
cycle cannot hide in one. Run by ``make lint``:

    python tools/check_imports.py [src]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

STAGES = {f"mnist_pipeline.{s}" for s in ("download", "preprocess", "train", "evaluate")}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from pkg import mod`` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & known


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def check(root: Path) -> list[str]:
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = {name: imports(path, set(paths)) - {name} for name, path in paths.items()}
    problems = [
        f"{paths[name]}: stage {name} imports stage {other}; stages share only artifacts"
        for name, deps in sorted(graph.items())
        if name in STAGES
        for other in sorted(deps & STAGES)
    ]
    if cycle := find_cycle(graph):
        problems.append(f"import cycle: {' -> '.join(cycle)}")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "src")
    problems = check(root)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

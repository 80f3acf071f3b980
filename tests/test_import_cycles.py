"""No import cycles among the modules of pipeline/ and workers/.

Read statically (ast), so nothing is imported. Every import counts: at module level, inside a
function and under ``if TYPE_CHECKING:``. An import moved into a function or behind
TYPE_CHECKING is how a cycle usually hides, and it still ties the two modules together: the
cure is a third module that both import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "workers")
# Import edges a cycle may keep, each with its reason; none today.
ALLOWED: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The modules of ours that ``module`` imports, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from pkg import name``: the submodule pkg.name if there is one, else pkg itself.
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {module: {target for target in _imported(module, path, known)
                     if (module, target) not in ALLOWED}
            for module, path in known.items()}


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """The shortest import path from ``start`` back to itself, if there is one."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    return None


def test_the_modules_of_pipeline_and_workers_import_no_cycle() -> None:
    graph = _graph()
    cycles = {" -> ".join(cycle) for module in sorted(graph)
              if (cycle := _cycle_through(module, graph)) is not None and min(cycle) == module}
    assert not cycles, "import cycles (a third module both can import breaks one):\n" + \
        "\n".join(sorted(cycles))


def test_the_finder_sees_late_and_type_checking_imports(tmp_path: Path) -> None:
    # The graph must see the imports a cycle hides in; a finder blind to them passes anything.
    (tmp_path / "a.py").write_text("def f():\n    from b import x\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\n"
                                   "if TYPE_CHECKING:\n    from a import f\n")
    known = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {m: set(_imported(m, p, known)) for m, p in known.items()}
    assert _cycle_through("a", graph) == ["a", "b", "a"]

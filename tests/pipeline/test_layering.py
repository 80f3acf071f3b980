"""The producer side's layers, checked statically: every import in pipeline/ and workers/ (at
the top of a module, inside a function or under TYPE_CHECKING) points into its own layer or one
below it, so the arrows run one way and the contract stays at the bottom.

A module's layer is that of the longest prefix naming it in ``LAYERS``. A new module in pipeline/
must be given one (its folder does it: pipeline/infra/x.py is infra).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Lowest first. A module may import its own layer and those listed before it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # What a caller and a worker agree on, and the typed settings: one layer, because the
    # schema types its fields with the contract's formats, URL rules and flag rules while jobs
    # read the model presets. pipeline.errors stays at the top level: Celery stores an
    # exception's module path in every failed result (exc_module), so it is wire format.
    ("floor", ("pipeline.errors", "pipeline.contract", "pipeline.config")),
    # What both sides stand on: Celery, brokers and their keys, storage, ffmpeg, and the
    # policies and quota store written against them.
    ("infra", ("pipeline.infra", "pipeline.policies", "pipeline.quota")),
    # Operations; pipeline.webhooks keeps its path because receivers import it (README).
    ("ops", ("pipeline.ops", "pipeline.webhooks")),
    # The caller's client; pipeline.aio keeps its path because callers import it (README).
    ("client", ("pipeline.client", "pipeline.aio")),
    ("workers", ("workers",)),
    # Processes and commands; config.checks probes a running deployment (brokers, workers).
    ("apps", ("pipeline.gateway", "pipeline.cli", "pipeline.config.checks")),
    # pipeline/__init__.py: the public names, re-exported from every layer.
    ("surface", ("pipeline",)),
)
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}

#: Arrows that point up, each imported late (inside the function that needs it) and why it
#: stays; the list may only shrink (test_every_allowed_exception_is_still_needed).
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("pipeline.config.rules", "pipeline.infra.brokers"):
        "a settings rule reads the broker kind off broker.url with brokers.kind_of",
}


def layer_of(module: str) -> str:
    best, best_len = "", -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    if not best:
        raise ValueError(f"{module} is in no layer")
    return best


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    base = REPO.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    return imports_in(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool) -> set[str]:
    """The first-party modules a source imports; ``from pkg import name`` counts as pkg.name
    when that is a module, else as pkg."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if _is_module(full) else base)
    return {name for name in found if name.split(".")[0] in ("pipeline", "workers")}


def _sources() -> list[Path]:
    return sorted([*REPO.joinpath("pipeline").rglob("*.py"), *REPO.joinpath("workers").rglob("*.py")])


def _upward_arrows() -> list[tuple[str, str]]:
    arrows = []
    for path in _sources():
        importer = _module_name(path)
        for target in sorted(imports_of(path)):
            if RANK[layer_of(target)] > RANK[layer_of(importer)]:
                arrows.append((importer, target))
    return arrows


def test_every_module_has_a_layer() -> None:
    """Only pipeline/__init__.py is the surface: a module beside it belongs in a layer's folder."""
    loose = [m for m in map(_module_name, _sources()) if layer_of(m) == "surface" and m != "pipeline"]
    assert loose == []


def test_imports_point_down_the_layers() -> None:
    upward = [f"{importer} ({layer_of(importer)}) imports {target} ({layer_of(target)})"
              for importer, target in _upward_arrows() if (importer, target) not in ALLOWED_UPWARD]
    assert upward == []


def test_every_allowed_exception_is_still_needed() -> None:
    assert set(ALLOWED_UPWARD) <= set(_upward_arrows())


@pytest.mark.parametrize(("importer", "target", "upward"), [
    ("pipeline.contract.jobs", "pipeline.client.producer", True),
    ("pipeline.contract.jobs", "pipeline.config.schema", False),
    ("pipeline.infra.brokers", "pipeline.ops.stats", True),
    ("pipeline.client.producer", "pipeline.ops.experiments", False),
    ("workers.tasks", "pipeline.cli.common", True),
    ("pipeline.cli.workers_cmd", "workers.recovery", False),
    ("pipeline.config.schema", "pipeline.config.checks", True),
])
def test_the_layers_order_modules_as_documented(importer: str, target: str, upward: bool) -> None:
    assert (RANK[layer_of(target)] > RANK[layer_of(importer)]) is upward


def test_a_late_import_counts() -> None:
    """An import inside a function is an arrow too, relative ones included."""
    source = ("def f():\n    from pipeline.client import producer\n    import pipeline.ops.stats\n"
              "    from ..infra import keys\n    from . import jobs\n")
    assert imports_in(source, "pipeline.contract.flags", is_package=False) == {
        "pipeline.client.producer", "pipeline.ops.stats", "pipeline.infra.keys",
        "pipeline.contract.jobs"}

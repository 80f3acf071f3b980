"""CI runs the lint and type gates before the tests, configured as issue 8 asks."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_ruff_then_mypy_then_pytest_and_stops_on_failure() -> None:
    lines = _commands((REPO / ".ci" / "run").read_text())
    assert "set -euo pipefail" in lines
    ruff, mypy = lines.index(".venv/bin/ruff check ."), lines.index(".venv/bin/mypy")
    pytest = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert lines.index("bash .ci/install") < ruff < mypy < pytest


def test_mypy_is_strict_on_both_packages_with_the_pydantic_plugin() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]
    mypy = config["mypy"]
    assert mypy["strict"] is True
    assert sorted(mypy["packages"]) == ["pipeline", "workers"]
    assert "pydantic.mypy" in mypy["plugins"]
    assert config["pydantic-mypy"]["init_typed"] is True
    # Missing types are forgiven per library, never for every import.
    assert "ignore_missing_imports" not in mypy
    for override in mypy["overrides"]:
        assert "*" not in override["module"] and "" not in override["module"]


def test_ruff_selects_its_rules_explicitly() -> None:
    lint = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert {"E4", "E7", "E9", "F", "I", "B", "UP"} <= set(lint["select"])

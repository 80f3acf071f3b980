"""``${VAR}`` and ``${VAR:default}`` inside string values, taken from the environment.

The seeds' syntax. A variable that is unset and has no default is a problem reported with the
key that asked for it, never a silent empty string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pipeline.config.problem import Problem

_TOKEN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


def substitute(tree: Any, environ: Mapping[str, str], *, path: str = "",
               problems: list[Problem] | None = None) -> Any:
    """Return a copy of ``tree`` with every ``${VAR}`` token replaced; append misses to problems."""
    if problems is None:
        problems = []
    if isinstance(tree, Mapping):
        return {k: substitute(v, environ, path=f"{path}.{k}" if path else str(k), problems=problems)
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [substitute(v, environ, path=f"{path}[{i}]", problems=problems)
                for i, v in enumerate(tree)]
    if not isinstance(tree, str) or "${" not in tree:
        return tree

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.append(Problem(path, tree, f"environment variable {name} is not set",
                                f"export {name}=..., or give a default: ${{{name}:value}}"))
        return match.group(0)

    return _TOKEN.sub(replace, tree)

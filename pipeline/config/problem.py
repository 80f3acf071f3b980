"""One finding of a settings report, and the lookup every rule and report line uses.

Its own module so that the rules (config/rules.py) and the report that renders them
(config/report.py) both build on it without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: What a secret value is shown as, wherever settings are printed or logged.
MASK = "**********"


@dataclass(frozen=True)
class Problem:
    """One finding of the report: where, what value, which rule, how to fix it."""

    path: str
    value: Any
    rule: str
    fix: str
    secret: bool = False

    def __repr__(self) -> str:
        # A report may be logged or end up in a traceback: a secret value never shows.
        value = MASK if self.secret and self.value else repr(self.value)
        return (f"Problem(path={self.path!r}, value={value}, rule={self.rule!r}, fix={self.fix!r}, "
                f"secret={self.secret})")


def get(raw: Mapping[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` in a raw settings tree, or None where any part is missing."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node

"""Turn pydantic's errors into the report a person can act on.

Each problem has its dotted path, the bad value (secrets masked), the rule it broke and a
suggested fix; unknown keys get a did-you-mean hint from the fields that do exist there.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_core import ErrorDetails

from pipeline.config.problem import MASK, Problem, get
from pipeline.config.schema import Settings


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union/dict annotations."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    if origin is dict:
        return [("dict", _unwrap(typing.get_args(annotation)[1]))]
    return [annotation]


def model_at(loc: Iterable[str | int]) -> type[BaseModel] | None:
    """The pydantic model that owns the last element of ``loc`` (for did-you-mean)."""
    model: type[BaseModel] = Settings
    parts = list(loc)[:-1]
    i = 0
    while i < len(parts):
        info = model.model_fields.get(str(parts[i]))
        if info is None:
            return None
        nxt: type[BaseModel] | None = None
        for t in _unwrap(info.annotation):
            if isinstance(t, tuple) and t[0] == "dict":  # dict[str, Model]: skip the key part
                i += 1
                nxt = next((m for m in t[1] if isinstance(m, type) and issubclass(m, BaseModel)), None)
            elif isinstance(t, type) and issubclass(t, BaseModel):
                nxt = t
        if nxt is None:
            return None
        model = nxt
        i += 1
    return model


def secret_paths(model: type[BaseModel] = Settings, prefix: str = "") -> set[str]:
    """Every dotted path whose type is SecretStr: masked wherever a value is shown."""
    out: set[str] = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        for t in _unwrap(info.annotation):
            if t is SecretStr:
                out.add(path)
            elif isinstance(t, type) and issubclass(t, BaseModel):
                out |= secret_paths(t, f"{path}.")
    return out


SECRET_PATHS = secret_paths()


def _fix_for(err: ErrorDetails) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        loc = [str(p) for p in err["loc"]]
        owner = model_at(loc)
        names = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
        return f"did you mean '{close[0]}'?" if close else (
            f"remove it; known keys here: {', '.join(names)}" if names else "remove it")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        # pydantic's ctx names only the bound that was broken; the fix names the whole range,
        # so read both bounds from the field's own constraints.
        owner = model_at([str(p) for p in err["loc"]])
        info = owner.model_fields.get(str(err["loc"][-1])) if owner else None
        metadata = info.metadata if info else []
        lo = next((getattr(m, a) for m in metadata for a in ("ge", "gt") if hasattr(m, a)),
                  ctx.get("ge", ctx.get("gt")))
        hi = next((getattr(m, a) for m in metadata for a in ("le", "lt") if hasattr(m, a)),
                  ctx.get("le", ctx.get("lt")))
        if lo is not None and hi is not None:
            return f"use a value between {lo} and {hi}"
        return f"use a value >= {lo}" if lo is not None else f"use a value <= {hi}"
    if kind in ("literal_error", "enum"):
        return f"use one of {ctx.get('expected')}"
    if kind == "missing":
        return "add this key"
    if kind.endswith("_parsing") or kind.endswith("_type"):
        return f"give a value of the right type ({kind.split('_')[0]})"
    if kind == "string_pattern_mismatch":
        return f"match the pattern {ctx.get('pattern')}"
    if kind in ("string_too_short", "too_short"):
        return "give a non-empty value"
    return "see the rule above"


def problems_from(exc: ValidationError, raw: Any) -> list[Problem]:
    out = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(p) for p in err["loc"])
        secret = path in SECRET_PATHS
        value = err.get("input") if err["type"] != "missing" else None
        if isinstance(value, dict) and err["type"] != "extra_forbidden":
            value = get(raw, path) if not isinstance(get(raw, path), dict) else "{...}"
        rule = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(Problem(path, value, rule, _fix_for(err), secret=secret))
    return out


def shown(problem: Problem) -> Any:
    return MASK if (problem.secret or problem.path in SECRET_PATHS) and problem.value else problem.value


@dataclass
class Report:
    """Everything wrong (errors) and everything doubtful (warnings) with one load."""

    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dicts(self) -> dict[str, list[dict[str, Any]]]:
        def row(p: Problem) -> dict[str, Any]:
            return {"path": p.path, "value": shown(p), "rule": p.rule, "fix": p.fix}
        return {"errors": [row(p) for p in self.errors], "warnings": [row(p) for p in self.warnings]}

    def text(self) -> str:
        lines = []
        if self.errors:
            lines.append(f"Settings are invalid: {len(self.errors)} error(s)")
            lines += [f"  - {p.path}: {p.rule} (value: {shown(p)!r}); fix: {p.fix}" for p in self.errors]
        if self.warnings:
            lines.append(f"Warnings ({len(self.warnings)}):")
            lines += [f"  - {p.path}: {p.rule} (value: {shown(p)!r}); {p.fix}" for p in self.warnings]
        return "\n".join(lines) if lines else "Settings are valid."


def path_warnings(raw: Any) -> list[Problem]:
    """Directories the settings name that could not be created (checked, never created here)."""
    out = []
    for dotted in ("app.data_dir", "storage.output_dir", "storage.temp_dir", "model.cache_dir"):
        value = get(raw, dotted)
        if not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser().resolve()
        ancestor = path
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
            out.append(Problem(dotted, value, f"cannot create {path}: {ancestor} is not a writable directory",
                               "point it at a writable location"))
    env, url = get(raw, "app.environment"), get(raw, "database.url")
    if env in ("staging", "production") and isinstance(url, str) and url.startswith("sqlite"):
        out.append(Problem("database.url", url, f"SQLite in {env}: quota reservations serialise on one file",
                           "use PostgreSQL (postgresql+psycopg://...) with the `postgres` extra"))
    return out

"""Build the one validated ``Settings`` of a process from the layers.

``load_settings()`` is what services, workers and the CLI call; ``load_layered()`` keeps the
raw tree, the provenance and the full report for ``musicgen-pipeline settings``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.config import layers
from pipeline.config.problem import Problem, get
from pipeline.config.report import Report, path_warnings, problems_from
from pipeline.config.rules import check_rules
from pipeline.config.schema import Settings
from pipeline.config.substitution import substitute
from pipeline.errors import SettingsError


@dataclass
class LayeredSettings:
    """A load with everything kept: raw tree, provenance, report, and Settings if valid."""

    env: str
    raw: dict[str, Any] = field(repr=False)  # plain secrets: never in a repr
    report: Report
    settings: Settings | None
    loaded: layers.Loaded = field(repr=False)

    def source_of(self, dotted: str) -> str:
        return self.loaded.source_of(dotted)

    @property
    def files(self) -> list[tuple[str, Path]]:
        return self.loaded.stack.files


def _choose_env(env: str | None, environ: Mapping[str, str]) -> str:
    chosen = env or environ.get(layers.ENV_SWITCHER) or "development"
    if chosen not in layers.ENVIRONMENTS:
        raise SettingsError(f"unknown environment {chosen!r}; use one of {', '.join(layers.ENVIRONMENTS)}",
                            field=layers.ENV_SWITCHER)
    return chosen


def _named_file(kind: str, name: Any, key: str) -> tuple[Path | None, Problem | None]:
    if name in (None, ""):
        return None, None
    # Looked up among the packaged files, never joined into a path: a value like
    # "../settings" must not load another layer file as a preset or profile.
    names = list(layers.available(kind))
    if name in names:
        return layers.settings_dir() / kind / f"{name}.toml", None
    close = difflib.get_close_matches(str(name)[:64], names, n=1)
    fix = f"did you mean '{close[0]}'?" if close else f"use one of: {', '.join(names)}"
    return None, Problem(key, name, f"no such {kind[:-1] if kind.endswith('s') else kind}", fix)


def _load(stack: layers.LayerStack, overrides: Mapping[str, Any]) -> layers.Loaded:
    """One Dynaconf load; a file that is not TOML becomes a SettingsError naming the file."""
    try:
        return layers.Loaded(stack, overrides)
    except ValueError as exc:  # TOMLDecodeError (Dynaconf's vendored one) says no file name
        import tomllib
        for label, path in stack.files:
            try:
                tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as file_exc:
                raise SettingsError(f"{path} is not valid TOML: {file_exc}", field=label) from exc
        raise


def load_layered(env: str | None = None, *, files: Sequence[str | Path] = (),
                 overrides: Mapping[str, Any] | None = None, cwd: str | Path | None = None) -> LayeredSettings:
    """Load every layer and validate; never raises for invalid values (see ``report``).

    The environment (MUSICGEN_ENV, MUSICGEN_* variables, ${VAR} values) is os.environ: Dynaconf
    reads it, and a second source of truth for tests would hide what production does.
    """
    environ = os.environ
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    overrides = dict(overrides or {})
    env_name = _choose_env(env, environ)
    extra = [Path(f) if Path(f).is_absolute() else cwd / f for f in files]
    for path in extra:
        if not path.is_file():
            raise SettingsError(f"settings file not found: {path}", field="--file")
    user = layers.user_files(cwd, environ, extra)
    for _, path in user:  # listed in MUSICGEN_SETTINGS_FILES yet missing: an error, not a skip
        if not path.is_file():
            raise SettingsError(f"settings file not found: {path}", field=layers.FILES_ENVVAR)
    base = ("settings.toml", layers.settings_dir() / "settings.toml")

    # Pass 1 learns which preset and profile the merged settings ask for.
    first = _load(layers.LayerStack(env_name, [base, *user]), overrides)
    problems: list[Problem] = []
    stack = layers.LayerStack(env_name, [base])
    for kind, key, label in (("models", "model.preset", "preset"), ("profiles", "app.profile", "profile")):
        named, problem = _named_file(kind, get(first.raw, key), key)
        if named is not None:
            stack.files.append((f"{label} {named.stem}", named))
        if problem is not None:
            problems.append(problem)
    stack.files.extend(user)
    loaded = _load(stack, overrides)

    raw = substitute(loaded.raw, environ, problems=problems)
    problems.extend(check_rules(raw))
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        problems = problems_from(exc, raw) + problems
    report = Report(errors=problems, warnings=path_warnings(raw))
    return LayeredSettings(env_name, raw, report, settings if report.ok else None, loaded)


def load_settings(env: str | None = None, *, files: Sequence[str | Path] = (),
                  overrides: Mapping[str, Any] | None = None, cwd: str | Path | None = None) -> Settings:
    """The validated settings of this process, or ``SettingsError`` listing every problem."""
    layered = load_layered(env, files=files, overrides=overrides, cwd=cwd)
    if layered.settings is None:
        raise SettingsError(layered.report.text(), details=layered.report.as_dicts()["errors"])
    return layered.settings

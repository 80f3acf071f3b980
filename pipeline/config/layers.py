"""The settings layers, lowest to highest precedence, and where each value came from.

This module is the one place the precedence is written down:

0. the schema's defaults (``pipeline/config/schema.py``): the one place a default is written
1. ``settings/settings.toml`` ``[default]``: only what every environment changes from them
2. its environment section, chosen by ``MUSICGEN_ENV`` (development | staging | production)
3. the model preset ``settings/models/<model.preset>.toml``
4. the deployment profile ``settings/profiles/<app.profile>.toml``, if one is named
5. user files: ``./settings.local.toml``, ``./.secrets.toml``, then the files listed in
   ``MUSICGEN_SETTINGS_FILES`` (separated by ``,`` or the OS path separator), then ``--file``
6. environment variables ``MUSICGEN_SECTION__KEY=value`` (values parsed as TOML)
7. explicit overrides in code or ``--set section.key=value``

Every layer file uses Dynaconf's sections: ``[default...]`` and, optionally, an environment
section (``[production...]``) that applies only in that environment.

Dynaconf does the reading, the merging, the env-var parsing and keeps the history we turn into
provenance. The preset and the profile are chosen by the merged settings themselves (an env var
may pick the preset), so the tree is loaded twice: once to learn the names, once in order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.schema import Settings

ENV_SWITCHER = "MUSICGEN_ENV"
ENVVAR_PREFIX = "MUSICGEN"
FILES_ENVVAR = "MUSICGEN_SETTINGS_FILES"
USER_FILES = ("settings.local.toml", ".secrets.toml")
ENVIRONMENTS = ("development", "staging", "production")
# Keys Dynaconf adds to the tree for its own use, and our own meta variables.
_META_KEYS = {"env", "load_dotenv", "settings_files", "environments", "envvar_prefix",
              "merge_enabled", "root_path", "env_switcher", "settings_files_for_dynaconf"}


def settings_dir() -> Path:
    """The packaged layer files: inside the wheel, or the repo's ``settings/`` in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_settings", package.parent / "settings"):
        if (candidate / "settings.toml").is_file():
            return candidate
    raise FileNotFoundError(f"settings.toml not found under {package}/_settings or "
                            f"{package.parent}/settings; the install is broken")


def available(kind: str) -> dict[str, str]:
    """``{name: one-line description}`` of the presets (``models``) or profiles (``profiles``)."""
    out = {}
    for path in sorted((settings_dir() / kind).glob("*.toml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        out[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return out


@dataclass
class LayerStack:
    """The files of one load, in precedence order, with a label for provenance."""

    env: str
    files: list[tuple[str, Path]] = field(default_factory=list)  # (label, path)


def user_files(cwd: Path, environ: Mapping[str, str], extra: Sequence[Path]) -> list[tuple[str, Path]]:
    found = [(name, cwd / name) for name in USER_FILES if (cwd / name).is_file()]
    listed = environ.get(FILES_ENVVAR, "")
    for item in listed.replace(os.pathsep, ",").split(","):
        if item.strip():
            path = Path(item.strip()).expanduser()
            found.append((f"{FILES_ENVVAR}:{path.name}", path if path.is_absolute() else cwd / path))
    found.extend((f"--file {p.name}", p) for p in extra)
    return found


def schema_defaults() -> dict[str, Any]:
    """Layer 0: the schema's defaults as a raw tree (unset ones left out, as a layer would)."""
    return Settings().model_dump(mode="json", exclude_none=True)


def _merged(below: Mapping[str, Any], above: Mapping[str, Any]) -> dict[str, Any]:
    """``above`` over ``below``, tables merged key by key as Dynaconf merges the layers."""
    out = dict(below)
    for key, value in above.items():
        under = out.get(key)
        out[key] = _merged(under, value) if isinstance(under, Mapping) and isinstance(value, Mapping) \
            else value
    return out


def _parse_override(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    from dynaconf.utils.parse_conf import parse_conf_data
    return parse_conf_data(value, tomlfy=True)


def _normalise(tree: Any) -> Any:
    """Lower-case keys (Dynaconf upper-cases top-level ones and env vars) and drop meta keys."""
    if isinstance(tree, Mapping):
        return {str(k).lower(): _normalise(v) for k, v in tree.items()
                if str(k).lower() not in _META_KEYS}
    if isinstance(tree, list):
        return [_normalise(v) for v in tree]
    return tree


class Loaded:
    """One Dynaconf load: the merged raw tree and the history behind each key."""

    def __init__(self, stack: LayerStack, overrides: Mapping[str, Any]) -> None:
        from dynaconf import Dynaconf

        self.stack = stack
        self._dyn = Dynaconf(
            settings_files=[str(p) for _, p in stack.files],
            environments=True,
            env=stack.env,
            env_switcher=ENV_SWITCHER,
            envvar_prefix=ENVVAR_PREFIX,
            merge_enabled=True,
            load_dotenv=False,
        )
        self._overrides = {k.lower(): v for k, v in overrides.items()}
        # What Dynaconf's env loader saw, kept for provenance (it records no per-variable history).
        self._env_vars = {k: v for k, v in os.environ.items() if k.startswith(ENVVAR_PREFIX + "_")
                          and k not in (ENV_SWITCHER, FILES_ENVVAR)}
        self._file_cache: dict[Path, dict[str, Any]] = {}
        for key, value in overrides.items():
            self._dyn.set(key, _parse_override(value))
        # The defaults go under the layers here, not only in pydantic: the rules, the preset's
        # name and `settings show` read this tree, and a key no layer sets is still the default.
        self.raw: dict[str, Any] = _merged(schema_defaults(), _normalise(self._dyn.as_dict()))
        self._replace_lists(self.raw)
        # The environment section chosen is the one truth about which environment this is.
        self.raw.setdefault("app", {})["environment"] = stack.env

    def _replace_lists(self, tree: dict[str, Any], prefix: str = "") -> None:
        """The list of the highest layer replaces the lists below it, as each layer reads on its
        own; Dynaconf's merge concatenates them (so no layer could drop a melody format)."""
        for key, value in tree.items():
            if isinstance(value, dict):
                self._replace_lists(value, f"{prefix}{key}.")
            elif isinstance(value, list) and (winner := self._winner(f"{prefix}{key}")) is not None:
                tree[key] = _normalise(winner[1])

    def source_of(self, dotted: str) -> str:
        """The layer that set ``dotted`` last: a file (and section), an env var, or an override.

        Dynaconf's history is not used: with merging on it records a layer's *merged* section (so
        every key of a section looks set by the last file that touched the section) and keeps one
        entry for all env vars. The layers are few and small, so we look at what each one says.
        """
        if dotted == "app.environment":
            return ENV_SWITCHER
        winner = self._winner(dotted)
        return winner[0] if winner is not None else "default (schema)"

    def _winner(self, dotted: str) -> tuple[str, Any] | None:
        """``(label, value)`` of the highest layer that sets ``dotted``; None if none does."""
        parts = dotted.lower().split(".")
        for key, value in reversed(list(self._overrides.items())):
            found, got = _lookup_under(key.split("."), _parse_override(value), parts)
            if found:
                return "override", got
        for name, value in sorted(self._env_vars.items(), reverse=True):
            var_parts = name[len(ENVVAR_PREFIX) + 1:].lower().split("__")
            found, got = _lookup_under(var_parts, _parse_override(value), parts)
            if found:
                return f"env {name}", got
        for label, path in reversed(self.stack.files):
            sections = _read_sections(path, self._file_cache)
            for section in ("global", self.stack.env, "default"):  # a file's own order, reversed
                found, got = _lookup(sections.get(section), parts)
                if found:
                    return (label if section in ("default", "global") else f"{label} [{section}]"), got
        return None


def _lookup_under(prefix: Sequence[str], value: Any, parts: Sequence[str]) -> tuple[bool, Any]:
    """Does a layer that sets ``prefix`` to ``value`` set ``parts``? ``(found, value there)``."""
    if list(parts[:len(prefix)]) != list(prefix):
        return False, None
    return _lookup(value, parts[len(prefix):])


def _lookup(tree: Any, parts: Sequence[str]) -> tuple[bool, Any]:
    """``(found, value)`` at ``parts`` in a nested mapping, keys compared lower-cased."""
    for part in parts:
        if not isinstance(tree, Mapping):
            return False, None
        tree = {str(k).lower(): v for k, v in tree.items()}
        if part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def _read_sections(path: Path, cache: dict[Path, dict[str, Any]]) -> dict[str, Any]:
    """A layer file's sections, keys lower-cased as Dynaconf matches them."""
    if path not in cache:
        import tomllib
        with path.open("rb") as fh:
            cache[path] = {str(k).lower(): v for k, v in tomllib.load(fh).items()}
    return cache[path]

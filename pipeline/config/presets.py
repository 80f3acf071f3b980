"""The model presets a deployment knows: a closed set, read from the packaged TOML files.

The producer routes by preset and must know a preset's window and whether it takes a melody
without loading the model; the worker needs a preset's ``model`` table to serve a job for a
preset other than its own. Both read it here.

A preset name comes from callers (``GenerationRequest.model``) and from broker messages, so it
is only ever *looked up* in the set of files that ship in ``settings/models/``; it is never
joined into a path (``../settings`` or an absolute path would otherwise read any TOML file).
"""

from __future__ import annotations

import difflib
import tomllib
from functools import lru_cache
from pathlib import Path

from pydantic import ValidationError

from pipeline.config.layers import settings_dir
from pipeline.config.schema import ModelSettings, Settings
from pipeline.errors import ModelNotFound, SettingsError

# Longer names are refused before any lookup or hint (difflib on a megabyte string is slow).
MAX_PRESET_NAME = 64


@lru_cache(maxsize=1)
def _preset_files() -> dict[str, Path]:
    """``{name: file}`` of the packaged presets; the packaged files do not change at run time."""
    paths = (settings_dir() / "models").glob("*.toml")
    return {path.stem: path for path in sorted(paths, key=lambda p: p.stem)}


def known_presets() -> tuple[str, ...]:
    """The names of every model preset this install ships, sorted."""
    return tuple(_preset_files())


def check_preset(name: object, field: str = "model") -> str:
    """``name`` if it is a known preset, else ``ModelNotFound`` (with a did-you-mean hint)."""
    files = _preset_files()
    if isinstance(name, str) and name in files:
        return name
    shown = repr(name)[:MAX_PRESET_NAME + 2]
    close = (difflib.get_close_matches(name, list(files), n=1)
             if isinstance(name, str) and len(name) <= MAX_PRESET_NAME else [])
    hint = f"; did you mean '{close[0]}'?" if close else f"; known presets: {', '.join(files)}"
    raise ModelNotFound(f"unknown model preset {shown}{hint}", field,
                        {"known_presets": list(files)})


@lru_cache(maxsize=64)
def _preset_table(name: str) -> dict[str, object]:
    path = _preset_files()[check_preset(name)]
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:  # a broken install, not the caller's fault
        raise SettingsError(f"model preset file {path} cannot be read: {exc}", "model.preset") from exc
    table = data.get("default", {}).get("model", {})
    if not isinstance(table, dict):
        raise SettingsError(f"model preset file {path} has no [default.model] table", "model.preset")
    return dict(table)


def model_settings_for(settings: Settings, preset: str) -> ModelSettings:
    """``settings.model`` for the active preset; for another known preset, its table over the
    active model settings, validated exactly as the active one is (``SettingsError`` if not)."""
    if preset == settings.model.preset:
        return settings.model
    table = _preset_table(check_preset(preset))
    try:
        return ModelSettings.model_validate({**settings.model.model_dump(), **table,
                                             "preset": preset})
    except ValidationError as exc:
        raise SettingsError(f"model preset {preset!r} does not validate: {exc}", "model.preset",
                            [{"path": "model." + ".".join(map(str, e["loc"])), "message": e["msg"]}
                             for e in exc.errors(include_url=False)]) from exc

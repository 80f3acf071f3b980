"""The model presets a deployment knows, read straight from their TOML files.

The producer routes by preset and must know a preset's window and whether it takes a melody
without loading the model; the worker needs a preset's ``model`` table to serve a job for a
preset other than its own. Both read it here.
"""

from __future__ import annotations

import difflib
import tomllib
from functools import lru_cache

from pipeline.config.layers import available, settings_dir
from pipeline.config.schema import ModelSettings, Settings
from pipeline.errors import ModelNotFound


@lru_cache(maxsize=64)
def _preset_table(name: str) -> dict[str, object]:
    path = settings_dir() / "models" / f"{name}.toml"
    if not path.is_file():
        known = list(available("models"))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known presets: {', '.join(known)}"
        raise ModelNotFound(f"unknown model preset {name!r}{hint}", "model")
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    return dict(data.get("default", {}).get("model", {}))


def model_settings_for(settings: Settings, preset: str) -> ModelSettings:
    """``settings.model`` for the active preset, or that preset's table over it for another."""
    if preset == settings.model.preset:
        return settings.model
    table = _preset_table(preset)
    return settings.model.model_copy(update={**table, "preset": preset})

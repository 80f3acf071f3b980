"""Fixtures shared by every test folder. Keep each group small and labelled."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

# --- settings: a clean environment for loading the layers -----------------------------------

def _substituted_vars() -> set[str]:
    """Every ${VAR} the packaged layer files read (REDIS_URL, FLOWER_PASSWORD, ...)."""
    from pipeline.config.layers import settings_dir

    return {name for path in settings_dir().rglob("*.toml")
            for name in re.findall(r"\$\{([A-Za-z_]\w*)", path.read_text(encoding="utf-8"))}


@pytest.fixture
def isolated_settings_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path (no stray settings.local.toml); no MUSICGEN_* nor ${VAR} variables set."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MUSICGEN_") or name in _substituted_vars():
            monkeypatch.delenv(name)
    return tmp_path


# Strong dummy values: production's rules refuse short or common secrets.
PRODUCTION_ENV = {
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "REDIS_PASSWORD": "redis-Pw-0123456789abcdef",
    "DATABASE_URL": "sqlite:///.musicgen/musicgen.db",
    "FLOWER_PASSWORD": "flower-Pw-0123456789abcdef",
}


@pytest.fixture
def production_env(isolated_settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The variables the production layers substitute, set to valid (strong) dummy values."""
    for name, value in PRODUCTION_ENV.items():
        monkeypatch.setenv(name, value)
    return dict(PRODUCTION_ENV)

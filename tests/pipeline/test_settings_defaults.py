"""Each default is written once, in the schema (pipeline/config/schema.py): settings.toml's
[default] holds only what every environment changes from it, and a key no layer sets still
resolves to the schema's default, in the raw tree the rules read as well as in Settings."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings, layers, load_layered
from pipeline.config.export import leaves
from pipeline.config.schema import QuotaSettings, WorkerSettings


def _at(tree: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def test_settings_toml_default_section_repeats_no_schema_default() -> None:
    default = tomllib.loads((layers.settings_dir() / "settings.toml").read_text())["default"]
    Settings.model_validate(default)  # a key the schema does not have is a ValidationError
    schema = Settings().model_dump(mode="json")
    repeated = [dotted for dotted, value in leaves(default) if _at(schema, dotted) == (True, value)]
    assert repeated == [], f"settings.toml [default] repeats the schema's defaults: {repeated}"


def test_a_key_no_layer_sets_is_the_schema_default_in_the_raw_tree(isolated_settings_env: Path) -> None:
    layered = load_layered("development")
    assert layered.report.ok, layered.report.text()
    assert layered.source_of("worker.soft_time_limit") == "default (schema)"
    assert layered.raw["worker"]["soft_time_limit"] == WorkerSettings().soft_time_limit
    # The preset is chosen from the raw tree: the schema's default names it.
    assert ("preset musicgen-small", layers.settings_dir() / "models" / "musicgen-small.toml") \
        in layered.files


def test_a_layer_that_sets_one_key_of_a_table_keeps_the_defaults_beside_it(
        isolated_settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_QUOTAS__TIERS__FREE__DAILY", "7")
    layered = load_layered("development")
    assert layered.settings is not None, layered.report.text()
    tiers = layered.settings.quotas.tiers
    assert tiers["free"].daily == 7
    assert tiers["free"].monthly == QuotaSettings().tiers["free"].monthly
    assert set(tiers) == set(QuotaSettings().tiers)  # the other tiers are still there

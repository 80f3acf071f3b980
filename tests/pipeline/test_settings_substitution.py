"""``${VAR}`` and ``${VAR:default}`` in settings values (pipeline/config/substitution.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_layered, load_settings
from pipeline.config.rules import Problem
from pipeline.config.substitution import substitute
from pipeline.errors import SettingsError


def _local(cwd: Path, text: str) -> None:
    (cwd / "settings.local.toml").write_text(text, encoding="utf-8")


def test_var_is_replaced(isolated_settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _local(isolated_settings_env, '[default.storage]\noutput_dir = "${OUT_ROOT}"\n')
    monkeypatch.setenv("OUT_ROOT", "/srv/music")
    settings = load_settings("development")
    assert settings.storage.output_dir == "/srv/music"


def test_default_is_used_only_when_the_var_is_unset(isolated_settings_env: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _local(isolated_settings_env, '[default.storage]\ntemp_dir = "${TMP_ROOT:/var/tmp/musicgen}"\n')
    assert load_settings("development").storage.temp_dir == "/var/tmp/musicgen"
    monkeypatch.setenv("TMP_ROOT", "/scratch")
    assert load_settings("development").storage.temp_dir == "/scratch"


def test_default_may_hold_colons_and_be_empty(isolated_settings_env: Path) -> None:
    _local(isolated_settings_env, '[default.broker]\nurl = "${NO_SUCH_URL:redis://127.0.0.1:6379/3}"\n'
                                  '[default.app]\nname = "svc${NO_SUFFIX:}"\n')
    settings = load_settings("development")
    assert settings.broker.url == "redis://127.0.0.1:6379/3"
    assert settings.app.name == "svc"


def test_several_tokens_nested_in_paths_lists_and_deep_keys(isolated_settings_env: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _local(isolated_settings_env,
           '[default.storage]\noutput_dir = "${BASE}/${KIND:music}/out"\n'
           '[default.validation]\nmelody_formats = ["${FMT:wav}", "mp3"]\n'
           '[default.quotas.tiers.custom]\ndaily = 5\nmonthly = 50\n'
           '[default.quotas]\ntimezone = "${TZ_NAME:UTC}"\n')
    monkeypatch.setenv("BASE", "/data")
    monkeypatch.setenv("FMT", "flac")
    settings = load_settings("development")
    assert settings.storage.output_dir == "/data/music/out"
    assert settings.validation.melody_formats == ["flac", "mp3"]
    assert settings.quotas.timezone == "UTC"


def test_a_value_from_an_env_var_is_substituted_too(isolated_settings_env: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_MODEL__CACHE_DIR", "${HOME_CACHE:/models}/hf")
    assert load_settings("development").model.cache_dir == "/models/hf"


def test_missing_var_without_default_names_the_key_and_the_var(isolated_settings_env: Path) -> None:
    _local(isolated_settings_env, '[default.storage]\noutput_dir = "${NOT_SET_ANYWHERE}/out"\n')
    layered = load_layered("development")
    assert layered.settings is None
    [problem] = layered.report.errors
    assert problem.path == "storage.output_dir"
    assert "NOT_SET_ANYWHERE" in problem.rule
    assert problem.value == "${NOT_SET_ANYWHERE}/out"  # never silently ""
    with pytest.raises(SettingsError) as err:
        load_settings("development")
    assert "storage.output_dir" in str(err.value) and "NOT_SET_ANYWHERE" in str(err.value)
    assert err.value.details[0]["path"] == "storage.output_dir"


def test_production_reports_each_missing_variable(isolated_settings_env: Path) -> None:
    layered = load_layered("production")
    missing = {p.path: p.rule for p in layered.report.errors if "is not set" in p.rule}
    assert {"broker.url", "broker.password", "database.url", "monitoring.flower_password"} <= set(missing)
    assert "REDIS_URL" in missing["broker.url"] and "FLOWER_PASSWORD" in missing["monitoring.flower_password"]


def test_substitute_directly_keeps_structure_and_collects_problems() -> None:
    problems: list[Problem] = []
    tree: dict[str, Any] = {"a": {"b": "${X}-${Y:y}", "c": 3, "d": ["${X}", "${Z}"]}, "e": "plain $X {X}"}
    out = substitute(tree, {"X": "x"}, problems=problems)
    assert out == {"a": {"b": "x-y", "c": 3, "d": ["x", "${Z}"]}, "e": "plain $X {X}"}
    assert tree["a"]["b"] == "${X}-${Y:y}"  # a copy: the input is untouched
    assert [(p.path, p.rule) for p in problems] == [("a.d[1]", "environment variable Z is not set")]

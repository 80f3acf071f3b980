"""Secrets (the SecretStr fields) never show: not in repr/str/JSON, the report, the CLI, or logs.

The one way out is explicit: ``settings export --reveal-secrets`` (a k8s Secret needs the real
values); without it the env lines and the Secret manifest hold ``**********``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_layered, load_settings
from pipeline.config.export import to_env, to_k8s
from pipeline.config.problem import MASK
from pipeline.config.report import SECRET_PATHS
from pipeline.errors import SettingsError

runner = CliRunner()


@pytest.fixture
def secrets(production_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Production with every secret set to a distinctive, strong value; returns the values."""
    values = {"REDIS_PASSWORD": "redis-SECRET-aaaaaaaaaaaa", "FLOWER_PASSWORD": "flower-SECRET-bbbbbbbbbb"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MUSICGEN_DATABASE__PASSWORD", "db-SECRET-cccccccccccccccc")
    monkeypatch.setenv("MUSICGEN_ENV", "production")
    return [*values.values(), "db-SECRET-cccccccccccccccc"]


def _assert_hidden(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text
        assert secret[:12] not in text  # not even a prefix of one


def test_secret_paths_are_the_secretstr_fields() -> None:
    assert SECRET_PATHS == {"api.url_token_secret", "broker.password", "broker.result_backend_password", "database.password",
                            "model.hub_token", "monitoring.flower_password",
                            "storage.secret_access_key", "webhooks.secret"}


def test_not_in_repr_str_or_json(secrets: list[str]) -> None:
    settings = load_settings()
    assert settings.broker.password is not None
    assert settings.broker.password.get_secret_value() == secrets[0]  # loaded for real...
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.broker),
                 str(settings.model_dump()), repr(load_layered())):
        _assert_hidden(text, secrets)  # ...and shown nowhere


def test_report_masks_a_rejected_secret(production_env: dict[str, str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    weak = "hunter2-weak"  # too short for production
    monkeypatch.setenv("REDIS_PASSWORD", weak)
    monkeypatch.setenv("MUSICGEN_BROKER__URL", "redis://:urlpass-SECRET@127.0.0.1:6379/0")
    layered = load_layered("production")
    paths = {p.path for p in layered.report.errors}
    assert {"broker.password", "broker.url"} <= paths
    shown = [layered.report.text(), str(layered.report.as_dicts()), repr(layered.report), repr(layered)]
    for text in shown:
        _assert_hidden(text, [weak, "urlpass-SECRET"])
    assert f"(value: '{MASK}')" in layered.report.text()
    with pytest.raises(SettingsError) as err:
        load_settings("production")
    _assert_hidden(str(err.value) + str(err.value.details) + repr(err.value), [weak, "urlpass-SECRET"])


@pytest.mark.parametrize("args", [
    ["settings", "show"],
    ["settings", "show", "--json"],
    ["settings", "show", "--key", "broker.password"],
    ["settings", "validate"],
    ["settings", "validate", "--json"],
    ["settings", "diff", "development", "production"],
    ["settings", "diff", "development", "production", "--json"],
    ["settings", "export", "--format", "env"],
    ["settings", "export", "--format", "k8s"],
], ids=" ".join)
def test_cli_never_prints_a_secret_unasked(args: list[str], secrets: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    _assert_hidden(result.output, secrets)
    if args[1] in ("show", "export"):
        assert MASK in result.output


def test_show_masks_an_invalid_secret_too(production_env: dict[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PASSWORD", "weak-SECRET")
    result = runner.invoke(app, ["settings", "show", "-e", "production", "-k", "broker"])
    assert result.exit_code == 1  # invalid, still shown
    assert "broker.password" in result.stdout and MASK in result.stdout
    _assert_hidden(result.output, ["weak-SECRET"])


def test_export_env_reveals_only_when_asked(secrets: list[str]) -> None:
    masked = runner.invoke(app, ["settings", "export", "--format", "env"])
    assert f"MUSICGEN_BROKER__PASSWORD={MASK}" in masked.stdout.splitlines()
    revealed = runner.invoke(app, ["settings", "export", "--format", "env", "--reveal-secrets"])
    assert revealed.exit_code == 0
    lines = revealed.stdout.splitlines()
    assert f'MUSICGEN_BROKER__PASSWORD="{secrets[0]}"' in lines
    assert f'MUSICGEN_MONITORING__FLOWER_PASSWORD="{secrets[1]}"' in lines
    assert f'MUSICGEN_DATABASE__PASSWORD="{secrets[2]}"' in lines


def test_export_k8s_secret_holds_only_secret_keys(secrets: list[str]) -> None:
    settings = load_settings()
    config_map, secret = yaml.safe_load_all(to_k8s(settings))
    assert set(secret["stringData"]) == {"MUSICGEN_BROKER__PASSWORD", "MUSICGEN_DATABASE__PASSWORD",
                                         "MUSICGEN_MONITORING__FLOWER_PASSWORD"}
    assert set(secret["stringData"].values()) == {MASK}  # placeholders unless revealed
    assert not set(secret["stringData"]) & set(config_map["data"])
    _assert_hidden(str(config_map), secrets)
    revealed_map, revealed = yaml.safe_load_all(to_k8s(settings, reveal_secrets=True))
    assert revealed["stringData"]["MUSICGEN_BROKER__PASSWORD"] == f'"{secrets[0]}"'
    assert revealed_map == config_map  # the ConfigMap never carries a secret
    assert all(f"={MASK}" in line for line in to_env(settings) if "PASSWORD" in line)


def test_no_secret_in_log_records(secrets: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # everything any library logs while loading
    logging.getLogger("pipeline").info("loading settings")  # the capture works
    layered = load_layered()
    layered.source_of("broker.password")
    load_settings()
    assert caplog.records, "caplog captured nothing: the test would prove nothing"
    for record in caplog.records:
        _assert_hidden(record.getMessage(), secrets)
        _assert_hidden(repr(record.args), secrets)
    _assert_hidden(caplog.text, secrets)


def test_export_to_file_is_private(secrets: list[str], isolated_settings_env: Path) -> None:
    target = isolated_settings_env / "prod.env"
    result = runner.invoke(app, ["settings", "export", "--format", "env", "--reveal-secrets",
                                 "--output", str(target)])
    assert result.exit_code == 0, result.output
    assert target.stat().st_mode & 0o077 == 0
    assert secrets[0] in target.read_text()
    _assert_hidden(result.output, secrets)

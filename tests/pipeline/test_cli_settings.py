"""``musicgen-pipeline settings``: every command in-process (CliRunner), the real console script
in a subprocess, the export round trip, and ``check`` against the real Redis, SQLite, PostgreSQL
and ffmpeg.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import Settings, layers, load_layered, load_settings
from pipeline.config.checks import (
    Status,
    check_database,
    check_device,
    check_dirs,
    check_ffmpeg,
    check_model,
)
from pipeline.config.export import leaves, to_env

runner = CliRunner()
CONSOLE_SCRIPT = Path(sys.executable).parent / "musicgen-pipeline"
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

pytestmark = pytest.mark.usefixtures("isolated_settings_env")


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["settings", *args])


def _rows(stdout: str) -> dict[str, list[str]]:
    """Plain (non-TTY) table output -> {first column: the other columns}."""
    out = {}
    for line in stdout.splitlines():
        cells = [c for c in line.split("  ") if c.strip()]
        if cells:
            out[cells[0].strip()] = [c.strip() for c in cells[1:]]
    return out


def test_root_help_lists_the_settings_commands() -> None:
    result = runner.invoke(app, ["settings", "--help"])
    assert result.exit_code == 0
    for command in ("validate", "show", "schema", "list", "diff", "export", "check"):
        assert command in result.output
    assert "settings" in runner.invoke(app, ["--help"]).output


# --- validate ---------------------------------------------------------------------------------

def test_validate_ok() -> None:
    result = invoke("validate")
    assert result.exit_code == 0, result.output
    assert "environment: development; layers: settings.toml, preset musicgen-small" in result.stdout
    assert "Settings are valid." in result.stdout


def test_validate_reports_every_error_on_stderr_and_exits_1() -> None:
    result = invoke("validate", "--set", "model.cache_size=0", "--set", "audio.formt=mp3",
                    "--set", "quotas.timezone=Nowhere/Land")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "Settings are invalid: 3 error(s)" in result.stderr
    assert "model.cache_size: Input should be greater than or equal to 1 (value: 0); " \
           "fix: use a value between 1 and 20" in result.stderr
    assert "did you mean 'format'?" in result.stderr and "Nowhere/Land" in result.stderr


def test_validate_json() -> None:
    ok = json.loads(invoke("validate", "--json").stdout)
    assert ok["valid"] is True and ok["environment"] == "development" and ok["errors"] == []
    bad = invoke("validate", "--json", "--set", "monitoring.flower_port=0")
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert report["valid"] is False
    assert report["errors"] == [{"path": "monitoring.flower_port", "value": 0,
                                 "rule": "Input should be greater than or equal to 1",
                                 "fix": "use a value between 1 and 65535"}]


def test_validate_production_lists_the_missing_variables() -> None:
    result = invoke("validate", "--env", "production")
    assert result.exit_code == 1
    for var in ("REDIS_URL", "REDIS_PASSWORD", "DATABASE_URL", "FLOWER_PASSWORD"):
        assert f"environment variable {var} is not set" in result.stderr


def test_validate_with_files_and_set(isolated_settings_env: Path) -> None:
    extra = isolated_settings_env / "extra.toml"
    extra.write_text("[default.model]\ncache_size = 3\n")
    result = invoke("validate", "-f", str(extra), "--set", "audio.format=mp3")
    assert result.exit_code == 0, result.output
    assert "--file extra.toml" in result.stdout


@pytest.mark.parametrize("args", [
    ["--set", "model.cache_size"],          # no '='
    ["--set", "cache_size=2"],              # no section
    ["--env", "prod"],                      # not an environment
    ["--file", "missing.toml"],             # no such file
], ids=lambda a: " ".join(a))
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = invoke("validate", *args)
    assert result.exit_code == 2
    assert "Invalid value" in result.output


def test_unknown_musicgen_env_and_broken_toml_exit_1(isolated_settings_env: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    broken = isolated_settings_env / "broken.toml"
    broken.write_text("[default.model\ncache_size = 3\n")
    result = invoke("validate", "-f", str(broken))
    assert result.exit_code == 1
    assert f"{broken} is not valid TOML" in result.stderr
    monkeypatch.setenv("MUSICGEN_ENV", "prod")
    result = invoke("validate")
    assert result.exit_code == 1 and "unknown environment 'prod'" in result.stderr


def test_missing_file_in_settings_files_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_SETTINGS_FILES", "nowhere.toml")
    result = invoke("validate")
    assert result.exit_code == 1 and "settings file not found" in result.stderr


# --- show -------------------------------------------------------------------------------------

def test_show_every_leaf_with_value_and_source() -> None:
    result = invoke("show", "--json")
    assert result.exit_code == 0
    shown = json.loads(result.stdout)["settings"]
    assert set(shown) == {k for k, _ in leaves(Settings().model_dump())}
    assert shown["generation.default_duration"] == {"value": 5.0, "source": "settings.toml [development]"}
    assert shown["model.source"] == {"value": "facebook/musicgen-small", "source": "preset musicgen-small"}
    assert shown["broker.url"] == {"value": None, "source": "default (schema)"}


def test_show_table_and_key_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_MODEL__CACHE_SIZE", "2")
    result = invoke("show", "--key", "model", "--set", "model.device=cpu")
    assert result.exit_code == 0
    rows = _rows(result.stdout)
    assert rows["model.cache_size"] == ["2", "env MUSICGEN_MODEL__CACHE_SIZE"]
    assert rows["model.device"] == ["cpu", "override"]
    assert rows["model.cache_dir"] == ["(unset)", "default (schema)"]
    assert rows["KEY"] == ["VALUE", "SOURCE"]
    assert not any(k.startswith("audio.") for k in rows)
    one = _rows(invoke("show", "-k", "app.debug").stdout)
    assert set(one) == {"environment: development; layers: settings.toml, preset musicgen-small",
                        "KEY", "app.debug"}
    assert one["app.debug"] == ["true", "settings.toml [development]"]


def test_show_unknown_key_is_a_usage_error() -> None:
    result = invoke("show", "--key", "modle.device")
    assert result.exit_code == 2
    assert "did you mean 'model.device'?" in result.output


def test_show_invalid_settings_still_shows() -> None:
    result = invoke("show", "--set", "model.cache_size=0", "--set", "model.dtyp=half")
    assert result.exit_code == 1
    rows = _rows(result.stdout)
    assert rows["model.cache_size"] == ["0", "override"]
    assert rows["model.dtyp"] == ["half", "override"]  # the typo is visible where it sits
    assert "model.cache_size" in result.stderr and "did you mean 'dtype'?" in result.stderr


# --- schema -----------------------------------------------------------------------------------

def test_schema_is_valid_json_schema_matching_the_layer_files(isolated_settings_env: Path) -> None:
    target = isolated_settings_env / "schema.json"
    result = invoke("schema", "--output", str(target))
    assert result.exit_code == 0
    schema = json.loads(target.read_text())
    assert schema == json.loads(invoke("schema").stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted(layers.settings_dir().rglob("*.toml")):
        errors = list(validator.iter_errors(tomllib.loads(path.read_text())))
        assert errors == [], f"{path.name}: {errors[0].message}"
    default_tree = tomllib.loads((layers.settings_dir() / "settings.toml").read_text())["default"]
    assert validator.is_valid({"default": default_tree})


@pytest.mark.parametrize("bad", [
    {"default": {"audio": {"formt": "mp3"}}},          # unknown key
    {"default": {"audio": {"sample_rate": 44000}}},    # not an allowed rate
    {"default": {"monitoring": {"flower_port": 0}}},   # out of range
    {"prod": {"app": {"debug": False}}},               # not a section
], ids=["unknown key", "literal", "range", "section"])
def test_schema_rejects_what_validation_rejects(bad: dict[str, Any]) -> None:
    schema = json.loads(invoke("schema").stdout)
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)


# --- list -------------------------------------------------------------------------------------

def test_list_environments_presets_profiles() -> None:
    result = invoke("list")
    assert result.exit_code == 0
    cells = [[c.strip() for c in line.split("  ") if c.strip()] for line in result.stdout.splitlines()]
    listed = {(row[0], row[1]): row[2:] for row in cells if len(row) >= 2}
    expected = [("environment", env) for env in layers.ENVIRONMENTS]
    expected += [("preset", name) for name in layers.available("models")]
    expected += [("profile", name) for name in layers.available("profiles")]
    for key in expected:
        assert listed.get(key), f"{key} missing or without a description"
    data = json.loads(invoke("list", "--json").stdout)
    assert data["presets"] == layers.available("models")
    assert data["profiles"] == layers.available("profiles")
    assert list(data["environments"]) == list(layers.ENVIRONMENTS)
    assert all(data["environments"].values())


# --- diff -------------------------------------------------------------------------------------

def test_diff_two_environments() -> None:
    result = invoke("diff", "development", "staging")
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    assert rows["KEY"] == ["development", "staging"]
    assert rows["model.preset"] == ["musicgen-small", "musicgen-medium"]
    assert rows["app.debug"] == ["true", "false"]
    assert "audio.format" not in rows  # equal everywhere
    data = json.loads(invoke("diff", "development", "staging", "--json").stdout)
    assert data["differences"]["model.preset"] == {
        "a": "musicgen-small", "b": "musicgen-medium",
        "source_a": "default (schema)", "source_b": "settings.toml [staging]"}
    assert set(data["differences"]) == set(rows) - {"KEY"}


def test_diff_same_environment_and_invalid_side() -> None:
    same = invoke("diff", "staging", "staging")
    assert same.exit_code == 0 and "no differences between staging and staging" in same.stdout
    invalid = invoke("diff", "development", "production")
    assert invalid.exit_code == 1
    assert "model.preset" in _rows(invalid.stdout)
    assert "production: Settings are invalid" in invalid.stderr


# --- export -----------------------------------------------------------------------------------

def _env_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def _clear_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MUSICGEN_") or name in {"REDIS_URL", "REDIS_PASSWORD", "DATABASE_URL",
                                                     "FLOWER_PASSWORD"}:
            monkeypatch.delenv(name)


def _load_from(variables: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    _clear_settings_env(monkeypatch)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_export_env_round_trips_through_the_env_loader(isolated_settings_env: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    extra = isolated_settings_env / "tuned.toml"
    extra.write_text('[default.validation]\nmelody_formats = ["wav", "flac"]\n'
                     '[default.quotas.tiers.gold]\ndaily = 7\nmonthly = 70\n'
                     '[default.app]\nname = "svc \\"quoted\\" ünïcode"\n')
    args = ["-f", str(extra), "--set", "model.preset=tiny", "--set", "worker.concurrency=4",
            "--set", "monitoring.flower_user=ops", "--set", "monitoring.flower_password=dev-pass",
            "--set", "storage.output_dir=/srv/out dir"]
    original = load_layered(files=[extra], overrides={a.split("=")[0]: a.split("=", 1)[1]
                                                      for a in args[3::2]}).settings
    assert original is not None
    result = invoke("export", "--format", "env", "--reveal-secrets", *args)
    assert result.exit_code == 0, result.output
    variables = _env_lines(result.stdout)
    assert next(iter(variables)) == "MUSICGEN_ENV" and variables["MUSICGEN_ENV"] == "development"
    assert variables["MUSICGEN_WORKER__CONCURRENCY"] == "4"
    assert variables["MUSICGEN_VALIDATION__MELODY_FORMATS"] == '["wav", "flac"]'
    (extra).unlink()  # the variables alone must carry everything
    assert _load_from(variables, monkeypatch) == original


def test_export_production_round_trip_env_and_k8s(production_env: dict[str, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    original = load_settings("production")
    env_out = invoke("export", "--format", "env", "-e", "production", "--reveal-secrets")
    assert env_out.exit_code == 0, env_out.output
    k8s_out = invoke("export", "--format", "k8s", "-e", "production", "--reveal-secrets",
                     "--name", "mg")
    config_map, secret = yaml.safe_load_all(k8s_out.stdout)
    assert (config_map["kind"], config_map["metadata"]["name"]) == ("ConfigMap", "mg")
    assert (secret["kind"], secret["type"], secret["metadata"]["name"]) == ("Secret", "Opaque", "mg-secrets")
    assert {**config_map["data"], **secret["stringData"]} == _env_lines(env_out.stdout)
    assert _load_from(_env_lines(env_out.stdout), monkeypatch) == original


def test_to_env_skips_unset_values_and_the_environment_key() -> None:
    lines = to_env(load_settings())
    names = [line.split("=", 1)[0] for line in lines]
    assert "MUSICGEN_BROKER__URL" not in names  # None in development: nothing to export
    assert "MUSICGEN_APP__ENVIRONMENT" not in names and names[0] == "MUSICGEN_ENV"
    assert len(names) == len(set(names))


def test_export_refuses_invalid_settings() -> None:
    result = invoke("export", "--format", "env", "--set", "model.cache_size=0")
    assert result.exit_code == 1 and result.stdout == ""
    assert "model.cache_size" in result.stderr
    assert invoke("export", "--format", "xml").exit_code == 2


# --- check ------------------------------------------------------------------------------------

def _check_rows(stdout: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in stdout.splitlines()[1:]:
        status, name, detail = [c.strip() for c in line.split("  ") if c.strip()][:3]
        rows[name] = (status, detail)
    return rows


def test_check_against_real_redis_and_sqlite(redis_url: str, isolated_settings_env: Path) -> None:
    result = invoke("check", "--set", f"broker.url={redis_url}")
    assert result.exit_code == 0, result.output
    rows = _check_rows(result.stdout)
    status, detail = rows["broker"]
    assert status == "ok" and detail.startswith(f"{redis_url} answers (redis: Redis "), detail
    assert "musicgen.tiny 0" in detail  # the queue depths (pipeline/infra/brokers.py)
    assert rows["database"][0] == "ok" and "sqlite" in rows["database"][1]
    for name in ("settings", "app.data_dir", "storage.output_dir", "storage.temp_dir", "ffmpeg",
                 "ffprobe", "device"):
        assert rows[name][0] == "ok", (name, rows[name])
    assert rows["model"][0] in ("ok", "warn")  # cached, or "will download on first use"
    assert (isolated_settings_env / ".musicgen" / "outputs").is_dir()  # check may create dirs


def test_check_embedded_broker_and_postgres() -> None:
    result = invoke("check", "--json", "--set", f"database.url={POSTGRES_URL}")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["broker"]["status"] == "ok" and "embedded" in rows["broker"]["detail"]
    assert rows["database"]["status"] == "ok" and "postgresql+psycopg" in rows["database"]["detail"]


def test_check_unreachable_broker_fails() -> None:
    result = invoke("check", "--set", "broker.url=redis://127.0.0.1:1/0", "--set",
                    "broker.connect_timeout=2")
    assert result.exit_code == 1
    status, detail = _check_rows(result.stdout)["broker"]
    assert status == "fail" and "redis://127.0.0.1:1/0 unreachable" in detail


def test_check_on_invalid_settings_runs_nothing(isolated_settings_env: Path) -> None:
    result = invoke("check", "--set", "model.cache_size=0")
    assert result.exit_code == 1 and "model.cache_size" in result.stderr
    assert not (isolated_settings_env / ".musicgen").exists()


def _settings(**sections: dict[str, Any]) -> Settings:
    return Settings.model_validate(sections)


def test_check_dirs_fails_where_a_dir_cannot_be(isolated_settings_env: Path) -> None:
    (isolated_settings_env / "blocker").write_text("")
    results = {r.name: r for r in check_dirs(_settings(storage={"temp_dir": "blocker/tmp"}))}
    assert results["storage.temp_dir"].status is Status.fail
    assert results["storage.output_dir"].status is Status.ok


def test_check_database_failures(isolated_settings_env: Path) -> None:
    [missing_dir] = check_database(_settings(database={"url": "sqlite:///nodir/x.db"}))
    assert missing_dir.status is Status.fail and "does not exist" in missing_dir.detail
    [no_driver] = check_database(_settings(database={"url": "mysql+pymysql://u@127.0.0.1/x"}))
    assert no_driver.status is Status.fail and "driver not installed" in no_driver.detail
    [no_dialect] = check_database(_settings(database={"url": "nosuchdb://u@127.0.0.1/x"}))
    assert no_dialect.status is Status.fail and "nosuchdb" in no_dialect.detail
    [refused] = check_database(_settings(database={"url": "postgresql+psycopg://u@127.0.0.1:1/x",
                                                   "password": "pw-SECRET"}), timeout=2)
    assert refused.status is Status.fail and "unreachable" in refused.detail
    assert "pw-SECRET" not in refused.detail


def test_check_ffmpeg_missing(monkeypatch: pytest.MonkeyPatch, isolated_settings_env: Path) -> None:
    assert [r.status for r in check_ffmpeg()] == [Status.ok, Status.ok]
    monkeypatch.setenv("PATH", str(isolated_settings_env))
    results = check_ffmpeg()
    assert [(r.name, r.status) for r in results] == [("ffmpeg", Status.fail), ("ffprobe", Status.fail)]


def test_check_model_local_cached_offline_and_download(isolated_settings_env: Path) -> None:
    local = isolated_settings_env / "ckpt"
    local.mkdir()
    [missing] = check_model(_settings(model={"source": str(local)}), {})
    assert missing.status is Status.fail and "no config.json" in missing.detail
    (local / "config.json").write_text("{}")
    [found] = check_model(_settings(model={"source": str(local)}), {})
    assert found.status is Status.ok

    cache = isolated_settings_env / "hub"
    hub = {"source": "facebook/musicgen-small", "cache_dir": str(cache)}
    [online] = check_model(_settings(model=hub), {})
    assert online.status is Status.warn and "will download on first use" in online.detail
    [offline] = check_model(_settings(model={**hub, "offline": True}), {})
    assert offline.status is Status.fail
    assert "musicgen-pipeline models download musicgen-small" in offline.detail  # the fix
    snapshot = cache / "models--facebook--musicgen-small" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    [cached] = check_model(_settings(model={**hub, "offline": True}), {})
    assert cached.status is Status.ok
    # Without model.cache_dir, HF_HUB_CACHE says where transformers looks.
    [via_env] = check_model(_settings(model={"source": hub["source"], "offline": True}),
                            {"HF_HUB_CACHE": str(cache)})
    assert via_env.status is Status.ok


def test_check_device() -> None:
    torch_already_here = "torch" in sys.modules
    assert check_device(_settings(model={"device": "cpu"}))[0].status is Status.ok
    assert check_device(_settings(model={"device": "auto"}))[0].status is Status.ok
    [no_torch] = check_device(_settings(model={"device": "cuda"}), find_spec=lambda name: None)
    assert no_torch.status is Status.warn and "worker extra not installed" in no_torch.detail
    assert ("torch" in sys.modules) == torch_already_here  # the check never imports torch here


@pytest.mark.skipif(sys.platform == "darwin", reason="mps exists on macOS")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="needs the worker extra (torch) to ask it about a device")
def test_check_device_asks_torch_in_a_subprocess() -> None:
    torch_already_here = "torch" in sys.modules
    [mps] = check_device(_settings(model={"device": "mps"}))
    assert mps.status is Status.fail and "mps: not available" in mps.detail
    assert ("torch" in sys.modules) == torch_already_here


# --- the real console script ------------------------------------------------------------------

def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICGEN_")}
    return subprocess.run([str(CONSOLE_SCRIPT), "settings", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_console_script_validate(isolated_settings_env: Path) -> None:
    ok = _script("validate", cwd=isolated_settings_env)
    assert ok.returncode == 0, ok.stderr
    assert "Settings are valid." in ok.stdout
    bad = _script("validate", "--set", "generation.default_temperature=9", cwd=isolated_settings_env)
    assert bad.returncode == 1
    assert "generation.default_temperature" in bad.stderr and "between 0.1 and 2.0" in bad.stderr
    usage = _script("validate", "--set", "nonsense", cwd=isolated_settings_env)
    assert usage.returncode == 2

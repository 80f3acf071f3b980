"""The validation rules: every rule of pipeline/config/rules.py fails and passes on a case of its
own, pydantic's range errors carry path, value, rule and fix, every error is reported at once,
and warnings are listed apart from errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_layered
from pipeline.config.rules import RULES, Rule

STRONG = "a-Strong-secret-0123456789"


@dataclass(frozen=True)
class Case:
    rule: str                      # a Rule.name from RULES
    env: str
    failing: dict[str, Any]       # overrides that break the rule
    passing: dict[str, Any]       # overrides that satisfy it (and leave the settings valid)
    path: str                      # where the problem is reported


CASES = [
    Case("generation.max_duration > generation.default_duration", "development",
         {"generation.default_duration": 30.0, "generation.max_duration": 30.0},
         {"generation.default_duration": 29.0, "generation.max_duration": 30.0}, "generation.max_duration"),
    Case("generation.default_duration >= generation.min_duration", "development",
         {"generation.default_duration": 1.0, "generation.min_duration": 2.0},
         {"generation.default_duration": 2.0, "generation.min_duration": 2.0}, "generation.default_duration"),
    Case("worker.hard_time_limit > worker.soft_time_limit", "development",
         {"worker.soft_time_limit": 360, "worker.hard_time_limit": 360},
         {"worker.soft_time_limit": 359, "worker.hard_time_limit": 360}, "worker.hard_time_limit"),
    Case("broker.visibility_timeout > worker.hard_time_limit", "development",
         {"broker.visibility_timeout": 360, "worker.hard_time_limit": 360},
         {"broker.visibility_timeout": 361, "worker.hard_time_limit": 360,
          "worker.time_limit_per_second": 0}, "broker.visibility_timeout"),
    Case("long jobs: visibility covers the scaled hard limit", "development",
         {"broker.visibility_timeout": 700, "worker.time_limit_per_second": 3.0},
         {"broker.visibility_timeout": 700, "worker.time_limit_per_second": 2.0},
         "broker.visibility_timeout"),
    Case("long form: stride inside the window", "development",
         {"generation.window_stride": 30.0}, {"generation.window_stride": 29.5},
         "generation.window_stride"),
    Case("recovery: dead workers found before the visibility timeout", "development",
         {"broker.url": "redis://127.0.0.1:6379/0", "broker.visibility_timeout": 400,
          "worker.time_limit_per_second": 0, "recovery.heartbeat_interval": 70},
         {"broker.url": "redis://127.0.0.1:6379/0", "broker.visibility_timeout": 400,
          "worker.time_limit_per_second": 0, "recovery.heartbeat_interval": 60},
         "recovery.heartbeat_interval"),
    Case("worker.max_memory_percent > worker.cleanup_threshold_percent", "development",
         {"worker.max_memory_percent": 80.0, "worker.cleanup_threshold_percent": 80.0},
         {"worker.max_memory_percent": 80.0, "worker.cleanup_threshold_percent": 79.0},
         "worker.max_memory_percent"),
    Case("validation.melody_max_duration > validation.melody_min_duration", "development",
         {"validation.melody_max_duration": 5.0, "validation.melody_min_duration": 5.0},
         {"validation.melody_max_duration": 5.0, "validation.melody_min_duration": 4.0},
         "validation.melody_max_duration"),
    Case("worker.retry_backoff_max > worker.retry_backoff", "development",
         {"worker.retry_backoff": 30.0, "worker.retry_backoff_max": 30.0},
         {"worker.retry_backoff": 30.0, "worker.retry_backoff_max": 31.0}, "worker.retry_backoff_max"),
    Case("threads pool: slots for a batch", "development",
         {"worker.pool": "threads", "generation.max_batch_size": 8, "worker.concurrency": 4},
         {"worker.pool": "threads", "generation.max_batch_size": 8, "worker.concurrency": 8},
         "worker.concurrency"),
    Case("production: debug off", "production", {"app.debug": True}, {"app.debug": False}, "app.debug"),
    Case("staging/production: Redis broker", "staging",
         {"broker.url": ""}, {"broker.url": "redis://127.0.0.1:6379/0"}, "broker.url"),
    Case("broker: replica wait on Redis only", "development",
         {"broker.url": "amqp://guest@127.0.0.1:5672//",
          "broker.result_backend": "redis://127.0.0.1:6379/0", "broker.wait_replicas": 1},
         {"broker.url": "sentinel://127.0.0.1:26379/0", "broker.wait_replicas": 1},
         "broker.wait_replicas"),
    Case("production: Redis password or TLS", "production",
         {"broker.url": "redis://10.0.0.1:6379/0", "broker.password": ""},
         {"broker.url": "rediss://10.0.0.1:6380/0", "broker.password": ""}, "broker.url"),
    Case("broker URL without password", "development",
         {"broker.url": "redis://:hunter2hunter2@127.0.0.1:6379/0"},
         {"broker.url": "redis://127.0.0.1:6379/0"}, "broker.url"),
    # The broker rules (pipeline/infra/brokers.py): which URL schemes, what RabbitMQ needs.
    Case("broker: a scheme we support", "development", {"broker.url": "kafka://127.0.0.1:9092"},
         {"broker.url": "sentinel://127.0.0.1:26379;sentinel://127.0.0.2:26379"}, "broker.url"),
    Case("RabbitMQ: results (and shared state) on Redis", "development",
         {"broker.url": "amqp://guest@127.0.0.1:5672//"},
         {"broker.url": "amqp://guest@127.0.0.1:5672//",
          "broker.result_backend": "redis://127.0.0.1:6379/0"}, "broker.result_backend"),
    Case("RabbitMQ: results (and shared state) on Redis", "development",
         {"broker.url": "amqp://guest@127.0.0.1:5672//",
          "broker.result_backend": "db+postgresql://127.0.0.1/results"},
         {"broker.url": "amqp://guest@127.0.0.1:5672//",
          "broker.result_backend": "sentinel://127.0.0.1:26379/1"}, "broker.result_backend"),
    Case("production: Redis password or TLS", "production",
         {"broker.url": "amqp://musicgen@10.0.0.1:5672/musicgen", "broker.password": "",
          "broker.result_backend": "rediss://10.0.0.2:6380/0"},
         {"broker.url": "amqps://musicgen@10.0.0.1:5671/musicgen", "broker.password": "",
          "broker.result_backend": "rediss://10.0.0.2:6380/0"}, "broker.url"),
    Case("broker URL without password", "development",
         {"broker.result_backend": "redis://:hunter2hunter2@127.0.0.1:6379/1"},
         {"broker.result_backend": "redis://127.0.0.1:6379/1"}, "broker.result_backend"),
    Case("broker.result_backend_password: present and strong", "production",
         {"broker.result_backend_password": "redis"},
         {"broker.result_backend_password": STRONG}, "broker.result_backend_password"),
    Case("production: Flower auth", "production",
         {"monitoring.flower_user": ""}, {"monitoring.flower_user": "ops"}, "monitoring.flower_user"),
    Case("staging/production: API auth", "production", {"api.auth": False}, {"api.auth": True},
         "api.auth"),
    Case("monitoring.flower_password: present and strong", "production",
         {"monitoring.flower_password": "flower"}, {"monitoring.flower_password": STRONG},
         "monitoring.flower_password"),
    Case("monitoring.flower_password: present and strong", "development",  # required by flower_user
         {"monitoring.flower_user": "ops"},
         {"monitoring.flower_user": "ops", "monitoring.flower_password": "dev"}, "monitoring.flower_password"),
    Case("broker.password: present and strong", "production",
         {"broker.password": "short"}, {"broker.password": STRONG}, "broker.password"),
    Case("database.password: present and strong", "production",
         {"database.password": "changeme"}, {"database.password": STRONG}, "database.password"),
    Case("quotas: default tier exists", "development",
         {"quotas.default_tier": "gold"}, {"quotas.default_tier": "premium"}, "quotas.default_tier"),
    Case("quotas: time zone", "development",
         {"quotas.timezone": "Mars/Olympus_Mons"}, {"quotas.timezone": "Europe/Paris"}, "quotas.timezone"),
    Case("experiments: percents sum to 100", "development",
         {"experiments.trial.variants": {"musicgen-small": 90, "musicgen-medium": 20},
          "experiments.trial.control": "musicgen-small"},
         {"experiments.trial.variants": {"musicgen-small": 90, "musicgen-medium": 10},
          "experiments.trial.control": "musicgen-small"}, "experiments.trial.variants"),
    Case("experiments: variants are known presets", "development",
         {"experiments.trial.variants": {"musicgen-small": 90, "musicgen-mediun": 10},
          "experiments.trial.control": "musicgen-small"},
         {"experiments.trial.variants": {"musicgen-small": 90, "musicgen-medium": 10},
          "experiments.trial.control": "musicgen-small"}, "experiments.trial.variants"),
    Case("experiments: control is a variant", "development",
         {"experiments.trial.variants": {"musicgen-small": 100}, "experiments.trial.control": "tiny"},
         {"experiments.trial.variants": {"musicgen-small": 100},
          "experiments.trial.control": "musicgen-small"}, "experiments.trial.control"),
    Case("experiments: tiers exist", "development",
         {"experiments.trial.variants": {"tiny": 100}, "experiments.trial.control": "tiny",
          "experiments.trial.tiers": ["gold"]},
         {"experiments.trial.variants": {"tiny": 100}, "experiments.trial.control": "tiny",
          "experiments.trial.tiers": ["premium"]}, "experiments.trial.tiers"),
    Case("experiments: end after start", "development",
         {"experiments.trial.variants": {"tiny": 100}, "experiments.trial.control": "tiny",
          "experiments.trial.start": "2026-12-02T00:00:00Z", "experiments.trial.end": "2026-12-01T00:00:00Z"},
         {"experiments.trial.variants": {"tiny": 100}, "experiments.trial.control": "tiny",
          "experiments.trial.start": "2026-12-01T00:00:00Z", "experiments.trial.end": "2026-12-02T00:00:00Z"},
         "experiments.trial.end"),
    Case("features: flag tiers exist", "development", {"features.priority_boost": {"tiers": ["premum"]}},
         {"features.priority_boost": {"tiers": ["premium"]}}, "features.priority_boost.tiers"),
    Case("storage: url is a folder or a bucket", "development", {"storage.url": "s3:///outputs"},
         {"storage.url": "s3://musicgen-results/outputs"}, "storage.url"),
    Case("storage: url is a folder or a bucket", "development", {"storage.url": "file://nas/out"},
         {"storage.url": "file:///srv/musicgen/out"}, "storage.url"),
    Case("storage: s3 keys in pairs", "development", {"storage.secret_access_key": STRONG},
         {"storage.access_key_id": "AKIAEXAMPLE", "storage.secret_access_key": STRONG},
         "storage.access_key_id"),
    Case("storage.secret_access_key: present and strong", "production",
         {"storage.access_key_id": "minioadmin", "storage.secret_access_key": "minioadmin"},
         {"storage.access_key_id": "minioadmin", "storage.secret_access_key": STRONG},
         "storage.secret_access_key"),
    Case("webhooks.secret: present and strong", "production",
         {"webhooks.allowed_hosts": ["hooks.example.com"]},
         {"webhooks.allowed_hosts": ["hooks.example.com"], "webhooks.secret": STRONG},
         "webhooks.secret"),
    Case("webhooks.secret: present and strong", "production", {"webhooks.public_hosts": True},
         {"webhooks.public_hosts": True, "webhooks.secret": STRONG}, "webhooks.secret"),
]

RULE_BY_NAME = {rule.name: rule for rule in RULES}


def test_every_rule_has_a_case() -> None:
    """A new rule without a failing and a passing case here fails this test."""
    assert {case.rule for case in CASES} == set(RULE_BY_NAME)


def _rule(case: Case) -> Rule:
    return RULE_BY_NAME[case.rule]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.rule} ({c.env})" for c in CASES])
def test_rule_fails(case: Case, production_env: dict[str, str]) -> None:
    layered = load_layered(case.env, overrides=case.failing)
    problem = _rule(case).check(layered.raw)
    assert problem is not None and problem.path == case.path
    assert problem in layered.report.errors  # the loader ran it and reported it
    assert layered.settings is None
    row = next(r for r in layered.report.as_dicts()["errors"] if r["rule"] == problem.rule)
    assert row["path"] == case.path and row["fix"]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.rule} ({c.env})" for c in CASES])
def test_rule_passes(case: Case, production_env: dict[str, str]) -> None:
    layered = load_layered(case.env, overrides=case.passing)
    assert _rule(case).check(layered.raw) is None
    assert layered.report.ok, layered.report.text()
    assert layered.settings is not None


# --- pydantic's own checks, reported the same way -------------------------------------------

RANGE_CASES = [
    # (key, bad value, words of the rule, words of the fix)
    ("monitoring.flower_port", 70000, "less than or equal to 65535", "between 1 and 65535"),
    ("broker.visibility_timeout", 100000, "less than or equal to 86400", "between 5 and 86400"),
    ("worker.max_memory_percent", 99.0, "less than or equal to 95", "between 10.0 and 95.0"),
    ("monitoring.error_rate_threshold_percent", -1.0, "greater than or equal to 0", "between 0.0 and 100.0"),
    ("generation.default_temperature", 0.0, "greater than or equal to 0.1", "between 0.1 and 2.0"),
    ("model.cache_size", 0, "greater than or equal to 1", "between 1 and 20"),
    ("audio.sample_rate", 44000, "Input should be 8000", "use one of"),
    ("audio.formt", "mp3", "unknown key", "did you mean 'format'?"),
    ("worker.concurrency", "many", "valid integer", "right type"),
]


@pytest.mark.parametrize(("key", "value", "rule", "fix"), RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_schema_error_has_path_value_rule_and_fix(key: str, value: Any, rule: str, fix: str,
                                                  isolated_settings_env: Path) -> None:
    layered = load_layered("development", overrides={key: value})
    assert not layered.report.ok
    [problem] = [p for p in layered.report.errors if p.path == key]
    assert problem.value == value
    assert rule in problem.rule
    assert fix in problem.fix
    text = layered.report.text()
    assert f"{key}: {problem.rule} (value: {value!r}); fix: {problem.fix}" in text


def test_unknown_section_is_an_error_with_did_you_mean(isolated_settings_env: Path) -> None:
    layered = load_layered("development", overrides={"audoi.format": "mp3"})
    [problem] = layered.report.errors
    assert (problem.path, problem.value, problem.rule) == ("audoi", {"format": "mp3"}, "unknown key")
    assert problem.fix == "did you mean 'audio'?"


def test_every_error_is_reported_at_once(isolated_settings_env: Path) -> None:
    mistakes = {
        "monitoring.flower_port": 0,                   # pydantic range
        "model.cache_size": 99,                        # pydantic range
        "audio.formt": "mp3",                          # unknown key
        "quotas.default_tier": "gold",                 # rule
        "worker.cleanup_threshold_percent": 90.0,      # rule (above max_memory_percent)
    }
    layered = load_layered("development", overrides=mistakes)
    assert len(layered.report.errors) == 5, layered.report.text()
    assert {p.path for p in layered.report.errors} == set(mistakes) - {
        "worker.cleanup_threshold_percent"} | {"worker.max_memory_percent"}
    assert layered.report.text().startswith("Settings are invalid: 5 error(s)")


def test_uncreatable_path_is_a_warning_listed_apart(isolated_settings_env: Path) -> None:
    blocker = isolated_settings_env / "a-file"
    blocker.write_text("not a directory")
    layered = load_layered("development", overrides={"storage.output_dir": str(blocker / "outputs")})
    assert layered.report.ok and layered.settings is not None  # a warning does not invalidate
    [warning] = layered.report.warnings
    assert warning.path == "storage.output_dir" and "cannot create" in warning.rule
    assert layered.report.errors == []
    assert layered.report.as_dicts()["warnings"][0]["path"] == "storage.output_dir"
    assert "Warnings (1):" in layered.report.text()


def test_warnings_and_errors_stay_in_their_own_lists(isolated_settings_env: Path) -> None:
    blocker = isolated_settings_env / "a-file"
    blocker.write_text("")
    layered = load_layered("development", overrides={"storage.temp_dir": str(blocker / "tmp"),
                                                      "model.cache_size": 0})
    assert [p.path for p in layered.report.errors] == ["model.cache_size"]
    assert [p.path for p in layered.report.warnings] == ["storage.temp_dir"]
    text = layered.report.text()
    assert text.index("model.cache_size") < text.index("Warnings (1):") < text.index("storage.temp_dir")


def test_validation_creates_no_directory(isolated_settings_env: Path) -> None:
    target = isolated_settings_env / "not" / "yet"
    layered = load_layered("development", overrides={"storage.output_dir": str(target)})
    assert layered.report.ok and layered.report.warnings == []
    assert not target.exists() and not (isolated_settings_env / "not").exists()

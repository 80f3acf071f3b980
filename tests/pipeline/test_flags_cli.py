"""``musicgen-pipeline flags list|check`` in process (CliRunner): values and their layers, the
decision and its reason, the tier read from a real quota database (SQLite and PostgreSQL), and
a typo's exit code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_settings
from pipeline.contract.flags import decide
from pipeline.contract.user_context import UserContext

pytest_plugins = ["tests.pipeline.quota_conftest"]
pytestmark = pytest.mark.usefixtures("isolated_settings_env")

runner = CliRunner()
PREMIUM_ONLY = 'features.priority_boost={tiers = ["premium"], deny = ["mallory"]}'


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


def test_list_shows_each_flag_its_value_and_the_layer_it_came_from() -> None:
    result = cli("flags", "list", "--set", PREMIUM_ONLY)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    melody = next(line for line in lines if line.startswith("melody_conditioning"))
    boost = next(line for line in lines if line.startswith("priority_boost"))
    assert melody.split() == ["melody_conditioning", "true", "(from", "default", "(schema))"]
    assert "100 %, tiers [premium], deny 1" in boost and "(from override)" in boost
    assert "read by pipeline/client/resolve.py _spec" in result.stdout


def test_list_as_json() -> None:
    result = cli("flags", "list", "--json", "--set", PREMIUM_ONLY)
    assert result.exit_code == 0, result.output
    rows = {row["flag"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"melody_conditioning", "priority_boost", "webhooks", "long_form",
                         "streaming_generation"}
    assert rows["melody_conditioning"]["rule"] is True
    assert rows["priority_boost"]["rule"]["tiers"] == ["premium"]
    assert rows["priority_boost"]["source"] == "override"


def test_check_prints_the_decision_and_why() -> None:
    on = cli("flags", "check", "priority_boost", "--user", "alice", "--tier", "premium",
             "--set", PREMIUM_ONLY)
    assert on.exit_code == 0, on.output
    assert re.fullmatch(r"priority_boost: on for alice \(tier premium\): bucket \d+\.\d < 100 %",
                        on.stdout.strip()), on.stdout
    off = cli("flags", "check", "priority_boost", "-u", "alice", "-t", "free", "--set", PREMIUM_ONLY)
    assert off.stdout.strip() == "priority_boost: off for alice (tier free): tier free not in [premium]"
    denied = cli("flags", "check", "priority_boost", "-u", "mallory", "-t", "premium", "--json",
                 "--set", PREMIUM_ONLY)
    data = json.loads(denied.stdout)
    assert (data["enabled"], data["reason"], data["tier"]) == (False, "user in deny list", "premium")


def test_check_agrees_with_the_library() -> None:
    settings = load_settings("development", overrides={"features.priority_boost": {"percentage": 30}})
    for user in ("u1", "u2", "u3", "u4", "u5", "u6"):
        expected = decide(settings.features, "priority_boost", UserContext(user, "free"))
        result = cli("flags", "check", "priority_boost", "-u", user, "-t", "free", "--json",
                     "--set", "features.priority_boost={percentage = 30}")
        data = json.loads(result.stdout)
        assert (data["enabled"], data["reason"]) == (expected.enabled, expected.reason)


def test_without_tier_it_reads_the_users_tier_from_the_quota_database(
        quota_empty_db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", quota_empty_db_url)
    assert cli("db", "upgrade").exit_code == 0
    assert cli("quota", "set", "alice", "--tier", "premium").exit_code == 0
    alice = cli("flags", "check", "priority_boost", "--user", "alice", "--set", PREMIUM_ONLY)
    assert alice.exit_code == 0, alice.output
    assert alice.stdout.startswith("priority_boost: on for alice (tier premium)")
    assert alice.stderr == ""
    bob = cli("flags", "check", "priority_boost", "--user", "bob", "--set", PREMIUM_ONLY)
    assert bob.stdout.startswith("priority_boost: off for bob (tier free)")  # no row: default tier


def test_without_a_database_it_falls_back_to_the_default_tier_with_a_note(
        isolated_settings_env: Path) -> None:
    result = cli("flags", "check", "priority_boost", "--user", "alice", "--set", PREMIUM_ONLY)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("priority_boost: off for alice (tier free)")
    assert "could not be read" in result.stderr and "default tier free" in result.stderr
    assert not (isolated_settings_env / ".musicgen" / "musicgen.db").exists()  # nothing created


def test_an_unknown_flag_name_exits_2_with_a_hint() -> None:
    result = cli("flags", "check", "priority_bost", "--user", "alice", "--tier", "free")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: no flag 'priority_bost'; did you mean 'priority_boost'?"


def test_invalid_settings_exit_1_with_the_report() -> None:
    result = cli("flags", "list", "--set", 'features.priority_boost={tiers = ["gold"]}')
    assert result.exit_code == 1
    assert "features.priority_boost.tiers" in result.stderr

"""``musicgen-pipeline db`` and ``quota``: in-process (CliRunner) on SQLite and PostgreSQL, the
real console script in a subprocess, and the database password never printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.quota import DEFAULT_TIERS, QuotaStore, make_engine
from tests.pipeline.test_migrations import HEAD

pytest_plugins = ["tests.pipeline.quota_conftest"]
pytestmark = pytest.mark.usefixtures("isolated_settings_env")

runner = CliRunner()
CONSOLE_SCRIPT = Path(sys.executable).parent / "musicgen-pipeline"
SECRET = "db-Pw-5ecret-not-to-print"  # PostgreSQL trusts local connections: any password works


@pytest.fixture
def db(quota_empty_db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty database on each backend, named by the settings' env vars (PostgreSQL also gets
    a password secret, which the commands must never print)."""
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", quota_empty_db_url)
    if quota_empty_db_url.startswith("postgresql"):
        monkeypatch.setenv("MUSICGEN_DATABASE__PASSWORD", SECRET)
    return quota_empty_db_url


def cli(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert SECRET not in result.output
    return result


def upgraded(db: str) -> str:
    result = cli("db", "upgrade")
    assert result.exit_code == 0, result.output
    return db


def test_db_upgrade_is_idempotent_and_current_reports_head(db: str) -> None:
    if db.startswith("sqlite"):  # `current` must not create an empty file as a side effect
        missing = cli("db", "current")
        assert missing.exit_code == 1
        assert "no SQLite file" in missing.output and "db upgrade" in missing.output
        assert not Path(make_url(db).database or "").exists()
    else:
        before = cli("db", "current")
        assert before.exit_code == 0, before.output
        assert f"revision: none (never migrated; head is {HEAD})" in before.stdout
        assert "postgres:***@127.0.0.1" in before.stdout  # the URL, its password masked
    first = cli("db", "upgrade")
    assert first.exit_code == 0, first.output
    assert f"revision: {HEAD} (head); upgraded from none" in first.stdout
    again = cli("db", "upgrade", "--revision", "head")
    assert again.exit_code == 0 and again.stdout.splitlines()[-1] == f"revision: {HEAD} (head)"
    now = cli("db", "current")
    assert now.exit_code == 0 and now.stdout.splitlines()[-1] == f"revision: {HEAD} (head)"


def test_db_upgrade_to_an_unknown_revision_fails_clearly(db: str) -> None:
    result = cli("db", "upgrade", "--revision", "9999")
    assert result.exit_code == 1
    assert "could not upgrade" in result.stderr and "9999" in result.stderr


def test_quota_show_on_an_unmigrated_postgresql_says_to_upgrade(db: str) -> None:
    result = cli("quota", "show", "alice")
    if db.startswith("sqlite"):  # the embedded default migrates itself on first use, as workers do
        assert result.exit_code == 0 and "tier:    free" in result.stdout
        return
    assert result.exit_code == 1
    assert "has no schema; run `musicgen-pipeline db upgrade`" in result.stderr


def test_quota_show_of_a_new_user_is_the_default_tier(db: str) -> None:
    upgraded(db)
    text = cli("quota", "show", "newcomer")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["user:", "newcomer"] and lines[1].split() == ["tier:", "free"]
    assert lines[2].startswith("daily:   0 / 10 jobs used (10 left), resets at ")
    assert lines[3].startswith("monthly: 0 / 100 jobs used (100 left), resets at ")
    data = json.loads(cli("quota", "show", "newcomer", "--json").stdout)
    assert data["tier"] == "free"
    assert {k: data["daily"][k] for k in ("used", "limit", "remaining")} == {
        "used": 0, "limit": 10, "remaining": 10}


def test_quota_set_then_show_counts_the_users_jobs(db: str) -> None:
    upgraded(db)
    result = cli("quota", "set", "alice", "--tier", "premium", "--daily", "3", "--monthly", "-1")
    assert result.exit_code == 0, result.output
    assert "tier:    premium" in result.stdout
    assert "daily:   0 / 3 jobs used (3 left)" in result.stdout
    assert "monthly: 0 / unlimited jobs used, resets at" in result.stdout
    # Charge two jobs through the library, as the producer would; the CLI must count them.
    engine = make_engine(make_url(db).set(password=SECRET).render_as_string(hide_password=False)
                         if db.startswith("postgresql") else db)
    try:
        store = QuotaStore(engine, tiers=DEFAULT_TIERS, default_tier="free")
        for n in range(2):
            store.reserve(job_id=f"job-{n}", user_id="alice", model="tiny", requested_seconds=5)
    finally:
        engine.dispose()
    data = json.loads(cli("quota", "show", "alice", "--json").stdout)
    assert data["user_id"] == "alice" and data["tier"] == "premium"
    assert {k: data["daily"][k] for k in ("used", "limit", "remaining")} == {
        "used": 2, "limit": 3, "remaining": 1}
    assert {k: data["monthly"][k] for k in ("used", "limit", "remaining")} == {
        "used": 2, "limit": "unlimited", "remaining": "unlimited"}
    assert data["daily"]["resets_at"].endswith("+00:00")
    # No --daily/--monthly: back on the tier's own limits.
    back = json.loads(cli("quota", "set", "alice", "--tier", "free", "--json").stdout)
    assert (back["daily"]["limit"], back["monthly"]["limit"]) == (10, 100)


def test_quota_set_refuses_an_unknown_tier_listing_the_tiers(db: str) -> None:
    upgraded(db)
    result = cli("quota", "set", "bob", "--tier", "gold")
    assert result.exit_code == 1
    assert "unknown tier 'gold'; known tiers: free, premium, enterprise" in result.stderr
    assert cli("quota", "show", "bob", "--json").exit_code == 0  # nothing half-written
    assert json.loads(cli("quota", "show", "bob", "--json").stdout)["tier"] == "free"


def test_quota_set_refuses_a_negative_limit_other_than_unlimited(db: str) -> None:
    upgraded(db)
    result = cli("quota", "set", "bob", "--tier", "free", "--daily", "-5")
    assert result.exit_code == 1
    assert "daily must be >= 0, -1 (unlimited)" in result.stderr


def test_an_unreachable_database_is_one_clear_line_without_the_password(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", "postgresql+psycopg://ops@127.0.0.1:1/ledger")
    monkeypatch.setenv("MUSICGEN_DATABASE__PASSWORD", SECRET)
    for args in (["quota", "show", "alice"], ["db", "current"], ["db", "upgrade"]):
        result = cli(*args)
        assert result.exit_code == 1, args
        assert "ops:***@127.0.0.1:1/ledger" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_console_script_migrates_and_sets_a_quota_on_postgresql(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.pipeline.quota_conftest import fresh_pg_database

    with fresh_pg_database() as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICGEN_")}
        env.update(MUSICGEN_DATABASE__URL=url, MUSICGEN_DATABASE__PASSWORD=SECRET)

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            proc = subprocess.run([str(CONSOLE_SCRIPT), *args], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=120, check=False)
            assert SECRET not in proc.stdout + proc.stderr
            return proc

        up = run("db", "upgrade")
        assert up.returncode == 0, up.stderr
        assert up.stdout.splitlines()[-1] == f"revision: {HEAD} (head); upgraded from none"
        assert run("quota", "set", "carol", "--tier", "enterprise").returncode == 0
        shown = run("quota", "show", "carol", "--json")
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["tier"] == "enterprise" and data["daily"]["limit"] == "unlimited"
        bad = run("quota", "set", "carol", "--tier", "platinum")
        assert bad.returncode == 1 and "known tiers: free, premium, enterprise" in bad.stderr

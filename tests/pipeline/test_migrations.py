"""The packaged Alembic migrations, on an empty SQLite file and an empty PostgreSQL database."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, insert, inspect, select

from pipeline.quota import (
    DEFAULT_TIERS,
    QuotaStore,
    current,
    daily_usage,
    make_engine,
    roll_up,
    upgrade,
)
from pipeline.quota.migrate import MIGRATIONS_DIR, alembic_config
from pipeline.quota.tables import Base, UsageLedger, UserQuota

HEAD = "0007"
REPO_ROOT = Path(__file__).resolve().parents[2]  # where ``import pipeline`` finds this tree

# quota_empty_db_url: an empty SQLite file, and an empty PostgreSQL database of its own.
pytest_plugins = ["tests.pipeline.quota_conftest"]


def test_migrations_ship_inside_the_package_with_one_head() -> None:
    assert MIGRATIONS_DIR.parent.name == "quota"
    assert {"env.py", "script.py.mako"} <= {p.name for p in MIGRATIONS_DIR.iterdir()}
    scripts = ScriptDirectory.from_config(alembic_config())
    assert scripts.get_heads() == [HEAD]


def test_upgrade_creates_the_tables_and_indexes(quota_empty_db_url: str) -> None:
    assert current(quota_empty_db_url) is None
    upgrade(quota_empty_db_url)
    assert current(quota_empty_db_url) == HEAD
    engine = make_engine(quota_empty_db_url)
    try:
        inspector = inspect(engine)
        tables = set(inspector.get_table_names())
        assert {"user_quotas", "usage_ledger", "usage_daily", "alembic_version"} <= tables
        indexes = {ix["name"]: ix["column_names"] for ix in inspector.get_indexes("usage_ledger")}
        assert indexes["ix_usage_ledger_user_id_created_at"] == ["user_id", "created_at"]
        assert indexes["ix_usage_ledger_created_at"] == ["created_at"]
        uniques = inspector.get_unique_constraints("usage_ledger")
        assert [u["column_names"] for u in uniques] == [["job_id"]]
        daily_pk = inspector.get_pk_constraint("usage_daily")
        assert daily_pk["name"] == "pk_usage_daily"
        assert daily_pk["constrained_columns"] == ["day", "user_id", "model"]
    finally:
        engine.dispose()


def test_upgrade_twice_is_a_no_op_that_keeps_data(quota_empty_db_url: str) -> None:
    upgrade(quota_empty_db_url)
    engine = make_engine(quota_empty_db_url)
    try:
        with engine.begin() as conn:
            now = datetime(2026, 11, 21, tzinfo=UTC)
            conn.execute(insert(UserQuota).values(
                user_id="alice", tier="free", created_at=now, updated_at=now))
        upgrade(quota_empty_db_url)
        assert current(quota_empty_db_url) == HEAD
        with engine.connect() as conn:
            assert conn.scalars(select(UserQuota.user_id)).all() == ["alice"]
    finally:
        engine.dispose()


def test_0002_adds_usage_daily_to_a_0001_ledger_and_goes_back(quota_empty_db_url: str) -> None:
    upgrade(quota_empty_db_url, "0001")
    engine = make_engine(quota_empty_db_url)
    try:
        assert "usage_daily" not in inspect(engine).get_table_names()
        created = datetime(2026, 11, 21, 9, tzinfo=UTC)
        with engine.begin() as conn:
            conn.execute(insert(UsageLedger).values(
                job_id="j1", user_id="alice", model="small", requested_seconds=8.0,
                produced_seconds=8.0, gpu_seconds=2.0, status="succeeded", created_at=created))
        upgrade(quota_empty_db_url)
        assert current(quota_empty_db_url) == HEAD
        # The ledger written before the upgrade rolls up into the new table.
        assert roll_up(engine, day=date(2026, 11, 21)) == 1
        [row] = daily_usage(engine, since=date(2026, 11, 21), until=date(2026, 11, 21))
        assert (row["user_id"], row["jobs"], row["succeeded"], row["gpu_seconds"]) == (
            "alice", 1, 1, 2.0)
        command.downgrade(alembic_config(quota_empty_db_url), "0001")
        assert current(quota_empty_db_url) == "0001"
        tables = set(inspect(engine).get_table_names())
        assert "usage_daily" not in tables and "usage_ledger" in tables
    finally:
        engine.dispose()


def _ledger_schema(engine: Engine) -> dict[str, Any]:
    """usage_ledger's columns, indexes and constraints as the database reports them."""
    inspector = inspect(engine)
    return {
        "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default"))
                    for c in inspector.get_columns("usage_ledger")],
        "indexes": sorted((ix["name"], tuple(ix["column_names"]))
                          for ix in inspector.get_indexes("usage_ledger")),
        "uniques": [(u["name"], u["column_names"])
                    for u in inspector.get_unique_constraints("usage_ledger")],
        "pk": inspector.get_pk_constraint("usage_ledger"),
    }


@pytest.mark.parametrize("start", ["0001", "0002"])
def test_0003_adds_batch_size_to_a_ledger_with_rows_and_goes_back(quota_empty_db_url: str,
                                                                   start: str) -> None:
    upgrade(quota_empty_db_url, start)
    engine = make_engine(quota_empty_db_url)
    try:
        before = _ledger_schema(engine)
        created = datetime(2026, 11, 21, 9, tzinfo=UTC)
        with engine.begin() as conn:  # one job finished before batching, one still running
            conn.execute(insert(UsageLedger), [
                {"job_id": "old", "user_id": "alice", "model": "small", "requested_seconds": 8.0,
                 "produced_seconds": 8.0, "gpu_seconds": 2.0, "status": "succeeded",
                 "created_at": created, "worker": "gpu-0", "attempts": 1},
                {"job_id": "running", "user_id": "alice", "model": "small",
                 "requested_seconds": 8.0, "produced_seconds": None, "gpu_seconds": None,
                 "status": "started", "created_at": created,
                 "worker": "gpu-0", "attempts": 1}])
        upgrade(quota_empty_db_url)
        assert current(quota_empty_db_url) == HEAD
        # The job that was running across the upgrade finishes with the new worker's numbers.
        store = QuotaStore(engine, tiers=DEFAULT_TIERS, default_tier="free")
        assert store.mark_finished("running", status="succeeded", produced_seconds=8.0,
                                   gpu_seconds=0.5, batch_size=4)
        rows = {r["job_id"]: r for r in store.ledger()}
        assert (rows["old"]["batch_size"], rows["old"]["gpu_seconds"]) == (None, 2.0)
        assert (rows["running"]["batch_size"], rows["running"]["gpu_seconds"]) == (4, 0.5)
        command.downgrade(alembic_config(quota_empty_db_url), "0002")
        assert current(quota_empty_db_url) == "0002"
        if start == "0002":  # the table is back as 0002 made it (SQLite rebuilt it: batch mode)
            assert _ledger_schema(engine) == before
        assert "batch_size" not in {c["name"] for c in inspect(engine).get_columns("usage_ledger")}
        with engine.connect() as conn:
            assert sorted(conn.execute(select(UsageLedger.job_id, UsageLedger.gpu_seconds))
                          .all()) == [("old", 2.0), ("running", 0.5)]
    finally:
        engine.dispose()


def test_workers_booting_together_all_migrate_cleanly(quota_empty_db_url: str) -> None:
    # Worker processes may start at once and each migrate on boot; the database lock (BEGIN
    # IMMEDIATE / advisory lock) must make them take turns. Each imports first, says "ready",
    # then waits for "go", so that the upgrades really overlap.
    code = ("import sys; from pipeline.quota import upgrade; print('ready', flush=True); "
            "sys.stdin.readline(); upgrade(sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, quota_empty_db_url], cwd=REPO_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    outputs = [p.communicate("go\n", timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert current(quota_empty_db_url) == HEAD


def test_threads_upgrading_together_take_turns(quota_empty_db_url: str) -> None:
    barrier = threading.Barrier(3)

    def boot(_: int) -> None:
        barrier.wait()
        upgrade(quota_empty_db_url)

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(boot, range(3)))  # re-raises any thread's error
    assert current(quota_empty_db_url) == HEAD


def test_models_match_the_migrated_schema(quota_empty_db_url: str) -> None:
    upgrade(quota_empty_db_url)
    engine = make_engine(quota_empty_db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()

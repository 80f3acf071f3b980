"""Fixtures for the quota tests: real SQLite files and real PostgreSQL databases.

Load it as a plugin (``pytest_plugins = ["tests.pipeline.quota_conftest"]``), not with an
import: pytest must import it first to rewrite its asserts, or it warns (an error here).

Every PostgreSQL database here is created with a unique name and dropped afterwards, so tests
never touch tables that belong to anyone else on the server. A server that cannot be reached is
an error, not a skip. Point ``PIPELINE_TEST_POSTGRES_URL`` at another server when needed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, make_url, text

from pipeline.quota import DEFAULT_TIERS, QuotaStore, TierLimits, make_engine, upgrade

PG_ADMIN_URL = os.environ.get("PIPELINE_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


class FakeClock:
    """A settable clock to inject into ``QuotaStore`` (always aware)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, iso: str) -> None:
        """Move to ``iso`` (an ISO 8601 string with an offset)."""
        self.now = datetime.fromisoformat(iso)
        assert self.now.tzinfo is not None


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """Create an empty uniquely named PostgreSQL database; yield its URL; drop it."""
    name = f"quota_test_{uuid.uuid4().hex[:12]}"
    admin: Engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            # FORCE ends connections a failed test may have left open (PostgreSQL 13+).
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def sqlite_url(path: Path) -> str:
    """The URL of a SQLite database file at ``path``."""
    return f"sqlite:///{path}"


@pytest.fixture(params=BACKENDS)
def quota_empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, never migrated database on each backend (PostgreSQL: its own, per test)."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "empty.db")
        return
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(scope="module")
def quota_pg_module_url() -> Iterator[str]:
    """One migrated PostgreSQL database for the whole test module."""
    with fresh_pg_database() as url:
        upgrade(url)
        yield url


@pytest.fixture(params=BACKENDS)
def quota_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty quota database on each backend."""
    if request.param == "sqlite":
        path = sqlite_url(tmp_path / "quota.db")
        upgrade(path)
        return path
    url: str = request.getfixturevalue("quota_pg_module_url")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:  # the module's own database: emptying it is safe
            conn.execute(text("TRUNCATE usage_ledger, user_quotas, usage_daily"))
    finally:
        engine.dispose()
    return url


@pytest.fixture
def quota_clock() -> FakeClock:
    """The store's clock, starting at noon UTC on 2026-11-21."""
    return FakeClock(datetime(2026, 11, 21, 12, 0, tzinfo=UTC))


StoreFactory = Callable[..., QuotaStore]


@pytest.fixture
def make_quota_store(quota_db_url: str, quota_clock: FakeClock) -> Iterator[StoreFactory]:
    """Build stores on ``quota_db_url`` (engine kwargs pass through); engines are disposed after."""
    engines: list[Engine] = []

    def factory(*, tiers: dict[str, TierLimits] | None = None, default_tier: str = "free",
                timezone: str = "UTC", **engine_kwargs: Any) -> QuotaStore:
        engine = make_engine(quota_db_url, **engine_kwargs)
        engines.append(engine)
        return QuotaStore(engine, tiers=tiers or DEFAULT_TIERS, default_tier=default_tier,
                          timezone=timezone, clock=quota_clock)

    yield factory
    for engine in engines:
        engine.dispose()


@pytest.fixture
def quota_store(make_quota_store: StoreFactory) -> QuotaStore:
    """A store with the documented tiers (free 10/100, premium 100/1000, enterprise unlimited)."""
    return make_quota_store()

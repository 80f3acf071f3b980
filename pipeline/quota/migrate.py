"""Bring a quota database's schema up to date with Alembic, from code.

The migrations ship inside the package (``pipeline/quota/migrations``) and the Alembic
``Config`` is built here, so an installed wheel can migrate with no ``alembic.ini`` and from any
working directory. Upgrading is idempotent: a database already at the target is left alone.

A new revision (after changing ``tables.py``), from a scratch database at head::

    from alembic import command
    command.revision(alembic_config("sqlite:///scratch.db"), "what changed",
                     autogenerate=True, rev_id="0004")
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.quota.tables import make_engine

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported inside the functions: a calling service imports this package through
# `import pipeline` and should not pay a second of start-up for migrations it never runs.

__all__ = ["MIGRATIONS_DIR", "alembic_config", "current", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Alembic runs env.py through a process-wide ``alembic.context`` proxy, so two threads migrating
# at once would hijack each other's context. Processes are kept apart by the database instead.
_IN_PROCESS = threading.Lock()


def alembic_config(url: str | None = None) -> Config:
    """Return an Alembic ``Config`` for the packaged migrations (``url`` for the CLI-like use)."""
    from alembic.config import Config

    cfg = Config()
    # Config values go through configparser interpolation: a literal % must be doubled.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the newest)."""
    from alembic import command

    engine = make_engine(url)
    try:
        # One connection and one transaction for the whole run, handed to env.py: on SQLite it
        # begins IMMEDIATE (make_engine) and on PostgreSQL env.py takes an advisory lock, so
        # processes migrating at once take turns and the later ones find the schema at head.
        with _IN_PROCESS, engine.begin() as connection:
            cfg = alembic_config()
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def current(url: str) -> str | None:
    """Return the database's current revision, or None when it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()

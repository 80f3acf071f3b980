"""Alembic environment for the quota tables.

Called by ``pipeline.quota.migrate`` with an open connection in ``config.attributes``; the
``sqlalchemy.url`` main option is the fallback for running Alembic's commands by hand.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from pipeline.quota.tables import Base, make_engine

# Any constant works; it only has to be the same in every process that migrates this schema.
_PG_MIGRATION_LOCK = 0x6D7573_71756F  # "mus" "quo"


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      compare_type=True, transaction_per_migration=False)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Workers starting together would otherwise race to create the same tables; the
            # lock is held until the migration transaction ends, then the next sees "at head".
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": _PG_MIGRATION_LOCK})
        context.run_migrations()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url set")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


_main()

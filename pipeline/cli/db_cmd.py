"""`musicgen-pipeline db upgrade|current`: the quota and usage-ledger database's schema.

Also the one place the other commands (quota, stats, health) open that database, so every one
of them reports an unreachable or unmigrated database the same way and never prints its
password: URLs are shown with ``***`` and every message is scrubbed of the secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer

from pipeline.cli.common import EnvOption, SetsOption, fail, load_or_exit, parse_sets
from pipeline.config.schema import Settings
from pipeline.errors import PipelineError, ServiceUnavailable

if TYPE_CHECKING:  # sqlalchemy and alembic load only when a command runs
    from pipeline.quota import QuotaStore

T = TypeVar("T")

db_app = typer.Typer(help="The quota and usage-ledger database: schema migrations.",
                     no_args_is_help=True)


def shown_url(url: str) -> str:
    """``url`` safe to print: any password replaced by ``***``."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<database.url that does not parse>"


def redact(text: str, settings: Settings) -> str:
    """``text`` with the database password (from its secret or inline in the URL) as ``***``."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    from pipeline.quota.configured import database_url

    secrets = []
    if settings.database.password is not None:
        secrets.append(settings.database.password.get_secret_value())
    try:
        inline = make_url(database_url(settings)).password
    except ArgumentError:
        inline = None
    if inline:
        secrets.append(str(inline))
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def describe_error(exc: BaseException, settings: Settings) -> str:
    """One password-free line saying what a database error was."""
    # The driver's own message says what went wrong; SQLAlchemy's wrapper adds the SQL text
    # and a link, which only make the one line long.
    orig = getattr(exc, "orig", None)
    lines = str(orig if orig is not None else exc).strip().splitlines()
    return redact(lines[0] if lines else type(exc).__name__, settings)


def with_store(settings: Settings, work: Callable[[QuotaStore], T]) -> T:
    """``work`` on the quota store of ``settings`` (created on first use, as an operator's
    write may), its pipeline errors printed as one line with exit 1 (``fail``)."""
    try:
        with open_store(settings, must_exist=False) as store:
            return work(store)
    except PipelineError as exc:
        fail(exc)


@contextmanager
def open_store(settings: Settings, *, must_exist: bool) -> Iterator[QuotaStore]:
    """The quota store of ``settings``, checked to be reachable and migrated; closed after.

    ``must_exist`` (stats, health): only read; a SQLite file that is not there, or a database
    without the schema, is an error, because a wrong path must not look like an idle service.
    Otherwise (quota, an operator's write) a SQLite file is created and migrated on first use
    (``store_for(migrate=True)``). PostgreSQL is always migrated by the operator (``db upgrade``). Errors,
    including those of queries made inside the ``with``, become ``ServiceUnavailable`` with a
    one-line, password-free reason.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from pipeline.quota import current
    from pipeline.quota.configured import database_url, sqlite_path, store_for

    url = database_url(settings)
    where = shown_url(url)
    path = sqlite_path(url)
    if path is not None and must_exist and not path.is_file():
        raise ServiceUnavailable(f"database unreachable: no SQLite file at {path} "
                                 "(database.url); has no job used these settings yet?")
    try:
        if path is None or must_exist:
            if current(url) is None:
                raise ServiceUnavailable(f"database {where} has no schema; run "
                                         "`musicgen-pipeline db upgrade`")
        store = store_for(settings, migrate=not must_exist)
    except (SQLAlchemyError, OSError) as exc:
        raise ServiceUnavailable(f"database unreachable at {where}: "
                                 f"{describe_error(exc, settings)}") from exc
    try:
        yield store
    except SQLAlchemyError as exc:
        raise ServiceUnavailable(f"database error at {where}: "
                                 f"{describe_error(exc, settings)}") from exc
    finally:
        store.close()


def _head() -> str | None:
    from alembic.script import ScriptDirectory

    from pipeline.quota.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _revision_line(revision: str | None) -> str:
    head = _head()
    if revision is None:
        return f"revision: none (never migrated; head is {head})"
    return f"revision: {revision} ({'head' if revision == head else f'head is {head}'})"


def _database(env: str | None, sets: list[str] | None) -> tuple[Settings, str, Path | None]:
    """The settings of a ``db`` command, their database URL, and its SQLite file if it is one."""
    from pipeline.quota.configured import database_url, sqlite_path

    settings = load_or_exit(env, parse_sets(sets))
    url = database_url(settings)
    return settings, url, sqlite_path(url)


@db_app.command("upgrade")
def upgrade_cmd(
    revision: str = typer.Option("head", "--revision", "-r", help="target revision"),
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Create or update the quota tables (idempotent: a database at the target is left alone)."""
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from pipeline.quota import current, upgrade

    settings, url, path = _database(env, sets)
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        before = current(url)
        upgrade(url, revision)
        after = current(url)
    except (CommandError, SQLAlchemyError, OSError) as exc:
        fail(ServiceUnavailable(f"could not upgrade {shown_url(url)} to {revision!r}: "
                                f"{describe_error(exc, settings)}"))
    typer.echo(f"database: {shown_url(url)}")
    typer.echo(_revision_line(after)
               + ("" if before == after else f"; upgraded from {before or 'none'}"))


@db_app.command("current")
def current_cmd(
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Print the database's schema revision (``none`` when it was never migrated)."""
    from sqlalchemy.exc import SQLAlchemyError

    from pipeline.quota import current

    settings, url, path = _database(env, sets)
    if path is not None and not path.is_file():  # connecting would create an empty file
        fail(ServiceUnavailable(f"no SQLite file at {path} (database.url); "
                                "`musicgen-pipeline db upgrade` creates it"))
    try:
        revision = current(url)
    except SQLAlchemyError as exc:
        fail(ServiceUnavailable(f"database unreachable at {shown_url(url)}: "
                                f"{describe_error(exc, settings)}"))
    typer.echo(f"database: {shown_url(url)}")
    typer.echo(_revision_line(revision))

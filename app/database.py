"""The shared `databases.Database`, migrations, and the few SQL helpers every feature uses."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pymysql
import sqlalchemy.exc
from databases import Database
from pymysql.constants.CLIENT import FOUND_ROWS

if TYPE_CHECKING:
    from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# `databases` lets the driver's own exceptions through.
INTEGRITY_ERRORS = (sqlite3.IntegrityError, pymysql.err.IntegrityError, sqlalchemy.exc.IntegrityError)


def make_database(settings: Settings) -> Database:
    """A Database for DATABASE_URL, with sensible pool and lock-wait options per backend."""
    if settings.is_sqlite:
        return Database(settings.database_url, timeout=30)
    return Database(
        settings.database_url,
        # No connection at start-up: a worker (re)started while the database is down must come
        # up and answer 503 until it returns, not fail to start (uvicorn then stops them all).
        min_size=0,
        max_size=settings.db_pool_size,
        pool_recycle=3600,
        charset="utf8mb4",
        # Every rule here is a guarded single-row UPDATE; REPEATABLE READ's gap locks would
        # only make concurrent sign-ins of different customers deadlock on index ranges.
        init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        # A guarded UPDATE's row count is the rows its WHERE matched, as on SQLite: MySQL would
        # otherwise leave out a matched row whose values happen to be unchanged.
        client_flag=FOUND_ROWS,
    )


def sync_url(url: str) -> str:
    """The synchronous twin of an async URL (Alembic runs synchronously)."""
    return url.replace("sqlite+aiosqlite://", "sqlite://").replace("mysql+aiomysql://", "mysql+pymysql://")


def _alembic_config(database_url: str) -> object:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Apply migrations/ to the database (idempotent)."""
    from alembic import command

    command.upgrade(_alembic_config(database_url), revision)  # type: ignore[arg-type]


def pending_migrations(database_url: str) -> list[str]:
    """The revisions of migrations/ this database has not had yet (empty: up to date)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, pool

    script = ScriptDirectory.from_config(_alembic_config(database_url))  # type: ignore[arg-type]
    engine = create_engine(sync_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
    applied = set()
    for rev in current:
        applied |= {r.revision for r in script.iterate_revisions(rev, "base")}
    return [r.revision for r in script.walk_revisions() if r.revision not in applied][::-1]


# Driver error codes that mean the server cannot be reached or dropped us (not a bad query).
MYSQL_UNAVAILABLE = {
    1040,  # too many connections
    1053,  # server shutdown in progress
    1927,  # connection was killed
    2002, 2003, 2005,  # cannot connect (socket, TCP, unknown host)
    2006, 2013, 2055,  # server has gone away, lost connection
}
SQLITE_UNAVAILABLE = ("unable to open database file", "database is locked", "disk i/o error")
MYSQL_MISSING_SCHEMA = {1146, 1054}  # no such table, no such column
SQLITE_MISSING_SCHEMA = ("no such table", "no such column")


def _driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception (SQLAlchemy wraps it; `databases` passes it through)."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
        return exc.orig
    return exc


def is_unavailable(exc: BaseException) -> bool:
    """The database is down or unreachable (answer 503 and retry later), as opposed to a bug or
    a schema that needs migrating."""
    exc = _driver_error(exc)
    if isinstance(exc, ConnectionError):  # refused, reset, broken pipe on the driver's socket
        return True
    if isinstance(exc, pymysql.err.InterfaceError):  # the driver's connection is closed
        return True
    if isinstance(exc, pymysql.err.OperationalError):
        return bool(exc.args) and exc.args[0] in MYSQL_UNAVAILABLE
    if isinstance(exc, sqlite3.OperationalError):
        return str(exc).lower().startswith(SQLITE_UNAVAILABLE)
    return False


def is_missing_schema(exc: BaseException) -> bool:
    """A table or column the code expects is not there: migrations were not applied."""
    exc = _driver_error(exc)
    if isinstance(exc, pymysql.err.ProgrammingError | pymysql.err.OperationalError):
        return bool(exc.args) and exc.args[0] in MYSQL_MISSING_SCHEMA
    if isinstance(exc, sqlite3.OperationalError):
        return str(exc).lower().startswith(SQLITE_MISSING_SCHEMA)
    return False


DEADLOCK_CODES = {1213, 1205}  # deadlock, lock wait timeout


def is_deadlock(exc: BaseException) -> bool:
    """A transient lock conflict worth one more try, not a database outage."""
    return isinstance(exc, pymysql.err.OperationalError) and bool(exc.args) and exc.args[0] in DEADLOCK_CODES


async def retrying(work: Callable[[], Awaitable[T]], *, tries: int = 3) -> T:
    """Run `work` again after a deadlock or lock-wait timeout (each try starts afresh)."""
    for attempt in range(tries):
        try:
            return await work()
        except Exception as exc:
            if attempt == tries - 1 or not is_deadlock(exc):
                raise
            await asyncio.sleep(0.005 * (attempt + 1))
    raise AssertionError("unreachable")


async def transact(db: Database, work: Callable[[], Awaitable[T]], *, tries: int = 3) -> T:
    """Run `work` in a transaction, again after a deadlock (each try starts afresh)."""

    async def once() -> T:
        async with db.transaction():
            return await work()

    return await retrying(once, tries=tries)


async def ping(db: Database) -> bool:
    """True when the database answers."""
    try:
        return (await db.fetch_val("SELECT 1")) == 1
    except Exception:
        return False

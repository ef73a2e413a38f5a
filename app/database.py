"""The shared `databases.Database`, migrations, and the few SQL helpers every feature uses."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pymysql
import sqlalchemy.exc
from databases import Database

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
        min_size=1,
        max_size=settings.db_pool_size,
        pool_recycle=3600,
        charset="utf8mb4",
        # Every rule here is a guarded single-row UPDATE; REPEATABLE READ's gap locks would
        # only make concurrent sign-ins of different customers deadlock on index ranges.
        init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    )


def sync_url(url: str) -> str:
    """The synchronous twin of an async URL (Alembic runs synchronously)."""
    return url.replace("sqlite+aiosqlite://", "sqlite://").replace("mysql+aiomysql://", "mysql+pymysql://")


def migrate(database_url: str, revision: str = "head") -> None:
    """Apply migrations/ to the database (idempotent)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.upgrade(config, revision)


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

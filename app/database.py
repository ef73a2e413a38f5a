"""The shared `databases.Database`, migrations, and the few SQL helpers every feature uses."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiomysql
import pymysql
import sqlalchemy.exc
from databases import Database
from databases.backends.mysql import MySQLBackend
from pymysql.constants.CLIENT import FOUND_ROWS

if TYPE_CHECKING:
    from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
log = logging.getLogger(__name__)

# `databases` lets the driver's own exceptions through.
INTEGRITY_ERRORS = (sqlite3.IntegrityError, pymysql.err.IntegrityError, sqlalchemy.exc.IntegrityError)


def make_database(settings: Settings) -> Database:
    """A Database for DATABASE_URL, with sensible pool and lock-wait options per backend; with
    DATABASE_FAILOVER, one whose pool moves on to the next node when its node fails."""
    if settings.is_sqlite:
        return Database(settings.database_url, timeout=30)
    failover: dict[str, object] = {}
    if settings.database_failover:
        # A node that accepts but never answers (hung, cut off) must not hold a request longer.
        failover = {"failover": settings.database_failover, "connect_timeout": 5}
    return (FailoverDatabase if failover else Database)(
        settings.database_url,
        **failover,
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


class FailoverPool(aiomysql.Pool):
    """aiomysql's pool over a list of interchangeable nodes (a Galera cluster): it connects to one
    node at a time and moves on to the next (in a circle) when a connection to it cannot be made,
    when a new connection finds the node not ready (Galera's wsrep_ready is OFF: cut off from the
    majority, or still joining), or when a statement gets 1047 (the node left the majority). Idle
    connections to a node left behind are closed, so after a fail-over every request runs on the
    new node. It stays on the new node when the old one returns (no fail-back: nothing to gain).

    The requests whose statements were under way on the node that died fail (503), as they would
    with one server; the next ones run on the next node. Only new connections are checked
    (wsrep_on, then wsrep_ready: two round trips; a server without Galera is always ready)."""

    def __init__(self, nodes: Sequence[tuple[str, int]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nodes = list(nodes)
        self.current = 0

    @property
    def node(self) -> tuple[str, int]:
        return self.nodes[self.current]

    def node_failed(self, node: tuple[str, int], reason: object) -> None:
        """`node` failed: move on, unless another request moved on already."""
        if node == self.node and len(self.nodes) > 1:
            self.current = (self.current + 1) % len(self.nodes)
            log.warning("database node %s:%s failed (%s): using %s:%s now", *node, reason, *self.node)

    async def _open(self) -> Any:
        """A new connection to the current node, else to the next ones (each tried once)."""
        for attempt in range(len(self.nodes)):
            host, port = node = self.node
            conn = _WatchedConnection(self, host=host, port=port, echo=self._echo, loop=self._loop,
                                      **{k: v for k, v in self._conn_kwargs.items() if k not in ("host", "port")})
            try:
                await conn._connect()
                ready = True
                async with conn.cursor() as cur:
                    await cur.execute("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'")
                    row = await cur.fetchone()
                    if row is not None and str(row[1]).upper() == "ON":
                        await cur.execute("SHOW GLOBAL STATUS LIKE 'wsrep_ready'")
                        row = await cur.fetchone()
                        ready = row is not None and str(row[1]).upper() == "ON"
                        if ready:
                            # Reads wait until this node has applied what the cluster committed
                            # before them: a session revoked or a step written through another
                            # node is seen here at once (pools of different workers may be on
                            # different nodes after a fail-over).
                            await cur.execute("SET SESSION wsrep_sync_wait = 1")
                if not ready:
                    conn.close()
                    raise pymysql.err.OperationalError(NOT_PRIMARY, "wsrep_ready is OFF: this node is not "
                                                                    "part of the cluster's majority yet")
                return conn
            except Exception as exc:
                conn.close()
                if attempt == len(self.nodes) - 1 or not is_unavailable(exc):
                    raise
                self.node_failed(node, exc)
        raise AssertionError("unreachable")

    async def _fill_free_pool(self, override_min: bool) -> None:
        # aiomysql's own, with connections made by _open, and those to other nodes dropped.
        for conn in list(self._free):
            stale = conn._reader.at_eof() or conn._reader.exception() or conn._reader.eof_received
            recycle = self._recycle > -1 and self._loop.time() - conn.last_usage > self._recycle
            if stale or recycle or (conn.host, conn.port) != self.node:
                self._free.remove(conn)
                conn.close()
        while self.size < self.minsize:
            await self._add()
        if not self._free and override_min and (not self.maxsize or self.size < self.maxsize):
            await self._add()

    async def _add(self) -> None:
        self._acquiring += 1
        try:
            self._free.append(await self._open())
            self._cond.notify()
        finally:
            self._acquiring -= 1


# With DATABASE_FAILOVER, a statement with no answer in this time fails its node (every statement
# of this app takes milliseconds; migrations run apart, through Alembic).
QUERY_TIMEOUT = 15.0


class _WatchedConnection(aiomysql.Connection):
    """Tells its pool when a statement finds its node out of the cluster (1047), and closes itself
    (the pool drops closed connections)."""

    def __init__(self, pool: FailoverPool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._failover_pool = pool

    async def query(self, sql: str, unbuffered: bool = False) -> int:
        try:
            return int(await asyncio.wait_for(super().query(sql, unbuffered), QUERY_TIMEOUT))
        except TimeoutError:
            # A node that took the connection but stopped answering (frozen, cut off by the
            # network) would otherwise hold this request, then the whole pool, until TCP gives up.
            self.close()
            self._failover_pool.node_failed((self.host, self.port), "no answer")
            raise pymysql.err.OperationalError(2013, f"no answer from {self.host}:{self.port} within "
                                                     f"{QUERY_TIMEOUT:.0f} s") from None
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] == NOT_PRIMARY:
                self.close()
                self._failover_pool.node_failed((self.host, self.port), exc)
            raise


class FailoverMySQLBackend(MySQLBackend):
    """`databases`' MySQL backend with a FailoverPool over DATABASE_URL's node and the `failover`
    ones (same user, password and database)."""

    _pool: FailoverPool | None

    def __init__(self, database_url: Any, *, failover: Sequence[tuple[str, int]], **options: Any) -> None:
        super().__init__(database_url, **options)
        self._nodes = [(self._database_url.hostname, self._database_url.port or 3306), *failover]

    async def connect(self) -> None:
        assert self._pool is None, "DatabaseBackend is already running"
        kwargs = self._get_connection_kwargs()
        self._pool = FailoverPool(
            self._nodes, minsize=kwargs.pop("minsize", 1), maxsize=kwargs.pop("maxsize", 10),
            echo=kwargs.pop("echo", False), pool_recycle=kwargs.pop("pool_recycle", -1),
            loop=asyncio.get_running_loop(), user=self._database_url.username, password=self._database_url.password,
            db=self._database_url.database, autocommit=True, **kwargs)


class FailoverDatabase(Database):
    """A Database whose MySQL URLs use FailoverMySQLBackend (option `failover=[(host, port), ...]`)."""

    SUPPORTED_BACKENDS = {**Database.SUPPORTED_BACKENDS, "mysql": "app.database:FailoverMySQLBackend"}


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
NOT_PRIMARY = 1047  # Galera: "WSREP has not yet prepared node for application use" (ER_UNKNOWN_COM_ERROR)
MYSQL_UNAVAILABLE = {
    1040,  # too many connections
    # A Galera node cut off from the majority (non-Primary) or still joining: it takes the
    # connection and answers SELECT 1, but every statement on a table gets 1047. Other nodes may
    # well be up (DATABASE_FAILOVER moves to them).
    NOT_PRIMARY,
    1053,  # server shutdown in progress
    1927,  # connection was killed
    2002, 2003, 2005,  # cannot connect (socket, TCP, unknown host)
    2006, 2013, 2055,  # server has gone away, lost connection
}
SQLITE_UNAVAILABLE = ("unable to open database file", "database is locked", "disk i/o error")
MYSQL_MISSING_SCHEMA = {1146, 1054}  # no such table, no such column
SQLITE_MISSING_SCHEMA = ("no such table", "no such column")


def driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception (SQLAlchemy wraps it; `databases` passes it through)."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
        return exc.orig
    return exc


def is_unavailable(exc: BaseException) -> bool:
    """The database is down or unreachable (answer 503 and retry later), as opposed to a bug or
    a schema that needs migrating."""
    exc = driver_error(exc)
    if isinstance(exc, ConnectionError):  # refused, reset, broken pipe on the driver's socket
        return True
    if isinstance(exc, pymysql.err.InterfaceError):  # the driver's connection is closed
        return True
    if isinstance(exc, pymysql.err.OperationalError):
        return bool(exc.args) and exc.args[0] in MYSQL_UNAVAILABLE
    if isinstance(exc, sqlite3.OperationalError):
        return str(exc).lower().startswith(SQLITE_UNAVAILABLE)
    return False


# SQLite on a full disk says SQLITE_FULL, or, when the WAL or its index cannot grow, one of
# these I/O errors (which a failing disk gives too).
SQLITE_FULL = {"SQLITE_FULL", "SQLITE_IOERR_WRITE", "SQLITE_IOERR_SHMSIZE", "SQLITE_IOERR_TRUNCATE",
               "SQLITE_IOERR_FSYNC"}
MYSQL_FULL = {1021, 1114}  # disk full, table full


def is_storage_full(exc: BaseException) -> bool:
    """A write failed for want of space (or a failing disk): nothing was written (SQLite and
    InnoDB roll the transaction back whole); the operator must act. Reads still work."""
    exc = driver_error(exc)
    if isinstance(exc, pymysql.err.OperationalError):
        return bool(exc.args) and exc.args[0] in MYSQL_FULL
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorname", None) in SQLITE_FULL
    return False


def is_missing_schema(exc: BaseException) -> bool:
    """A table or column the code expects is not there: migrations were not applied."""
    exc = driver_error(exc)
    if isinstance(exc, pymysql.err.ProgrammingError | pymysql.err.OperationalError):
        return bool(exc.args) and exc.args[0] in MYSQL_MISSING_SCHEMA
    if isinstance(exc, sqlite3.OperationalError):
        return str(exc).lower().startswith(SQLITE_MISSING_SCHEMA)
    return False


# Deadlock, lock wait timeout. Galera reports its conflicts as 1213 too (checked against MariaDB
# 10.11 with galera-4, tests/test_galera.py): a transaction that loses certification to a
# concurrent write through another node fails at COMMIT, and one aborted by a replicated write
# ("brute force" abort) fails at its next statement or at COMMIT. Both are safe to run again.
DEADLOCK_CODES = {1213, 1205}


def is_deadlock(exc: BaseException) -> bool:
    """A transient lock conflict worth one more try (a deadlock, a lock wait timeout, a Galera
    certification failure), not a database outage."""
    exc = driver_error(exc)
    return isinstance(exc, pymysql.err.OperationalError) and bool(exc.args) and exc.args[0] in DEADLOCK_CODES


async def retrying(work: Callable[[], Awaitable[T]], *, tries: int = 3) -> T:
    """Run `work` again after a deadlock or lock-wait timeout (each try starts afresh)."""
    for attempt in range(tries):
        try:
            return await work()
        except Exception as exc:
            if attempt == tries - 1 or not is_deadlock(exc):
                raise
            log.info("database conflict %s (a deadlock, or a Galera certification failure): trying again",
                     driver_error(exc).args[0])
            await asyncio.sleep(0.005 * (attempt + 1))
    raise AssertionError("unreachable")


async def transact(db: Database, work: Callable[[], Awaitable[T]], *, tries: int = 3) -> T:
    """Run `work` in a transaction, again after a deadlock (each try starts afresh)."""

    async def once() -> T:
        connection = db.connection()
        held = connection._connection_counter
        try:
            async with db.transaction():
                return await work()
        finally:
            # `databases` (0.9, pinned) hands the connection back only when BEGIN, COMMIT or
            # ROLLBACK succeed. Galera fails a conflicting transaction at COMMIT, and a dead node
            # fails all three: each would keep a pooled connection for ever, until the pool is
            # exhausted and every request waits. (aiomysql closes what it gets back mid-transaction.)
            while connection._connection_counter > held:
                await connection.__aexit__()

    return await retrying(once, tries=tries)


async def ping(db: Database) -> bool:
    """True when the database answers."""
    try:
        return (await db.fetch_val("SELECT 1")) == 1
    except Exception:
        return False

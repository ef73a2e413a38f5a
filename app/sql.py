"""The one way this app runs SQL: a SQLAlchemy Core statement, compiled once per dialect and
run on the driver cursor of the `databases` connection (so inside its transactions).

`databases` would compile every statement on every call and build SQLAlchemy result metadata
for every row, several times the cost of the round trip itself (bench/README.md). Here the SQL
text, the bind processors (our UTCDateTime, SQLite's date strings, booleans) and the result
processors are worked out once, through SQLAlchemy's public API (the compiled statement's
`string` and `bind_names`, each type's `dialect_impl(...).bind_processor/result_processor`,
the statement's `selected_columns`), and reused; values are passed as driver parameters,
never formatted into the SQL.
"""

from __future__ import annotations

import weakref
from collections import namedtuple
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from databases import Database
from sqlalchemy.dialects.mysql import pymysql as mysql_pymysql
from sqlalchemy.dialects.sqlite import pysqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement

# Named parameters on both drivers: pymysql's %(name)s, sqlite3's :name.
_DIALECTS: dict[str, Callable[[], Dialect]] = {
    "mysql": lambda: mysql_pymysql.dialect(paramstyle="pyformat"),
    "sqlite": lambda: pysqlite.dialect(paramstyle="named"),
}
_dialects: dict[str, Dialect] = {}


def _dialect(name: str) -> Dialect:
    if name not in _dialects:
        _dialects[name] = _DIALECTS[name]()
    return _dialects[name]


@dataclass(frozen=True, slots=True)
class _Prepared:
    sql: str
    defaults: dict[str, Any]  # values the statement carries itself (`attempts + 1`, `kind = 'code'`)
    binds: tuple[tuple[str, Callable[[Any], Any]], ...]  # names whose values need converting
    results: tuple[tuple[int, Callable[[Any], Any]], ...]  # result columns that need converting
    row: type | None  # a namedtuple of the result columns


class Query:
    """A statement with named `sa.bindparam`s (or, for an INSERT, `columns` to bind)."""

    __slots__ = ("statement", "columns", "_prepared", "__weakref__")

    def __init__(self, statement: ClauseElement, *, columns: Sequence[str] = ()) -> None:
        self.statement = statement
        self.columns = tuple(columns)
        self._prepared: dict[str, _Prepared] = {}
        _LIVE.add(self)

    def prepared(self, dialect_name: str) -> _Prepared:
        found = self._prepared.get(dialect_name)
        if found is None:
            found = self._prepared[dialect_name] = self._prepare(_dialect(dialect_name))
        return found

    def _prepare(self, dialect: Dialect) -> _Prepared:
        kwargs: dict[str, Any] = {"dialect": dialect}
        if self.columns:
            kwargs["column_keys"] = list(self.columns)
        compiled: Any = self.statement.compile(**kwargs)
        if dialect.paramstyle not in ("pyformat", "named"):
            raise AssertionError("named parameters expected")
        defaults: dict[str, Any] = {}
        binds: dict[str, Callable[[Any], Any]] = {}
        # bind_names: every BindParameter of the statement and the name it has in the SQL (one
        # name may stand in several places: it is converted once).
        for bind, name in compiled.bind_names.items():
            if bind.expanding or bind.callable is not None:
                raise AssertionError(f"{name}: expanding or callable parameters are not prepared")
            if not bind.required:
                defaults[name] = bind.value
            proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                binds[name] = proc
        results: list[tuple[int, Callable[[Any], Any]]] = []
        keys: list[str] = []
        if isinstance(self.statement, sa.sql.expression.SelectBase):
            for i, column in enumerate(self.statement.selected_columns):
                keys.append(str(column.key))  # unnamed expressions become _0, _1, ... (rename)
                proc = column.type.dialect_impl(dialect).result_processor(dialect, None)
                if proc is not None:
                    results.append((i, proc))
        row = namedtuple("Row", keys, rename=True) if keys else None  # type: ignore[misc]  # noqa: PYI024
        return _Prepared(compiled.string, defaults, tuple(binds.items()), tuple(results), row)


# Every statement still referenced (the module-level ones for good), for prepare_all.
_LIVE: weakref.WeakSet[Query] = weakref.WeakSet()


def prepare_all(db: Database) -> int:
    """Compile every statement defined so far for this database's dialect, at start-up, so the
    first requests of a new worker do not spend their event loop's time compiling (a few built
    on first use compile then). How many it compiled."""
    name = dialect(db)
    queries = list(_LIVE)
    for q in queries:
        q.prepared(name)
    return len(queries)


def _args(p: _Prepared, params: dict[str, Any]) -> dict[str, Any]:
    args = {**p.defaults, **params} if p.defaults else params
    for name, proc in p.binds:
        if name in args:
            args[name] = proc(args[name])
    return args


def _row(p: _Prepared, raw: Sequence[Any]) -> Any:
    if p.results:
        values = list(raw)
        for i, proc in p.results:
            values[i] = proc(values[i])
        raw = values
    assert p.row is not None
    return p.row(*raw)


def dialect(db: Database) -> str:
    """"sqlite" or "mysql" (MariaDB included): for the few statements written per backend."""
    return "sqlite" if db.url.dialect == "sqlite" else "mysql"


async def _run(db: Database, q: Query, params: dict[str, Any], fetch: int) -> tuple[list[Any], int, int]:
    """(rows as namedtuples, rowcount, lastrowid); fetch: 0 none, 1 one, 2 all."""
    name = dialect(db)
    p = q.prepared(name)
    args = _args(p, params)
    async with db.connection() as conn:
        raw = conn.raw_connection
        if name == "sqlite":
            async with raw.execute(p.sql, args) as cursor:
                rows = [await cursor.fetchone()] if fetch == 1 else (await cursor.fetchall() if fetch else [])
                count, last = cursor.rowcount, cursor.lastrowid
        else:
            async with raw.cursor() as cursor:
                await cursor.execute(p.sql, args)
                rows = [await cursor.fetchone()] if fetch == 1 else (list(await cursor.fetchall()) if fetch else [])
                count, last = cursor.rowcount, cursor.lastrowid
    return [_row(p, r) for r in rows if r is not None], int(count), int(last or 0)


async def fetch_one(db: Database, q: Query, **params: Any) -> Any | None:
    """The first row as a namedtuple of the selected columns, or None."""
    rows, _, _ = await _run(db, q, params, 1)
    return rows[0] if rows else None


async def fetch_all(db: Database, q: Query, **params: Any) -> list[Any]:
    rows, _, _ = await _run(db, q, params, 2)
    return rows


async def fetch_val(db: Database, q: Query, **params: Any) -> Any | None:
    row = await fetch_one(db, q, **params)
    return None if row is None else row[0]


async def execute(db: Database, q: Query, **params: Any) -> int:
    """Run an UPDATE, DELETE or INSERT; how many rows it changed (a guarded UPDATE's verdict)."""
    _, count, _ = await _run(db, q, params, 0)
    return count


async def insert(db: Database, q: Query, **params: Any) -> int:
    """Run an INSERT; the new row's auto-increment id."""
    _, _, last = await _run(db, q, params, 0)
    return last

"""The audit log as the console shows it: auth events filtered by customer, staff member, type,
address and time range, newest first, 50 a page, and as CSV. No HTTP here."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import sqlalchemy as sa
from databases import Database

from app import sql
from app.tables import auth_events

PAGE_SIZE = 50
CSV_LIMIT = 100_000
e = auth_events


@dataclass(frozen=True)
class Filters:
    customer_id: int | None = None
    staff_id: int | None = None
    event: str | None = None
    ip: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def params(self) -> dict[str, Any]:
        return {name: value for name, value in (("cid", self.customer_id), ("sid", self.staff_id),
                                                 ("event", self.event), ("ip", self.ip), ("since", self.since),
                                                 ("until", self.until)) if value is not None}


@cache
def _query(shape: frozenset[str]) -> sql.Query:
    """One prepared statement per combination of filters in use (each combination an index range:
    customer, staff, event by time, or time alone)."""
    where = []
    if "cid" in shape:
        where.append(e.c.customer_id == sa.bindparam("cid", type_=sa.Integer))
    if "sid" in shape:
        where.append(e.c.staff_id == sa.bindparam("sid", type_=sa.Integer))
    if "event" in shape:
        where.append(e.c.event == sa.bindparam("event", type_=sa.String))
    if "ip" in shape:
        where.append(e.c.ip == sa.bindparam("ip", type_=sa.String))
    if "since" in shape:
        where.append(e.c.created_at >= sa.bindparam("since", type_=e.c.created_at.type))
    if "until" in shape:
        where.append(e.c.created_at < sa.bindparam("until", type_=e.c.created_at.type))
    stmt = (sa.select(e.c.id, e.c.created_at, e.c.event, e.c.customer_id, e.c.staff_id, e.c.ip, e.c.user_agent,
                      e.c.detail)
            .where(*where).order_by(e.c.created_at.desc(), e.c.id.desc())
            .limit(sa.bindparam("lim", type_=sa.Integer)).offset(sa.bindparam("off", type_=sa.Integer)))
    return sql.Query(stmt)


@dataclass(frozen=True)
class Page:
    rows: list[Any]
    page: int
    more: bool


async def events(db: Database, filters: Filters, *, page: int = 1) -> Page:
    page = max(1, min(page, 10_000))
    params = filters.params()
    rows = await sql.fetch_all(db, _query(frozenset(params)), lim=PAGE_SIZE + 1, off=(page - 1) * PAGE_SIZE,
                               **params)
    return Page(rows[:PAGE_SIZE], page, len(rows) > PAGE_SIZE)


COLUMNS = ("time (UTC)", "event", "customer", "staff", "ip", "user agent", "detail")


async def as_csv(db: Database, filters: Filters) -> str:
    """Every matching event (at most CSV_LIMIT, newest first). Cells that a spreadsheet would run
    as a formula are prefixed with a quote."""
    params = filters.params()
    rows = await sql.fetch_all(db, _query(frozenset(params)), lim=CSV_LIMIT, off=0, **params)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([_cell(v) for v in (r.created_at.isoformat(), r.event, r.customer_id or "", r.staff_id or "",
                                             r.ip, r.user_agent, r.detail or "")])
    return out.getvalue()


def _cell(value: object) -> str:
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text

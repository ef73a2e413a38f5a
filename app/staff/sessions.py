"""Staff sessions: one `staff_sessions` row per sign-in, whose id is the SHA-256 of the token
the admin cookie carries (a database leak opens no session). Checked on every request: not
revoked, idle less than IDLE_TIMEOUT, younger than ABSOLUTE_TIMEOUT, its staff member not
disabled. No HTTP here."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from databases import Database

from app import sql
from app.security.crypto import sha256_hex
from app.security.crypto import token as new_token
from app.staff import ABSOLUTE_TIMEOUT, IDLE_TIMEOUT, Role, Staff
from app.tables import staff as s
from app.tables import staff_sessions as ss

TOUCH_EVERY = 60  # seconds between last-seen writes, so most reads stay reads

_INSERT = sql.Query(ss.insert(), columns=("id", "staff_id", "created_at", "last_seen_at", "ip", "user_agent"))
_LOAD = sql.Query(
    sa.select(ss.c.last_seen_at, s.c.id, s.c.email, s.c.role, s.c.disabled_at, s.c.last_sign_in_at)
    .select_from(ss.join(s, s.c.id == ss.c.staff_id))
    .where(
        ss.c.id == sa.bindparam("sid"),
        ss.c.revoked_at.is_(None),
        ss.c.last_seen_at > sa.bindparam("idle_after"),
        ss.c.created_at > sa.bindparam("born_after"),
        s.c.disabled_at.is_(None),
    )
)
_TOUCH = sql.Query(
    ss.update()
    .where(ss.c.id == sa.bindparam("sid"), ss.c.last_seen_at < sa.bindparam("before"))
    .values(last_seen_at=sa.bindparam("now"))
)
_REVOKE = sql.Query(
    ss.update().where(ss.c.id == sa.bindparam("sid"), ss.c.revoked_at.is_(None)).values(revoked_at=sa.bindparam("now"))
)
_REVOKE_ALL = sql.Query(
    ss.update()
    .where(ss.c.staff_id == sa.bindparam("staff_id"), ss.c.revoked_at.is_(None))
    .values(revoked_at=sa.bindparam("now"))
)


async def create(db: Database, *, staff_id: int, ip: str, user_agent: str, now: datetime) -> str:
    """A new session row; the random token for the cookie (the row keeps its SHA-256)."""
    value = new_token()
    await sql.execute(db, _INSERT, id=sha256_hex(value), staff_id=staff_id, created_at=now, last_seen_at=now,
                      ip=ip[:45], user_agent=user_agent[:255])
    return value


async def load(db: Database, *, token: str, now: datetime) -> Staff | None:
    """The staff member of a live session, or None; touches last_seen at most once a minute."""
    if not token or len(token) > 200:
        return None
    sid = sha256_hex(token)
    row = await sql.fetch_one(db, _LOAD, sid=sid, idle_after=now - timedelta(seconds=IDLE_TIMEOUT),
                              born_after=now - timedelta(seconds=ABSOLUTE_TIMEOUT))
    if row is None:
        return None
    try:
        role = Role(row.role)
    except ValueError:
        return None  # a role this code does not know grants nothing
    if (now - row.last_seen_at).total_seconds() >= TOUCH_EVERY:
        await sql.execute(db, _TOUCH, sid=sid, before=now - timedelta(seconds=TOUCH_EVERY), now=now)
    return Staff(row.id, row.email, role, row.disabled_at, row.last_sign_in_at)


async def revoke(db: Database, *, token: str, now: datetime) -> None:
    """End one session (sign-out)."""
    await sql.execute(db, _REVOKE, sid=sha256_hex(token), now=now)


async def revoke_all(db: Database, *, staff_id: int, now: datetime) -> None:
    """End every session of a staff member (disabled)."""
    await sql.execute(db, _REVOKE_ALL, staff_id=staff_id, now=now)

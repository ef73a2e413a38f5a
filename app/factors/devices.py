"""Trusted devices ("Don't ask again on this device for N days"): a random token in the
browser's cookie, its SHA-256 in a row of one customer, with an expiry and a revocation time.
A trusted device skips the second step only, never the password (SECURITY.md 37).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from databases import Database

from app import sql
from app.security import crypto
from app.tables import trusted_devices as t

MAX_TOKEN = 128  # longer than any token we make: not worth hashing
KEEP_ENDED = timedelta(days=1)  # ended rows stay this long (a list that just changed still shows them)


@dataclass(frozen=True)
class Device:
    id: int
    label: str
    ip: str
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime


_INSERT = sql.Query(
    t.insert(), columns=("customer_id", "token_hash", "label", "ip", "created_at", "last_used_at", "expires_at")
)
_LIVE_TOKEN = sa.and_(
    t.c.token_hash == sa.bindparam("h"), t.c.customer_id == sa.bindparam("cid"), t.c.revoked_at.is_(None),
    t.c.expires_at > sa.bindparam("now"),
)
_TOUCH = sql.Query(t.update().where(_LIVE_TOKEN).values(last_used_at=sa.bindparam("now")))
_FIND = sql.Query(sa.select(t.c.id).where(_LIVE_TOKEN))
_LIST = sql.Query(
    sa.select(t.c.id, t.c.label, t.c.ip, t.c.created_at, t.c.last_used_at, t.c.expires_at)
    .where(t.c.customer_id == sa.bindparam("cid"), t.c.revoked_at.is_(None), t.c.expires_at > sa.bindparam("now"))
    .order_by(t.c.created_at.desc(), t.c.id.desc())
)
_REVOKE = sql.Query(
    t.update().where(t.c.id == sa.bindparam("did"), t.c.customer_id == sa.bindparam("cid"), t.c.revoked_at.is_(None))
    .values(revoked_at=sa.bindparam("now"))
)
_REVOKE_ALL = sql.Query(
    t.update().where(t.c.customer_id == sa.bindparam("cid"), t.c.revoked_at.is_(None),
                     t.c.expires_at > sa.bindparam("now"))
    .values(revoked_at=sa.bindparam("now"))
)
_FORGET = sql.Query(
    t.delete().where(sa.or_(t.c.expires_at < sa.bindparam("before"), t.c.revoked_at < sa.bindparam("before")))
)


async def trust(db: Database, *, customer_id: int, label: str, ip: str, now: datetime, days: int) -> str:
    """Trust this device for `days`: the token for its cookie (the row keeps only its hash)."""
    value = crypto.token()
    await sql.insert(db, _INSERT, customer_id=customer_id, token_hash=crypto.sha256_hex(value), label=label[:120],
                     ip=ip[:45], created_at=now, last_used_at=now, expires_at=now + timedelta(days=days))
    return value


async def recognised(db: Database, *, customer_id: int, token: str | None, now: datetime) -> int | None:
    """The device's id when `token` is a live trust of this customer (its last use noted), else
    None: another customer's token, an expired or revoked one. One token a call: a shared
    browser's cookie may hold several customers' tokens, the caller tries each."""
    if not token or len(token) > MAX_TOKEN:
        return None
    h = crypto.sha256_hex(token)
    # Touch first, then read: a revocation in between reads as not recognised.
    await sql.execute(db, _TOUCH, h=h, cid=customer_id, now=now)
    found = await sql.fetch_val(db, _FIND, h=h, cid=customer_id, now=now)
    return None if found is None else int(found)


async def list_devices(db: Database, customer_id: int, now: datetime) -> list[Device]:
    """The customer's live trusted devices, newest first."""
    return [Device(id=r.id, label=r.label, ip=r.ip, created_at=r.created_at, last_used_at=r.last_used_at,
                   expires_at=r.expires_at) for r in await sql.fetch_all(db, _LIST, cid=customer_id, now=now)]


async def revoke(db: Database, *, customer_id: int, device_id: int, now: datetime) -> bool:
    """Stop trusting one of the customer's devices (another customer's id changes nothing)."""
    return bool(await sql.execute(db, _REVOKE, did=device_id, cid=customer_id, now=now))


async def revoke_all(db: Database, *, customer_id: int, now: datetime) -> int:
    """Stop trusting every device of the customer (a password or factor change); how many."""
    return await sql.execute(db, _REVOKE_ALL, cid=customer_id, now=now)


async def forget_expired(db: Database, now: datetime) -> int:
    """Delete the rows that expired, or were revoked, more than KEEP_ENDED ago; how many."""
    return await sql.execute(db, _FORGET, before=now - KEEP_ENDED)

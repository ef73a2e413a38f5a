"""SQL for the auth flows. Every function takes the Database first."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from databases import Database

from app.database import execute_count
from app.tables import auth_events, auth_sessions, customers, otp_verification


@dataclass(frozen=True)
class Customer:
    id: int
    username: str | None
    email: str
    full_name: str
    password_hash: str
    email_verified_at: datetime | None
    otp_enabled: bool
    session_version: int


_COLS = (
    customers.c.id,
    customers.c.username,
    customers.c.email,
    customers.c.full_name,
    customers.c.password_hash,
    customers.c.email_verified_at,
    customers.c.otp_enabled,
    customers.c.session_version,
)


def _customer(rec: object) -> Customer | None:
    if rec is None:
        return None
    m = rec._mapping  # type: ignore[attr-defined]
    return Customer(
        id=m["id"],
        username=m["username"],
        email=m["email"],
        full_name=m["full_name"] or "",
        password_hash=m["password_hash"],
        email_verified_at=m["email_verified_at"],
        otp_enabled=bool(m["otp_enabled"]),
        session_version=m["session_version"],
    )


def _same(db: Database, column: sa.Column[str], value: str) -> sa.ColumnElement[bool]:
    """Case-insensitive equality. MySQL's default collations already ignore case (and keep
    using the index); SQLite compares bytes, so both sides are lower-cased there."""
    if db.url.dialect == "sqlite":
        return sa.func.lower(column) == value.lower()
    return column == value


async def find_customer(db: Database, *, login: str) -> Customer | None:
    """By email (when it looks like one) or username, ignoring case."""
    col = customers.c.email if "@" in login else customers.c.username
    return _customer(await db.fetch_one(sa.select(*_COLS).where(_same(db, col, login))))


async def get_customer(db: Database, customer_id: int) -> Customer | None:
    return _customer(await db.fetch_one(sa.select(*_COLS).where(customers.c.id == customer_id)))


async def find_conflict(db: Database, *, email: str, username: str) -> tuple[Customer | None, Customer | None]:
    """(customer with this email, customer with this username)."""
    rows = await db.fetch_all(
        sa.select(*_COLS).where(sa.or_(_same(db, customers.c.email, email), _same(db, customers.c.username, username)))
    )
    found = [_customer(r) for r in rows]
    by_email = next((c for c in found if c and c.email.lower() == email.lower()), None)
    by_username = next((c for c in found if c and (c.username or "").lower() == username.lower()), None)
    return by_email, by_username


async def create_customer(
    db: Database, *, username: str, email: str, full_name: str, password_hash: str, now: datetime
) -> int:
    """Insert a customer with OTP on and the email unverified."""
    return int(
        await db.execute(
            customers.insert().values(
                username=username,
                email=email,
                full_name=full_name,
                password_hash=password_hash,
                created_at=now,
                otp_enabled=True,
                otp_attempts=0,
                otp_lockouts=0,
                session_version=0,
            )
        )
    )


async def reset_unverified(
    db: Database, customer_id: int, *, username: str, full_name: str, password_hash: str
) -> bool:
    """Start an account whose email was never verified over with new details."""
    async with db.connection() as conn:
        return bool(
            await execute_count(
                conn,
                customers.update()
                .where(customers.c.id == customer_id, customers.c.email_verified_at.is_(None))
                .values(username=username, full_name=full_name, password_hash=password_hash,
                        session_version=customers.c.session_version + 1),
            )
        )


async def set_password_hash(db: Database, customer_id: int, password_hash: str) -> None:
    await db.execute(customers.update().where(customers.c.id == customer_id).values(password_hash=password_hash))


async def mark_verified(db: Database, customer_id: int, now: datetime) -> None:
    await db.execute(
        customers.update()
        .where(customers.c.id == customer_id, customers.c.email_verified_at.is_(None))
        .values(email_verified_at=now)
    )


async def set_otp(db: Database, *, enabled: bool, email: str | None = None) -> int:
    """Turn OTP on or off for one customer (by email) or all; returns how many changed."""
    query = customers.update().where(customers.c.otp_enabled == (not enabled))
    if email is not None:
        query = query.where(customers.c.email == email.lower())
    async with db.connection() as conn:
        return await execute_count(conn, query.values(otp_enabled=enabled))


# --- signed-in sessions ------------------------------------------------------------------


@dataclass(frozen=True)
class SessionRow:
    id: str
    customer_id: int
    created_at: datetime
    last_seen_at: datetime
    ip: str
    user_agent: str


async def create_session(
    db: Database, *, session_hash: str, customer_id: int, version: int, ip: str, user_agent: str, now: datetime
) -> None:
    await db.execute(
        auth_sessions.insert().values(
            id=session_hash,
            customer_id=customer_id,
            session_version=version,
            created_at=now,
            last_seen_at=now,
            ip=ip[:45],
            user_agent=user_agent[:255],
        )
    )


async def load_session(
    db: Database, *, session_hash: str, now: datetime, idle: int, absolute: int
) -> tuple[SessionRow, Customer] | None:
    """The live session and its customer, or None (revoked, stale version, idle or too old)."""
    s, c = auth_sessions, customers
    rec = await db.fetch_one(
        sa.select(
            s.c.id.label("sid"), s.c.created_at, s.c.last_seen_at, s.c.ip, s.c.user_agent,
            s.c.session_version.label("sv"), *_COLS,
        )
        .select_from(s.join(c, c.c.id == s.c.customer_id))
        .where(s.c.id == session_hash, s.c.revoked_at.is_(None))
    )
    if rec is None or rec.sv != rec.session_version:
        return None
    if rec.last_seen_at <= now - timedelta(seconds=idle) or rec.created_at <= now - timedelta(seconds=absolute):
        return None
    customer = _customer(rec)
    assert customer is not None
    return SessionRow(rec.sid, customer.id, rec.created_at, rec.last_seen_at, rec.ip, rec.user_agent), customer


async def touch_session(db: Database, session_hash: str, now: datetime) -> None:
    await db.execute(auth_sessions.update().where(auth_sessions.c.id == session_hash).values(last_seen_at=now))


async def revoke_session(db: Database, session_hash: str, now: datetime) -> None:
    await db.execute(
        auth_sessions.update()
        .where(auth_sessions.c.id == session_hash, auth_sessions.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )


async def revoke_all(db: Database, customer_id: int, now: datetime) -> None:
    """End every session of a customer: rows revoked, the version bumped, open codes void."""
    async with db.transaction():
        await db.execute(
            otp_verification.update()
            .where(otp_verification.c.customer_id == customer_id, otp_verification.c.used_at.is_(None),
                   otp_verification.c.invalidated_at.is_(None))
            .values(invalidated_at=now)
        )
        await db.execute(
            auth_sessions.update()
            .where(auth_sessions.c.customer_id == customer_id, auth_sessions.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        await db.execute(
            customers.update()
            .where(customers.c.id == customer_id)
            .values(session_version=customers.c.session_version + 1)
        )


async def active_sessions(
    db: Database, customer_id: int, *, now: datetime, idle: int, absolute: int
) -> list[SessionRow]:
    s = auth_sessions
    rows = await db.fetch_all(
        sa.select(s.c.id, s.c.customer_id, s.c.created_at, s.c.last_seen_at, s.c.ip, s.c.user_agent)
        .where(
            s.c.customer_id == customer_id,
            s.c.revoked_at.is_(None),
            s.c.last_seen_at > now - timedelta(seconds=idle),
            s.c.created_at > now - timedelta(seconds=absolute),
        )
        .order_by(s.c.last_seen_at.desc())
        .limit(20)
    )
    return [SessionRow(r.id, r.customer_id, r.created_at, r.last_seen_at, r.ip, r.user_agent) for r in rows]


async def recent_sign_ins(db: Database, customer_id: int, limit: int = 5) -> list[dict[str, object]]:
    e = auth_events
    rows = await db.fetch_all(
        sa.select(e.c.created_at, e.c.ip, e.c.user_agent)
        .where(e.c.customer_id == customer_id, e.c.event == "signed_in")
        .order_by(e.c.created_at.desc())
        .limit(limit)
    )
    return [dict(r._mapping) for r in rows]

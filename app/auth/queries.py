"""SQL for the auth flows. Every function takes the Database first."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from databases import Database

from app import sql
from app.database import transact
from app.tables import (
    auth_events,
    auth_sessions,
    authenticators,
    customers,
    mail_outbox,
    otp_codes,
    otp_verification,
    trusted_devices,
    webauthn_challenges,
)

SIGNUP, SHOP = "signup", "shop"  # customers.source: this app's registration, or the shop's own rows


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
    source: str = SHOP
    signin_paused_until: datetime | None = None
    otp_locked_until: datetime | None = None
    factor_bypass_until: datetime | None = None  # staff let the emailed code count until then
    disabled_at: datetime | None = None  # staff disabled the account


_COLS = (
    customers.c.id,
    customers.c.username,
    customers.c.email,
    customers.c.full_name,
    customers.c.password_hash,
    customers.c.email_verified_at,
    customers.c.otp_enabled,
    customers.c.session_version,
    customers.c.source,
    customers.c.signin_paused_until,
    customers.c.otp_locked_until,
    customers.c.factor_bypass_until,
    customers.c.disabled_at,
)


def _customer(rec: Any) -> Customer | None:
    if rec is None:
        return None
    return Customer(
        id=rec.id,
        username=rec.username,
        email=rec.email,
        full_name=rec.full_name or "",
        password_hash=getattr(rec, "password_hash", ""),  # "" where it was not read (a session's load)
        email_verified_at=rec.email_verified_at,
        otp_enabled=bool(rec.otp_enabled),
        session_version=rec.session_version,
        source=rec.source,
        signin_paused_until=rec.signin_paused_until,
        otp_locked_until=getattr(rec, "otp_locked_until", None),
        factor_bypass_until=getattr(rec, "factor_bypass_until", None),
        disabled_at=getattr(rec, "disabled_at", None),
    )


def _login_query(column: sa.Column[str], *, lowered: bool) -> sql.Query:
    """Case-insensitive equality. MySQL's default collations already ignore case (and keep
    using the index); SQLite compares bytes, so both sides are lower-cased there."""
    left = sa.func.lower(column) if lowered else column
    return sql.Query(sa.select(*_COLS).where(left == sa.bindparam("login", type_=sa.String)))


_FIND = {
    (field, lowered): _login_query(getattr(customers.c, field), lowered=lowered)
    for field in ("email", "username") for lowered in (False, True)
}
_GET = sql.Query(sa.select(*_COLS).where(customers.c.id == sa.bindparam("cid")))


async def _by(db: Database, field: str, value: str) -> Customer | None:
    lowered = sql.dialect(db) == "sqlite"
    return _customer(await sql.fetch_one(db, _FIND[field, lowered], login=value.lower() if lowered else value))


async def find_customer(db: Database, *, login: str) -> Customer | None:
    """By email (when it looks like one) or username, ignoring case."""
    return await _by(db, "email" if "@" in login else "username", login)


async def get_customer(db: Database, customer_id: int) -> Customer | None:
    return _customer(await sql.fetch_one(db, _GET, cid=customer_id))


def _conflict_query(*, lowered: bool) -> sql.Query:
    def match(column: sa.Column[str], name: str) -> sa.ColumnElement[bool]:
        return (sa.func.lower(column) if lowered else column) == sa.bindparam(name, type_=sa.String)

    by_email, by_username = match(customers.c.email, "email"), match(customers.c.username, "username")
    # The database says which side matched, by its own collation (MySQL's also folds accents).
    return sql.Query(sa.select(*_COLS, sa.case((by_email, 1), else_=0).label("email_hit"),
                               sa.case((by_username, 1), else_=0).label("username_hit"))
                     .where(sa.or_(by_email, by_username)))


_CONFLICT = {lowered: _conflict_query(lowered=lowered) for lowered in (False, True)}


async def find_conflict(db: Database, *, email: str, username: str) -> tuple[Customer | None, Customer | None]:
    """(customer with this email, customer with this username), read in one statement: two reads
    could straddle a concurrent sign-up's commit and see its username but not its address."""
    lowered = sql.dialect(db) == "sqlite"
    found = await sql.fetch_all(db, _CONFLICT[lowered], email=email.lower() if lowered else email,
                                username=username.lower() if lowered else username)
    by_email = next((_customer(rec) for rec in found if rec.email_hit), None)
    by_username = next((_customer(rec) for rec in found if rec.username_hit), None)
    return by_email, by_username


_CREATE = sql.Query(
    customers.insert().values(otp_enabled=True, otp_attempts=0, otp_lockouts=0, session_version=0, source=SIGNUP),
    columns=("username", "email", "full_name", "password_hash", "created_at"),
)


async def create_customer(
    db: Database, *, username: str, email: str, full_name: str, password_hash: str, now: datetime
) -> int:
    """Insert a sign-up: OTP on, the email unverified."""
    return await sql.insert(db, _CREATE, username=username, email=email, full_name=full_name,
                            password_hash=password_hash, created_at=now)


_APPLY_CLAIM = sql.Query(
    customers.update()
    .where(customers.c.id == sa.bindparam("cid"), customers.c.source == SIGNUP,
           customers.c.email_verified_at.is_(None))
    .values(username=sa.bindparam("new_username"), full_name=sa.bindparam("new_full_name"),
            password_hash=sa.bindparam("new_hash"))
)


async def apply_claim(db: Database, customer_id: int, *, username: str, full_name: str, password_hash: str) -> bool:
    """A registration's details replace an unconfirmed sign-up's, once its code was entered
    (run before the address is marked verified). Never a shop customer's row."""
    return bool(await sql.execute(db, _APPLY_CLAIM, cid=customer_id, new_username=username,
                                  new_full_name=full_name, new_hash=password_hash))


_SET_HASH = sql.Query(
    customers.update().where(customers.c.id == sa.bindparam("cid")).values(password_hash=sa.bindparam("new_hash"))
)


async def set_password_hash(db: Database, customer_id: int, password_hash: str) -> None:
    await sql.execute(db, _SET_HASH, cid=customer_id, new_hash=password_hash)


_SET_OTP_ALL = {
    enabled: sql.Query(customers.update().where(customers.c.otp_enabled == (not enabled)).values(otp_enabled=enabled))
    for enabled in (True, False)
}
_COUNT_ALL = sql.Query(sa.select(sa.func.count()).select_from(customers))


async def set_otp(db: Database, *, enabled: bool, email: str | None = None) -> tuple[int, int]:
    """Turn OTP on or off for one customer (by email, ignoring case) or all.
    Returns (customers matched, customers changed)."""
    if email is None:
        matched = int(await sql.fetch_val(db, _COUNT_ALL) or 0)
        return matched, await sql.execute(db, _SET_OTP_ALL[enabled])
    customer = await _by(db, "email", email)
    if customer is None:
        return 0, 0
    changed = await sql.execute(db, _SET_OTP_ONE, cid=customer.id, enabled=enabled)
    return 1, changed


_SET_OTP_ONE = sql.Query(
    customers.update()
    .where(customers.c.id == sa.bindparam("cid"), customers.c.otp_enabled != sa.bindparam("enabled"))
    .values(otp_enabled=sa.bindparam("enabled"))
)


# --- signed-in sessions ------------------------------------------------------------------


@dataclass(frozen=True)
class SessionRow:
    id: str
    customer_id: int
    created_at: datetime
    last_seen_at: datetime
    ip: str
    user_agent: str
    method: str = "password"  # app.factors.Method: how it was authenticated
    authenticated_at: datetime | None = None  # the last proof of the password or a factor in it


_CREATE_SESSION = sql.Query(
    auth_sessions.insert(),
    columns=("id", "customer_id", "session_version", "created_at", "last_seen_at", "ip", "user_agent", "method",
             "authenticated_at"),
)


async def create_session(
    db: Database, *, session_hash: str, customer_id: int, version: int, ip: str, user_agent: str, now: datetime,
    method: str = "password",
) -> None:
    await sql.execute(db, _CREATE_SESSION, id=session_hash, customer_id=customer_id, session_version=version,
                      created_at=now, last_seen_at=now, ip=ip[:45], user_agent=user_agent[:255], method=method,
                      authenticated_at=now)


_REAUTHENTICATED = sql.Query(
    auth_sessions.update().where(auth_sessions.c.id == sa.bindparam("sid"), auth_sessions.c.revoked_at.is_(None))
    .values(authenticated_at=sa.bindparam("now"))
)


async def reauthenticated(db: Database, session_hash: str, now: datetime) -> bool:
    """The customer proved the password (or a factor) again in this session."""
    return bool(await sql.execute(db, _REAUTHENTICATED, sid=session_hash, now=now))


_LOAD_SESSION = sql.Query(
    sa.select(
        auth_sessions.c.id.label("sid"), auth_sessions.c.created_at, auth_sessions.c.last_seen_at, auth_sessions.c.ip,
        auth_sessions.c.user_agent, auth_sessions.c.session_version.label("sv"), auth_sessions.c.method,
        auth_sessions.c.authenticated_at,
        # Every signed-in page loads this: not the password hash, which no such page needs.
        *(col for col in _COLS if col is not customers.c.password_hash),
    )
    .select_from(auth_sessions.join(customers, customers.c.id == auth_sessions.c.customer_id))
    .where(auth_sessions.c.id == sa.bindparam("sid"), auth_sessions.c.revoked_at.is_(None))
)


async def load_session(
    db: Database, *, session_hash: str, now: datetime, idle: int, absolute: int
) -> tuple[SessionRow, Customer] | None:
    """The live session and its customer, or None (revoked, stale version, idle or too old)."""
    rec = await sql.fetch_one(db, _LOAD_SESSION, sid=session_hash)
    if rec is None or rec.sv != rec.session_version:
        return None
    if rec.last_seen_at <= now - timedelta(seconds=idle) or rec.created_at <= now - timedelta(seconds=absolute):
        return None
    customer = _customer(rec)
    assert customer is not None
    return SessionRow(rec.sid, customer.id, rec.created_at, rec.last_seen_at, rec.ip, rec.user_agent, rec.method,
                      rec.authenticated_at or rec.created_at), customer


_TOUCH = sql.Query(
    auth_sessions.update().where(auth_sessions.c.id == sa.bindparam("sid")).values(last_seen_at=sa.bindparam("now"))
)
_REVOKE = sql.Query(
    auth_sessions.update()
    .where(auth_sessions.c.id == sa.bindparam("sid"), auth_sessions.c.customer_id == sa.bindparam("cid"),
           auth_sessions.c.revoked_at.is_(None))
    .values(revoked_at=sa.bindparam("now"))
)


async def touch_session(db: Database, session_hash: str, now: datetime) -> None:
    await sql.execute(db, _TOUCH, sid=session_hash, now=now)


async def revoke_session(db: Database, session_hash: str, customer_id: int, now: datetime) -> bool:
    """End one session of this customer; False when there was none to end."""
    return bool(await sql.execute(db, _REVOKE, sid=session_hash, cid=customer_id, now=now))


# Customer row first: every statement or transaction that locks a customer row and their
# code rows takes the customer row first (app/otp/engine.py), so none waits on another the
# other way round (a deadlock).
_REVOKE_ALL = (
    sql.Query(
        customers.update()
        .where(customers.c.id == sa.bindparam("cid"))
        .values(session_version=customers.c.session_version + 1)
    ),
    sql.Query(
        otp_verification.update()
        .where(otp_verification.c.customer_id == sa.bindparam("cid"), otp_verification.c.used_at.is_(None),
               otp_verification.c.invalidated_at.is_(None))
        .values(invalidated_at=sa.bindparam("now"))
    ),
    sql.Query(
        auth_sessions.update()
        .where(auth_sessions.c.customer_id == sa.bindparam("cid"), auth_sessions.c.revoked_at.is_(None))
        .values(revoked_at=sa.bindparam("now"))
    ),
)


async def end_open_steps(db: Database, customer_id: int, now: datetime) -> None:
    """End every pending step of the customer (a way to sign in was added: the steps started
    under the old rules end with them)."""
    await sql.execute(db, _REVOKE_ALL[1], cid=customer_id, now=now)


async def revoke_all_now(db: Database, customer_id: int, now: datetime) -> None:
    """revoke_all's statements, inside the caller's transaction."""
    for query in _REVOKE_ALL:
        await sql.execute(db, query, cid=customer_id, now=now)


async def revoke_all(db: Database, customer_id: int, now: datetime) -> None:
    """End every session of a customer: rows revoked, the version bumped, open codes void."""
    await transact(db, lambda: revoke_all_now(db, customer_id, now))


_VERSION = sql.Query(sa.select(customers.c.session_version).where(customers.c.id == sa.bindparam("cid")))


async def session_version(db: Database, customer_id: int) -> int | None:
    found = await sql.fetch_val(db, _VERSION, cid=customer_id)
    return None if found is None else int(found)


_SET_EMAIL = sql.Query(
    customers.update().where(customers.c.id == sa.bindparam("cid"))
    .values(email=sa.bindparam("new_email"), email_verified_at=sa.bindparam("now"))
)


async def set_email(db: Database, customer_id: int, email: str, now: datetime) -> bool:
    """A new, confirmed address (IntegrityError when another account took it meanwhile)."""
    return bool(await sql.execute(db, _SET_EMAIL, cid=customer_id, new_email=email, now=now))


_MOVE_SIGNUP = sql.Query(
    customers.update()
    .where(customers.c.id == sa.bindparam("cid"), customers.c.source == SIGNUP,
           customers.c.email_verified_at.is_(None), customers.c.password_hash == sa.bindparam("ph"))
    .values(email=sa.bindparam("new_email"))
)


async def move_signup(db: Database, customer_id: int, email: str, *, password_hash: str) -> bool:
    """An unconfirmed sign-up takes another address (the customer who made it mistyped it):
    only while unconfirmed and still holding the details it was made with; never a confirmed
    account or a shop customer. False: nothing moved."""
    return bool(await sql.execute(db, _MOVE_SIGNUP, cid=customer_id, new_email=email, ph=password_hash))


_DELETE_ACCOUNT = (
    # What is the customer's goes; the audit keeps the events with the customer id alone.
    sql.Query(otp_codes.delete().where(otp_codes.c.challenge_id.in_(
        sa.select(otp_verification.c.id).where(otp_verification.c.customer_id == sa.bindparam("cid"))))),
    sql.Query(otp_verification.delete().where(otp_verification.c.customer_id == sa.bindparam("cid"))),
    sql.Query(auth_sessions.delete().where(auth_sessions.c.customer_id == sa.bindparam("cid"))),
    # Not left to ON DELETE CASCADE: SQLite enforces no foreign keys and reuses a freed id, so a
    # new sign-up would inherit the deleted customer's app, passkeys and trusted devices.
    sql.Query(authenticators.delete().where(authenticators.c.customer_id == sa.bindparam("cid"))),
    sql.Query(trusted_devices.delete().where(trusted_devices.c.customer_id == sa.bindparam("cid"))),
    sql.Query(webauthn_challenges.delete().where(webauthn_challenges.c.customer_id == sa.bindparam("cid"))),
    sql.Query(mail_outbox.delete().where(mail_outbox.c.customer_id == sa.bindparam("cid"))),
    sql.Query(auth_events.update().where(auth_events.c.customer_id == sa.bindparam("cid"))
              .values(ip="", user_agent="")),
    sql.Query(customers.delete().where(customers.c.id == sa.bindparam("cid"))),
)


async def delete_account(db: Database, customer_id: int) -> None:
    """Delete a customer with their codes, sessions and queued mail (call in a transaction)."""
    for query in _DELETE_ACCOUNT:
        await sql.execute(db, query, cid=customer_id)


def _dashboard_query() -> sql.Query:
    """The customer's active sessions (newest use first, at most 20) and last sign-ins (at most
    5), one round trip: a UNION ALL of the two limited lists, told apart by `kind`."""
    s, e = auth_sessions, auth_events
    active = (
        sa.select(sa.literal_column("'session'").label("kind"), s.c.id, s.c.created_at, s.c.last_seen_at, s.c.ip,
                  s.c.user_agent, s.c.method)
        .where(
            s.c.customer_id == sa.bindparam("cid"),
            s.c.revoked_at.is_(None),
            s.c.last_seen_at > sa.bindparam("seen_after"),
            s.c.created_at > sa.bindparam("created_after"),
        )
        .order_by(s.c.last_seen_at.desc())
        .limit(20)
        .subquery()
    )
    sign_ins = (
        sa.select(sa.literal_column("'sign_in'").label("kind"), sa.literal_column("''").label("id"), e.c.created_at,
                  e.c.created_at.label("last_seen_at"), e.c.ip, e.c.user_agent, sa.literal_column("''").label("method"))
        .where(e.c.customer_id == sa.bindparam("cid"), e.c.event == "signed_in")
        .order_by(e.c.created_at.desc())
        .limit(5)
        .subquery()
    )
    return sql.Query(sa.union_all(sa.select(active), sa.select(sign_ins)))


_DASHBOARD = _dashboard_query()


async def dashboard_lists(
    db: Database, customer_id: int, *, now: datetime, idle: int, absolute: int
) -> tuple[list[SessionRow], list[dict[str, object]]]:
    """(active sessions, newest use first; last sign-ins, newest first)."""
    rows = await sql.fetch_all(db, _DASHBOARD, cid=customer_id, seen_after=now - timedelta(seconds=idle),
                               created_after=now - timedelta(seconds=absolute))
    active = sorted((SessionRow(r.id, customer_id, r.created_at, r.last_seen_at, r.ip, r.user_agent, r.method)
                     for r in rows if r.kind == "session"), key=lambda x: x.last_seen_at, reverse=True)
    sign_ins = sorted(({"created_at": r.created_at, "ip": r.ip, "user_agent": r.user_agent}
                       for r in rows if r.kind == "sign_in"), key=lambda x: x["created_at"], reverse=True)
    return active, sign_ins

"""Staff accounts: creation with a one-time set-up link, set-up (password and authenticator app),
the two sign-in steps, the list and disabling. The rules and their SQL; no HTTP here.

- The set-up link's token is random (256 bits), stored as SHA-256, valid SETUP_TTL, used once
  (the guarded UPDATE that finishes set-up clears it).
- The password step answers alike for an unknown address, a wrong password, a disabled or
  locked account and one not set up yet, and costs one Argon2 verification either way.
- The code step: RFC 6238 within one step either side; each attempt is counted before the
  code is compared (`failures < MAX_FAILURES` in the UPDATE), the MAX_FAILURES-th wrong one
  locks the account for LOCKOUT seconds; a step is accepted once (`totp_last_step < :step`);
  success resets the count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from databases import Database

from app import audit, sql
from app.audit import Event
from app.auth.forms import check_password as password_problem
from app.auth.forms import email_field
from app.database import INTEGRITY_ERRORS
from app.factors import FactorKeys, totp
from app.security.crypto import Unreadable, sha256_hex, token
from app.security.passwords import check_password, hash_password
from app.services import Client
from app.staff import Role, Staff, sessions
from app.tables import staff as s

log = logging.getLogger("app.staff")

SETUP_TTL = 24 * 3600  # seconds a set-up link lasts
MAX_FAILURES = 5  # wrong codes in a row before the lock
LOCKOUT = 15 * 60  # seconds
CLI = Client("", "cli")  # who acts from `python -m app staff ...`


class AlreadyExists(Exception):
    """A staff member has this email already."""


class CodeVerdict(StrEnum):
    OK = "ok"
    WRONG = "wrong"  # wrong, replayed or too old; attempts remain
    LOCKED = "locked"  # too many wrong codes: wait until `locked_until`
    GONE = "gone"  # no such staff member, disabled, or not set up


@dataclass(frozen=True)
class CodeResult:
    verdict: CodeVerdict
    attempts_left: int = 0
    locked_until: datetime | None = None


class DisableResult(StrEnum):
    DISABLED = "disabled"
    SELF = "self"  # an admin cannot disable themselves
    UNKNOWN = "unknown"
    ALREADY = "already"


@dataclass(frozen=True)
class Setup:
    """A valid set-up link: whose, and the secret to show (the same until set-up is done)."""

    staff_id: int
    email: str
    secret: str


@dataclass
class SetUpResult:
    done: bool = False
    gone: bool = False  # the link is unknown, used or expired
    errors: dict[str, str] = field(default_factory=dict)


def _staff(row: Any) -> Staff:
    return Staff(row.id, row.email, Role(row.role), row.disabled_at, row.last_sign_in_at)


_ROW_COLUMNS = (s.c.id, s.c.email, s.c.role, s.c.password_hash, s.c.totp_secret, s.c.totp_last_step, s.c.setup_hash,
                s.c.failures, s.c.locked_until, s.c.disabled_at, s.c.last_sign_in_at)
_BY_EMAIL = sql.Query(sa.select(*_ROW_COLUMNS).where(s.c.email == sa.bindparam("email")))
_BY_ID = sql.Query(sa.select(*_ROW_COLUMNS).where(s.c.id == sa.bindparam("sid")))
_BY_SETUP = sql.Query(
    sa.select(*_ROW_COLUMNS).where(s.c.setup_hash == sa.bindparam("h"), s.c.setup_expires_at > sa.bindparam("now"),
                                   s.c.disabled_at.is_(None))
)
_LIST = sql.Query(sa.select(s.c.id, s.c.email, s.c.role, s.c.disabled_at, s.c.last_sign_in_at).order_by(s.c.email))
_INSERT = sql.Query(s.insert(), columns=("email", "role", "setup_hash", "setup_expires_at", "created_at"))
_SET_SECRET = sql.Query(
    s.update().where(s.c.id == sa.bindparam("sid"), s.c.totp_secret.is_(None), s.c.setup_hash.is_not(None))
    .values(totp_secret=sa.bindparam("sealed"))
)
_REPLACE_SECRET = sql.Query(
    s.update().where(s.c.id == sa.bindparam("sid"), s.c.totp_secret == sa.bindparam("old"),
                     s.c.setup_hash.is_not(None))
    .values(totp_secret=sa.bindparam("sealed"))
)
_FINISH_SETUP = sql.Query(
    s.update().where(s.c.id == sa.bindparam("sid"), s.c.setup_hash == sa.bindparam("h"),
                     s.c.setup_expires_at > sa.bindparam("now"), s.c.totp_secret == sa.bindparam("sealed"),
                     s.c.disabled_at.is_(None))
    .values(password_hash=sa.bindparam("ph"), totp_last_step=sa.bindparam("step"), setup_hash=None,
            setup_expires_at=None, failures=0, locked_until=None)
)
# Counted before the code is compared: of any number of concurrent attempts, MAX_FAILURES pass.
_COUNT = sql.Query(
    s.update().where(s.c.id == sa.bindparam("sid"), s.c.failures < MAX_FAILURES,
                     sa.or_(s.c.locked_until.is_(None), s.c.locked_until <= sa.bindparam("now")))
    .values(failures=s.c.failures + 1)
)
_LOCK = sql.Query(
    s.update().where(s.c.id == sa.bindparam("sid"), s.c.failures >= MAX_FAILURES,
                     sa.or_(s.c.locked_until.is_(None), s.c.locked_until <= sa.bindparam("now")))
    .values(locked_until=sa.bindparam("until"), failures=0)
)
_FAILURES = sql.Query(sa.select(s.c.failures, s.c.locked_until).where(s.c.id == sa.bindparam("sid")))
_ACCEPT = sql.Query(
    s.update().where(s.c.id == sa.bindparam("sid"), s.c.disabled_at.is_(None),
                     sa.or_(s.c.totp_last_step.is_(None), s.c.totp_last_step < sa.bindparam("step")))
    .values(totp_last_step=sa.bindparam("step"), failures=0, locked_until=None, last_sign_in_at=sa.bindparam("now"))
)
_DISABLE = sql.Query(
    s.update().where(s.c.id == sa.bindparam("sid"), s.c.disabled_at.is_(None)).values(disabled_at=sa.bindparam("now"))
)


def normalized_email(raw: str) -> str | None:
    email, problem = email_field(raw)
    return None if problem else email


# --- creation and set-up -------------------------------------------------------------------------


async def create(db: Database, *, email: str, role: Role, now: datetime, client: Client = CLI,
                 by: int | None = None) -> str:
    """A new staff member with no password yet; the set-up token for their link (shown once).
    ValueError for an address that is not one; AlreadyExists when the email is taken."""
    address = normalized_email(email)
    if address is None:
        raise ValueError(f"{email!r} is not an email address")
    value = token()
    try:
        new_id = await sql.insert(db, _INSERT, email=address, role=Role(role).value, setup_hash=sha256_hex(value),
                                  setup_expires_at=now + timedelta(seconds=SETUP_TTL), created_at=now)
    except INTEGRITY_ERRORS as exc:
        raise AlreadyExists(address) from exc
    await audit.record_staff(db, Event.STAFF_CREATED, staff_id=by if by is not None else new_id, customer_id=None,
                             ip=client.ip, user_agent=client.user_agent, now=now,
                             detail={"staff": new_id, "by": by if by is not None else "cli", "before": None,
                                     "after": {"email": address, "role": Role(role).value}})
    return value


def _valid_token(value: str) -> bool:
    return 0 < len(value) <= 100


async def setup_of(db: Database, keys: FactorKeys, *, token: str, now: datetime) -> Setup | None:
    """What a valid set-up link shows (the authenticator secret is made on the first visit and
    kept, sealed, until set-up is done); None for an unknown, used or expired link."""
    if not _valid_token(token):
        return None
    row = await sql.fetch_one(db, _BY_SETUP, h=sha256_hex(token), now=now)
    if row is None:
        return None
    if row.totp_secret is not None:
        try:
            return Setup(row.id, row.email, _open(keys, row.totp_secret))
        except Unreadable:
            log.warning("staff %s: the set-up secret no longer opens; a new one is made", row.id)
    secret = totp.new_secret()
    sealed = keys.at_rest.seal({"s": secret})
    if row.totp_secret is None:
        changed = await sql.execute(db, _SET_SECRET, sid=row.id, sealed=sealed)
    else:
        changed = await sql.execute(db, _REPLACE_SECRET, sid=row.id, old=row.totp_secret, sealed=sealed)
    if not changed:  # another visit made one first: show that one
        row = await sql.fetch_one(db, _BY_SETUP, h=sha256_hex(token), now=now)
        if row is None or row.totp_secret is None:
            return None
        return Setup(row.id, row.email, _open(keys, row.totp_secret))
    return Setup(row.id, row.email, secret)


def _open(keys: FactorKeys, sealed: str) -> str:
    secret = keys.at_rest.open(sealed).get("s")
    if not isinstance(secret, str):
        raise Unreadable("no secret in it")
    return secret


async def set_up(db: Database, keys: FactorKeys, *, token: str, password: str, confirm: str, code: str,
                 now: datetime, client: Client) -> SetUpResult:
    """Finish set-up: a password that passes the customers' rules, and the authenticator app
    proven by a code (its step then counts as used). The link works once."""
    if not _valid_token(token):
        return SetUpResult(gone=True)
    row = await sql.fetch_one(db, _BY_SETUP, h=sha256_hex(token), now=now)
    if row is None or row.totp_secret is None:
        return SetUpResult(gone=True)
    result = SetUpResult()
    problem = password_problem(password, email=row.email, username="")
    if problem:
        result.errors["password"] = problem
    elif confirm != password:
        result.errors["confirm_password"] = "The two passwords do not match."
    if not code.strip():
        result.errors["code"] = "Enter the 6-digit code your authenticator app shows."
    if result.errors:
        return result
    verdict, step = await _attempt(db, keys, row, code, now)
    if verdict.verdict is CodeVerdict.LOCKED:
        result.errors["code"] = "Too many wrong codes. Wait 15 minutes, then try again."
        return result
    if verdict.verdict is not CodeVerdict.OK or step is None:
        result.errors["code"] = "That code is not right. Check the app shows Computer Shop, then enter its current code."
        return result
    hashed = await hash_password(password)
    done = await sql.execute(db, _FINISH_SETUP, sid=row.id, h=sha256_hex(token), now=now, sealed=row.totp_secret,
                             ph=hashed, step=step)
    if not done:
        return SetUpResult(gone=True)
    await audit.record_staff(db, Event.STAFF_CREATED, staff_id=row.id, customer_id=None, ip=client.ip,
                             user_agent=client.user_agent, now=now,
                             detail={"staff": row.id, "set_up": True, "before": {"password": False, "app": False},
                                     "after": {"password": True, "app": True}})
    return SetUpResult(done=True)


async def _lock(db: Database, staff_id: int, now: datetime) -> CodeResult:
    """MAX_FAILURES reached: lock for LOCKOUT (the count starts again after it)."""
    until = now + timedelta(seconds=LOCKOUT)
    await sql.execute(db, _LOCK, sid=staff_id, now=now, until=until)
    row = await sql.fetch_one(db, _FAILURES, sid=staff_id)
    found = row.locked_until if row is not None and row.locked_until is not None else until
    return CodeResult(CodeVerdict.LOCKED, locked_until=found)


async def _attempt(db: Database, keys: FactorKeys, row: Any, code: str, now: datetime) -> tuple[CodeResult, int | None]:
    """Count the attempt, then compare: (OK, the matching step), or (WRONG with the attempts
    left, None), or (LOCKED, None). The step is not yet marked used."""
    if row.locked_until is not None and row.locked_until > now:
        return CodeResult(CodeVerdict.LOCKED, locked_until=row.locked_until), None
    if not await sql.execute(db, _COUNT, sid=row.id, now=now):
        return await _lock(db, row.id, now), None
    try:
        step = totp.matching_step(_open(keys, row.totp_secret), code, now)
    except Unreadable:
        log.warning("staff %s: no key opens the authenticator secret", row.id)
        step = None
    if step is not None and (row.totp_last_step is None or step > row.totp_last_step):
        return CodeResult(CodeVerdict.OK), step
    return await _wrong(db, row.id, now), None


async def _wrong(db: Database, staff_id: int, now: datetime) -> CodeResult:
    counts = await sql.fetch_one(db, _FAILURES, sid=staff_id)
    if counts is not None and counts.locked_until is not None and counts.locked_until > now:
        # A concurrent attempt past the budget locked the account (and set the count back to 0)
        # between this attempt's count and this read: locked, not "5 attempts left".
        return CodeResult(CodeVerdict.LOCKED, locked_until=counts.locked_until)
    failures = counts.failures if counts is not None else MAX_FAILURES
    if failures >= MAX_FAILURES:
        return await _lock(db, staff_id, now)
    return CodeResult(CodeVerdict.WRONG, attempts_left=MAX_FAILURES - failures)


# --- signing in ------------------------------------------------------------------------------


async def sign_in(db: Database, *, email: str, password: str, now: datetime, client: Client) -> Staff | None:
    """The password step: the staff member to ask for a code, or None, alike for an unknown
    address, a wrong password, a disabled or locked account and one not set up (one Argon2
    verification in every case)."""
    address = normalized_email(email) if len(email) <= 254 else None
    row = await sql.fetch_one(db, _BY_EMAIL, email=address) if address else None
    ok, _ = await check_password(row.password_hash if row is not None else None, password[:1024])
    if row is None:
        return None
    reason = None
    if not ok:
        reason = "password"
    elif row.disabled_at is not None:
        reason = "disabled"
    elif row.locked_until is not None and row.locked_until > now:
        reason = "locked"
    elif row.totp_secret is None or row.setup_hash is not None:
        reason = "not_set_up"
    if reason is not None:
        await audit.record_staff(db, Event.STAFF_FAILED, staff_id=row.id, customer_id=None, ip=client.ip,
                                 user_agent=client.user_agent, now=now, detail={"step": "password", "reason": reason})
        return None
    return _staff(row)


async def check_code(db: Database, keys: FactorKeys, *, staff_id: int, code: str, now: datetime,
                     client: Client) -> CodeResult:
    """The code step after the password: OK once per step, counted and locked as the module
    says. OK records the sign-in (last_sign_in_at, STAFF_SIGNED_IN)."""
    row = await sql.fetch_one(db, _BY_ID, sid=staff_id)
    if row is None or row.disabled_at is not None or row.password_hash is None or row.totp_secret is None \
            or row.setup_hash is not None:
        return CodeResult(CodeVerdict.GONE)
    result, step = await _attempt(db, keys, row, code, now)
    if step is not None:
        if await sql.execute(db, _ACCEPT, sid=row.id, step=step, now=now):
            await audit.record_staff(db, Event.STAFF_SIGNED_IN, staff_id=row.id, customer_id=None, ip=client.ip,
                                     user_agent=client.user_agent, now=now)
            return result
        result = await _wrong(db, row.id, now)  # the step was used meanwhile (a replay), or disabled
    reason = "locked" if result.verdict is CodeVerdict.LOCKED else "code"
    await audit.record_staff(db, Event.STAFF_FAILED, staff_id=row.id, customer_id=None, ip=client.ip,
                             user_agent=client.user_agent, now=now,
                             detail={"step": "code", "reason": reason, "attempts_left": result.attempts_left})
    return result


async def signed_out(db: Database, *, staff: Staff, token: str, now: datetime, client: Client) -> None:
    """Sign-out: the session row revoked, and the event recorded."""
    await sessions.revoke(db, token=token, now=now)
    await audit.record_staff(db, Event.STAFF_SIGNED_OUT, staff_id=staff.id, customer_id=None, ip=client.ip,
                             user_agent=client.user_agent, now=now)


# --- the list, disabling -------------------------------------------------------------------------


async def list_staff(db: Database) -> list[Staff]:
    """Every staff member, by email; rows with a role this code does not know are left out."""
    found = []
    for row in await sql.fetch_all(db, _LIST):
        try:
            found.append(_staff(row))
        except ValueError:
            continue
    return found


async def get(db: Database, staff_id: int) -> Staff | None:
    row = await sql.fetch_one(db, _BY_ID, sid=staff_id)
    try:
        return None if row is None else _staff(row)
    except ValueError:
        return None


async def disable(db: Database, *, staff_id: int, by: Staff, now: datetime, client: Client) -> DisableResult:
    """Disable a staff member and end their sessions (audited with before and after). An admin
    cannot disable themselves: the console must keep one admin who can act."""
    if staff_id == by.id:
        return DisableResult.SELF
    row = await sql.fetch_one(db, _BY_ID, sid=staff_id)
    if row is None:
        return DisableResult.UNKNOWN
    if row.disabled_at is not None:
        return DisableResult.ALREADY
    async with db.transaction():
        if not await sql.execute(db, _DISABLE, sid=staff_id, now=now):
            return DisableResult.ALREADY
        await sessions.revoke_all(db, staff_id=staff_id, now=now)
        await audit.record_staff(db, Event.STAFF_DISABLED, staff_id=by.id, customer_id=None, ip=client.ip,
                                 user_agent=client.user_agent, now=now,
                                 detail={"staff": staff_id, "email": row.email, "before": {"disabled_at": None},
                                         "after": {"disabled_at": now.isoformat()}})
    return DisableResult.DISABLED

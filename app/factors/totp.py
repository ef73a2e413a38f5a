"""Authenticator apps (RFC 6238 TOTP, through pyotp): a 160-bit secret sealed at rest, codes
accepted within one 30-s step either side, and each step accepted once per customer.

One `authenticators` row of type "totp" per customer, data {"secret": sealed, "last_step": n}.
Every change of `data` is a compare-and-swap on the whole text (`WHERE data = :old`): of any
number of concurrent writers on any number of workers one wins, the others read again. That
is what makes a code single use without a column of its own for the step.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any

import pyotp
import segno
import sqlalchemy as sa
from databases import Database

from app import sql
from app.database import INTEGRITY_ERRORS
from app.factors import FactorKeys, Type
from app.security.crypto import Unreadable, equal, sha256_hex
from app.tables import authenticators as a

log = logging.getLogger("app.factors")

STEP = 30  # seconds per code (RFC 6238's default, what every app uses)
DRIFT = 1  # steps accepted either side of now: a clock a little off, a code typed as it turned
DIGITS = 6
ISSUER = "Computer Shop"
QR_PIXELS = 200
CAS_TRIES = 5  # re-reads after losing a compare-and-swap to another writer


class AlreadyEnrolled(Exception):
    """The customer has a confirmed app already: one per customer (remove it first)."""


def new_secret() -> str:
    """160 random bits, base32 (RFC 4226's recommended length; what pyotp makes)."""
    return pyotp.random_base32()


def grouped(secret: str) -> str:
    """The secret in groups of four, for typing it into an app by hand."""
    return " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))


def provisioning_uri(secret: str, *, account: str, issuer: str = ISSUER) -> str:
    """The otpauth:// URI an app reads from the QR code."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP).provisioning_uri(name=account, issuer_name=issuer)


def qr_svg(uri: str) -> str:
    """The URI as an inline <svg> (no XML declaration), about QR_PIXELS wide, with a <title>.

    Only SVG attributes (no `style`), no external references: it passes a CSP without
    'unsafe-inline'. Dark modules on a white square, so it scans on a dark page too."""
    qr = segno.make(uri, error="m")
    width, _ = qr.symbol_size(scale=1)
    svg: str = qr.svg_inline(scale=max(2, round(QR_PIXELS / width)), dark="#000", light="#fff",
                             title="QR code to scan with your authenticator app")
    return svg.replace("<svg ", '<svg role="img" ', 1)


def _step(now: datetime) -> int:
    return int(now.timestamp()) // STEP


def normalized(code: str) -> str | None:
    """The code without spaces; None unless it is six ASCII digits."""
    code = "".join(code.split())
    if len(code) != DIGITS or not all("0" <= ch <= "9" for ch in code):
        return None
    return code


def matching_step(secret: str, code: str, now: datetime) -> int | None:
    """The 30-s counter within DRIFT steps of `now` whose code is `code`, else None. Every
    candidate is compared, in constant time, whichever matches."""
    entry = normalized(code)
    if entry is None:
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP)
    found = None
    base = _step(now)
    for step in range(base - DRIFT, base + DRIFT + 1):
        if equal(totp.generate_otp(step), entry) and found is None:
            found = step
    return found


# --- storage -----------------------------------------------------------------------------


def _slot(customer_id: int) -> str:
    """The row's `lookup`: its unique index lets one totp row per customer exist, whatever
    races (two tabs enrolling at once insert one row; the other replaces it)."""
    return sha256_hex(f"{Type.TOTP.value}\x1f{customer_id}")


def _dumps(sealed: str, last_step: int | None) -> str:
    return json.dumps({"secret": sealed, "last_step": last_step})


def _open(keys: FactorKeys, data: str) -> tuple[str, str, int | None]:
    """(the sealed secret, the secret, the last accepted step). Unreadable when no key of the
    ring opens it (its message never holds the secret)."""
    parsed = json.loads(data)
    secret = keys.at_rest.open(parsed["secret"]).get("s")
    if not isinstance(secret, str):
        raise Unreadable("no secret in it")
    return parsed["secret"], secret, parsed.get("last_step")


_COLUMNS = (a.c.id, a.c.data, a.c.confirmed_at)
_MINE = sa.and_(a.c.customer_id == sa.bindparam("cid"), a.c.type == Type.TOTP.value)
_ROW = sql.Query(sa.select(*_COLUMNS).where(_MINE).order_by(a.c.id.desc()).limit(1))
_PENDING = sql.Query(sa.select(*_COLUMNS).where(_MINE, a.c.confirmed_at.is_(None)).order_by(a.c.id.desc()).limit(1))
_CONFIRMED = sql.Query(sa.select(*_COLUMNS).where(_MINE, a.c.confirmed_at.is_not(None)).order_by(a.c.id).limit(1))
_INSERT = sql.Query(a.insert(), columns=("customer_id", "type", "data", "label", "lookup", "created_at"))
_RESTART = sql.Query(
    a.update().where(a.c.id == sa.bindparam("rid"), a.c.confirmed_at.is_(None))
    .values(data=sa.bindparam("new"), created_at=sa.bindparam("now"), label="", last_used_at=None)
)
_CONFIRM = sql.Query(
    a.update().where(a.c.id == sa.bindparam("rid"), a.c.confirmed_at.is_(None), a.c.data == sa.bindparam("old"))
    .values(data=sa.bindparam("new"), confirmed_at=sa.bindparam("now"), label=sa.bindparam("label"))
)
_USE = sql.Query(
    a.update().where(a.c.id == sa.bindparam("rid"), a.c.confirmed_at.is_not(None), a.c.data == sa.bindparam("old"))
    .values(data=sa.bindparam("new"), last_used_at=sa.bindparam("now"))
)
_RESEAL = sql.Query(
    a.update().where(a.c.id == sa.bindparam("rid"), a.c.data == sa.bindparam("old")).values(data=sa.bindparam("new"))
)
_ALL = sql.Query(sa.select(a.c.id, a.c.data).where(a.c.type == Type.TOTP.value).order_by(a.c.id))
_ONE = sql.Query(sa.select(a.c.data).where(a.c.id == sa.bindparam("rid")))
_REMOVE = sql.Query(a.delete().where(_MINE))
_FORGET = sql.Query(
    a.delete().where(a.c.type == Type.TOTP.value, a.c.confirmed_at.is_(None), a.c.created_at < sa.bindparam("before"))
)
# SQLite (WAL): a transaction that reads first cannot become a writer once another connection
# has committed; a caller's transaction takes the write lock before the compare-and-swap reads.
_SQLITE_WRITER = sql.Query(a.update().where(sa.false()).values(data=a.c.data))


async def _writer(db: Database) -> None:
    if sql.dialect(db) == "sqlite":
        await sql.execute(db, _SQLITE_WRITER)


async def start(db: Database, keys: FactorKeys, *, customer_id: int, now: datetime) -> str:
    """A new secret for the customer's unconfirmed app (replacing one being enrolled), to show
    once. AlreadyEnrolled when a confirmed app exists: it stays untouched."""
    secret = new_secret()
    data = _dumps(keys.at_rest.seal({"s": secret}), None)
    for _ in range(CAS_TRIES):
        row = await sql.fetch_one(db, _ROW, cid=customer_id)
        if row is not None and row.confirmed_at is not None:
            raise AlreadyEnrolled
        if row is not None:
            if await sql.execute(db, _RESTART, rid=row.id, new=data, now=now):
                return secret
            continue  # confirmed (or removed) meanwhile: look again
        try:
            await sql.insert(db, _INSERT, customer_id=customer_id, type=Type.TOTP.value, data=data, label="",
                             lookup=_slot(customer_id), created_at=now)
        except INTEGRITY_ERRORS:
            continue  # another request inserted the row first: replace it or refuse
        return secret
    raise RuntimeError("could not start enrolling an authenticator app: the row kept changing")


async def pending_secret(db: Database, keys: FactorKeys, customer_id: int) -> str | None:
    """The secret of the app being enrolled, to show again until its first code is entered."""
    row = await sql.fetch_one(db, _PENDING, cid=customer_id)
    return None if row is None else _open(keys, row.data)[1]


async def confirm(db: Database, keys: FactorKeys, *, customer_id: int, code: str, now: datetime,
                  label: str = "Authenticator app") -> bool:
    """The first right code enrols the app; its step counts as used (no replay at sign-in).
    Wrong entries are the caller's to count and limit, as for any code."""
    await _writer(db)
    for _ in range(CAS_TRIES):
        row = await sql.fetch_one(db, _PENDING, cid=customer_id)
        if row is None:
            return False
        sealed, secret, _ = _open(keys, row.data)
        step = matching_step(secret, code, now)
        if step is None:
            return False
        new = _dumps(sealed, step)
        if await sql.execute(db, _CONFIRM, rid=row.id, old=row.data, new=new, now=now, label=label[:100]):
            return True
    return False


async def check(db: Database, keys: FactorKeys, *, customer_id: int, code: str, now: datetime) -> bool:
    """A code of the customer's confirmed app, each step accepted once: True only when the
    step is newer than the last accepted one and this call moved `last_step` to it (of two
    concurrent entries of one code, one). Wrong entries are the caller's to count and limit."""
    await _writer(db)
    for _ in range(CAS_TRIES):
        row = await sql.fetch_one(db, _CONFIRMED, cid=customer_id)
        if row is None:
            return False
        sealed, secret, last = _open(keys, row.data)
        step = matching_step(secret, code, now)
        if step is None or (last is not None and step <= last):
            return False
        new = _dumps(sealed, step)
        if await sql.execute(db, _USE, rid=row.id, old=row.data, new=new, now=now):
            return True
        # Lost the swap: another entry (this code, or a newer one) or a reseal came first.
    return False


async def remove(db: Database, customer_id: int) -> bool:
    """Remove the customer's app (enrolled or being enrolled)."""
    return bool(await sql.execute(db, _REMOVE, cid=customer_id))


async def forget_unconfirmed(db: Database, now: datetime, older_than: timedelta = timedelta(hours=1)) -> int:
    """Delete enrolments whose first code never came; how many."""
    return await sql.execute(db, _FORGET, before=now - older_than)


async def reseal(db: Database, keys: FactorKeys) -> int:
    """Seal every secret again under the current key (after a SECRET_KEY rotation, while the old
    key is still a fallback); how many. A secret no key opens is left as it is, and logged by
    row id."""
    done = 0
    for row in await sql.fetch_all(db, _ALL):
        data: Any = row.data
        for _ in range(CAS_TRIES):
            try:
                _, secret, last = _open(keys, data)
            except Unreadable:
                log.warning("authenticator %s: no current or fallback key opens its secret", row.id)
                break
            new = _dumps(keys.at_rest.seal({"s": secret}), last)
            if await sql.execute(db, _RESEAL, rid=row.id, old=data, new=new):
                done += 1
                break
            # A sign-in moved last_step meanwhile: seal what is there now.
            data = await sql.fetch_val(db, _ONE, rid=row.id)
            if data is None:
                break
    return done

"""Customers as the console sees them: search, one customer's page, and the staff actions on
them. Each action is one guarded change plus an audit event naming the staff member, the
customer, and the state before and after. No HTTP here."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from databases import Database

from app import audit, sql
from app.audit import Event
from app.auth import queries
from app.database import transact
from app.factors import Factors, bypass, devices, factors_of, passkeys
from app.mail import outbox
from app.tables import auth_events, auth_sessions, customers, mail_outbox, otp_verification

PAGE_SIZE = 50
SORTS = {"email": customers.c.email, "name": customers.c.full_name, "created": customers.c.created_at,
         "id": customers.c.id}

c = customers


@dataclass(frozen=True)
class Row:
    id: int
    email: str
    username: str | None
    full_name: str
    created_at: datetime | None
    otp_enabled: bool
    locked_until: datetime | None
    disabled_at: datetime | None


def _row(rec: Any) -> Row:
    return Row(rec.id, rec.email, rec.username, rec.full_name or "", rec.created_at, bool(rec.otp_enabled),
               rec.otp_locked_until, rec.disabled_at)


_LIST_COLS = (c.c.id, c.c.email, c.c.username, c.c.full_name, c.c.created_at, c.c.otp_enabled, c.c.otp_locked_until,
              c.c.disabled_at)


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    page: int
    more: bool  # a next page exists
    query: str
    sort: str


def _search_query(sort: str, with_text: bool, with_id: bool) -> sql.Query:
    stmt = sa.select(*_LIST_COLS)
    if with_text:
        like = sa.bindparam("like", type_=sa.String)
        found: list[sa.ColumnElement[bool]] = [c.c.email.like(like, escape="\\"), c.c.username.like(like, escape="\\"),
                 c.c.full_name.like(like, escape="\\")]
        if with_id:
            found.append(c.c.id == sa.bindparam("num", type_=sa.Integer))
        stmt = stmt.where(sa.or_(*found))
    order = SORTS[sort]
    return sql.Query(stmt.order_by(order.desc() if sort in ("created", "id") else order.asc(), c.c.id.desc())
                     .limit(sa.bindparam("lim", type_=sa.Integer)).offset(sa.bindparam("off", type_=sa.Integer)))


_SEARCH = {(sort, t, n): _search_query(sort, t, n) for sort in SORTS for t in (False, True) for n in (False, True)
           if t or not n}


async def search(db: Database, *, query: str, sort: str = "id", page: int = 1) -> Page:
    """Customers whose email, username or name starts with `query` (LIKE 'text%': each on its
    own index; both backends compare case-insensitively), or whose id it is; 50 a page, sorted.
    One more row is read to know whether a next page exists."""
    sort = sort if sort in SORTS else "id"
    page = max(1, min(page, 10_000))
    q = query.strip()[:254]
    like = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    digits = q.isascii() and q.isdigit() and len(q) <= 12  # "²" is a digit to isdigit(), not to int()
    params: dict[str, Any] = {"lim": PAGE_SIZE + 1, "off": (page - 1) * PAGE_SIZE}
    if q:
        params["like"] = like
    if q and digits:
        params["num"] = int(q)
    rows = [_row(r) for r in await sql.fetch_all(db, _SEARCH[sort, bool(q), bool(q) and digits], **params)]
    return Page(rows[:PAGE_SIZE], page, len(rows) > PAGE_SIZE, q, sort)


@dataclass(frozen=True)
class Detail:
    customer: queries.Customer
    created_at: datetime | None
    failures: int
    locked_until: datetime | None
    disabled_at: datetime | None
    factors: Factors
    passkeys: list[passkeys.Passkey]
    devices: list[devices.Device]
    sign_ins: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    codes: list[dict[str, Any]] = field(default_factory=list)


_EXTRA = sql.Query(sa.select(c.c.created_at, c.c.otp_attempts, c.c.otp_locked_until, c.c.disabled_at)
                   .where(c.c.id == sa.bindparam("cid")))
_SIGN_INS = sql.Query(
    sa.select(auth_events.c.created_at, auth_events.c.ip, auth_events.c.user_agent)
    .where(auth_events.c.customer_id == sa.bindparam("cid"), auth_events.c.event == Event.SIGNED_IN.value)
    .order_by(auth_events.c.created_at.desc()).limit(10)
)
_SESSIONS = sql.Query(
    sa.select(auth_sessions.c.created_at, auth_sessions.c.last_seen_at, auth_sessions.c.ip,
              auth_sessions.c.user_agent, auth_sessions.c.method)
    .where(auth_sessions.c.customer_id == sa.bindparam("cid"), auth_sessions.c.revoked_at.is_(None),
           auth_sessions.c.last_seen_at > sa.bindparam("seen_after"))
    .order_by(auth_sessions.c.last_seen_at.desc()).limit(20)
)
o = otp_verification
_CODES = sql.Query(
    sa.select(o.c.purpose, o.c.kind, o.c.created_at, o.c.expires_at, o.c.used_at, o.c.invalidated_at, o.c.attempts,
              sa.select(mail_outbox.c.status).where(mail_outbox.c.challenge_id == o.c.id)
              .order_by(mail_outbox.c.id.desc()).limit(1).scalar_subquery().label("delivery"))
    .where(o.c.customer_id == sa.bindparam("cid"))
    .order_by(o.c.created_at.desc()).limit(20)
)


async def _extra(db: Database, customer_id: int) -> Any:
    extra = await sql.fetch_one(db, _EXTRA, cid=customer_id)
    if extra is None:
        raise Refused("There is no such customer.")
    return extra


def outcome(row: Any, now: datetime) -> str:
    """What became of a step, in words (never its code)."""
    if row.used_at is not None:
        return "verified"
    if row.invalidated_at is not None:
        return "ended"
    if row.expires_at <= now:
        return "expired"
    return "open"


async def detail(db: Database, customer_id: int, *, now: datetime, idle: int) -> Detail | None:
    customer = await queries.get_customer(db, customer_id)
    if customer is None:
        return None
    extra = await _extra(db, customer_id)
    codes = [{"purpose": r.purpose, "kind": r.kind, "created_at": r.created_at, "delivery": r.delivery or "none",
              "outcome": outcome(r, now), "attempts": r.attempts}
             for r in await sql.fetch_all(db, _CODES, cid=customer_id)]
    return Detail(
        customer=customer, created_at=extra.created_at, failures=int(extra.otp_attempts),
        locked_until=extra.otp_locked_until if extra.otp_locked_until and extra.otp_locked_until > now else None,
        disabled_at=extra.disabled_at, factors=await factors_of(db, customer_id),
        passkeys=await passkeys.list_passkeys(db, customer_id), devices=await devices.list_devices(db, customer_id, now),
        sign_ins=[r._asdict() for r in await sql.fetch_all(db, _SIGN_INS, cid=customer_id)],
        sessions=[r._asdict() for r in await sql.fetch_all(db, _SESSIONS, cid=customer_id,
                                                                 seen_after=now - timedelta(seconds=idle))],
        codes=codes,
    )


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    """The staff member acting, as the audit records them."""

    staff_id: int
    email: str
    ip: str
    user_agent: str


class Refused(Exception):
    """The action does not apply (say why)."""


_SET_OTP = sql.Query(c.update().where(c.c.id == sa.bindparam("cid")).values(otp_enabled=sa.bindparam("on")))
_UNLOCK = sql.Query(c.update().where(c.c.id == sa.bindparam("cid"))
                    .values(otp_attempts=0, otp_lockouts=0, otp_locked_until=None, signin_paused_until=None))
_DISABLE = sql.Query(c.update().where(c.c.id == sa.bindparam("cid")).values(disabled_at=sa.bindparam("at")))


async def _audited(db: Database, actor: Actor, customer_id: int, now: datetime, action: str, before: Any,
                   after: Any, reason: str | None = None) -> None:
    detail: dict[str, Any] = {"action": action, "before": before, "after": after, "staff": actor.email}
    if reason:
        detail["reason"] = reason
    await audit.record_staff(db, Event.STAFF_ACTION, staff_id=actor.staff_id, customer_id=customer_id, ip=actor.ip,
                             user_agent=actor.user_agent, now=now, detail=detail)


async def _customer(db: Database, customer_id: int) -> queries.Customer:
    customer = await queries.get_customer(db, customer_id)
    if customer is None:
        raise Refused("There is no such customer.")
    return customer


async def set_codes(db: Database, actor: Actor, customer_id: int, *, on: bool, now: datetime) -> None:
    customer = await _customer(db, customer_id)

    async def work() -> None:
        await sql.execute(db, _SET_OTP, cid=customer_id, on=on)
        await _audited(db, actor, customer_id, now, "sign-in codes", "on" if customer.otp_enabled else "off",
                       "on" if on else "off")

    await transact(db, work)


async def unlock(db: Database, actor: Actor, customer_id: int, *, now: datetime) -> None:
    await _customer(db, customer_id)
    extra = await _extra(db, customer_id)

    async def work() -> None:
        await sql.execute(db, _UNLOCK, cid=customer_id)
        await _audited(db, actor, customer_id, now, "unlock",
                       {"failures": extra.otp_attempts, "locked_until": extra.otp_locked_until},
                       {"failures": 0, "locked_until": None})

    await transact(db, work)


async def end_sessions(db: Database, actor: Actor, customer_id: int, *, now: datetime) -> None:
    await _customer(db, customer_id)

    async def work() -> None:
        await queries.revoke_all_now(db, customer_id, now)
        await _audited(db, actor, customer_id, now, "end all sessions", "signed in", "signed out everywhere")

    await transact(db, work)


async def revoke_device(db: Database, actor: Actor, customer_id: int, device_id: int, *, now: datetime) -> None:
    await _customer(db, customer_id)
    if not await devices.revoke(db, customer_id=customer_id, device_id=device_id, now=now):
        raise Refused("That device is not trusted by this customer (any more).")
    await _audited(db, actor, customer_id, now, "revoke trusted device", f"device {device_id} trusted",
                   f"device {device_id} revoked")


async def revoke_devices(db: Database, actor: Actor, customer_id: int, *, now: datetime) -> None:
    await _customer(db, customer_id)
    count = await devices.revoke_all(db, customer_id=customer_id, now=now)
    await _audited(db, actor, customer_id, now, "revoke all trusted devices", f"{count} trusted", "0 trusted")


async def set_disabled(db: Database, actor: Actor, customer_id: int, *, disabled: bool, now: datetime) -> None:
    await _customer(db, customer_id)
    extra = await _extra(db, customer_id)

    async def work() -> None:
        await sql.execute(db, _DISABLE, cid=customer_id, at=now if disabled else None)
        if disabled:
            await queries.revoke_all_now(db, customer_id, now)  # out at once, everywhere
        await _audited(db, actor, customer_id, now, "account", "disabled" if extra.disabled_at else "enabled",
                       "disabled" if disabled else "enabled")

    await transact(db, work)


_COOLDOWN_OVER = sql.Query(c.update().where(c.c.id == sa.bindparam("cid")).values(otp_last_sent_at=None))


async def resend_confirmation(db: Database, sealer: Any, actor: Actor, customer_id: int, *, origin: str,
                              now: datetime) -> outbox.Queued:
    """A sign-up whose address was never confirmed: a mail asking them to sign in, where a code
    confirms the address (a code needs the browser that asks for it); their resend cooldown
    ends, so that sign-in mails the code at once."""
    customer = await _customer(db, customer_id)
    if customer.email_verified_at is not None:
        raise Refused("This customer's email address is confirmed already.")

    async def work() -> outbox.Queued:
        await sql.execute(db, _COOLDOWN_OVER, cid=customer_id)
        queued = await outbox.enqueue(db, sealer, kind=outbox.MailKind.CONFIRM_REMINDER, recipient=customer.email,
                                      now=now, customer_id=customer_id,
                                      context={"name": customer.full_name or customer.username or "",
                                               "username": customer.username or customer.email, "origin": origin})
        await _audited(db, actor, customer_id, now, "resend email confirmation", "unconfirmed",
                       "confirmation mail queued")
        return queued

    return await transact(db, work)


async def grant_bypass(db: Database, actor: Actor, customer_id: int, *, hours: int, reason: str,
                       now: datetime) -> None:
    customer = await _customer(db, customer_id)
    if not (await factors_of(db, customer_id)).strong:
        raise Refused("This customer has no authenticator app or passkey: the emailed code already works.")
    try:
        await bypass.grant(db, now=now, email=customer.email, hours=hours, reason=reason, staff=actor.email)
    except ValueError as exc:
        raise Refused(str(exc).capitalize() + ".") from exc
    await _audited(db, actor, customer_id, now, "second-step bypass", customer.factor_bypass_until,
                   (now + timedelta(hours=hours)).isoformat(), reason=reason)

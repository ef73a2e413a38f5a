"""Codes: 6 digits from `secrets`, stored as HMAC(SECRET_KEY, id:code), single use, bound to
customer + purpose + pending session, with per-code and per-customer limits kept in the
database and changed only by guarded UPDATEs, so several workers agree without locks."""

from __future__ import annotations

import contextlib
import hmac
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from databases import Database

from app import sql
from app.database import INTEGRITY_ERRORS
from app.security.crypto import keyed_hash, letters_token, seal_for_token, sha256_hex
from app.tables import authenticators as _au
from app.tables import customers, mail_outbox, otp_codes, otp_ledgers, otp_verification

CODE_DIGITS = 6


class Kind(StrEnum):
    """What a challenge is: a mailed code; a placeholder while the cooldown runs (password
    proven, no code sent yet); a decoy for a registration whose address or username exists."""

    CODE = "code"
    PLACEHOLDER = "placeholder"
    DECOY = "decoy"
    # A second step answered by a factor (an authenticator app, a passkey, a backup code), never
    # by a mailed code: it has none, gets none, and shares the budget, failure count and lockout.
    FACTOR = "factor"


class Purpose(StrEnum):
    REGISTRATION = "registration"  # confirm the address of a new account
    LOGIN = "login"  # the second step after a password
    RESET = "reset"  # prove the mailbox before choosing a new password
    EMAIL = "email"  # confirm a new address for a signed-in customer
    DELETE = "delete"  # confirm that a signed-in customer deletes the account


class Outcome(StrEnum):
    """What one code entry came to."""

    VERIFIED = "verified"
    WRONG = "wrong"
    DEAD = "dead"  # out of tries before this entry counted
    EXPIRED = "expired"
    LOCKED = "locked"
    INVALID = "invalid"  # used, or replaced by a newer code


@dataclass(frozen=True)
class OtpPolicy:
    registration_ttl: int = 900
    login_ttl: int = 600
    resend_cooldown: int = 60
    max_attempts: int = 5
    lockout_schedule: tuple[int, ...] = (60, 300, 900, 3600)

    def ttl(self, purpose: Purpose) -> int:
        """Confirming an address (a new account, a new email) gets the longer lifetime."""
        return self.registration_ttl if purpose in (Purpose.REGISTRATION, Purpose.EMAIL) else self.login_ttl

    def lockout(self, level: int) -> int:
        return self.lockout_schedule[min(level, len(self.lockout_schedule) - 1)]


@dataclass(frozen=True)
class Keys:
    code: bytes
    binding: bytes
    address: bytes  # keyed hashes of addresses: the ledgers of unproven steps, mail windows


@dataclass(frozen=True)
class Issued:
    challenge_id: int
    code: str
    expires_at: datetime
    tag: str  # the step's tag, shown beside the code field and in the mail
    link_token: str  # the mail's link (kept only hashed)
    stop_token: str  # the mail's "Not you?" link (kept only hashed)


class StepEnded(Exception):
    """The step was used or ended meanwhile: no code goes out for it."""


class Cooldown(Exception):
    """A code was sent to this customer less than the cooldown ago."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Challenge:
    id: int
    customer_id: int
    purpose: Purpose
    kind: Kind
    sent_to: str
    attempts: int
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    invalidated_at: datetime | None
    locked_until: datetime | None
    last_sent_at: datetime | None
    session_version: int = 0  # the customer's, for the session a right code starts
    delivery: str | None = None  # the state of the mail it shows (app.mail.outbox.MailStatus), if any
    claim: str | None = None  # sealed details of a registration that takes over an unconfirmed sign-up
    last_code_at: datetime | None = None  # when its newest code (or, for a stand-in, its last answer) went
    tag: str = ""
    # Started with the password or in a signed-in session. False (a registration form, forgot
    # password): failures count on the address's ledger (`ledger_key`), and the step never
    # touches the customer's failure count, cooldown or other steps.
    proven: bool = True
    ledger_key: str | None = None
    paused_until: datetime | None = None  # "Not you?" paused sign-in codes (part of locked_until)

    @property
    def sent_at(self) -> datetime:
        """When the step's newest code went out (for a stand-in: when it answered last)."""
        return self.last_code_at or self.created_at

    @property
    def real(self) -> bool:
        """A code was mailed for it (not a placeholder or a stand-in)."""
        return self.kind is Kind.CODE

    def resend_wait(self, policy: OtpPolicy, now: datetime) -> int:
        """Seconds until a new code may be asked for, as the code step shows it. A decoy or an
        unproven step counts from its own last answer; a proven one from the customer's last code."""
        if self.kind is Kind.DECOY or not self.proven or self.last_sent_at is None:
            return _left(self.sent_at, policy.resend_cooldown, now)
        return _left(self.last_sent_at, policy.resend_cooldown, now)


@dataclass(frozen=True)
class Verdict:
    """What a code entry came to."""

    status: Outcome
    customer_id: int | None = None
    attempts_left: int = 0
    locked_until: datetime | None = None
    checked: bool = False  # the entry was counted and compared (a failure to log), not refused unread


def generate_code() -> str:
    """Six digits, uniformly from the OS's CSPRNG, zero-padded."""
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def new_challenge_id() -> int:
    return secrets.randbits(62) | 1


def code_hash(key: bytes, challenge_id: int, code: str) -> str:
    return keyed_hash(key, challenge_id, code)


def binding_hash(key: bytes, nonce: str) -> str:
    return keyed_hash(key, "pending-session", nonce)


def ledger_key(key: bytes, purpose: Purpose, address: str) -> str:
    """Whose failures an unproven step counts on: the purpose and the address, however typed."""
    return keyed_hash(key, "ledger", purpose.value, address.strip().lower())


# Letters and digits no one confuses (no 0/O, 1/I/L, 2/Z, 5/S, 6/G, 8/B).
TAG_ALPHABET = "ACDEFHJKMNPRTUVWXY3479"
CODES_KEPT = 3  # the newest codes of a step that stay valid


def new_tag() -> str:
    """Three characters that tie a step to its mails ("Code for sign-in K7Q")."""
    return "".join(secrets.choice(TAG_ALPHABET) for _ in range(3))


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return max(a, b) if a and b else a or b


def _left(since: datetime | None, seconds: int, now: datetime) -> int:
    if since is None:
        return 0
    return max(0, math.ceil(seconds - (now - since).total_seconds()))


o, c = otp_verification, customers

_LAST_SENT = sql.Query(sa.select(c.c.otp_last_sent_at).where(c.c.id == sa.bindparam("cid")))
# The cooldown is a compare-and-set on the customer row: of any number of concurrent
# requests on any number of workers, one wins per cooldown window.
_TAKE_COOLDOWN = sql.Query(
    c.update()
    .where(c.c.id == sa.bindparam("cid"),
           sa.or_(c.c.otp_last_sent_at.is_(None), c.c.otp_last_sent_at <= sa.bindparam("threshold")))
    .values(otp_last_sent_at=sa.bindparam("now"))
)
_INVALIDATE_OPEN = sql.Query(
    o.update()
    .where(o.c.customer_id == sa.bindparam("cid"), o.c.used_at.is_(None), o.c.invalidated_at.is_(None),
           o.c.id != sa.bindparam("keep"))
    .values(invalidated_at=sa.bindparam("now"))
)


def _ending_open_codes(*where: Any, values: dict[Any, Any]) -> sql.Query:
    """MySQL/MariaDB: an UPDATE of the customer row that also ends the customer's open steps
    (challenges) but `keep`, one statement instead of two (a multi-table UPDATE: the customer
    row, then their challenges, the order everything that locks both takes them in; nothing
    changes when the customer row does not match). SQLite runs the two statements."""
    open_codes = sa.and_(o.c.customer_id == c.c.id, o.c.used_at.is_(None), o.c.invalidated_at.is_(None),
                         o.c.id != sa.bindparam("keep"))
    return sql.Query(
        sa.update(c.outerjoin(o, open_codes)).where(*where)
        .values({**values, o.c.invalidated_at: sa.bindparam("now")})
    )


async def _ending_open_codes_if(db: Database, alone: sql.Query, combined: sql.Query, *, cid: int, now: datetime,
                                keep: int = 0, **params: Any) -> int:
    """Run a customer-row UPDATE and, when it matched the row, end the customer's open codes:
    `combined` (one statement, from _ending_open_codes) on MySQL/MariaDB, `alone` then
    _INVALIDATE_OPEN on SQLite. How many rows it changed: 0 when the customer row did not match."""
    if sql.dialect(db) == "mysql":
        return await sql.execute(db, combined, cid=cid, now=now, keep=keep, **params)
    changed = await sql.execute(db, alone, cid=cid, now=now, **params)
    if changed:
        await sql.execute(db, _INVALIDATE_OPEN, cid=cid, now=now, keep=keep)
    return changed


_TAKE_COOLDOWN_ENDING_OPEN = _ending_open_codes(
    c.c.id == sa.bindparam("cid"),
    sa.or_(c.c.otp_last_sent_at.is_(None), c.c.otp_last_sent_at <= sa.bindparam("threshold")),
    values={c.c.otp_last_sent_at: sa.bindparam("now")},
)
_INSERT = sql.Query(
    o.insert(),
    columns=("id", "customer_id", "purpose", "code_hash", "session_binding", "kind", "sent_to", "attempts",
             "created_at", "expires_at", "claim", "mail_id", "last_code_at", "tag", "proven", "ledger_key"),
)
k = otp_codes
_INSERT_CODE = sql.Query(
    k.insert(), columns=("challenge_id", "code_hash", "created_at", "expires_at", "link_hash", "link_sealed",
                         "stop_hash"),
)
# A resend: the step's newest code is this one now (a placeholder becomes a real step). Only
# while the step is open: a used or ended step gets no more codes.
_NEXT_CODE = sql.Query(
    o.update().where(o.c.id == sa.bindparam("cid"), o.c.used_at.is_(None), o.c.invalidated_at.is_(None),
                     o.c.kind != Kind.FACTOR.value)
    .values(expires_at=sa.bindparam("expires"), last_code_at=sa.bindparam("now"), kind=Kind.CODE.value,
            claim=sa.bindparam("new_claim"))
)
_OPEN_CODE_IDS = sql.Query(
    sa.select(k.c.id)
    .where(k.c.challenge_id == sa.bindparam("cid"), k.c.invalidated_at.is_(None), k.c.expires_at > sa.bindparam("now"))
    .order_by(k.c.created_at.desc(), k.c.id.desc())
)
_PUSH_OUT = sql.Query(k.update().where(k.c.id == sa.bindparam("code_id")).values(invalidated_at=sa.bindparam("now")))
# Every code of the step, newest first: which one an entry matches, and whether it still works.
_CODES = sql.Query(
    sa.select(k.c.id, k.c.code_hash, k.c.expires_at, k.c.invalidated_at)
    .where(k.c.challenge_id == sa.bindparam("cid"))
    .order_by(k.c.created_at.desc(), k.c.id.desc())
)


async def cooldown_left(db: Database, *, customer_id: int, policy: OtpPolicy, now: datetime) -> int:
    """Seconds until this customer may be sent another code (0 = now)."""
    sent = await sql.fetch_val(db, _LAST_SENT, cid=customer_id)
    return _left(sent, policy.resend_cooldown, now)


async def take_cooldown(db: Database, *, customer_id: int, policy: OtpPolicy, now: datetime, keep: int = 0,
                        force: bool = False) -> None:
    """Start the customer's cooldown and end their other open steps (but `keep`), as a code for
    a proven step does; Cooldown if one went less than the cooldown ago. `force`: taken whatever
    it holds (the caller limits mail some other way)."""
    threshold = now - timedelta(seconds=policy.resend_cooldown) if not force else now + timedelta(days=1)
    if not await _ending_open_codes_if(db, _TAKE_COOLDOWN, _TAKE_COOLDOWN_ENDING_OPEN, cid=customer_id,
                                       threshold=threshold, now=now, keep=keep):
        raise Cooldown(max(1, await cooldown_left(db, customer_id=customer_id, policy=policy, now=now)))


_lg = otp_ledgers
_LEDGER_FOUND = sql.Query(sa.select(_lg.c.key).where(_lg.c.key == sa.bindparam("k")))
_LEDGER_NEW = sql.Query(_lg.insert(), columns=("key", "failures", "lockouts", "locked_until", "updated_at"))


async def _ensure_ledger(db: Database, key: str, now: datetime) -> None:
    """The address's ledger row, made the first time (concurrent first requests: one insert wins)."""
    if await sql.fetch_val(db, _LEDGER_FOUND, k=key) is None:
        with contextlib.suppress(*INTEGRITY_ERRORS):
            await sql.execute(db, _LEDGER_NEW, key=key, failures=0, lockouts=0, locked_until=None, updated_at=now)


async def issue(
    db: Database,
    *,
    keys: Keys,
    policy: OtpPolicy,
    now: datetime,
    customer_id: int,
    purpose: Purpose,
    nonce: str,
    sent_to: str,
    claim: str | None = None,
    challenge: Challenge | None = None,
    ledger: str | None = None,
) -> Issued:
    """A code for a new step, or, with `challenge`, one more code for that open step (a resend):
    every earlier code of it stays valid until its own expiry, the CODES_KEPT newest at most, all
    under the step's one attempt budget; StepEnded if it was used or ended meanwhile.

    A proven step (`ledger` None: after the password, or in a signed-in session) takes the
    customer's cooldown and ends their other open steps; Cooldown if too soon. An unproven one
    (`ledger`: the address's ledger key) touches nothing of the customer's: the caller limits
    its mail per address.

    `claim`: the sealed details of a registration that takes over an unconfirmed sign-up,
    applied only when a code of this step is entered. Call inside a transaction together with
    queueing its mail, so that a code exists exactly when its mail does.
    """
    if ledger is None:
        await take_cooldown(db, customer_id=customer_id, policy=policy, now=now,
                            keep=challenge.id if challenge is not None else 0)
    else:
        await _ensure_ledger(db, ledger, now)
    code = generate_code()
    expires_at = now + timedelta(seconds=policy.ttl(purpose))
    if challenge is None:
        challenge_id, tag = new_challenge_id(), new_tag()
        await sql.execute(
            db, _INSERT, id=challenge_id, customer_id=customer_id, purpose=purpose.value,
            code_hash=secrets.token_hex(32), session_binding=binding_hash(keys.binding, nonce), kind=Kind.CODE.value,
            sent_to=sent_to, attempts=0, created_at=now, expires_at=expires_at, claim=claim, mail_id=None,
            last_code_at=now, tag=tag, proven=ledger is None, ledger_key=ledger,
        )
    else:
        challenge_id, tag = challenge.id, challenge.tag
        if not await sql.execute(db, _NEXT_CODE, cid=challenge_id, expires=expires_at, now=now, new_claim=claim):
            raise StepEnded
        older = await sql.fetch_all(db, _OPEN_CODE_IDS, cid=challenge_id, now=now)
        for row in older[CODES_KEPT - 1:]:
            await sql.execute(db, _PUSH_OUT, code_id=row.id, now=now)
    link_token, stop_token = letters_token(), letters_token()
    await sql.execute(
        db, _INSERT_CODE, challenge_id=challenge_id, code_hash=code_hash(keys.code, challenge_id, code),
        created_at=now, expires_at=expires_at, link_hash=sha256_hex(link_token),
        link_sealed=seal_for_token(link_token, code), stop_hash=sha256_hex(stop_token),
    )
    return Issued(challenge_id, code, expires_at, tag, link_token, stop_token)


async def stand_in(
    db: Database,
    *,
    keys: Keys,
    policy: OtpPolicy,
    now: datetime,
    customer_id: int | None,
    purpose: Purpose,
    nonce: str,
    sent_to: str,
    kind: Kind,
    mail_id: int | None = None,
    claim: str | None = None,
    ledger: str | None = None,
) -> int:
    """A challenge no code was mailed for (placeholder or decoy). It can never verify (it has no
    code; a placeholder gets one on a resend), and it neither invalidates the customer's real
    codes nor touches their cooldown. `mail_id`: a mail queued earlier whose delivery state the
    step shows. `ledger`: unproven (see issue); its failures count on that address's ledger."""
    if ledger is not None:
        await _ensure_ledger(db, ledger, now)
    challenge_id = new_challenge_id()
    await sql.execute(
        db, _INSERT, id=challenge_id, customer_id=customer_id, purpose=purpose.value,
        code_hash=secrets.token_hex(32), session_binding=binding_hash(keys.binding, nonce), kind=kind.value,
        sent_to=sent_to, attempts=0, created_at=now, expires_at=now + timedelta(seconds=policy.ttl(purpose)),
        claim=claim, mail_id=mail_id, last_code_at=now, tag=new_tag(), proven=ledger is None, ledger_key=ledger,
    )
    return challenge_id


_ANSWER_AGAIN = sql.Query(
    o.update().where(o.c.id == sa.bindparam("cid"), o.c.used_at.is_(None), o.c.invalidated_at.is_(None))
    .values(expires_at=sa.bindparam("expires"), last_code_at=sa.bindparam("now"), mail_id=sa.bindparam("new_mail"))
)


async def answer_again(db: Database, *, policy: OtpPolicy, now: datetime, challenge: Challenge,
                       mail_id: int | None) -> None:
    """A "resend" that mails no code (a stand-in's, or one inside the address's mail window): the
    same step answers as if a new code had gone (its lifetime and cooldown start again), showing
    the state of `mail_id` (a notice, or the mail it showed). StepEnded if it was used or ended."""
    if not await sql.execute(db, _ANSWER_AGAIN, cid=challenge.id, now=now, new_mail=mail_id,
                             expires=now + timedelta(seconds=policy.ttl(challenge.purpose))):
        raise StepEnded


_NEWEST_OPEN = sql.Query(
    sa.select(o.c.id)
    .where(
        o.c.customer_id == sa.bindparam("cid"),
        o.c.purpose == sa.bindparam("purpose"),
        o.c.kind == Kind.CODE.value,
        o.c.used_at.is_(None),
        o.c.invalidated_at.is_(None),
        o.c.expires_at > sa.bindparam("now"),
    )
    .order_by(o.c.created_at.desc())
    .limit(1)
)
_REBIND = sql.Query(
    o.update().where(o.c.id == sa.bindparam("cid")).values(session_binding=sa.bindparam("binding"),
                                                            claim=sa.bindparam("new_claim"))
)
_OPEN_BOUND = sql.Query(
    sa.select(o.c.id)
    .where(
        o.c.customer_id == sa.bindparam("cid"),
        o.c.purpose == sa.bindparam("purpose"),
        o.c.session_binding == sa.bindparam("binding"),
        o.c.used_at.is_(None),
        o.c.invalidated_at.is_(None),
        o.c.expires_at > sa.bindparam("now"),
    )
    .order_by(o.c.created_at.desc())
    .limit(1)
)


async def open_bound(
    db: Database, *, keys: Keys, customer_id: int, purpose: Purpose, nonce: str, now: datetime
) -> int | None:
    """The customer's newest open challenge already bound to this nonce, if any: a form sent
    twice (a double click, a retry) joins the step the first one started."""
    found = await sql.fetch_val(db, _OPEN_BOUND, cid=customer_id, purpose=purpose.value,
                                binding=binding_hash(keys.binding, nonce), now=now)
    return None if found is None else int(found)


_SET_CLAIM = sql.Query(o.update().where(o.c.id == sa.bindparam("cid")).values(claim=sa.bindparam("new_claim")))


async def set_claim(db: Database, challenge_id: int, claim: str | None) -> None:
    """Replace the registration details a challenge will apply when its code is entered."""
    await sql.execute(db, _SET_CLAIM, cid=challenge_id, new_claim=claim)


_CONSUME = sql.Query(
    o.update()
    .where(o.c.id == sa.bindparam("cid"), o.c.used_at.is_not(None), o.c.used_at > sa.bindparam("since"),
           o.c.invalidated_at.is_(None))
    .values(invalidated_at=sa.bindparam("now"))
)


_PAUSE = sql.Query(
    c.update().where(c.c.id == sa.bindparam("cid"))
    .values(signin_paused_until=sa.func.coalesce(
        sa.case((c.c.signin_paused_until > sa.bindparam("until"), c.c.signin_paused_until), else_=sa.bindparam("until")),
        sa.bindparam("until")))
)
_END_STEPS = sql.Query(
    o.update()
    .where(o.c.customer_id == sa.bindparam("cid"), o.c.used_at.is_(None), o.c.invalidated_at.is_(None))
    .values(invalidated_at=sa.bindparam("now"))
)
_STOP_TOKEN = sql.Query(
    sa.select(o.c.customer_id).select_from(k.join(o, o.c.id == k.c.challenge_id))
    .where(k.c.stop_hash == sa.bindparam("h"))
)


async def customer_of_stop_token(db: Database, token_value: str) -> int | None:
    """Whose code mail this "Not you?" link came in (its token is kept hashed)."""
    found = await sql.fetch_val(db, _STOP_TOKEN, h=sha256_hex(token_value))
    return None if found is None else int(found)


async def pause_sign_in(db: Database, *, customer_id: int, now: datetime, until: datetime) -> None:
    """"Not you?": every pending step of the customer ends, and no sign-in code goes out until
    `until` (a password reset still can: it is what to do next)."""
    await sql.execute(db, _PAUSE, cid=customer_id, until=until)
    await sql.execute(db, _END_STEPS, cid=customer_id, now=now)


_LINK = sql.Query(
    sa.select(k.c.challenge_id, k.c.link_sealed, k.c.expires_at, k.c.invalidated_at, o.c.used_at.label("step_used"),
              o.c.invalidated_at.label("step_ended"), o.c.tag, o.c.purpose)
    .select_from(k.join(o, o.c.id == k.c.challenge_id))
    .where(k.c.link_hash == sa.bindparam("h"))
)


@dataclass(frozen=True)
class Link:
    """What a mail's link leads to: its step, and whether its code still works."""

    challenge_id: int
    sealed: str
    tag: str
    purpose: Purpose
    works: bool


async def find_link(db: Database, *, token_value: str, now: datetime) -> Link | None:
    rec = await sql.fetch_one(db, _LINK, h=sha256_hex(token_value))
    if rec is None or rec.link_sealed is None:
        return None
    works = (rec.invalidated_at is None and rec.expires_at > now and rec.step_used is None and rec.step_ended is None)
    return Link(rec.challenge_id, rec.link_sealed, rec.tag, Purpose(rec.purpose), works)


async def consume(db: Database, *, challenge_id: int, now: datetime, within: int) -> bool:
    """Spend what a verified challenge allows (a password reset), once: True for the one caller
    that did, within `within` seconds of the code being entered."""
    return bool(await sql.execute(db, _CONSUME, cid=challenge_id, since=now - timedelta(seconds=within), now=now))


async def rebind_open(
    db: Database, *, keys: Keys, customer_id: int, purpose: Purpose, nonce: str, now: datetime,
    claim: str | None = None,
) -> int | None:
    """Hand the customer's newest open code to a new pending session (password proven again
    inside the cooldown), with this session's claim if any. Its attempt count stays. Returns
    its id, or None."""
    found = await sql.fetch_val(db, _NEWEST_OPEN, cid=customer_id, purpose=purpose.value, now=now)
    if found is None:
        return None
    await sql.execute(db, _REBIND, cid=found, binding=binding_hash(keys.binding, nonce), new_claim=claim)
    return int(found)


_mail = mail_outbox
_LOAD = sql.Query(
    sa.select(
        o.c.id, o.c.customer_id, o.c.purpose, o.c.kind, o.c.sent_to, o.c.attempts, o.c.created_at, o.c.expires_at,
        o.c.used_at, o.c.invalidated_at, o.c.session_binding, o.c.claim, o.c.last_code_at, o.c.tag,
        o.c.proven, o.c.ledger_key, c.c.otp_locked_until, c.c.otp_last_sent_at, c.c.session_version,
        c.c.signin_paused_until, _lg.c.locked_until.label("ledger_locked_until"),
        # The state of its newest mail, in the same round trip (the code step shows it); a decoy
        # inside the notice cooldown shows the state of the notice that went out before.
        sa.func.coalesce(
            sa.select(_mail.c.status).where(_mail.c.challenge_id == o.c.id).order_by(_mail.c.id.desc()).limit(1)
            .scalar_subquery(),
            sa.select(_mail.c.status).where(_mail.c.id == o.c.mail_id).scalar_subquery(),
        ).label("delivery"),
    )
    .select_from(o.outerjoin(c, c.c.id == o.c.customer_id).outerjoin(_lg, _lg.c.key == o.c.ledger_key))
    .where(o.c.id == sa.bindparam("cid"))
)


async def load_challenge(db: Database, *, keys: Keys, challenge_id: int, nonce: str,
                         purpose: Purpose | None = None) -> Challenge | None:
    """The pending challenge, only if it belongs to this pending session (and, when given, is
    for this purpose: a registration code never completes a sign-in step, nor the reverse)."""
    rec = await sql.fetch_one(db, _LOAD, cid=challenge_id)
    if rec is None or not hmac.compare_digest(rec.session_binding, binding_hash(keys.binding, nonce)):
        return None
    if purpose is not None and rec.purpose != purpose.value:
        return None
    proven = bool(rec.proven)
    # A proven step is held up by the customer's lockout (and a sign-in by "Not you?"); an
    # unproven one by its address's ledger only.
    # A factor step is not: a paused mail is no reason to refuse the customer's own app or passkey.
    paused = (rec.signin_paused_until if proven and rec.purpose == Purpose.LOGIN.value and rec.kind != Kind.FACTOR.value
              else None)
    return Challenge(
        id=rec.id,
        customer_id=rec.customer_id,
        purpose=Purpose(rec.purpose),
        kind=Kind(rec.kind),
        sent_to=rec.sent_to,
        attempts=rec.attempts,
        created_at=rec.created_at,
        expires_at=rec.expires_at,
        used_at=rec.used_at,
        invalidated_at=rec.invalidated_at,
        locked_until=_later(rec.otp_locked_until, paused) if proven else rec.ledger_locked_until,
        last_sent_at=rec.otp_last_sent_at,
        session_version=rec.session_version or 0,
        delivery=rec.delivery,
        claim=rec.claim,
        last_code_at=rec.last_code_at,
        tag=rec.tag,
        proven=proven,
        ledger_key=rec.ledger_key,
        paused_until=paused,
    )


@dataclass(frozen=True)
class _Ledger:
    """Where a challenge's failures count, and the statements that keep them."""

    bump: sql.Query  # failures + 1
    read: sql.Query  # (failures, lockouts)
    lock: sql.Query  # guarded: failures >= max -> locked_until, lockouts + 1, failures 0
    locked_until: sql.Query


def _make_ledger(table: sa.Table, key: sa.Column[Any], failures: sa.Column[int], lockouts: sa.Column[int],
                 locked_until: sa.Column[datetime], stamp: sa.Column[datetime]) -> _Ledger:
    row = key == sa.bindparam("row_id")
    bump: dict[Any, Any] = {failures: failures + 1, stamp: sa.bindparam("now")}
    return _Ledger(
        bump=sql.Query(table.update().where(row).values(bump)),
        read=sql.Query(sa.select(failures, lockouts).where(row)),
        lock=sql.Query(
            table.update()
            .where(row, failures >= sa.bindparam("max_attempts"))
            .values({locked_until: sa.bindparam("until"), lockouts: lockouts + 1, failures: 0})
        ),
        locked_until=sql.Query(sa.select(locked_until).where(row)),
    )


_CUSTOMER_LEDGER = _make_ledger(c, c.c.id, c.c.otp_attempts, c.c.otp_lockouts, c.c.otp_locked_until,
                                c.c.last_otp_attempt)
_ADDRESS_LEDGER = _make_ledger(_lg, _lg.c.key, _lg.c.failures, _lg.c.lockouts, _lg.c.locked_until, _lg.c.updated_at)


def _ledger(challenge: Challenge) -> tuple[_Ledger, int | str]:
    """Where this challenge's failures count: the customer's row for a proven step; for an
    unproven one (real or stand-in alike), its address's row of otp_ledgers."""
    if challenge.proven:
        assert challenge.customer_id is not None
        return _CUSTOMER_LEDGER, challenge.customer_id
    assert challenge.ledger_key is not None
    return _ADDRESS_LEDGER, challenge.ledger_key


_open_code = sa.and_(
    o.c.id == sa.bindparam("cid"), o.c.attempts < sa.bindparam("max_attempts"),
    o.c.used_at.is_(None), o.c.invalidated_at.is_(None),
)
_SQLITE_WRITER = sql.Query(o.update().where(sa.false()).values(attempts=o.c.attempts))
# Every entry is counted against the step's one budget before anything is compared, by a
# guarded UPDATE: of any number of concurrent entries, at most max_attempts count.
_COUNT = sql.Query(o.update().where(_open_code).values(attempts=o.c.attempts + 1))
_ENDED = sql.Query(sa.select(o.c.id).where(o.c.id == sa.bindparam("cid"),
                                          sa.or_(o.c.used_at.is_not(None), o.c.invalidated_at.is_not(None))))
# The entry matched an open code: the step is used, once (of concurrent right entries one wins).
_USE = sql.Query(
    o.update().where(o.c.id == sa.bindparam("cid"), o.c.used_at.is_(None), o.c.invalidated_at.is_(None))
    .values(used_at=sa.bindparam("now"))
)
# A right code resets the failures, and proves the mailbox: the address counts as verified
# (a shop customer whose address was never confirmed, signing in with codes on, included), and
# the resend cooldown ends (it keeps a mailbox from being flooded; this one just answered).
_RESET: dict[Any, Any] = {c.c.otp_attempts: 0, c.c.otp_lockouts: 0, c.c.otp_locked_until: None,
                           c.c.last_otp_attempt: sa.bindparam("now"), c.c.otp_last_sent_at: None,
                           c.c.email_verified_at: sa.func.coalesce(c.c.email_verified_at, sa.bindparam("now"))}
_SUCCEEDED = sql.Query(c.update().where(c.c.id == sa.bindparam("cid")).values(_RESET))
_SUCCEEDED_ENDING_OPEN = _ending_open_codes(c.c.id == sa.bindparam("cid"), values=_RESET)
# A right code of an unproven step proves the mailbox too, and ends the customer's other open
# steps; it leaves their failure count, lockout and cooldown as they were (whoever holds the
# mailbox gets no way around a lockout earned after the password). Its address's ledger starts over.
_PROVED: dict[Any, Any] = {c.c.email_verified_at: sa.func.coalesce(c.c.email_verified_at, sa.bindparam("now"))}
_PROVED_ALONE = sql.Query(c.update().where(c.c.id == sa.bindparam("cid")).values(_PROVED))
_PROVED_ENDING_OPEN = _ending_open_codes(c.c.id == sa.bindparam("cid"), values=_PROVED)
_LEDGER_CLEAR = sql.Query(
    _lg.update().where(_lg.c.key == sa.bindparam("k"))
    .values(failures=0, lockouts=0, locked_until=None, updated_at=sa.bindparam("now"))
)


# The sign-in path's fast check, two guarded UPDATEs. First the entry is counted, as verify()
# counts every entry before comparing: a step bound to this pending session, with real codes
# (not a placeholder or decoy), tries left, not used or ended, and the customer not locked out.
# Then, only for an entry that counted, the step is used if one of its codes matches and is
# neither pushed out nor expired. The hashes are keyed (HMAC of the step's id and the code), so
# comparing them in SQL tells nothing about any code to anyone without the key.
_COUNT_BOUND = sql.Query(
    o.update()
    .where(
        _open_code,
        o.c.customer_id == sa.bindparam("uid"),
        o.c.purpose == sa.bindparam("purpose"),
        o.c.kind == Kind.CODE.value,
        o.c.session_binding == sa.bindparam("binding"),
        ~sa.exists().where(c.c.id == sa.bindparam("uid"), sa.or_(c.c.otp_locked_until > sa.bindparam("now"),
                                                                 c.c.signin_paused_until > sa.bindparam("now"))),
        # Not for a customer who has an app or a passkey now (added since the step began), unless
        # staff let the emailed code count for a while: the full path then says what happened.
        ~sa.and_(
            sa.exists().where(_au.c.customer_id == sa.bindparam("uid"), sa.or_(_au.c.type == "totp", _au.c.type == "passkey"),
                              _au.c.confirmed_at.is_not(None)),
            ~sa.exists().where(c.c.id == sa.bindparam("uid"), c.c.factor_bypass_until > sa.bindparam("now")),
        ),
    )
    .values(attempts=o.c.attempts + 1)
)
_USE_BOUND = sql.Query(
    o.update()
    .where(
        o.c.id == sa.bindparam("cid"), o.c.used_at.is_(None), o.c.invalidated_at.is_(None),
        sa.exists().where(k.c.challenge_id == sa.bindparam("cid"), k.c.code_hash == sa.bindparam("hash"),
                          k.c.invalidated_at.is_(None), k.c.expires_at > sa.bindparam("now")),
    )
    .values(used_at=sa.bindparam("now"))
)


class FastCheck(StrEnum):
    USED = "used"  # the entry was right and used the step: finish with succeeded()
    COUNTED = "counted"  # counted but no match: verify(counted=True) gives the verdict
    UNCOUNTED = "uncounted"  # nothing happened: verify() counts and decides


async def use_code(
    db: Database, *, keys: Keys, policy: OtpPolicy, now: datetime, challenge_id: int, nonce: str,
    customer_id: int, purpose: Purpose, code: str,
) -> FastCheck:
    """The fast path of verify() on the sign-in path, without loading the step.

    Run it in a transaction with what the code starts (the session): the UPDATEs lock the code
    row, then read the customer row under a shared lock, while a sign-out everywhere or a new
    code locks the customer row, then the codes; when MariaDB breaks such a deadlock it rolls
    the whole transaction back, and `transact` runs it again."""
    if not await sql.execute(db, _COUNT_BOUND, cid=challenge_id, uid=customer_id, purpose=purpose.value,
                             binding=binding_hash(keys.binding, nonce), max_attempts=policy.max_attempts, now=now):
        return FastCheck.UNCOUNTED
    if await sql.execute(db, _USE_BOUND, cid=challenge_id, hash=code_hash(keys.code, challenge_id, code), now=now):
        return FastCheck.USED
    return FastCheck.COUNTED


async def succeeded(db: Database, customer_id: int, now: datetime) -> None:
    """A right code of a proven step: failures reset, the address verified, the resend cooldown
    over, every other open code (and the pending steps that hold them) ended."""
    await _ending_open_codes_if(db, _SUCCEEDED, _SUCCEEDED_ENDING_OPEN, cid=customer_id, now=now)


async def proved(db: Database, challenge: Challenge, now: datetime) -> None:
    """A right code of any step: succeeded() for a proven one; for an unproven one, the address
    verified and the customer's other open steps ended, their failure count, lockout and
    cooldown untouched, and the address's ledger cleared."""
    assert challenge.customer_id is not None
    if challenge.proven:
        await succeeded(db, challenge.customer_id, now)
        return
    await _ending_open_codes_if(db, _PROVED_ALONE, _PROVED_ENDING_OPEN, cid=challenge.customer_id, now=now,
                                keep=challenge.id)
    await sql.execute(db, _LEDGER_CLEAR, k=challenge.ledger_key, now=now)


_END_STEP = sql.Query(
    o.update().where(o.c.id == sa.bindparam("cid"), o.c.used_at.is_(None), o.c.invalidated_at.is_(None))
    .values(invalidated_at=sa.bindparam("now"))
)


async def end_step(db: Database, challenge_id: int, now: datetime) -> None:
    """End one open step (its codes stop working)."""
    await sql.execute(db, _END_STEP, cid=challenge_id, now=now)


async def verify(
    db: Database,
    *,
    keys: Keys,
    policy: OtpPolicy,
    now: datetime,
    challenge: Challenge,
    code: str,
    counted: bool = False,
) -> Verdict:
    """Check one code entry against a step loaded for this session: any of its open codes, under
    its one attempt budget. A VERIFIED verdict has used the step: the caller finishes with
    proved() in the same transaction. `counted`: use_code() counted this entry already (the
    step was loaded after it)."""
    if challenge.used_at is not None or challenge.invalidated_at is not None:
        return Verdict(Outcome.INVALID)
    locked_until = challenge.locked_until
    # An entry use_code() counted was compared before any lock that came since: it is a failure
    # like any other (counted on the ledger below), not a refusal.
    if not counted and locked_until is not None and locked_until > now:
        return Verdict(Outcome.LOCKED, locked_until=locked_until)
    if challenge.expires_at <= now:
        return Verdict(Outcome.EXPIRED)  # its newest code, and so every one, has expired
    # Counted before comparing: no burst gets more than max tries, right entries included.
    if not counted and not await sql.execute(db, _COUNT, cid=challenge.id, max_attempts=policy.max_attempts):
        # Out of tries, or used or ended since it was loaded (another tab, "Not you?"): say which.
        ended = await sql.fetch_one(db, _ENDED, cid=challenge.id)
        return Verdict(Outcome.INVALID if ended is not None else Outcome.DEAD)
    if counted and sql.dialect(db) == "sqlite":
        # SQLite (WAL): a transaction that reads first cannot become a writer once another
        # connection has committed; take the write lock before reading the codes.
        await sql.execute(db, _SQLITE_WRITER)
    matched = None
    if challenge.real:
        entry = code_hash(keys.code, challenge.id, code)
        for row in await sql.fetch_all(db, _CODES, cid=challenge.id):
            if hmac.compare_digest(entry, row.code_hash):
                matched = row
    if matched is not None and matched.invalidated_at is None and matched.expires_at > now:
        if not await sql.execute(db, _USE, cid=challenge.id, now=now):
            return Verdict(Outcome.INVALID)  # used (or ended) meanwhile
        return Verdict(Outcome.VERIFIED, customer_id=challenge.customer_id)
    # This entry's count (exact unless the same session races itself, where it only
    # changes the "attempts left" wording; the guard above is what limits tries).
    code_left = max(0, policy.max_attempts - (challenge.attempts + (0 if counted else 1)))
    return await _failure(db, policy=policy, now=now, challenge=challenge, code_left=code_left, matched=matched)


async def _failure(db: Database, *, policy: OtpPolicy, now: datetime, challenge: Challenge, code_left: int,
                   matched: Any) -> Verdict:
    """A counted entry that did not verify: on the step's ledger, with the lockout it may earn."""
    # Failures across codes, sessions and workers; a resend never resets them. An unproven step
    # counts on its address's ledger, so a stranger cannot lock the owner out through it.
    ledger, row_id = _ledger(challenge)
    await sql.execute(db, ledger.bump, row_id=row_id, now=now)
    state = await sql.fetch_one(db, ledger.read, row_id=row_id)
    assert state is not None
    failures, level = int(state[0]), int(state[1])
    if failures >= policy.max_attempts:
        until: datetime | None = now + timedelta(seconds=policy.lockout(level))
        if not await sql.execute(db, ledger.lock, row_id=row_id, max_attempts=policy.max_attempts, until=until):
            until = await sql.fetch_val(db, ledger.locked_until, row_id=row_id)
        return Verdict(Outcome.LOCKED, customer_id=challenge.customer_id if challenge.kind is not Kind.DECOY else None,
                       locked_until=until, checked=True)
    if matched is not None:  # a code of this step that no longer works (it says which way)
        return Verdict(Outcome.EXPIRED if matched.invalidated_at is None else Outcome.INVALID,
                       customer_id=challenge.customer_id, attempts_left=min(code_left, policy.max_attempts - failures),
                       checked=True)
    left = min(code_left, policy.max_attempts - failures)
    if left <= 0:
        return Verdict(Outcome.DEAD, customer_id=challenge.customer_id, checked=True)
    return Verdict(Outcome.WRONG, customer_id=challenge.customer_id, attempts_left=left, checked=True)


async def verify_factor(
    db: Database,
    *,
    policy: OtpPolicy,
    now: datetime,
    challenge: Challenge,
    check: Callable[[], Awaitable[bool]],
) -> Verdict:
    """One answer at a factor step (Kind.FACTOR): held to the same rules as a code entry
    (counted against the step's one budget before `check` runs, failures on the customer's count,
    the same lockout), with `check` deciding instead of a mailed code. A VERIFIED verdict has
    used the step: the caller finishes in the same transaction."""
    if challenge.kind is not Kind.FACTOR or challenge.used_at is not None or challenge.invalidated_at is not None:
        return Verdict(Outcome.INVALID)
    if challenge.locked_until is not None and challenge.locked_until > now:
        return Verdict(Outcome.LOCKED, locked_until=challenge.locked_until)
    if challenge.expires_at <= now:
        return Verdict(Outcome.EXPIRED)
    if not await sql.execute(db, _COUNT, cid=challenge.id, max_attempts=policy.max_attempts):
        ended = await sql.fetch_one(db, _ENDED, cid=challenge.id)
        return Verdict(Outcome.INVALID if ended is not None else Outcome.DEAD)
    if await check():
        if not await sql.execute(db, _USE, cid=challenge.id, now=now):
            return Verdict(Outcome.INVALID)
        return Verdict(Outcome.VERIFIED, customer_id=challenge.customer_id)
    return await _failure(db, policy=policy, now=now, challenge=challenge, code_left=max(
        0, policy.max_attempts - (challenge.attempts + 1)), matched=None)

"""The outbox: mail queued in the same transaction as its code, claimed atomically by any
dispatcher on any worker, sent once. Payloads are sealed (AES-GCM) so no row shows a code."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from databases import Database

from app import sql
from app.database import INTEGRITY_ERRORS
from app.security.crypto import Sealer, Unreadable, keyed_hash
from app.tables import mail_outbox, mail_throttle, otp_verification

log = logging.getLogger("app.mail")


class MailStatus(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"  # given up: a permanent refusal, too many tries, or an unreadable payload
    EXPIRED = "expired"  # its code expired before it could be delivered
    CANCELLED = "cancelled"  # its code was used or replaced before it could be delivered

    @property
    def final(self) -> bool:
        return self not in (MailStatus.QUEUED, MailStatus.SENDING)


class MailKind(StrEnum):
    REGISTRATION_CODE = "registration_code"
    LOGIN_CODE = "login_code"
    RESET_CODE = "reset_code"
    EMAIL_CODE = "email_code"
    DELETE_CODE = "delete_code"
    ACCOUNT_EXISTS = "account_exists"
    USERNAME_TAKEN = "username_taken"  # no longer sent (usernames are said taken on the form)
    PASSWORD_CHANGED = "password_changed"
    EMAIL_CHANGED = "email_changed"
    ADDRESS_IN_USE = "address_in_use"
    ACCOUNT_DELETED = "account_deleted"
    FACTOR_ADDED = "factor_added"
    FACTOR_REMOVED = "factor_removed"
    BACKUP_CODES_CREATED = "backup_codes_created"
    BACKUP_CODE_USED = "backup_code_used"
    CONFIRM_REMINDER = "confirm_reminder"  # staff resent the email confirmation


CODE_KINDS = frozenset({MailKind.REGISTRATION_CODE, MailKind.LOGIN_CODE, MailKind.RESET_CODE, MailKind.EMAIL_CODE,
                        MailKind.DELETE_CODE})


@dataclass(frozen=True)
class Queued:
    id: int
    kind: str
    recipient: str
    context: dict[str, Any]
    tries: int
    expires_at: datetime | None
    last_error: str | None = None  # how the previous try failed

    @property
    def is_code(self) -> bool:
        return self.kind in CODE_KINDS


o = mail_outbox
_ENQUEUE = sql.Query(
    o.insert(),
    columns=("kind", "customer_id", "challenge_id", "recipient", "payload", "status", "tries", "created_at",
             "next_attempt_at", "expires_at", "claimed_until"),
)


async def enqueue(
    db: Database,
    sealer: Sealer,
    *,
    kind: MailKind | str,
    recipient: str,
    context: dict[str, Any],
    now: datetime,
    customer_id: int | None = None,
    challenge_id: int | None = None,
    expires_at: datetime | None = None,
    claim_for: float | None = None,
) -> Queued:
    """Queue a message. With `claim_for` (seconds), it is queued already claimed by this process
    (first try counted), to be handed to its dispatcher once the transaction commits: no other
    dispatcher takes it unless the claim runs out (this process died)."""
    claimed = claim_for is not None
    kind = MailKind(kind)
    message_id = await sql.insert(
        db, _ENQUEUE, kind=kind.value, customer_id=customer_id, challenge_id=challenge_id, recipient=recipient,
        payload=sealer.seal(context), status=(MailStatus.SENDING if claimed else MailStatus.QUEUED).value,
        tries=1 if claimed else 0, created_at=now, next_attempt_at=now, expires_at=expires_at,
        claimed_until=now + timedelta(seconds=claim_for) if claim_for is not None else None,
    )
    return Queued(message_id, kind.value, recipient, context, 1 if claimed else 0, expires_at)


_DUE = sa.or_(
    sa.and_(o.c.status == MailStatus.QUEUED.value, o.c.next_attempt_at <= sa.bindparam("now")),
    sa.and_(o.c.status == MailStatus.SENDING.value, o.c.claimed_until < sa.bindparam("now")),
)
_ov = otp_verification
_SELECT_DUE = sql.Query(
    sa.select(o.c.id, o.c.kind, o.c.recipient, o.c.payload, o.c.tries, o.c.expires_at, o.c.status, o.c.last_error,
              # A code mail whose code was used or replaced meanwhile is not worth sending.
              sa.or_(_ov.c.used_at.is_not(None), _ov.c.invalidated_at.is_not(None)).label("code_done"))
    .select_from(o.outerjoin(_ov, _ov.c.id == o.c.challenge_id))
    .where(_DUE)
    .order_by(o.c.next_attempt_at)
    .limit(sa.bindparam("limit", type_=sa.Integer))
)
_CLAIM = sql.Query(
    o.update()
    .where(o.c.id == sa.bindparam("mid"), o.c.tries == sa.bindparam("seen_tries"), _DUE)
    .values(status=MailStatus.SENDING.value, claimed_until=sa.bindparam("until"), tries=o.c.tries + 1)
)


@dataclass(frozen=True)
class Due:
    """What one look at the queue found: messages to claim, and rows to settle without sending."""

    ready: list[Queued]
    unreadable: list[tuple[int, str]]  # (id, why)
    done_codes: list[int]  # code mails whose code was used or replaced meanwhile
    taken_over: list[int]  # claimed by a process that stopped before it finished


async def due(db: Database, sealer: Sealer, *, now: datetime, limit: int) -> Due:
    """Messages ready to go (including ones a stopped dispatcher left claimed), not yet claimed.

    Each payload is opened on its own: one that no key opens (sealed under a key since
    retired, or damaged) is reported, never allowed to hold up the rows behind it."""
    rows = await sql.fetch_all(db, _SELECT_DUE, now=now, limit=limit)
    found = Due([], [], [], [])
    for r in rows:
        if r.code_done:
            found.done_codes.append(r.id)
            continue
        try:
            context = sealer.open(r.payload) if r.payload else {}
        except Unreadable as exc:
            found.unreadable.append((r.id, str(exc)))
            continue
        if r.status == MailStatus.SENDING.value:
            found.taken_over.append(r.id)
        found.ready.append(Queued(r.id, r.kind, r.recipient, context, r.tries + 1, r.expires_at, r.last_error))
    return found


async def claim(db: Database, message: Queued, *, now: datetime, claim_for: float) -> bool:
    """Take one message for sending; False when another dispatcher got it first."""
    return bool(await sql.execute(db, _CLAIM, mid=message.id, seen_tries=message.tries - 1, now=now,
                                  until=now + timedelta(seconds=claim_for)))


_MARKS: dict[tuple[bool, bool, bool], sql.Query] = {}


def _mark(sent: bool, wipe: bool, retry: bool) -> sql.Query:
    key = (sent, wipe, retry)
    if key not in _MARKS:
        values: dict[str, Any] = {"status": sa.bindparam("new_status"), "claimed_until": None,
                                  "last_error": sa.bindparam("error")}
        if sent:
            values["sent_at"] = sa.bindparam("now")
        if wipe:
            values["payload"] = None
            # A mail for no customer (the notice that an account was deleted) keeps only the
            # address's domain once it is final: nothing of the person stays.
            values["recipient"] = sa.case(
                (o.c.customer_id.is_(None), sa.func.substr(o.c.recipient, sa.func.instr(o.c.recipient, "@"))),
                else_=o.c.recipient)
        if retry:
            values["next_attempt_at"] = sa.bindparam("retry_at")
        _MARKS[key] = sql.Query(o.update().where(o.c.id == sa.bindparam("mid")).values(**values))
    return _MARKS[key]


async def mark(db: Database, message_id: int, status: MailStatus, *, now: datetime, error: str | None = None,
               retry_at: datetime | None = None, keep_sent: bool = False) -> None:
    """Record how a send went."""
    # Sent or hopeless: nothing left to seal.
    wipe = status.final and not (status is MailStatus.SENT and keep_sent)
    query = _mark(status is MailStatus.SENT, wipe, retry_at is not None)
    await sql.execute(db, query, mid=message_id, new_status=status.value, error=(error or None) and error[:500],
                      now=now, retry_at=retry_at)


_WAKE_RETRIES = sql.Query(
    o.update()
    .where(o.c.status == MailStatus.QUEUED.value, o.c.tries > 0, o.c.next_attempt_at > sa.bindparam("now"))
    .values(next_attempt_at=sa.bindparam("now"))
)


async def wake_retries(db: Database, *, now: datetime) -> int:
    """Make every message waiting out a backoff due now (the mail server answers again)."""
    return await sql.execute(db, _WAKE_RETRIES, now=now)


# --- at most one notice per recipient per window, across workers --------------------------

_t = mail_throttle
_THROTTLE_TAKE = sql.Query(
    _t.update()
    .where(_t.c.key == sa.bindparam("k"), _t.c.last_at <= sa.bindparam("threshold"))
    .values(last_at=sa.bindparam("now"), mail_id=None)
)
_THROTTLE_NEW = sql.Query(_t.insert(), columns=("key", "last_at", "mail_id"))
_THROTTLE_MAIL = sql.Query(sa.select(_t.c.mail_id).where(_t.c.key == sa.bindparam("k")))
_THROTTLE_SET_MAIL = sql.Query(_t.update().where(_t.c.key == sa.bindparam("k")).values(mail_id=sa.bindparam("mid")))


def throttle_key(key: bytes, kind: str, value: str) -> str:
    """A window's key: a keyed hash, so the table holds no address anyone could recover."""
    return keyed_hash(key, "mail-window", kind, value.strip().lower())


async def take_throttle(db: Database, key: str, *, now: datetime, window: int) -> bool:
    """True for the one caller per `window` seconds that may send (call in a transaction)."""
    if await sql.execute(db, _THROTTLE_TAKE, k=key, threshold=now - timedelta(seconds=window), now=now):
        return True
    try:
        await sql.execute(db, _THROTTLE_NEW, key=key, last_at=now, mail_id=None)
    except INTEGRITY_ERRORS:
        return False  # another request holds this window
    return True


async def throttled_mail(db: Database, key: str) -> int | None:
    """The notice the holder of the current window sent."""
    found = await sql.fetch_val(db, _THROTTLE_MAIL, k=key)
    return None if found is None else int(found)


async def note_throttled_mail(db: Database, key: str, mail_id: int) -> None:
    await sql.execute(db, _THROTTLE_SET_MAIL, k=key, mid=mail_id)


_SHOWN_BY = sql.Query(
    sa.select(sa.func.coalesce(
        sa.select(o.c.id).where(o.c.challenge_id == sa.bindparam("cid")).order_by(o.c.id.desc()).limit(1)
        .scalar_subquery(),
        sa.select(_ov.c.mail_id).where(_ov.c.id == sa.bindparam("cid")).scalar_subquery(),
    ))
)


async def shown_by(db: Database, challenge_id: int) -> int | None:
    """The mail whose delivery state a challenge's step shows (its own newest, or the one it borrowed)."""
    found = await sql.fetch_val(db, _SHOWN_BY, cid=challenge_id)
    return None if found is None else int(found)


_RECENT = sql.Query(sa.select(o).order_by(o.c.id.desc()).limit(sa.bindparam("limit", type_=sa.Integer)))


async def recent(db: Database, sealer: Sealer, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest messages with their contexts (development inbox)."""
    out = []
    for r in await sql.fetch_all(db, _RECENT, limit=limit):
        item = dict(r._asdict())
        try:
            item["context"] = sealer.open(r.payload) if r.payload else None
        except Unreadable:
            item["context"] = None
        out.append(item)
    return out


_PURGE_UNSENT = sql.Query(
    mail_outbox.update()
    .where(
        # Two equalities, not IN: prepared statements take no expanding parameters.
        sa.or_(mail_outbox.c.status == MailStatus.QUEUED.value, mail_outbox.c.status == MailStatus.SENDING.value),
        mail_outbox.c.expires_at <= sa.bindparam("now"),
        mail_outbox.c.payload.is_not(None),
    )
    .values(payload=None)
)
_PURGE_KEPT = sql.Query(
    mail_outbox.update()
    .where(mail_outbox.c.status == MailStatus.SENT.value, mail_outbox.c.expires_at <= sa.bindparam("now"),
           mail_outbox.c.payload.is_not(None))
    .values(payload=None)
)


async def purge_payloads(db: Database, *, now: datetime, sent_kept: bool = False) -> int:
    """Wipe sealed payloads that can no longer help (their code expired). Sent, failed and
    expired mail lost its payload when it was marked, so only mail still queued or being
    sent is looked at: a range on the (status, next_attempt_at) index, however many sent
    rows the table holds. With `sent_kept`, sent mail too: development keeps it for
    /dev/mail (a small database), and `python -m app otp cleanup` looks for it on demand in any
    mode (it reads every sent row's index entry, so the periodic task leaves it out)."""
    n = await sql.execute(db, _PURGE_UNSENT, now=now)
    if sent_kept:
        n += await sql.execute(db, _PURGE_KEPT, now=now)
    return n

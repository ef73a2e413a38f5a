"""The outbox: mail queued in the same transaction as its code, claimed atomically by any
dispatcher on any worker, sent once. Payloads are sealed (AES-GCM) so no row shows a code."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from databases import Database

from app import sql
from app.tables import mail_outbox

QUEUED, SENDING, SENT, FAILED, EXPIRED = "queued", "sending", "sent", "failed", "expired"
FINAL = {SENT, FAILED, EXPIRED}
CLAIM_SECONDS = 120


@dataclass(frozen=True)
class Sealer:
    key: bytes

    def seal(self, data: dict[str, Any]) -> str:
        nonce = os.urandom(12)
        return base64.b64encode(nonce + AESGCM(self.key).encrypt(nonce, json.dumps(data).encode(), b"outbox")).decode()

    def open(self, sealed: str) -> dict[str, Any]:
        blob = base64.b64decode(sealed)
        return dict(json.loads(AESGCM(self.key).decrypt(blob[:12], blob[12:], b"outbox")))


@dataclass(frozen=True)
class Queued:
    id: int
    kind: str
    recipient: str
    context: dict[str, Any]
    tries: int
    expires_at: datetime | None


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
    kind: str,
    recipient: str,
    context: dict[str, Any],
    now: datetime,
    customer_id: int | None = None,
    challenge_id: int | None = None,
    expires_at: datetime | None = None,
    claim: bool = False,
) -> Queued:
    """Queue a message. With `claim`, it is queued already claimed by this process (first
    try counted), to be handed to its dispatcher once the transaction commits: no other
    dispatcher takes it unless the claim runs out (this process died)."""
    message_id = await sql.insert(
        db, _ENQUEUE, kind=kind, customer_id=customer_id, challenge_id=challenge_id, recipient=recipient,
        payload=sealer.seal(context), status=SENDING if claim else QUEUED, tries=1 if claim else 0,
        created_at=now, next_attempt_at=now, expires_at=expires_at,
        claimed_until=now + timedelta(seconds=CLAIM_SECONDS) if claim else None,
    )
    return Queued(message_id, kind, recipient, context, 1 if claim else 0, expires_at)


_DUE = sa.or_(
    sa.and_(o.c.status == QUEUED, o.c.next_attempt_at <= sa.bindparam("now")),
    sa.and_(o.c.status == SENDING, o.c.claimed_until < sa.bindparam("now")),
)
_SELECT_DUE = sql.Query(
    sa.select(o.c.id, o.c.kind, o.c.recipient, o.c.payload, o.c.tries, o.c.expires_at)
    .where(_DUE)
    .order_by(o.c.next_attempt_at)
    .limit(sa.bindparam("limit", type_=sa.Integer))
)
_CLAIM = sql.Query(
    o.update()
    .where(o.c.id == sa.bindparam("mid"), o.c.tries == sa.bindparam("seen_tries"), _DUE)
    .values(status=SENDING, claimed_until=sa.bindparam("until"), tries=o.c.tries + 1)
)


async def due(db: Database, sealer: Sealer, *, now: datetime, limit: int) -> list[Queued]:
    """Messages ready to go (including ones a crashed dispatcher left claimed), not yet claimed."""
    rows = await sql.fetch_all(db, _SELECT_DUE, now=now, limit=limit)
    return [
        Queued(r.id, r.kind, r.recipient, sealer.open(r.payload) if r.payload else {}, r.tries + 1, r.expires_at)
        for r in rows
    ]


async def claim(db: Database, message: Queued, *, now: datetime) -> bool:
    """Take one message for sending; False when another dispatcher got it first."""
    return bool(await sql.execute(db, _CLAIM, mid=message.id, seen_tries=message.tries - 1, now=now,
                                  until=now + timedelta(seconds=CLAIM_SECONDS)))


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
        if retry:
            values["next_attempt_at"] = sa.bindparam("retry_at")
        _MARKS[key] = sql.Query(o.update().where(o.c.id == sa.bindparam("mid")).values(**values))
    return _MARKS[key]


async def mark(db: Database, message_id: int, status: str, *, now: datetime, error: str | None = None,
               retry_at: datetime | None = None, keep_sent: bool = False) -> None:
    """Record how a send went."""
    # Sent or hopeless: nothing left to seal.
    wipe = status in (FAILED, EXPIRED) or (status == SENT and not keep_sent)
    query = _mark(status == SENT, wipe, retry_at is not None)
    await sql.execute(db, query, mid=message_id, new_status=status, error=(error or None) and error[:500], now=now,
                      retry_at=retry_at)


_SENT_RECENTLY: dict[tuple[str, ...], sql.Query] = {}


async def sent_recently(db: Database, *, recipient: str, kinds: tuple[str, ...], since: datetime) -> bool:
    """Whether a message of these kinds was queued for this address since then."""
    if kinds not in _SENT_RECENTLY:
        _SENT_RECENTLY[kinds] = sql.Query(
            sa.select(o.c.id)
            .where(o.c.recipient == sa.bindparam("recipient"), o.c.created_at > sa.bindparam("since"),
                   sa.or_(*(o.c.kind == k for k in kinds)))
            .limit(1)
        )
    return await sql.fetch_val(db, _SENT_RECENTLY[kinds], recipient=recipient, since=since) is not None


async def recent(db: Database, sealer: Sealer, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest messages with their contexts (development inbox)."""
    rows = await db.fetch_all(sa.select(o).order_by(o.c.id.desc()).limit(limit))
    out = []
    for r in rows:
        item = dict(r._mapping)
        item["context"] = sealer.open(r.payload) if r.payload else None
        out.append(item)
    return out


_PURGE_UNSENT = sql.Query(
    mail_outbox.update()
    .where(
        # Two equalities, not IN: prepared statements take no expanding parameters.
        sa.or_(mail_outbox.c.status == QUEUED, mail_outbox.c.status == SENDING),
        mail_outbox.c.expires_at <= sa.bindparam("now"),
        mail_outbox.c.payload.is_not(None),
    )
    .values(payload=None)
)
_PURGE_KEPT = sql.Query(
    mail_outbox.update()
    .where(mail_outbox.c.status == SENT, mail_outbox.c.expires_at <= sa.bindparam("now"),
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

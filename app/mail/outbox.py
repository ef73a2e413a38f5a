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

from app.database import execute_count
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
) -> int:
    """Queue a message; returns its id."""
    return int(
        await db.execute(
            mail_outbox.insert().values(
                kind=kind,
                customer_id=customer_id,
                challenge_id=challenge_id,
                recipient=recipient,
                payload=sealer.seal(context),
                status=QUEUED,
                tries=0,
                created_at=now,
                next_attempt_at=now,
                expires_at=expires_at,
            )
        )
    )


_DUE = sa.or_(
    sa.and_(mail_outbox.c.status == QUEUED, mail_outbox.c.next_attempt_at <= sa.bindparam("now")),
    sa.and_(mail_outbox.c.status == SENDING, mail_outbox.c.claimed_until < sa.bindparam("now")),
)


async def due(db: Database, sealer: Sealer, *, now: datetime, limit: int) -> list[Queued]:
    """Messages ready to go (including ones a crashed dispatcher left claimed), not yet claimed."""
    o = mail_outbox
    rows = await db.fetch_all(
        sa.select(o.c.id, o.c.kind, o.c.recipient, o.c.payload, o.c.tries, o.c.expires_at)
        .where(_DUE.params(now=now))
        .order_by(o.c.next_attempt_at)
        .limit(limit)
    )
    return [
        Queued(r.id, r.kind, r.recipient, sealer.open(r.payload) if r.payload else {}, r.tries + 1, r.expires_at)
        for r in rows
    ]


async def claim(db: Database, message: Queued, *, now: datetime) -> bool:
    """Take one message for sending; False when another dispatcher got it first."""
    o = mail_outbox
    async with db.connection() as conn:
        return bool(
            await execute_count(
                conn,
                o.update()
                .where(o.c.id == message.id, o.c.tries == message.tries - 1, _DUE.params(now=now))
                .values(status=SENDING, claimed_until=now + timedelta(seconds=CLAIM_SECONDS), tries=o.c.tries + 1),
            )
        )


async def mark(db: Database, message_id: int, status: str, *, now: datetime, error: str | None = None,
               retry_at: datetime | None = None, keep_sent: bool = False) -> None:
    """Record how a send went."""
    values: dict[str, Any] = {"status": status, "claimed_until": None, "last_error": (error or None) and error[:500]}
    if status == SENT:
        values["sent_at"] = now
    if status in (FAILED, EXPIRED) or (status == SENT and not keep_sent):
        values["payload"] = None  # sent or hopeless: nothing left to seal
    if retry_at is not None:
        values["next_attempt_at"] = retry_at
    await db.execute(mail_outbox.update().where(mail_outbox.c.id == message_id).values(**values))


async def sent_recently(db: Database, *, recipient: str, kinds: tuple[str, ...], since: datetime) -> bool:
    """Whether a message of these kinds was queued for this address since then."""
    o = mail_outbox
    found = await db.fetch_val(
        sa.select(o.c.id)
        .where(o.c.recipient == recipient, o.c.created_at > since, o.c.kind.in_(kinds))
        .limit(1)
    )
    return found is not None


async def delivery_state(db: Database, *, challenge_id: int) -> str | None:
    """The state of the newest mail for a challenge."""
    o = mail_outbox
    return await db.fetch_val(
        sa.select(o.c.status).where(o.c.challenge_id == challenge_id).order_by(o.c.id.desc()).limit(1)
    )


async def recent(db: Database, sealer: Sealer, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest messages with their contexts (development inbox)."""
    o = mail_outbox
    rows = await db.fetch_all(sa.select(o).order_by(o.c.id.desc()).limit(limit))
    out = []
    for r in rows:
        item = dict(r._mapping)
        item["context"] = sealer.open(r.payload) if r.payload else None
        out.append(item)
    return out


async def purge_payloads(db: Database, *, now: datetime, window: timedelta = timedelta(days=1)) -> int:
    """Wipe sealed payloads that can no longer help (their code expired). Looks back one
    window on the expires_at index; the clean-up runs every few minutes."""
    o = mail_outbox
    async with db.connection() as conn:
        return await execute_count(
            conn,
            o.update()
            .where(o.c.expires_at <= now, o.c.expires_at > now - window, o.c.payload.is_not(None))
            .values(payload=None),
        )

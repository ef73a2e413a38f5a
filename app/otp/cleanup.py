"""Delete expired and used codes, keeping their counts per day in `otp_stats`."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from databases import Database

from app import sql
from app.factors import devices, passkeys, totp
from app.mail import outbox
from app.mail.outbox import MailStatus
from app.otp.engine import Kind
from app.staff import analytics
from app.tables import (
    auth_sessions,
    mail_outbox,
    mail_throttle,
    otp_codes,
    otp_ledgers,
    otp_stats,
    otp_verification,
    staff_sessions,
)

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger("app.otp")
GRACE = timedelta(hours=1)  # keep finished codes a while, so support can see what happened
# An address's ledger and mail windows idle this long are forgotten (the longest lockout is an
# hour): the tables hold what is in use, not every address ever typed into a form.
IDLE_KEPT = timedelta(days=1)


BATCH = 2000


async def cleanup(db: Database, *, now: datetime, sent_kept: bool = False) -> int:
    """Fold finished codes into otp_stats and delete them, in batches. Returns how many went.

    Every code expires within its TTL, so "expired more than the grace period ago" covers
    used and replaced codes too, and it is one range on the expires_at index: no full scan,
    and no lock on rows a sign-in is using."""
    deleted = 0
    await analytics.roll_up(db, now=now, settled=GRACE)  # the funnel's counts, before the steps go
    while True:
        n = await _cleanup_batch(db, cutoff=now - GRACE)
        deleted += n
        if n < BATCH:
            break
    await outbox.purge_payloads(db, now=now, sent_kept=sent_kept)
    await sql.execute(db, _FORGET_LEDGERS, idle=now - IDLE_KEPT, now=now)
    await sql.execute(db, _FORGET_WINDOWS, idle=now - IDLE_KEPT)
    # Ways to sign in: used or expired passkey challenges, trusted devices expired or revoked
    # more than a day ago, authenticator apps whose set-up was never finished.
    await passkeys.forget_challenges(db, now)
    await devices.forget_expired(db, now)
    await totp.forget_unconfirmed(db, now)
    await forget_history(db, now=now)
    return deleted




_FORGET_LEDGERS = sql.Query(
    otp_ledgers.delete().where(
        otp_ledgers.c.updated_at < sa.bindparam("idle"),
        sa.or_(otp_ledgers.c.locked_until.is_(None), otp_ledgers.c.locked_until < sa.bindparam("now")),
    )
)
_FORGET_WINDOWS = sql.Query(mail_throttle.delete().where(mail_throttle.c.last_at < sa.bindparam("idle")))


o = otp_verification
_OUTCOME = sa.case(
    (o.c.used_at.is_not(None), "verified"),
    (o.c.invalidated_at.is_not(None), "replaced"),
    else_="expired",
)
# Take the write lock first: on SQLite (WAL) a transaction that read before another
# connection's commit cannot become a writer later.
_SQLITE_WRITE_LOCK = sql.Query(otp_stats.update().where(sa.false()).values(codes=otp_stats.c.codes))
_FINISHED = sql.Query(
    sa.select(o.c.id, o.c.kind, o.c.purpose, o.c.created_at, o.c.attempts, _OUTCOME.label("outcome"))
    .where(o.c.expires_at <= sa.bindparam("cutoff"))
    .order_by(o.c.expires_at)
    .limit(BATCH)
    .with_for_update(skip_locked=True)  # two workers cleaning at once count each code once
)
_stats_key = (otp_stats.c.day == sa.bindparam("d"), otp_stats.c.purpose == sa.bindparam("p"),
              otp_stats.c.outcome == sa.bindparam("r"))
_ADD_STATS = sql.Query(
    otp_stats.update().where(*_stats_key)
    .values(codes=otp_stats.c.codes + sa.bindparam("n"), attempts=otp_stats.c.attempts + sa.bindparam("a"))
)
_NEW_STATS = sql.Query(otp_stats.insert(), columns=("day", "purpose", "outcome", "codes", "attempts"))
DELETE_CHUNK = 500
# A fixed number of placeholders, so the statement is prepared once; a short chunk repeats its
# last id (IN ignores duplicates).
_DELETE = sql.Query(o.delete().where(o.c.id.in_([sa.bindparam(f"id{i}") for i in range(DELETE_CHUNK)])))
_DELETE_CODES = sql.Query(
    otp_codes.delete().where(otp_codes.c.challenge_id.in_([sa.bindparam(f"id{i}") for i in range(DELETE_CHUNK)]))
)


async def _cleanup_batch(db: Database, *, cutoff: datetime) -> int:
    async with db.transaction():
        if sql.dialect(db) == "sqlite":
            await sql.execute(db, _SQLITE_WRITE_LOCK)
        rows = await sql.fetch_all(db, _FINISHED, cutoff=cutoff)
        counts: dict[tuple[object, str, str], list[int]] = {}
        for r in rows:
            if r.kind != Kind.CODE.value:
                continue  # placeholders and decoys carry no code and no analytics
            entry = counts.setdefault((r.created_at.date(), r.purpose, r.outcome), [0, 0])
            entry[0] += 1
            entry[1] += r.attempts
        for (day, purpose, result), (codes, attempts) in counts.items():
            if not await sql.execute(db, _ADD_STATS, d=day, p=purpose, r=result, n=codes, a=attempts):
                await sql.execute(db, _NEW_STATS, day=day, purpose=purpose, outcome=result, codes=codes,
                                  attempts=attempts)
        ids = [r.id for r in rows]
        for i in range(0, len(ids), DELETE_CHUNK):
            chunk = ids[i : i + DELETE_CHUNK]
            chunk += [chunk[-1]] * (DELETE_CHUNK - len(chunk))
            ids_of_chunk = {f"id{j}": v for j, v in enumerate(chunk)}
            await sql.execute(db, _DELETE_CODES, **ids_of_chunk)
            await sql.execute(db, _DELETE, **ids_of_chunk)
    return len(rows)


async def run_cleanup_forever(services: Services) -> None:
    """The periodic task each app process runs."""
    while True:
        await asyncio.sleep(services.settings.otp_cleanup_interval)
        try:
            n = await cleanup(services.db, now=services.clock.now(), sent_kept=services.mailer.keep_sent)
            if n:
                log.info("otp cleanup deleted=%d", n)
        except Exception as exc:
            log.warning("otp cleanup failed: %s", type(exc).__name__)


# Sessions last seen and mail settled this long ago are deleted: every session has ended by
# then (SESSION_IDLE_TIMEOUT, SESSION_ABSOLUTE_TIMEOUT), and a mail's fate is in the audit and
# the funnel's daily counts. Without this, both tables only grow (the soak in bench/README.md).
HISTORY_KEPT = timedelta(days=30)
SETTLED_MAIL = (MailStatus.SENT, MailStatus.FAILED, MailStatus.EXPIRED, MailStatus.CANCELLED)
_OLD_SESSIONS = sql.Query(
    sa.select(auth_sessions.c.id).where(auth_sessions.c.last_seen_at < sa.bindparam("cutoff")).limit(BATCH))
_OLD_STAFF_SESSIONS = sql.Query(
    sa.select(staff_sessions.c.id).where(staff_sessions.c.last_seen_at < sa.bindparam("cutoff")).limit(BATCH))
# One status at a time: each a range on the outbox's (status, next_attempt_at) index.
_OLD_MAIL = sql.Query(
    sa.select(mail_outbox.c.id)
    .where(mail_outbox.c.status == sa.bindparam("status"), mail_outbox.c.next_attempt_at < sa.bindparam("cutoff"))
    .limit(BATCH))


def _delete_by_id(table: sa.Table) -> sql.Query:
    return sql.Query(table.delete().where(table.c.id.in_([sa.bindparam(f"id{i}") for i in range(DELETE_CHUNK)])))


_DELETE_SESSIONS = _delete_by_id(auth_sessions)
_DELETE_STAFF_SESSIONS = _delete_by_id(staff_sessions)
_DELETE_MAIL = _delete_by_id(mail_outbox)


async def forget_history(db: Database, *, now: datetime, kept: timedelta = HISTORY_KEPT) -> int:
    """Delete sessions last seen, and mail settled, more than `kept` ago, in batches. Returns
    how many rows went."""
    cutoff, gone = now - kept, 0
    work: list[tuple[sql.Query, sql.Query, dict[str, str]]] = [
        (_OLD_SESSIONS, _DELETE_SESSIONS, {}), (_OLD_STAFF_SESSIONS, _DELETE_STAFF_SESSIONS, {}),
        *((_OLD_MAIL, _DELETE_MAIL, {"status": s.value}) for s in SETTLED_MAIL),
    ]
    for find, delete, params in work:
        while True:
            ids = [r.id for r in await sql.fetch_all(db, find, cutoff=cutoff, **params)]
            for i in range(0, len(ids), DELETE_CHUNK):
                chunk = ids[i : i + DELETE_CHUNK]
                chunk += [chunk[-1]] * (DELETE_CHUNK - len(chunk))
                await sql.execute(db, delete, **{f"id{j}": v for j, v in enumerate(chunk)})
            gone += len(ids)
            if len(ids) < BATCH:
                break
    return gone

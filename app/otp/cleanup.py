"""Delete expired and used codes, keeping their counts per day in `otp_stats`."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from databases import Database

from app import sql
from app.mail import outbox
from app.tables import otp_stats, otp_verification

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger("app.otp")
GRACE = timedelta(hours=1)  # keep finished codes a while, so support can see what happened


BATCH = 2000


async def cleanup(db: Database, *, now: datetime, sent_kept: bool = False) -> int:
    """Fold finished codes into otp_stats and delete them, in batches. Returns how many went.

    Every code expires within its TTL, so "expired more than the grace period ago" covers
    used and replaced codes too, and it is one range on the expires_at index: no full scan,
    and no lock on rows a sign-in is using."""
    deleted = 0
    while True:
        n = await _cleanup_batch(db, cutoff=now - GRACE)
        deleted += n
        if n < BATCH:
            break
    await outbox.purge_payloads(db, now=now, sent_kept=sent_kept)
    return deleted


async def _cleanup_batch(db: Database, *, cutoff: datetime) -> int:
    o = otp_verification
    outcome = sa.case(
        (o.c.used_at.is_not(None), "verified"),
        (o.c.invalidated_at.is_not(None), "replaced"),
        else_="expired",
    )
    async with db.transaction():
        if sql.dialect(db) == "sqlite":
            # Take the write lock first: on SQLite (WAL) a transaction that read before another
            # connection's commit cannot become a writer later.
            await db.execute(otp_stats.update().where(sa.false()).values(codes=otp_stats.c.codes))
        rows = await db.fetch_all(
            sa.select(o.c.id, o.c.kind, o.c.purpose, o.c.created_at, o.c.attempts, outcome.label("outcome"))
            .where(o.c.expires_at <= cutoff)
            .order_by(o.c.expires_at)
            .limit(BATCH)
            .with_for_update(skip_locked=True)  # two workers cleaning at once count each code once
        )
        counts: dict[tuple[object, str, str], list[int]] = {}
        for r in rows:
            if r.kind != "code":
                continue  # placeholders and decoys carry no code and no analytics
            entry = counts.setdefault((r.created_at.date(), r.purpose, r.outcome), [0, 0])
            entry[0] += 1
            entry[1] += r.attempts
        for (day, purpose, result), (codes, attempts) in counts.items():
            key = (otp_stats.c.day == day, otp_stats.c.purpose == purpose, otp_stats.c.outcome == result)
            exists = await db.fetch_val(sa.select(sa.func.count()).select_from(otp_stats).where(*key))
            if exists:
                await db.execute(
                    otp_stats.update()
                    .where(*key)
                    .values(codes=otp_stats.c.codes + codes, attempts=otp_stats.c.attempts + attempts)
                )
            else:
                await db.execute(
                    otp_stats.insert().values(day=day, purpose=purpose, outcome=result, codes=codes, attempts=attempts)
                )
        ids = [r.id for r in rows]
        for i in range(0, len(ids), 500):
            await db.execute(o.delete().where(o.c.id.in_(ids[i : i + 500])))
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

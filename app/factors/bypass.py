"""For a customer who lost every factor: shop staff, after checking who they are, let the
emailed code complete the second step for a while (time-boxed, with a reason, audited, undone
by itself) instead of deleting their factors. `python -m app factors bypass` today; the staff
console (issue 18) calls the same function."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa
from databases import Database

from app import audit, sql
from app.audit import Event
from app.auth import queries
from app.factors import devices
from app.tables import customers

log = logging.getLogger("app.audit")
MAX_HOURS = 72

_GRANT = sql.Query(customers.update().where(customers.c.id == sa.bindparam("cid"))
                   .values(factor_bypass_until=sa.bindparam("until")))


async def grant(db: Database, *, now: datetime, email: str, hours: int, reason: str, staff: str) -> bool:
    """Until now + hours (at most MAX_HOURS), the emailed code counts as this customer's second
    step. False: no such customer. The reason and who granted it go to the audit log."""
    if not 1 <= hours <= MAX_HOURS:
        raise ValueError(f"hours must be between 1 and {MAX_HOURS}")
    if not reason.strip():
        raise ValueError("a reason is required")
    customer = await queries.find_customer(db, login=email)
    if customer is None:
        return False
    await sql.execute(db, _GRANT, cid=customer.id, until=now + timedelta(hours=hours))
    # No device trusted before (or, since an emailed code never trusts one while a factor
    # exists, during) the bypass outlives it.
    await devices.revoke_all(db, customer_id=customer.id, now=now)
    log.info("factor bypass customer=%s hours=%s staff=%s reason=%s", customer.id, hours, audit.safe(staff),
             audit.safe(reason))
    await audit.record(db, Event.FACTOR_BYPASS, customer_id=customer.id, ip="", user_agent=f"staff:{staff}"[:255],
                       now=now)
    return True

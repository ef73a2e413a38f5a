"""Auth events: one structured log line and one `auth_events` row each."""

from __future__ import annotations

import logging
import re
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from databases import Database

from app import sql
from app.tables import auth_events

log = logging.getLogger("app.audit")


class Event(StrEnum):
    REGISTERED = "registered"
    CODE_SENT = "code_sent"
    CODE_FAILED = "code_failed"
    LOCKED = "locked"
    VERIFIED = "verified"
    SIGNED_IN = "signed_in"
    SIGNED_OUT = "signed_out"
    SESSION_REVOKED = "session_revoked"
    PASSWORD_FAILED = "password_failed"
    RESEND_REFUSED = "resend_refused"
    RESET_REQUESTED = "reset_requested"
    PASSWORD_RESET = "password_reset"
    PASSWORD_CHANGED = "password_changed"
    EMAIL_CHANGED = "email_changed"
    ACCOUNT_DELETED = "account_deleted"
    NOT_ME = "not_me"  # "Not you?" in a code mail: pending steps ended, sign-in codes paused
    FACTOR_FAILED = "factor_failed"  # a wrong app code, backup code or passkey at the second step
    FACTOR_ADDED = "factor_added"
    FACTOR_REMOVED = "factor_removed"
    BACKUP_CODES_CREATED = "backup_codes_created"
    BACKUP_CODE_USED = "backup_code_used"
    DEVICE_TRUSTED = "device_trusted"
    DEVICE_REVOKED = "device_revoked"
    REAUTHENTICATED = "reauthenticated"
    FACTOR_BYPASS = "factor_bypass"  # staff let a customer who lost every factor in with the emailed code
    # The staff console (issue 18): each names the staff member (staff_id) and, for a change,
    # what it was before and after (detail, JSON).
    STAFF_SIGNED_IN = "staff_signed_in"
    STAFF_SIGNED_OUT = "staff_signed_out"
    STAFF_FAILED = "staff_failed"
    STAFF_CREATED = "staff_created"
    STAFF_DISABLED = "staff_disabled"
    STAFF_ACTION = "staff_action"  # a change to a customer; detail says which, before and after


EVENTS = frozenset(Event)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def safe(value: object) -> str:
    """User-controlled text for a log line: CR, LF and other controls escaped."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


_COLUMNS = ("customer_id", "event", "ip", "user_agent", "created_at")
_INSERTS: dict[int, sql.Query] = {}


def _insert(rows: int) -> sql.Query:
    """INSERT of `rows` events sharing customer, address, agent and time."""
    if rows not in _INSERTS:
        shared: dict[str, Any] = {c: sa.bindparam(c) for c in _COLUMNS if c != "event"}
        _INSERTS[rows] = sql.Query(
            auth_events.insert().values([{**shared, "event": sa.bindparam(f"event_{i}")} for i in range(rows)])
        )
    return _INSERTS[rows]


async def record(
    db: Database, *events: Event, customer_id: int | None, ip: str, user_agent: str, now: datetime
) -> None:
    """Log and store auth events that happened together (one INSERT), in UTC."""
    ua = user_agent[:255]
    names = {f"event_{i}": Event(e).value for i, e in enumerate(events)}  # ValueError: not an auth event
    for name in names.values():
        log.info("auth event=%s customer=%s ip=%s time=%s ua=%s", name, customer_id, safe(ip), now.isoformat(),
                 safe(ua))
    await sql.execute(db, _insert(len(events)), customer_id=customer_id, ip=ip[:45], user_agent=ua, created_at=now,
                      **names)


_STAFF_INSERT = sql.Query(auth_events.insert(), columns=("customer_id", "event", "ip", "user_agent", "created_at",
                                                         "staff_id", "detail"))


async def record_staff(db: Database, event: Event, *, staff_id: int, customer_id: int | None, ip: str,
                       user_agent: str, now: datetime, detail: dict[str, Any] | None = None) -> None:
    """A staff member's event, with what changed (before, after, reason) as JSON."""
    import json

    text = json.dumps(detail, default=str, sort_keys=True) if detail is not None else None
    log.info("auth event=%s staff=%s customer=%s ip=%s time=%s detail=%s", Event(event).value, staff_id, customer_id,
             safe(ip), now.isoformat(), safe(text or ""))
    await sql.execute(db, _STAFF_INSERT, customer_id=customer_id, event=Event(event).value, ip=ip[:45],
                      user_agent=user_agent[:255], created_at=now, staff_id=staff_id, detail=text)

"""The staff console (issue 18): shop staff, not customers. Their own table, sessions, cookie
(path /admin) and shorter timeouts; roles checked on every route. Modules: accounts (staff
rows, set-up, sign-in rules), sessions, web (the cookie and the route guards), customers (search
and actions), audit_view, analytics (the funnel) — the rules free of HTTP, routes thin."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Role(StrEnum):
    VIEWER = "viewer"  # reads
    ADMIN = "admin"  # reads and changes

    def may(self, needed: Role) -> bool:
        return self is Role.ADMIN or needed is Role.VIEWER


@dataclass(frozen=True)
class Staff:
    id: int
    email: str
    role: Role
    disabled_at: datetime | None = None
    last_sign_in_at: datetime | None = None


IDLE_TIMEOUT = 15 * 60  # seconds
ABSOLUTE_TIMEOUT = 8 * 3600

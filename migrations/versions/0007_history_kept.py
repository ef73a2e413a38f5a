"""Ended sessions are forgotten (issue 19's soak: auth_sessions and staff_sessions only grew).

The clean-up task deletes sessions last seen more than 30 days ago (every session ends long
before: 30 minutes idle, 12 hours at most) and settled mail (sent, failed, expired, cancelled)
older than 30 days. Sessions get an index on last_seen_at, so that is a range, not a scan of
every session ever opened; the outbox already has (status, next_attempt_at).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_auth_sessions_last_seen", "auth_sessions", ["last_seen_at"])
    op.create_index("ix_staff_sessions_last_seen", "staff_sessions", ["last_seen_at"])


def downgrade() -> None:
    op.drop_index("ix_staff_sessions_last_seen", table_name="staff_sessions")
    op.drop_index("ix_auth_sessions_last_seen", table_name="auth_sessions")

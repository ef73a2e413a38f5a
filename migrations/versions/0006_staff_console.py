"""The staff console (issue 18): staff and their sessions, audit details, daily rollups.

- staff: shop staff, not customers: email, role (admin | viewer), Argon2id password, an
  authenticator app (secret sealed like a customer's), a one-time set-up link (hashed), their
  own failure count and lockout, disabled_at.
- staff_sessions: server-side sessions of the console (cookie path /admin), as auth_sessions.
- auth_events.staff_id, auth_events.detail: which staff member acted, and what changed (JSON:
  before, after, reason). Indexes for the audit view's filters by time and by type.
- customers.disabled_at: staff disabled the account (no sign-in until enabled again);
  customers.full_name indexed for the console's search.
- auth_daily: per day, purpose, recipient domain and metric, the counts the funnel reads
  (kept by the clean-up task, so the console never scans the raw tables).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

DT = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
InnoDB = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


def upgrade() -> None:
    op.create_table(
        "staff",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("email", sa.String(254), nullable=False, unique=True),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=True),
        sa.Column("totp_secret", sa.Text, nullable=True),
        sa.Column("totp_last_step", sa.BigInteger, nullable=True),
        sa.Column("setup_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("setup_expires_at", DT, nullable=True),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked_until", DT, nullable=True),
        sa.Column("disabled_at", DT, nullable=True),
        sa.Column("created_at", DT, nullable=False),
        sa.Column("last_sign_in_at", DT, nullable=True),
        **InnoDB,
    )
    op.create_table(
        "staff_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("staff_id", sa.Integer, sa.ForeignKey("staff.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", DT, nullable=False),
        sa.Column("last_seen_at", DT, nullable=False),
        sa.Column("ip", sa.String(45), nullable=False, server_default=""),
        sa.Column("user_agent", sa.String(255), nullable=False, server_default=""),
        sa.Column("revoked_at", DT, nullable=True),
        **InnoDB,
    )
    op.create_index("ix_staff_sessions_staff", "staff_sessions", ["staff_id", "revoked_at"])
    op.create_table(
        "auth_daily",
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("purpose", sa.String(16), primary_key=True),
        sa.Column("domain", sa.String(100), primary_key=True),
        sa.Column("metric", sa.String(24), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False, server_default="0"),
        **InnoDB,
    )
    with op.batch_alter_table("auth_events") as batch:
        batch.add_column(sa.Column("staff_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("detail", sa.Text, nullable=True))
    op.create_index("ix_auth_events_created", "auth_events", ["created_at"])
    op.create_index("ix_auth_events_event", "auth_events", ["event", "created_at"])
    op.create_index("ix_auth_events_staff", "auth_events", ["staff_id", "created_at"])
    with op.batch_alter_table("customers") as batch:
        batch.add_column(sa.Column("disabled_at", DT, nullable=True))
    op.create_index("ix_customers_full_name", "customers", ["full_name"])


def downgrade() -> None:
    op.drop_index("ix_customers_full_name", "customers")
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("disabled_at")
    op.drop_index("ix_auth_events_staff", "auth_events")
    op.drop_index("ix_auth_events_event", "auth_events")
    op.drop_index("ix_auth_events_created", "auth_events")
    with op.batch_alter_table("auth_events") as batch:
        batch.drop_column("detail")
        batch.drop_column("staff_id")
    op.drop_table("auth_daily")
    op.drop_table("staff_sessions")
    op.drop_table("staff")

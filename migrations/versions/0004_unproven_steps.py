"""Steps nobody proved a secret for keep to themselves (the security review of issues 14-16).

- customer_otp_verification.proven: the step was started with the password or inside a
  signed-in session. Only such a step touches the customer's failure count, cooldown and
  other steps.
- customer_otp_verification.ledger_key and otp_ledgers: the failure count of the others (a
  registration form, forgot password), per purpose and address, shared by every such step for
  that address, real or stand-in.
- mail_throttle's keys become keyed hashes (the old rows go: they mattered for a minute), with
  an index for the clean-up that forgets idle ones.
- The stand-ins' own ledger columns (failures, lockouts, locked_until) and the index that
  carried them per address go. Open stand-ins end: they mailed no code, and a new form starts
  a fresh one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

DT = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "otp_ledgers",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lockouts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked_until", DT, nullable=True),
        sa.Column("updated_at", DT, nullable=False),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_otp_ledgers_updated", "otp_ledgers", ["updated_at"])
    # Windows were keyed by an unkeyed hash of the address; now a keyed one (nothing to recover
    # by trying addresses). The old ones only mattered for a minute.
    op.execute("DELETE FROM mail_throttle")
    op.create_index("ix_mail_throttle_last", "mail_throttle", ["last_at"])
    # Naive UTC, as every time column holds.
    now = datetime.now(UTC).replace(tzinfo=None)
    op.execute(sa.text(
        "UPDATE customer_otp_verification SET invalidated_at = :now "
        "WHERE kind = 'decoy' AND used_at IS NULL AND invalidated_at IS NULL"
    ).bindparams(now=now))
    op.drop_index("ix_otp_sent_to", "customer_otp_verification")
    with op.batch_alter_table("customer_otp_verification") as batch:
        batch.add_column(sa.Column("proven", sa.Boolean, nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("ledger_key", sa.String(64), nullable=True))
        batch.drop_column("failures")
        batch.drop_column("lockouts")
        batch.drop_column("locked_until")
    op.execute("UPDATE customer_otp_verification SET proven = 0 WHERE kind = 'decoy'")


def downgrade() -> None:
    with op.batch_alter_table("customer_otp_verification") as batch:
        batch.add_column(sa.Column("failures", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("lockouts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("locked_until", DT, nullable=True))
        batch.drop_column("ledger_key")
        batch.drop_column("proven")
    op.create_index("ix_otp_sent_to", "customer_otp_verification", ["sent_to", "purpose", "created_at"])
    op.drop_index("ix_mail_throttle_last", "mail_throttle")
    op.drop_table("otp_ledgers")

"""Where a customer row came from, registration claims, the notice throttle.

- customers.source: "signup" for rows this app's registration creates, "shop" for every row
  that was there before (and rows the shop's other software adds): those are customers and are
  never taken over by a registration.
- customer_otp_verification.claim and .mail_id, and an index on the address a step shows
  (a stand-in carries the failure count of the one before it for the same address).
- mail_throttle: one notice per recipient per cooldown, across workers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DT = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("customers") as batch:
        batch.add_column(sa.Column("source", sa.String(8), nullable=False, server_default="shop"))
    with op.batch_alter_table("customer_otp_verification") as batch:
        batch.add_column(sa.Column("claim", sa.Text, nullable=True))
        batch.add_column(sa.Column("mail_id", sa.BigInteger, nullable=True))
    op.create_index("ix_otp_sent_to", "customer_otp_verification", ["sent_to", "purpose", "created_at"])
    op.create_table(
        "mail_throttle",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("last_at", DT, nullable=False),
        sa.Column("mail_id", sa.BigInteger, nullable=True),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("mail_throttle")
    op.drop_index("ix_otp_sent_to", "customer_otp_verification")
    with op.batch_alter_table("customer_otp_verification") as batch:
        batch.drop_column("mail_id")
        batch.drop_column("claim")
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("source")

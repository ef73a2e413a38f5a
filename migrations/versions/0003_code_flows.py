"""Every code of one pending step stays valid (the 3 newest), under one attempt budget.

- otp_codes: the codes mailed for a challenge, with their link and "Not you?" tokens (hashed).
- customers.signin_paused_until: "Not you?" in a code mail pauses sign-in codes.
- customer_otp_verification gains last_code_at and tag; its code_hash is no longer read for
  challenges made from now on. A challenge issued before this revision moves its one code to
  otp_codes, so a code in flight during the upgrade still works.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

DT = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BIGID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "otp_codes",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("challenge_id", sa.BigInteger, nullable=False),
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("created_at", DT, nullable=False),
        sa.Column("expires_at", DT, nullable=False),
        sa.Column("invalidated_at", DT, nullable=True),
        sa.Column("link_hash", sa.String(64), nullable=True),
        sa.Column("link_sealed", sa.Text, nullable=True),
        sa.Column("stop_hash", sa.String(64), nullable=True),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_otp_codes_challenge", "otp_codes", ["challenge_id", "created_at"])
    op.create_index("ix_otp_codes_link", "otp_codes", ["link_hash"])
    op.create_index("ix_otp_codes_stop", "otp_codes", ["stop_hash"])
    with op.batch_alter_table("customers") as batch:
        batch.add_column(sa.Column("signin_paused_until", DT, nullable=True))
    with op.batch_alter_table("customer_otp_verification") as batch:
        batch.add_column(sa.Column("last_code_at", DT, nullable=True))
        batch.add_column(sa.Column("tag", sa.String(3), nullable=False, server_default=""))
    # Codes still open at the upgrade keep working: the same hash (challenge id + code), moved.
    op.execute(
        "INSERT INTO otp_codes (challenge_id, code_hash, created_at, expires_at) "
        "SELECT id, code_hash, created_at, expires_at FROM customer_otp_verification "
        "WHERE kind = 'code' AND used_at IS NULL AND invalidated_at IS NULL"
    )
    op.execute("UPDATE customer_otp_verification SET last_code_at = created_at WHERE kind = 'code'")


def downgrade() -> None:
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("signin_paused_until")
    with op.batch_alter_table("customer_otp_verification") as batch:
        batch.drop_column("tag")
        batch.drop_column("last_code_at")
    op.drop_table("otp_codes")

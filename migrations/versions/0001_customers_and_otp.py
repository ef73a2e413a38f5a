"""Customers with OTP fields, codes, sessions, audit events, mail outbox.

Creates `customers` on an empty database, or upgrades an existing shop's `customers`
table (at least id, email, password_hash) by adding only what is missing: every row
and every other column stays.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

DT = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BIGID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def customer_columns() -> list[sa.Column]:
    """Every column this app needs on `customers`, besides id, email and password_hash."""
    return [
        sa.Column("username", sa.String(150), nullable=True),
        sa.Column("full_name", sa.String(200), nullable=False, server_default=""),
        sa.Column("created_at", DT, nullable=True),
        sa.Column("email_verified_at", DT, nullable=True),
        sa.Column("otp_secret", sa.String(64), nullable=True),
        sa.Column("otp_enabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("last_otp_attempt", DT, nullable=True),
        sa.Column("otp_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("otp_locked_until", DT, nullable=True),
        sa.Column("otp_lockouts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("otp_last_sent_at", DT, nullable=True),
        sa.Column("session_version", sa.Integer, nullable=False, server_default="0"),
    ]


def upgrade_customers() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if not inspector.has_table("customers"):
        op.create_table(
            "customers",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("email", sa.String(254), nullable=False),
            sa.Column("password_hash", sa.String(255), nullable=False),
            *customer_columns(),
            mysql_engine="InnoDB",
            mysql_charset="utf8mb4",
        )
        op.create_index("uq_customers_email", "customers", ["email"], unique=True)
        op.create_index("uq_customers_username", "customers", ["username"], unique=True)
        return

    existing = {c["name"] for c in inspector.get_columns("customers")}
    missing = {"id", "email", "password_hash"} - existing
    if missing:
        raise RuntimeError(f"customers table lacks {', '.join(sorted(missing))}; cannot upgrade it")
    to_add = [c for c in customer_columns() if c.name not in existing]
    with op.batch_alter_table("customers") as batch:
        for column in to_add:
            batch.add_column(column)
    if "created_at" not in existing:
        # A non-constant default cannot be added to existing rows on every backend: fill it in.
        now = datetime.now(UTC).replace(tzinfo=None)
        op.execute(sa.text("UPDATE customers SET created_at = :now WHERE created_at IS NULL").bindparams(now=now))
    indexed = {tuple(ix["column_names"]) for ix in inspector.get_indexes("customers")}
    indexed |= {tuple(uc["column_names"]) for uc in inspector.get_unique_constraints("customers")}
    pk = tuple(inspector.get_pk_constraint("customers").get("constrained_columns") or ())
    if ("email",) not in indexed and pk != ("email",):
        op.create_index("uq_customers_email", "customers", ["email"], unique=True)
    if ("username",) not in indexed:
        op.create_index("uq_customers_username", "customers", ["username"], unique=True)


def upgrade() -> None:
    upgrade_customers()
    op.create_table(
        "customer_otp_verification",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=True),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("session_binding", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(12), nullable=False, server_default="code"),  # code | placeholder | decoy
        sa.Column("sent_to", sa.String(254), nullable=False, server_default=""),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", DT, nullable=False),
        sa.Column("expires_at", DT, nullable=False),
        sa.Column("used_at", DT, nullable=True),
        sa.Column("invalidated_at", DT, nullable=True),
        # A decoy keeps its own failure ledger, shaped like the customer's, so it behaves alike.
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lockouts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked_until", DT, nullable=True),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_otp_customer_open", "customer_otp_verification", ["customer_id", "used_at", "invalidated_at"])
    op.create_index("ix_otp_expires_at", "customer_otp_verification", ["expires_at"])
    op.create_table(
        "otp_stats",
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("purpose", sa.String(16), primary_key=True),
        sa.Column("outcome", sa.String(16), primary_key=True),
        sa.Column("codes", sa.Integer, nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "auth_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("session_version", sa.Integer, nullable=False),
        sa.Column("created_at", DT, nullable=False),
        sa.Column("last_seen_at", DT, nullable=False),
        sa.Column("ip", sa.String(45), nullable=False, server_default=""),
        sa.Column("user_agent", sa.String(255), nullable=False, server_default=""),
        sa.Column("revoked_at", DT, nullable=True),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_auth_sessions_customer", "auth_sessions", ["customer_id", "revoked_at"])
    op.create_table(
        "auth_events",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("customer_id", sa.Integer, nullable=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("ip", sa.String(45), nullable=False, server_default=""),
        sa.Column("user_agent", sa.String(255), nullable=False, server_default=""),
        sa.Column("created_at", DT, nullable=False),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_auth_events_customer", "auth_events", ["customer_id", "event", "created_at"])
    op.create_table(
        "mail_outbox",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("customer_id", sa.Integer, nullable=True),
        sa.Column("challenge_id", sa.BigInteger, nullable=True),
        sa.Column("recipient", sa.String(254), nullable=False),
        sa.Column("payload", sa.Text, nullable=True),  # base64 of nonce + AES-GCM ciphertext
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("tries", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.Column("created_at", DT, nullable=False),
        sa.Column("next_attempt_at", DT, nullable=False),
        sa.Column("claimed_until", DT, nullable=True),
        sa.Column("sent_at", DT, nullable=True),
        sa.Column("expires_at", DT, nullable=True),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_outbox_due", "mail_outbox", ["status", "next_attempt_at"])
    op.create_index("ix_outbox_challenge", "mail_outbox", ["challenge_id"])
    op.create_index("ix_outbox_expires_at", "mail_outbox", ["expires_at"])
    op.create_index("ix_outbox_recipient", "mail_outbox", ["recipient", "created_at"])


def downgrade() -> None:
    for table in ("mail_outbox", "auth_events", "auth_sessions", "otp_stats", "customer_otp_verification"):
        op.drop_table(table)
    # customers is the shop's own table: its rows and columns stay.

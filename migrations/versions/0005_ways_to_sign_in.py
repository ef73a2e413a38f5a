"""Ways to sign in (issue 17): authenticator apps, passkeys, backup codes, trusted devices.

- authenticators: one row per factor a customer has (as django-allauth keeps them): type
  "totp" (the secret sealed with AES-GCM, the last accepted step), "passkey" (credential id,
  public key, sign counter, whether it may sign in alone), "backup_codes" (the set, hashed, each
  with its used time). `confirmed_at` NULL: an app whose first code was not entered yet.
- trusted_devices: "Don't ask again on this device": the SHA-256 of a random token that a signed
  cookie carries, per customer, with what the dashboard shows and an expiry.
- webauthn_challenges: each WebAuthn ceremony's challenge, single use, bound to the session, 5 min.
- customers.factor_bypass_until: a customer who lost every factor, helped by shop staff: until
  then the emailed code completes the second step again (audited, time-boxed, undone by itself).
- auth_sessions.method: how the session was authenticated; auth_sessions.authenticated_at: the
  last time its customer proved the password or a factor (re-authentication for changes).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

DT = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
InnoDB = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


def upgrade() -> None:
    op.create_table(
        "authenticators",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("label", sa.String(100), nullable=False, server_default=""),
        sa.Column("lookup", sa.String(64), nullable=True),
        sa.Column("created_at", DT, nullable=False),
        sa.Column("confirmed_at", DT, nullable=True),
        sa.Column("last_used_at", DT, nullable=True),
        **InnoDB,
    )
    op.create_index("ix_authenticators_customer", "authenticators", ["customer_id", "type"])
    op.create_index("ix_authenticators_lookup", "authenticators", ["lookup"], unique=True)
    op.create_table(
        "trusted_devices",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("label", sa.String(120), nullable=False, server_default=""),
        sa.Column("ip", sa.String(45), nullable=False, server_default=""),
        sa.Column("created_at", DT, nullable=False),
        sa.Column("last_used_at", DT, nullable=False),
        sa.Column("expires_at", DT, nullable=False),
        sa.Column("revoked_at", DT, nullable=True),
        **InnoDB,
    )
    op.create_index("ix_trusted_devices_customer", "trusted_devices", ["customer_id", "revoked_at"])
    op.create_index("ix_trusted_devices_expires", "trusted_devices", ["expires_at"])
    op.create_table(
        "webauthn_challenges",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("customer_id", sa.Integer, nullable=True),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("binding", sa.String(64), nullable=False),
        sa.Column("challenge", sa.String(128), nullable=False),
        sa.Column("created_at", DT, nullable=False),
        sa.Column("expires_at", DT, nullable=False),
        sa.Column("used_at", DT, nullable=True),
        **InnoDB,
    )
    op.create_index("ix_webauthn_challenges_expires", "webauthn_challenges", ["expires_at"])
    with op.batch_alter_table("customers") as batch:
        batch.add_column(sa.Column("factor_bypass_until", DT, nullable=True))
    with op.batch_alter_table("auth_sessions") as batch:
        batch.add_column(sa.Column("method", sa.String(16), nullable=False, server_default="password"))
        batch.add_column(sa.Column("authenticated_at", DT, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("factor_bypass_until")
    with op.batch_alter_table("auth_sessions") as batch:
        batch.drop_column("authenticated_at")
        batch.drop_column("method")
    op.drop_table("webauthn_challenges")
    op.drop_table("trusted_devices")
    op.drop_table("authenticators")

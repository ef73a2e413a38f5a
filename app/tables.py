"""SQLAlchemy Core tables. Alembic revisions in migrations/ create and upgrade them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

metadata = sa.MetaData()

# MySQL's DATETIME keeps whole seconds unless asked for microseconds.
DateTimeImpl = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database."""

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC)


customers = sa.Table(
    "customers",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(150), unique=True, nullable=True),
    sa.Column("email", sa.String(254), unique=True, nullable=False),
    sa.Column("full_name", sa.String(200), nullable=False, server_default=""),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=True),
    sa.Column("email_verified_at", UTCDateTime, nullable=True),
    # The guide's OTP fields, names kept so existing shop code recognises them.
    sa.Column("otp_secret", sa.String(64), nullable=True),  # reserved for authenticator apps (TOTP)
    sa.Column("otp_enabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("last_otp_attempt", UTCDateTime, nullable=True),  # last code entry, right or wrong
    sa.Column("otp_attempts", sa.Integer, nullable=False, server_default="0"),  # failures since last success
    sa.Column("otp_locked_until", UTCDateTime, nullable=True),
    # Ours: lockout level for the progressive schedule, resend cooldown, revocation.
    sa.Column("otp_lockouts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("otp_last_sent_at", UTCDateTime, nullable=True),
    sa.Column("session_version", sa.Integer, nullable=False, server_default="0"),
    # Where the row came from: "signup" (this app's registration form) or "shop" (the shop's own
    # table, or its other software). Only a sign-up that never confirmed its address may be taken
    # over by a new registration, and only through a code to that address.
    sa.Column("source", sa.String(8), nullable=False, server_default="shop"),
    # "Not you?" in a code mail: no sign-in code goes out until then (a reset still can).
    sa.Column("signin_paused_until", UTCDateTime, nullable=True),
    # Staff let a customer who lost every factor in with the emailed code until then (audited).
    sa.Column("factor_bypass_until", UTCDateTime, nullable=True),
    sa.Column("disabled_at", UTCDateTime, nullable=True),  # staff disabled the account (migration 0006)
    sa.Index("ix_customers_full_name", "full_name"),
)

# A challenge is one pending step (a sign-in, a registration, a reset...) with everything that
# belongs to the step: the session it is bound to, its shared attempt budget, its tag, a stand-in's
# ledger. The codes mailed for it are rows of otp_codes (at most the 3 newest are open).
otp_verification = sa.Table(
    "customer_otp_verification",
    metadata,
    # Random 62-bit ids: unguessable, and known before the insert so the hash can bind it.
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=True),
    sa.Column("purpose", sa.String(16), nullable=False),  # registration | login | reset | email | delete
    # Before migration 0003 the one code; since, unused (random): codes are in otp_codes.
    sa.Column("code_hash", sa.String(64), nullable=False),
    sa.Column("session_binding", sa.String(64), nullable=False),  # HMAC of the pending session's nonce
    sa.Column("kind", sa.String(12), nullable=False, server_default="code"),  # code | placeholder | decoy
    sa.Column("sent_to", sa.String(254), nullable=False, server_default=""),  # masked address shown at the code step
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),  # wrong entries, for all its codes
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),  # its newest code's
    sa.Column("last_code_at", UTCDateTime, nullable=True),  # when its newest code was sent
    sa.Column("tag", sa.String(3), nullable=False, server_default=""),  # shown on the step and in its mails
    sa.Column("used_at", UTCDateTime, nullable=True),
    sa.Column("invalidated_at", UTCDateTime, nullable=True),
    # Whoever started the step proved a secret (the password, or a signed-in session). Only such
    # a step touches the customer's failure count, cooldown and other steps; one started by a
    # form anyone can send (registration, forgot password) counts on `ledger_key`'s row of
    # otp_ledgers instead, so a stranger cannot lock out, hold up or end the owner's sign-in.
    sa.Column("proven", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("ledger_key", sa.String(64), nullable=True),
    # A registration taking over an unconfirmed sign-up: its details (username, name, password
    # hash), sealed, applied only when this code is entered.
    sa.Column("claim", sa.Text, nullable=True),
    # A decoy inside the notice cooldown: the earlier notice whose delivery state it shows.
    sa.Column("mail_id", sa.BigInteger, nullable=True),
    sa.Index("ix_otp_customer_open", "customer_id", "used_at", "invalidated_at"),
    sa.Index("ix_otp_expires_at", "expires_at"),
)

# The failure count of steps nobody proved a secret for, per purpose and address (a keyed hash
# of both): shared by every such step for that address, real or stand-in, from any session, so
# they all behave alike and a flood of them locks only themselves.
otp_ledgers = sa.Table(
    "otp_ledgers",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lockouts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("locked_until", UTCDateTime, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_otp_ledgers_updated", "updated_at"),
)

otp_stats = sa.Table(
    "otp_stats",
    metadata,
    # What cleanup keeps of deleted codes: counts per day, purpose and outcome.
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("purpose", sa.String(16), primary_key=True),
    sa.Column("outcome", sa.String(16), primary_key=True),  # verified | expired | replaced
    sa.Column("codes", sa.Integer, nullable=False, server_default="0"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
)

auth_sessions = sa.Table(
    "auth_sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # SHA-256 of the token the cookie carries
    sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
    sa.Column("session_version", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_seen_at", UTCDateTime, nullable=False),
    sa.Column("ip", sa.String(45), nullable=False, server_default=""),
    sa.Column("user_agent", sa.String(255), nullable=False, server_default=""),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    # How it was authenticated (app.factors.Method), and when its customer last proved the
    # password or a factor in it (adding or removing a factor asks for a recent one).
    sa.Column("method", sa.String(16), nullable=False, server_default="password"),
    sa.Column("authenticated_at", UTCDateTime, nullable=True),
    sa.Index("ix_auth_sessions_customer", "customer_id", "revoked_at"),
    sa.Index("ix_auth_sessions_last_seen", "last_seen_at"),  # the clean-up's range (migration 0007)
)

auth_events = sa.Table(
    "auth_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("customer_id", sa.Integer, nullable=True),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("ip", sa.String(45), nullable=False, server_default=""),
    sa.Column("user_agent", sa.String(255), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("staff_id", sa.Integer, nullable=True),  # the staff member who acted (migration 0006)
    sa.Column("detail", sa.Text, nullable=True),  # JSON: before, after, reason of a staff action
    sa.Index("ix_auth_events_customer", "customer_id", "event", "created_at"),
    sa.Index("ix_auth_events_created", "created_at"),
    sa.Index("ix_auth_events_event", "event", "created_at"),
    sa.Index("ix_auth_events_staff", "staff_id", "created_at"),
)

mail_outbox = sa.Table(
    "mail_outbox",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),  # registration_code | login_code | account_exists
    sa.Column("customer_id", sa.Integer, nullable=True),
    sa.Column("challenge_id", sa.BigInteger, nullable=True),
    sa.Column("recipient", sa.String(254), nullable=False),
    # The template context (with the code) sealed with AES-GCM under a key derived
    # from SECRET_KEY, so no row holds a readable code; wiped once it can no longer help.
    sa.Column("payload", sa.Text, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # queued | sending | sent | failed | expired
    sa.Column("tries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.String(500), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("next_attempt_at", UTCDateTime, nullable=False),
    sa.Column("claimed_until", UTCDateTime, nullable=True),
    sa.Column("sent_at", UTCDateTime, nullable=True),
    sa.Column("expires_at", UTCDateTime, nullable=True),
    sa.Index("ix_outbox_due", "status", "next_attempt_at"),
    sa.Index("ix_outbox_challenge", "challenge_id"),
    sa.Index("ix_outbox_expires_at", "expires_at"),
    sa.Index("ix_outbox_recipient", "recipient", "created_at"),
)

otp_codes = sa.Table(
    "otp_codes",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("challenge_id", sa.BigInteger, nullable=False),
    sa.Column("code_hash", sa.String(64), nullable=False),  # HMAC-SHA256(key, challenge id + code), hex
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("invalidated_at", UTCDateTime, nullable=True),  # a fourth newer code pushed it out
    # The mail's link: SHA-256 of its token, and the code sealed under a key derived from the
    # token (the database alone cannot show it), for the page that shows it on another device.
    sa.Column("link_hash", sa.String(64), nullable=True),
    sa.Column("link_sealed", sa.Text, nullable=True),
    sa.Column("stop_hash", sa.String(64), nullable=True),  # the mail's "Not you?" link
    sa.Index("ix_otp_codes_challenge", "challenge_id", "created_at"),
    sa.Index("ix_otp_codes_link", "link_hash"),
    sa.Index("ix_otp_codes_stop", "stop_hash"),
)

mail_throttle = sa.Table(
    "mail_throttle",
    metadata,
    # At most one mail per key (a keyed hash of the recipient, or of a session's step) per window, taken by a guarded
    # UPDATE or, the first time, an INSERT that the primary key lets only one request win.
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("last_at", UTCDateTime, nullable=False),
    sa.Column("mail_id", sa.BigInteger, nullable=True),  # the notice that went out then
    sa.Index("ix_mail_throttle_last", "last_at"),  # clean-up forgets windows idle for a day
)

# Ways to sign in beyond the password and the emailed code (migration 0005), one row per factor:
# type "totp" (data: the sealed secret, the last accepted 30-s step), "passkey" (credential,
# public key, sign counter, may it sign in alone), "backup_codes" (the set, hashed, used times).
authenticators = sa.Table(
    "authenticators",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("data", sa.Text, nullable=False),  # JSON
    sa.Column("label", sa.String(100), nullable=False, server_default=""),
    sa.Column("lookup", sa.String(64), nullable=True),  # a passkey's credential id, hashed (unique)
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("confirmed_at", UTCDateTime, nullable=True),  # an app counts once its first code was right
    sa.Column("last_used_at", UTCDateTime, nullable=True),
    sa.Index("ix_authenticators_customer", "customer_id", "type"),
    sa.Index("ix_authenticators_lookup", "lookup", unique=True),
)

trusted_devices = sa.Table(
    "trusted_devices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("customer_id", sa.Integer, sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # SHA-256 of the cookie's token
    sa.Column("label", sa.String(120), nullable=False, server_default=""),  # browser and system
    sa.Column("ip", sa.String(45), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_used_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Index("ix_trusted_devices_customer", "customer_id", "revoked_at"),
    sa.Index("ix_trusted_devices_expires", "expires_at"),
)

webauthn_challenges = sa.Table(
    "webauthn_challenges",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # SHA-256 of the challenge
    sa.Column("customer_id", sa.Integer, nullable=True),  # None: a passkey sign-in, whoever it turns out to be
    sa.Column("purpose", sa.String(16), nullable=False),  # register | alone | second
    sa.Column("binding", sa.String(64), nullable=False),  # keyed hash of the session's nonce
    sa.Column("challenge", sa.String(128), nullable=False),  # base64url
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("used_at", UTCDateTime, nullable=True),
    sa.Index("ix_webauthn_challenges_expires", "expires_at"),
)

# The staff console (migration 0006). Staff are not customers.
staff = sa.Table(
    "staff",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(254), nullable=False, unique=True),
    sa.Column("role", sa.String(8), nullable=False),  # admin | viewer
    sa.Column("password_hash", sa.String(255), nullable=True),  # None until the set-up link is used
    sa.Column("totp_secret", sa.Text, nullable=True),  # sealed, as a customer's app secret
    sa.Column("totp_last_step", sa.BigInteger, nullable=True),
    sa.Column("setup_hash", sa.String(64), nullable=True, unique=True),  # SHA-256 of the one-time set-up token
    sa.Column("setup_expires_at", UTCDateTime, nullable=True),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("locked_until", UTCDateTime, nullable=True),
    sa.Column("disabled_at", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_sign_in_at", UTCDateTime, nullable=True),
)

staff_sessions = sa.Table(
    "staff_sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # SHA-256 of the token the admin cookie carries
    sa.Column("staff_id", sa.Integer, sa.ForeignKey("staff.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_seen_at", UTCDateTime, nullable=False),
    sa.Column("ip", sa.String(45), nullable=False, server_default=""),
    sa.Column("user_agent", sa.String(255), nullable=False, server_default=""),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Index("ix_staff_sessions_staff", "staff_id", "revoked_at"),
    sa.Index("ix_staff_sessions_last_seen", "last_seen_at"),
)

# Daily counts the funnel reads (kept by the clean-up task): per day, purpose, the recipient's
# mail domain and metric (requested, mailed, delivered, verified, failure reasons, ...).
auth_daily = sa.Table(
    "auth_daily",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("purpose", sa.String(16), primary_key=True),
    sa.Column("domain", sa.String(100), primary_key=True),
    sa.Column("metric", sa.String(24), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False, server_default="0"),
)

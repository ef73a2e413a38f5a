"""Ways to sign in beyond the password and the emailed code: authenticator apps (totp),
passkeys, backup codes and trusted devices, one module each, with their rules and SQL and
nothing of HTTP. `factors_of` tells the second-step policy (app.auth.flows.second_step) what a
customer has."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

import sqlalchemy as sa
from databases import Database

from app import sql
from app.security.crypto import Sealer, derive_key, hkdf_key
from app.tables import authenticators


class Method(StrEnum):
    """How a session was authenticated (auth_sessions.method), as the dashboard shows it."""

    PASSWORD = "password"  # the password alone (codes off)
    CODE = "code"  # the password, then an emailed code (or the code alone, confirming a new address)
    APP = "app"  # the password, then an authenticator app
    PASSKEY = "passkey"  # a passkey (alone, or after the password)
    BACKUP = "backup_code"  # the password, then a backup code
    DEVICE = "device"  # the password on a device the customer trusts
    RESET = "reset"  # a password reset (an emailed code, and a factor when the customer has one)

    @property
    def words(self) -> str:
        return METHOD_WORDS[self]


METHOD_WORDS = {
    Method.PASSWORD: "Password", Method.CODE: "Password and emailed code", Method.APP: "Password and authenticator app",
    Method.PASSKEY: "Passkey", Method.BACKUP: "Password and backup code", Method.DEVICE: "Password on a trusted device",
    Method.RESET: "Password reset",
}


class Type(StrEnum):
    """authenticators.type"""

    TOTP = "totp"
    PASSKEY = "passkey"
    BACKUP_CODES = "backup_codes"


@dataclass(frozen=True)
class FactorKeys:
    """The keys of the factors, derived from SECRET_KEY. The running app uses the current key
    alone (SECURITY.md 34: fallbacks open sessions and queued mail, nothing else); `python -m app
    factors reseal` builds them with SECRET_KEY_FALLBACKS to seal what an older key sealed again."""

    at_rest: Sealer  # authenticator-app secrets: HKDF-SHA256 keys, AES-256-GCM
    backup: bytes  # keyed hashes of backup codes made before each set had a sealed key of its own

    @classmethod
    def from_secret(cls, secret_key: str, fallbacks: tuple[str, ...] = ()) -> FactorKeys:
        return cls(at_rest=Sealer(tuple(hkdf_key(k, "totp-secret") for k in (secret_key, *fallbacks)), b"totp"),
                   backup=derive_key(secret_key, "backup-codes"))


@dataclass(frozen=True)
class Factors:
    """What a customer has besides the password."""

    app: bool = False  # a confirmed authenticator app
    passkeys: int = 0
    backup_left: int = 0  # unused backup codes
    backup_made: bool = False  # a set exists (all used or not)

    @property
    def strong(self) -> bool:
        """An app or a passkey: the emailed code no longer completes the second step."""
        return self.app or self.passkeys > 0


_OF = sql.Query(
    sa.select(authenticators.c.type, authenticators.c.data, authenticators.c.confirmed_at)
    .where(authenticators.c.customer_id == sa.bindparam("cid"))
)


async def factors_of(db: Database, customer_id: int) -> Factors:
    """One indexed read of the customer's authenticators."""
    app, passkeys, left, made = False, 0, 0, False
    for row in await sql.fetch_all(db, _OF, cid=customer_id):
        if row.type == Type.TOTP and row.confirmed_at is not None:
            app = True
        elif row.type == Type.PASSKEY:
            passkeys += 1
        elif row.type == Type.BACKUP_CODES:
            made = True
            left += sum(1 for code in json.loads(row.data).get("codes", []) if code.get("used_at") is None)
    return Factors(app=app, passkeys=passkeys, backup_left=left, backup_made=made)

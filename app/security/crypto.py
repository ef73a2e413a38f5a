"""Keys, keyed hashes, random tokens and sealed (encrypted) payloads. No HTTP here.

Every use of SECRET_KEY gets a key of its own, derived from it. A shop rotates its key by
moving the old one into SECRET_KEY_FALLBACKS: what was sealed with an older key still opens
(sessions and queued mail), while everything new is made with the current one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


@lru_cache(maxsize=64)
def derive_key(secret_key: str, purpose: str) -> bytes:
    """A separate 32-byte key per use, derived from SECRET_KEY: HMAC-SHA256(secret, label)."""
    return hmac.new(secret_key.encode(), b"computer-shop:" + purpose.encode(), hashlib.sha256).digest()


@lru_cache(maxsize=64)
def hkdf_key(secret_key: str, purpose: str, length: int = 32) -> bytes:
    """A key for encryption at rest (RFC 5869 HKDF-SHA256, the purpose as `info`)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"computer-shop", info=purpose.encode()).derive(
        secret_key.encode()
    )


def keyed_hash(key: bytes, *parts: object) -> str:
    """HMAC-SHA256 over the parts (joined by a unit separator), hex."""
    msg = b"\x1f".join(str(p).encode() for p in parts)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def token() -> str:
    """A random URL-safe token (256 bits)."""
    return secrets.token_urlsafe(32)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def equal(a: str, b: str) -> bool:
    """Constant-time comparison of two strings."""
    return hmac.compare_digest(a.encode(), b.encode())


class Unreadable(Exception):
    """A sealed value that no current or fallback key opens (damaged, or from a retired key)."""


@dataclass(frozen=True)
class Sealer:
    """AES-256-GCM with a key ring: seals with the first key, opens with any of them.

    `aad` binds a sealed value to its use, so a value sealed for one purpose never opens
    as another."""

    keys: tuple[bytes, ...]
    aad: bytes = b"outbox"

    @classmethod
    def for_purpose(cls, secret_key: str, fallbacks: Sequence[str], purpose: str, aad: bytes | None = None) -> Sealer:
        keys = tuple(derive_key(k, purpose) for k in (secret_key, *fallbacks))
        return cls(keys, aad if aad is not None else purpose.encode())

    def seal(self, data: dict[str, Any]) -> str:
        nonce = os.urandom(12)
        blob = AESGCM(self.keys[0]).encrypt(nonce, json.dumps(data).encode(), self.aad)
        return base64.b64encode(nonce + blob).decode()

    def open(self, sealed: str) -> dict[str, Any]:
        """The sealed dict; Unreadable when it is damaged or no key of the ring opens it."""
        try:
            blob = base64.b64decode(sealed, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Unreadable("not base64") from exc
        if len(blob) < 12 + 16:
            raise Unreadable("too short")
        for key in self.keys:
            try:
                plain = AESGCM(key).decrypt(blob[:12], blob[12:], self.aad)
            except InvalidTag:
                continue
            try:
                value = json.loads(plain)
            except ValueError as exc:
                raise Unreadable("not JSON") from exc
            if not isinstance(value, dict):
                raise Unreadable("not an object")
            return value
        raise Unreadable("no key opens it")


TOKEN_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def letters_token(length: int = 24) -> str:
    """A random token of letters only (about 6 bits each: 24 letters is 136 bits). A link with
    it has no digit run a mail client or a test could mistake for the code."""
    return "".join(secrets.choice(TOKEN_LETTERS) for _ in range(length))


def seal_for_token(token_value: str, text: str) -> str:
    """`text` sealed under a key derived from a token that only its holder has (the database
    keeps a hash of the token): what the row holds opens only with the link from the mail."""
    key = hashlib.sha256(b"computer-shop:token-seal\x1f" + token_value.encode()).digest()
    nonce = os.urandom(12)
    return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, text.encode(), b"token-seal")).decode()


def open_for_token(token_value: str, sealed: str) -> str | None:
    key = hashlib.sha256(b"computer-shop:token-seal\x1f" + token_value.encode()).digest()
    try:
        blob = base64.b64decode(sealed, validate=True)
        return AESGCM(key).decrypt(blob[:12], blob[12:], b"token-seal").decode()
    except (binascii.Error, ValueError, InvalidTag):
        return None

"""A software authenticator for tests: an ES256 (P-256) key from `cryptography`, and answers
shaped like a browser's PublicKeyCredential.toJSON(), which is what @simplewebauthn/browser
posts: base64url strings, `clientExtensionResults`, the registration's `transports`.

    key = SoftAuthenticator()
    response_json = key.registration(options_json, origin="http://localhost:8000", uv=True)
    response_json = key.assertion(options_json, origin="http://localhost:8000", sign_count=5)

Only what a test needs to choose is a parameter: the flags (UP, UV, BE, BS), credProps, the
sign counter, the user handle, the origin and RP ID; everything else is what a platform
authenticator sends."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

# Authenticator data flags (WebAuthn level 3, 6.1).
UP, UV, BE, BS, AT = 0x01, 0x04, 0x08, 0x10, 0x40
ES256 = -7


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def cbor(value: Any) -> bytes:
    """Just enough CBOR (RFC 8949) for attestation objects and COSE keys."""

    def head(major: int, n: int) -> bytes:
        if n < 24:
            return bytes([major << 5 | n])
        for extra, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
            if n < 1 << (8 * struct.calcsize(fmt)):
                return bytes([major << 5 | extra]) + struct.pack(fmt, n)
        raise ValueError("integer too large")

    if isinstance(value, bool):
        return b"\xf5" if value else b"\xf4"
    if isinstance(value, int):
        return head(0, value) if value >= 0 else head(1, -1 - value)
    if isinstance(value, bytes):
        return head(2, len(value)) + value
    if isinstance(value, str):
        raw = value.encode()
        return head(3, len(raw)) + raw
    if isinstance(value, list | tuple):
        return head(4, len(value)) + b"".join(cbor(v) for v in value)
    if isinstance(value, dict):
        return head(5, len(value)) + b"".join(cbor(k) + cbor(v) for k, v in value.items())
    raise TypeError(f"no CBOR for {type(value).__name__}")


class Excluded(Exception):
    """The authenticator holds a credential the options exclude (a browser's InvalidStateError)."""


@dataclass
class SoftAuthenticator:
    """One passkey: its key, credential id, counter and the account it was made for."""

    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    credential_id: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    aaguid: bytes = bytes(16)
    sign_count: int = 0
    user_handle: bytes | None = None  # user.id of the registration options
    backup_eligible: bool = False
    backed_up: bool = False

    def cose_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor({1: 2, 3: ES256, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big")})

    def _auth_data(self, rp_id: str, flags: int, sign_count: int, attested: bool) -> bytes:
        data = hashlib.sha256(rp_id.encode()).digest() + bytes([flags]) + struct.pack(">I", sign_count)
        if attested:
            data += self.aaguid + struct.pack(">H", len(self.credential_id)) + self.credential_id + self.cose_key()
        return data

    def _sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    def _flags(self, up: bool, uv: bool) -> int:
        return ((UP if up else 0) | (UV if uv else 0) | (BE if self.backup_eligible else 0)
                | (BS if self.backed_up else 0))

    def registration(
        self, options_json: str, *, origin: str, uv: bool = True, up: bool = True, backup_eligible: bool = False,
        backed_up: bool = False, cred_props: bool | None = True, fmt: str = "none",
        transports: Sequence[str] = ("internal", "hybrid"), rp_id: str | None = None, mind_exclude: bool = True,
        client_type: str = "webauthn.create",
    ) -> str:
        """The answer to navigator.credentials.create(options) as toJSON() gives it. `cred_props`:
        the credProps.rk reported (None: the extension's result is left out). `fmt`: "none", or
        "packed" with a self attestation signed by the credential key."""
        options = json.loads(options_json)
        if mind_exclude and any(unb64url(c["id"]) == self.credential_id for c in options.get("excludeCredentials", [])):
            raise Excluded("this authenticator already holds a credential for the account")
        self.user_handle = unb64url(options["user"]["id"])
        self.backup_eligible, self.backed_up = backup_eligible, backed_up
        client_data = json.dumps({"type": client_type, "challenge": options["challenge"], "origin": origin,
                                  "crossOrigin": False}, separators=(",", ":")).encode()
        auth_data = self._auth_data(rp_id or options["rp"]["id"], self._flags(up, uv) | AT, self.sign_count, True)
        if fmt == "none":
            statement: dict[str, Any] = {}
        elif fmt == "packed":
            statement = {"alg": ES256, "sig": self._sign(auth_data + hashlib.sha256(client_data).digest())}
        else:
            raise ValueError(f"no attestation format {fmt!r} here")
        attestation = cbor({"fmt": fmt, "attStmt": statement, "authData": auth_data})
        spki = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        extensions: dict[str, Any] = {} if cred_props is None else {"credProps": {"rk": cred_props}}
        return json.dumps({
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "authenticatorAttachment": "platform",
            "response": {
                "clientDataJSON": b64url(client_data),
                "attestationObject": b64url(attestation),
                "authenticatorData": b64url(auth_data),
                "transports": list(transports),
                "publicKeyAlgorithm": ES256,
                "publicKey": b64url(spki),
            },
            "clientExtensionResults": extensions,
        })

    def assertion(
        self, options_json: str, *, origin: str, uv: bool = True, up: bool = True, sign_count: int | None = None,
        user_handle: bytes | None = None, omit_user_handle: bool = False, rp_id: str | None = None,
        client_type: str = "webauthn.get",
    ) -> str:
        """The answer to navigator.credentials.get(options) as toJSON() gives it. `sign_count`:
        the counter to report (and keep); by default the one kept, unchanged (a synced passkey's
        0). `user_handle`: another account's than the registration's."""
        options = json.loads(options_json)
        if sign_count is not None:
            self.sign_count = sign_count
        client_data = json.dumps({"type": client_type, "challenge": options["challenge"], "origin": origin,
                                  "crossOrigin": False}, separators=(",", ":")).encode()
        auth_data = self._auth_data(rp_id or options["rpId"], self._flags(up, uv), self.sign_count, False)
        signature = self._sign(auth_data + hashlib.sha256(client_data).digest())
        response = {"clientDataJSON": b64url(client_data), "authenticatorData": b64url(auth_data),
                    "signature": b64url(signature)}
        handle = user_handle if user_handle is not None else self.user_handle
        if handle is not None and not omit_user_handle:  # toJSON() leaves a null userHandle out
            response["userHandle"] = b64url(handle)
        return json.dumps({
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "authenticatorAttachment": "platform",
            "response": response,
            "clientExtensionResults": {},
        })

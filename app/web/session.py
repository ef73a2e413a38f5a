"""The session cookie: a typed structure, signed (not encrypted), ids only.

Its holder can read it, so it carries identifiers and nothing else (SECURITY.md 17): the CSRF
token, the pending step (challenge id, binding nonce and, after a password, the customer id
and session version), or the signed-in session's token, customer id and sign-in time.

It is a browser-session cookie (no Max-Age): it ends when the browser closes, which matters on
shared computers, while the server enforces the idle and absolute timeouts. Signatures are
checked with SECRET_KEY and every key in SECRET_KEY_FALLBACKS, and made with SECRET_KEY, so a
key rotation signs nobody out.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import itsdangerous
from itsdangerous import BadSignature
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_KEY = "app.cookie"


@dataclass
class Pending:
    """A step waiting for a code: which challenge, and the nonce its binding was made from."""

    challenge_id: int
    nonce: str
    purpose: str  # app.otp.Purpose: which kind of step this is (a code of another purpose never completes it)
    # Set only after a password was proven: lets a right code sign in with one guarded UPDATE.
    customer_id: int | None = None
    session_version: int | None = None

    @property
    def owner(self) -> tuple[int, int] | None:
        if self.customer_id is None or self.session_version is None:
            return None
        return self.customer_id, self.session_version


@dataclass
class SessionCookie:
    csrf: str = ""
    pending: Pending | None = None
    session_token: str | None = None  # the signed-in session; its row's id is SHA-256 of this
    customer_id: int | None = None
    auth_time: int | None = None  # Unix time of the sign-in
    notice: str | None = None  # a one-time message for the next page (no-JavaScript resend)
    modified: bool = field(default=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        # Any change is written back at the response; `modified` itself is bookkeeping.
        object.__setattr__(self, name, value)
        if name != "modified":
            object.__setattr__(self, "modified", True)

    def clear(self) -> None:
        """Forget everything (a privilege change starts a new session)."""
        self.csrf, self.pending, self.session_token = "", None, None
        self.customer_id = self.auth_time = None
        self.notice = None

    @property
    def empty(self) -> bool:
        return not (self.csrf or self.pending or self.session_token or self.notice)

    # --- wire format: the same readable names, JSON, base64 ----------------------------------

    def dump(self) -> bytes:
        data: dict[str, Any] = {}
        if self.csrf:
            data["csrf"] = self.csrf
        if self.pending is not None:
            p = self.pending
            data["pending"] = {"challenge": p.challenge_id, "nonce": p.nonce, "purpose": p.purpose}
            if p.owner is not None:
                data["pending"].update(customer=p.customer_id, version=p.session_version)
        if self.session_token:
            data.update(session=self.session_token, customer=self.customer_id, auth_time=self.auth_time)
        if self.notice:
            data["notice"] = self.notice
        return base64.b64encode(json.dumps(data, separators=(",", ":")).encode())

    @classmethod
    def load(cls, raw: bytes) -> SessionCookie:
        """Parse a verified payload; anything of the wrong shape is dropped, never trusted."""
        try:
            data = json.loads(base64.b64decode(raw))
        except (binascii.Error, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        cookie = cls(csrf=_str(data.get("csrf")) or "", notice=_str(data.get("notice")))
        p = data.get("pending")
        if isinstance(p, dict) and _int(p.get("challenge")) is not None and _str(p.get("nonce")) and _str(p.get("purpose")):
            cookie.pending = Pending(p["challenge"], p["nonce"], p["purpose"], _int(p.get("customer")),
                                     _int(p.get("version")))
        token, customer = _str(data.get("session")), _int(data.get("customer"))
        if token and customer is not None:
            cookie.session_token, cookie.customer_id, cookie.auth_time = token, customer, _int(data.get("auth_time"))
        cookie.modified = False  # as read
        return cookie


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def cookie_of(conn: HTTPConnection) -> SessionCookie:
    """This request's session cookie (SessionCookieMiddleware put it in the scope)."""
    found = conn.scope.get(SCOPE_KEY)
    if found is None:
        found = conn.scope[SCOPE_KEY] = SessionCookie()
    return found  # type: ignore[no-any-return]


class SessionCookieMiddleware:
    """Reads the signed cookie into a SessionCookie, and writes it back when it changed."""

    def __init__(self, app: ASGIApp, *, secret_keys: Sequence[str], cookie_name: str, https_only: bool,
                 max_age: int) -> None:
        self.app = app
        # itsdangerous signs with the last key and accepts any of them.
        self.signer = itsdangerous.TimestampSigner(list(reversed(secret_keys)), salt="cookie-session")
        self.cookie_name, self.max_age = cookie_name, max_age
        self.flags = "path=/; httponly; samesite=lax" + ("; secure" if https_only else "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        raw = conn.cookies.get(self.cookie_name)
        cookie, had = SessionCookie(), raw is not None
        if raw:
            try:
                cookie = SessionCookie.load(self.signer.unsign(raw.encode(), max_age=self.max_age))
            except BadSignature:
                cookie.modified = True  # forged, garbled or too old: replaced or removed
        scope[SCOPE_KEY] = cookie

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start" and cookie.modified:
                headers = MutableHeaders(scope=message)
                if not cookie.empty:
                    value = self.signer.sign(cookie.dump()).decode()
                    headers.append("Set-Cookie", f"{self.cookie_name}={value}; {self.flags}")
                elif had:
                    headers.append("Set-Cookie", f"{self.cookie_name}=null; {self.flags}; max-age=0; "
                                                 "expires=Thu, 01 Jan 1970 00:00:00 GMT")
            await send(message)

        await self.app(scope, receive, send_with_cookie)

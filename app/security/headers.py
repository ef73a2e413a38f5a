"""The security headers every response carries: CSP without inline code, nosniff, framing, HSTS."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=(), interest-cohort=()"),
)
_PAGE_HEADERS = (("Cache-Control", "no-store"),)
_HSTS = (("Strict-Transport-Security", "max-age=63072000; includeSubDomains"),)


def _raw(headers: Iterable[tuple[str, str]]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers)


class SecurityHeadersMiddleware:
    """Adds the security headers to every response, errors and fragments included. A header
    the response set itself is kept. Every response passes here: the raw header list is
    scanned once, not once per header."""

    def __init__(self, app: ASGIApp, *, production: bool) -> None:
        self.app = app
        hsts = _HSTS if production else ()
        self.for_static = _raw(_HEADERS + hsts)
        self.for_pages = _raw(_HEADERS + _PAGE_HEADERS + hsts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")
        wanted = self.for_static if static else self.for_pages

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {bytes(k).lower() for k, _ in headers}
                headers.extend(pair for pair in wanted if pair[0] not in present)
                if not static:
                    _add_vary(headers, b"HX-Request")
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _add_vary(headers: list[tuple[bytes, bytes]], name: bytes) -> None:
    """`name` added to the response's Vary (all its Vary headers merged into one), once."""
    values: list[bytes] = []
    kept = []
    for key, value in headers:
        if bytes(key).lower() == b"vary":
            values += [v.strip() for v in bytes(value).split(b",") if v.strip()]
        else:
            kept.append((key, value))
    if name.lower() not in {v.lower() for v in values}:
        values.append(name)
    headers[:] = [*kept, (b"vary", b", ".join(values))]

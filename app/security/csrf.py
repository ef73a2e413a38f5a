"""CSRF: a per-session token on every state-changing request, plus an Origin and
Sec-Fetch-Site check (SECURITY.md 22)."""

from __future__ import annotations

from enum import StrEnum

from starlette.requests import Request

from app.security.crypto import equal, token
from app.web.session import cookie_of

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
# Set by the proxy middleware: the host names this request may call its own.
HOSTS_KEY = "app.hosts"


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use."""
    cookie = cookie_of(request)
    if not cookie.csrf:
        cookie.csrf = token()
    return cookie.csrf


def same_origin(request: Request) -> bool:
    """Refuse what a browser says came from elsewhere (Sec-Fetch-Site, then Origin).

    The hosts we accept are the request's Host, the X-Forwarded-Host a trusted proxy passed
    on, and the host of PUBLIC_ORIGIN (worked out once per request by ProxyMiddleware)."""
    site = request.headers.get("sec-fetch-site")
    if site and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin == "null" or "://" not in origin:
        return False
    hosts = request.scope.get(HOSTS_KEY) or {request.headers.get("host", "")}
    return origin.split("://", 1)[1] in hosts


class CsrfVerdict(StrEnum):
    OK = "ok"
    FOREIGN = "foreign"  # the browser says it came from another site
    ENDED = "ended"  # from this site, but not with this session's token: the session ended or changed


async def csrf_verdict(request: Request) -> CsrfVerdict:
    """OK when the request carries the session's token and comes from this site; otherwise why
    not, so the page can say the right thing (a tab left open past its session is not an attack)."""
    if not same_origin(request):
        return CsrfVerdict.FOREIGN
    return CsrfVerdict.OK if await _token_matches(request) else CsrfVerdict.ENDED


async def _token_matches(request: Request) -> bool:
    return await token_sent(request, cookie_of(request).csrf)


async def token_sent(request: Request, expected: str | None) -> bool:
    """The form field csrf_token or the X-CSRF-Token header matches `expected` (the customer
    session's token, or the staff console's)."""
    if not expected:
        return False
    # The form field first: the step just swapped in carries the current token, while the
    # hx-headers copy on <body> dates from the last full page load (tokens rotate at sign-in).
    sent: list[str] = []
    if request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(CSRF_FIELD)
        if isinstance(value, str):
            sent.append(value)
    if header := request.headers.get(CSRF_HEADER):
        sent.append(header)
    return any(equal(v, expected) for v in sent)

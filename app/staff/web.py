"""The HTTP side of the staff console: its own cookie, and the guards every console route passes.

The admin cookie is not the customer's: its own name, path /admin, SameSite=Strict, HttpOnly,
Secure (and the `__Secure-` prefix) in production, no Max-Age (it ends with the browser). Its
value is itsdangerous-signed JSON holding ids only: {"t": the session token or None, "c": the
console's CSRF token, "p": a pending sign-in {"s": staff id, "n": nonce, "at": Unix time} or
None}. No middleware writes it: whatever changes it writes it on its response, through
render_admin or with_cookie.

Every console endpoint is wrapped in staff_page (GET) or staff_action (state-changing) with
the role it needs; the sign-in forms, which nobody is signed in to use, in console_form.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any

import itsdangerous
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from app.htmx import wants_fragment
from app.security.crypto import token
from app.security.csrf import same_origin, token_sent
from app.settings import Settings
from app.staff import ABSOLUTE_TIMEOUT, Role, Staff, sessions
from app.templating import render
from app.web.request import client_of, services
from app.web.session import cookie_of

COOKIE = "admin_session"
SECURE_COOKIE = "__Secure-admin_session"  # production: HTTPS only, and no page over HTTP can set it
PATH = "/admin"
LOGIN = "/admin/login"
PENDING_TTL = 300  # seconds from the password to the code
LIMIT_SCOPE = "admin"

_COOKIE_KEY = "app.admin_cookie"
_STAFF_KEY = "app.admin_staff"

Endpoint = Callable[[Request], Awaitable[Response]]
StaffEndpoint = Callable[[Request, Staff], Awaitable[Response]]


@dataclass(frozen=True)
class PendingSignIn:
    """The password was right: which staff member, a nonce, and when (Unix time, app clock)."""

    staff_id: int
    nonce: str
    at: int


@dataclass
class AdminCookie:
    token: str | None = None
    csrf: str = ""
    pending: PendingSignIn | None = None
    had: bool = field(default=False, compare=False)  # the request carried one
    modified: bool = field(default=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name not in ("modified", "had"):
            object.__setattr__(self, "modified", True)

    @property
    def empty(self) -> bool:
        return not (self.token or self.csrf or self.pending)

    def restart(self) -> None:
        """A new cookie session: nothing of the old one (token, CSRF, pending step) survives."""
        self.token, self.pending, self.csrf = None, None, token()

    def dump(self) -> dict[str, Any]:
        p = self.pending
        return {"t": self.token, "c": self.csrf or None,
                "p": None if p is None else {"s": p.staff_id, "n": p.nonce, "at": p.at}}

    @classmethod
    def parse(cls, data: object) -> AdminCookie:
        """A verified payload; anything of the wrong shape is dropped, never trusted."""
        cookie = cls()
        if isinstance(data, dict):
            t, c, p = data.get("t"), data.get("c"), data.get("p")
            if isinstance(t, str) and t:
                cookie.token = t
            if isinstance(c, str) and c:
                cookie.csrf = c
            if isinstance(p, dict) and _int(p.get("s")) is not None and _int(p.get("at")) is not None \
                    and isinstance(p.get("n"), str):
                cookie.pending = PendingSignIn(p["s"], p["n"], p["at"])
        cookie.modified = False
        return cookie


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@lru_cache(maxsize=8)
def _serializer(keys: tuple[str, ...]) -> itsdangerous.URLSafeTimedSerializer:
    # itsdangerous signs with the last key and accepts any: SECRET_KEY last, fallbacks before it.
    return itsdangerous.URLSafeTimedSerializer(list(reversed(keys)), salt="admin-session",
                                               serializer_kwargs={"separators": (",", ":")})


def _keys(request: Request) -> tuple[str, ...]:
    settings = services(request).settings
    return (settings.secret_key, *settings.secret_key_fallbacks)


def cookie_name(request: Request) -> str:
    return name_for(services(request).settings)


def name_for(settings: Settings) -> str:
    """The admin cookie's name under these settings."""
    return SECURE_COOKIE if settings.is_production else COOKIE


def cookie_value(settings: Settings, cookie: AdminCookie) -> str:
    """The signed value of `cookie` (what with_cookie writes; tests build sessions with it)."""
    return _serializer((settings.secret_key, *settings.secret_key_fallbacks)).dumps(cookie.dump())


def admin_cookie(request: Request) -> AdminCookie:
    """This request's admin cookie, read and verified on first use."""
    found = request.scope.get(_COOKIE_KEY)
    if found is not None:
        return found  # type: ignore[no-any-return]
    raw = request.cookies.get(cookie_name(request))
    cookie = AdminCookie()
    if raw:
        try:
            cookie = AdminCookie.parse(_serializer(_keys(request)).loads(raw, max_age=ABSOLUTE_TIMEOUT))
        except (itsdangerous.BadData, ValueError):
            cookie.modified = True  # forged, garbled or too old: removed
        cookie.had = True
    request.scope[_COOKIE_KEY] = cookie
    return cookie


def with_cookie(request: Request, response: Response) -> Response:
    """Write the admin cookie on `response` when this request changed it."""
    cookie = request.scope.get(_COOKIE_KEY)
    if cookie is None or not cookie.modified:
        return response
    production = services(request).settings.is_production
    name = cookie_name(request)
    kwargs: dict[str, Any] = {"path": PATH, "httponly": True, "samesite": "strict", "secure": production}
    if not cookie.empty:
        response.set_cookie(name, cookie_value(services(request).settings, cookie), **kwargs)
    elif cookie.had:
        response.delete_cookie(name, **kwargs)
    cookie.modified = False
    return response


def staff_csrf(request: Request) -> str:
    """The console's CSRF token, created on first use."""
    cookie = admin_cookie(request)
    if not cookie.csrf:
        cookie.csrf = token()
    return cookie.csrf


async def current_staff(request: Request) -> Staff | None:
    """The signed-in staff member, checked against the database (once per request)."""
    if _STAFF_KEY in request.scope:
        cached: Staff | None = request.scope[_STAFF_KEY]
        return cached
    cookie = admin_cookie(request)
    staff = None
    if cookie.token:
        svc = services(request)
        staff = await sessions.load(svc.db, token=cookie.token, now=svc.clock.now())
        if staff is None:
            cookie.token = None  # ended (signed out, timed out, disabled): forget it
    request.scope[_STAFF_KEY] = staff
    return staff


# --- the sign-in steps' cookie -----------------------------------------------------------------


def start_pending(request: Request, staff_id: int, now: datetime) -> None:
    """The password was right: a new cookie session holding only the pending step."""
    cookie = admin_cookie(request)
    cookie.restart()
    cookie.pending = PendingSignIn(staff_id, token(), int(now.timestamp()))


def pending_staff_id(request: Request, now: datetime) -> int | None:
    """The staff member whose password was accepted less than PENDING_TTL ago, if any."""
    p = admin_cookie(request).pending
    if p is None or not 0 <= now.timestamp() - p.at < PENDING_TTL:
        return None
    return p.staff_id


def drop_pending(request: Request) -> None:
    cookie = admin_cookie(request)
    if cookie.pending is not None:
        cookie.pending = None


def signed_in(request: Request, session_token: str) -> None:
    """Both steps passed: a new cookie session (fresh CSRF token) carrying the session token."""
    cookie = admin_cookie(request)
    cookie.restart()
    cookie.token = session_token
    request.scope.pop(_STAFF_KEY, None)


def signed_out(request: Request) -> None:
    cookie = admin_cookie(request)
    cookie.token, cookie.pending, cookie.csrf = None, None, ""
    request.scope[_STAFF_KEY] = None


# --- answers -----------------------------------------------------------------------------------


def render_admin(request: Request, name: str, ctx: dict[str, Any] | None = None, *, status: int = 200,
                 headers: dict[str, str] | None = None, block: str = "main") -> Response:
    """A console page (or its `block` for htmx), with `staff` and `staff_csrf`, and the admin
    cookie written when it changed. The customer's cookie is left as it came."""
    context: dict[str, Any] = {"staff": request.scope.get(_STAFF_KEY), "staff_csrf": staff_csrf(request)}
    context.update(ctx or {})
    # render() asks for the customer's CSRF token, which would start a customer cookie (path /)
    # on a console page: put that cookie back as it was.
    customer = cookie_of(request)
    had_csrf, was_modified = customer.csrf, customer.modified
    response = render(request, name, context, status=status, headers=headers, block=block)
    if not had_csrf and customer.csrf:
        customer.csrf = ""
        customer.modified = was_modified
    return with_cookie(request, response)


def redirect(request: Request, url: str, *, full: bool = False) -> Response:
    """303 without JavaScript; for htmx a 200 with HX-Location (swap #main), or with HX-Redirect
    when `full` (the page's header changes: signed in or out). The admin cookie goes with it."""
    if wants_fragment(request):
        if full:
            response = Response(status_code=200, headers={"HX-Redirect": url})
        else:
            response = Response(status_code=200, headers={
                "HX-Location": json.dumps({"path": url, "target": "#main", "swap": "innerHTML"})})
    else:
        response = RedirectResponse(url, status_code=303)
    return with_cookie(request, response)


def refused(request: Request, reason: str, *, status: int = 403, headers: dict[str, str] | None = None,
            **ctx: Any) -> Response:
    """admin/refused.html: reason "role" (signed in without the role), "foreign" (from another
    site), "ended" (not this session's CSRF token), "busy" (rate limited)."""
    return render_admin(request, "admin/refused.html", {"reason": reason, **ctx}, status=status, headers=headers)


async def _token_sent(request: Request) -> bool:
    """The form field csrf_token or the X-CSRF-Token header matches the console's token."""
    return await token_sent(request, admin_cookie(request).csrf)


async def _limited(request: Request) -> Response | None:
    wait = await services(request).limiter.hit(LIMIT_SCOPE, client_of(request).ip)
    if wait:
        return refused(request, "busy", status=429, headers={"Retry-After": str(wait)}, retry_after=wait)
    return None


def _to_login(request: Request) -> Response:
    return redirect(request, LOGIN, full=True)


# --- guards ------------------------------------------------------------------------------------


def staff_page(role: Role) -> Callable[[StaffEndpoint], Endpoint]:
    """For GET endpoints `async def endpoint(request, staff)`: signed out -> the sign-in page;
    signed in without `role` -> 403."""

    def decorate(endpoint: StaffEndpoint) -> Endpoint:
        @wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            staff = await current_staff(request)
            if staff is None:
                return _to_login(request)
            if not staff.role.may(role):
                return refused(request, "role")
            return await endpoint(request, staff)

        wrapper.staff_role = role  # type: ignore[attr-defined]
        return wrapper

    return decorate


def staff_action(role: Role) -> Callable[[StaffEndpoint], Endpoint]:
    """For state-changing endpoints: the request must come from this site; signed out -> the
    sign-in page (the endpoint never runs: there is nothing a stale tab could change); without
    `role` -> 403; without the console's CSRF token -> 403; then the per-address limit."""

    def decorate(endpoint: StaffEndpoint) -> Endpoint:
        @wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            if not same_origin(request):
                return refused(request, "foreign")
            staff = await current_staff(request)
            if staff is None:
                return _to_login(request)
            if not staff.role.may(role):
                return refused(request, "role")
            if not await _token_sent(request):
                return refused(request, "ended")
            if (busy := await _limited(request)) is not None:
                return busy
            return await endpoint(request, staff)

        wrapper.csrf_protected = True  # type: ignore[attr-defined]
        wrapper.staff_role = role  # type: ignore[attr-defined]
        return wrapper

    return decorate


def console_form(endpoint: Endpoint) -> Endpoint:
    """The sign-in and set-up forms (nobody signed in yet): from this site, with the console's
    CSRF token, within the per-address limit."""

    @wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        if not same_origin(request):
            return refused(request, "foreign")
        if not await _token_sent(request):
            return refused(request, "ended")
        if (busy := await _limited(request)) is not None:
            return busy
        return await endpoint(request)

    wrapper.csrf_protected = True  # type: ignore[attr-defined]
    return wrapper


def staff_signing_out(endpoint: StaffEndpoint) -> Endpoint:
    """Sign-out: from this site; never rate limited; a session that already ended is simply
    signed out (nothing left to end); a live one ends only with its CSRF token."""

    @wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        if not same_origin(request):
            return refused(request, "foreign")
        staff = await current_staff(request)
        if staff is None:
            signed_out(request)
            return redirect(request, f"{LOGIN}?signed_out=1", full=True)
        if not await _token_sent(request):
            return refused(request, "ended")
        return await endpoint(request, staff)

    wrapper.csrf_protected = True  # type: ignore[attr-defined]
    wrapper.staff_role = Role.VIEWER  # type: ignore[attr-defined]
    return wrapper

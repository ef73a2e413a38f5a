"""The cookie side of sessions: ids only (the pending step, or the signed-in session's token),
a fresh cookie session on every privilege change, and the server-side check on every request."""

from __future__ import annotations

from starlette.requests import Request

from app.auth import queries
from app.auth.flows import SignedIn, Step
from app.auth.queries import Customer, SessionRow
from app.otp import Purpose
from app.security.crypto import sha256_hex, token
from app.web.request import services
from app.web.session import Pending, cookie_of

TOUCH_EVERY = 60  # seconds between last-seen writes, so reads stay reads


def start_pending(request: Request, step: Step) -> None:
    """A form was accepted: a new cookie session that holds only the pending step."""
    cookie = cookie_of(request)
    cookie.clear()
    cookie.csrf = token()
    owner = step.owner or (None, None)
    cookie.pending = Pending(step.challenge_id, step.nonce, step.purpose.value, owner[0], owner[1])


def start_side_step(request: Request, step: Step) -> None:
    """A code step inside a signed-in session (a new address, a deletion): the session stays."""
    cookie_of(request).pending = Pending(step.challenge_id, step.nonce, step.purpose.value)


def pending_step(request: Request) -> Step | None:
    p = cookie_of(request).pending
    if p is None:
        return None
    try:
        purpose = Purpose(p.purpose)
    except ValueError:
        return None
    return Step(p.challenge_id, p.nonce, purpose, p.owner)


def set_pending_challenge(request: Request, challenge_id: int) -> None:
    cookie = cookie_of(request)
    p = cookie.pending
    if p is not None:
        cookie.pending = Pending(challenge_id, p.nonce, p.purpose, p.customer_id, p.session_version)
        cookie.notice = None


def drop_pending(request: Request) -> None:
    cookie = cookie_of(request)
    if cookie.pending is not None:
        cookie.pending = None


def signed_in(request: Request, signed: SignedIn) -> None:
    """A new cookie session that carries the new session row's token."""
    cookie = cookie_of(request)
    cookie.clear()
    cookie.csrf = token()
    cookie.session_token, cookie.customer_id, cookie.auth_time = signed.token, signed.customer_id, signed.auth_time


async def current(request: Request) -> tuple[SessionRow, Customer] | None:
    """The signed-in customer, checked against the database on every request."""
    if hasattr(request.state, "signed_in"):
        cached: tuple[SessionRow, Customer] | None = request.state.signed_in
        return cached
    result = None
    cookie = cookie_of(request)
    if cookie.session_token:
        svc = services(request)
        now = svc.clock.now()
        result = await queries.load_session(
            svc.db,
            session_hash=sha256_hex(cookie.session_token),
            now=now,
            idle=svc.settings.session_idle_timeout,
            absolute=svc.settings.session_absolute_timeout,
        )
        if result is None:
            cookie.session_token = cookie.customer_id = cookie.auth_time = None
        elif (now - result[0].last_seen_at).total_seconds() >= TOUCH_EVERY:
            await queries.touch_session(svc.db, result[0].id, now)
    request.state.signed_in = result
    return result

"""The cookie side of sessions: ids only (pending challenge + nonce, or the signed-in
session's token), a fresh session on every privilege change, and the server-side check."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from app.auth import queries
from app.auth.queries import Customer, SessionRow
from app.security import sha256_hex, token
from app.services import services

TOUCH_EVERY = 60  # seconds between last-seen writes, so reads stay reads


def start_pending(request: Request, *, challenge_id: int, nonce: str, owner: tuple[int, int] | None = None) -> None:
    """Password (or registration form) accepted: a new session that holds only the pending step.

    `owner` (customer id, session version) is given only after a password was proven: it lets
    a right code sign in with one guarded UPDATE (otp.use_code). Never after a registration
    form, where it would tell a new account from an existing address."""
    request.session.clear()
    request.session["csrf"] = token()
    request.session["pending"] = {"c": challenge_id, "n": nonce}
    if owner is not None:
        request.session["pending"].update(u=owner[0], v=owner[1])


def pending_owner(p: dict[str, Any]) -> tuple[int, int] | None:
    u, v = p.get("u"), p.get("v")
    return (u, v) if isinstance(u, int) and isinstance(v, int) else None


def pending(request: Request) -> dict[str, Any] | None:
    value = request.session.get("pending")
    if isinstance(value, dict) and isinstance(value.get("c"), int) and isinstance(value.get("n"), str):
        return value
    return None


def set_pending_challenge(request: Request, challenge_id: int) -> None:
    p = pending(request)
    if p is not None:
        request.session["pending"] = {**p, "c": challenge_id}
        request.session.pop("notice", None)


async def sign_in(request: Request, customer_id: int, session_version: int, *, ip: str, user_agent: str) -> None:
    """A new session row and a new cookie session that carries its token."""
    svc = services(request)
    sid = token()
    now = svc.clock.now()
    await queries.create_session(
        svc.db,
        session_hash=sha256_hex(sid),
        customer_id=customer_id,
        version=session_version,
        ip=ip,
        user_agent=user_agent,
        now=now,
    )
    request.session.clear()
    request.session["csrf"] = token()
    request.session["sid"] = sid
    request.session["cid"] = customer_id  # lets sign-out end the row in one guarded UPDATE
    request.session["at"] = int(now.timestamp())


async def end(request: Request) -> int | None:
    """Sign out this session: its row revoked (one guarded UPDATE), the cookie cleared.
    Returns the customer's id when a live session was ended."""
    sid, cid = request.session.get("sid"), request.session.get("cid")
    ended = None
    if isinstance(sid, str) and isinstance(cid, int):
        svc = services(request)
        if await queries.revoke_session(svc.db, sha256_hex(sid), cid, svc.clock.now()):
            ended = cid
    request.session.clear()
    return ended


async def current(request: Request) -> tuple[SessionRow, Customer] | None:
    """The signed-in customer, checked against the database on every request."""
    if hasattr(request.state, "signed_in"):
        cached: tuple[SessionRow, Customer] | None = request.state.signed_in
        return cached
    result = None
    sid = request.session.get("sid")
    if isinstance(sid, str):
        svc = services(request)
        now = svc.clock.now()
        result = await queries.load_session(
            svc.db,
            session_hash=sha256_hex(sid),
            now=now,
            idle=svc.settings.session_idle_timeout,
            absolute=svc.settings.session_absolute_timeout,
        )
        if result is None:
            request.session.pop("sid", None)
        elif (now - result[0].last_seen_at).total_seconds() >= TOUCH_EVERY:
            await queries.touch_session(svc.db, result[0].id, now)
    request.state.signed_in = result
    return result

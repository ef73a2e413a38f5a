"""Register, sign in, the code step, resend, sign out. Thin: validation in forms.py, rules in
app/otp, SQL in queries.py; endpoints do the I/O and choose page or fragment."""

from __future__ import annotations

import math
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from functools import wraps
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app import audit, otp
from app.auth import forms, queries, sessions
from app.auth.queries import Customer
from app.database import INTEGRITY_ERRORS, transact
from app.htmx import redirect, wants_fragment
from app.mail import outbox
from app.security import check_password, csrf_ok, hash_password, sha256_hex
from app.services import Services, ip_of, services, ua_of
from app.templating import render

Endpoint = Callable[[Request], Awaitable[Response]]


# --- guards ------------------------------------------------------------------------------


def guarded(scope: str | None) -> Callable[[Endpoint], Endpoint]:
    """CSRF and Origin check, then the per-address rate limit of `scope`, before the endpoint
    runs. `csrf_only` (scope None) is for sign-out alone."""

    def decorate(endpoint: Endpoint) -> Endpoint:
        @wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            svc = services(request)
            if not await csrf_ok(request, svc.settings.trusted_proxies):
                return render(request, "errors/403.html", status=403)
            wait = await svc.limiter.hit(scope, ip_of(request)) if scope else 0
            if wait:
                return render(
                    request, "errors/429.html", {"retry_after": wait}, status=429, headers={"Retry-After": str(wait)}
                )
            return await endpoint(request)

        wrapper.csrf_protected = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


# Signing out is never rate limited: customers behind one address (a library, an office)
# share its per-address budget, and a 429 here would leave a session open on a shared
# computer. Without a live session it touches nothing; with a stale one it costs one
# indexed statement, no more than any signed-in page with that cookie.
csrf_only = guarded(None)


def one_connection(endpoint: Endpoint) -> Endpoint:
    """Run the endpoint's statements on one pooled connection (taken once, not per statement).
    Not for endpoints that hash a password: the pool must not wait on Argon2."""

    @wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        async with services(request).db.connection():
            return await endpoint(request)

    return wrapper


def minutes(seconds: int) -> int:
    return max(1, math.ceil(seconds / 60))


# --- registration ------------------------------------------------------------------------


async def register_form(request: Request) -> Response:
    return render(request, "auth/register.html", {"form": forms.Form()})


@guarded("register")
async def register_submit(request: Request) -> Response:
    svc = services(request)
    form = forms.registration(dict(await request.form()))
    if not form.ok:
        return render(request, "auth/register.html", {"form": form}, status=422)
    data = await request.form()
    password_hash = await hash_password(str(data["password"]))  # paid whatever happens next
    email, username = form.values["email"], form.values["username"]
    now, nonce = svc.clock.now(), secrets.token_urlsafe(24)
    sent_to = forms.mask_email(email)
    ip, ua = ip_of(request), ua_of(request)

    by_email, by_username = await queries.find_conflict(svc.db, email=email, username=username)
    challenge_id: int | None = None
    if (
        by_email is not None and by_email.email_verified_at is None
        and (by_username is None or by_username.id == by_email.id)
        and await queries.reset_unverified(svc.db, by_email.id, username=username,
                                           full_name=form.values["full_name"], password_hash=password_hash)
    ):
        # Nobody ever proved this address: whoever registers it now starts over, and the
        # code goes to the mailbox, so only its owner can finish. No squatting on addresses.
        customer = await queries.get_customer(svc.db, by_email.id)
        assert customer is not None
        challenge_id = await _send_code(svc, customer, purpose=otp.Purpose.REGISTRATION, nonce=nonce, ip=ip, ua=ua)
    elif by_email is None and by_username is None:
        try:
            async def create() -> tuple[int, tuple[otp.Issued, outbox.Queued]]:
                customer_id = await queries.create_customer(
                    svc.db, username=username, email=email, full_name=form.values["full_name"],
                    password_hash=password_hash, now=now,
                )
                return customer_id, await _issue_code(
                    svc, customer_id=customer_id, email=email, name=form.values["full_name"],
                    purpose=otp.Purpose.REGISTRATION, nonce=nonce, sent_to=sent_to, now=now,
                )

            customer_id, (issued, queued) = await transact(svc.db, create)
            challenge_id = issued.challenge_id
            _dispatch(svc, queued)
            await audit.record(svc.db, "registered", "code_sent", customer_id=customer_id, ip=ip, user_agent=ua, now=now)
        except INTEGRITY_ERRORS:
            # A double submit or a race with another registration: answered like any duplicate.
            by_email, by_username = await queries.find_conflict(svc.db, email=email, username=username)
    if challenge_id is None:
        challenge_id = await _decoy(svc, email=email, by_email=by_email, by_username=by_username,
                                    nonce=nonce, sent_to=sent_to, username=username)
    sessions.start_pending(request, challenge_id=challenge_id, nonce=nonce)
    return await _code_step_after_post(request)


async def _decoy(
    svc: Services, *, email: str, by_email: Customer | None, by_username: Customer | None,
    nonce: str, sent_to: str, username: str,
) -> int:
    """The address or username exists: the same visible answer as a new account, and a
    notice to the address instead of a code (at most one per cooldown per owner)."""
    now = svc.clock.now()
    owner = by_email
    challenge_id = await otp.stand_in(
        svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=owner.id if owner else None,
        purpose=otp.Purpose.REGISTRATION, nonce=nonce, sent_to=sent_to, kind=otp.DECOY,
    )
    if owner is not None:
        await _notify_owner(svc, owner, challenge_id=challenge_id, now=now)
    elif not await outbox.sent_recently(svc.db, recipient=email, kinds=NOTICES, since=_cooldown_start(svc, now)):
        await outbox.enqueue(
            svc.db, svc.sealer, kind="username_taken", recipient=email, now=now,
            challenge_id=challenge_id, context={"username": username},
        )
    svc.mailer.notify()
    return challenge_id


NOTICES = ("account_exists", "username_taken")


def _cooldown_start(svc: Services, now: datetime) -> datetime:
    return now - timedelta(seconds=svc.policy.resend_cooldown)


async def _notify_owner(svc: Services, owner: Customer, *, challenge_id: int, now: datetime) -> None:
    """Tell the owner someone tried to register their address: at most once per cooldown."""
    if await outbox.sent_recently(svc.db, recipient=owner.email, kinds=NOTICES, since=_cooldown_start(svc, now)):
        return
    await outbox.enqueue(
        svc.db, svc.sealer, kind="account_exists", recipient=owner.email, now=now, customer_id=owner.id,
        challenge_id=challenge_id,
        context={"name": owner.full_name or owner.username or "", "username": owner.username or ""},
    )
    svc.mailer.notify()


# --- sign-in -----------------------------------------------------------------------------


async def login_form(request: Request) -> Response:
    return render(request, "auth/login.html", {"form": forms.Form()})


@guarded("login")
async def login_submit(request: Request) -> Response:
    svc = services(request)
    data = dict(await request.form())
    form = forms.login(data)
    if not form.ok:
        return render(request, "auth/login.html", {"form": form}, status=422)
    ip, ua = ip_of(request), ua_of(request)
    # Per account as well as per address: guessing one customer's password from many
    # addresses meets the same limit. Answered like a wrong password, so it tells nothing.
    if await svc.limiter.hit_account("login-account", sha256_hex(form.values["login"].lower())):
        form.errors["form"] = "That username or email and password do not match an account."
        await audit.record(svc.db, "password_failed", customer_id=None, ip=ip, user_agent=ua, now=svc.clock.now())
        return render(request, "auth/login.html", {"form": form}, status=422)
    customer = await queries.find_customer(svc.db, login=form.values["login"])
    ok, rehash = await check_password(customer.password_hash if customer else None, str(data["password"]))
    async with svc.db.connection():  # the hash is done: one connection for the rest
        now = svc.clock.now()
        if not ok or customer is None:
            await audit.record(svc.db, "password_failed", customer_id=customer.id if customer else None,
                               ip=ip, user_agent=ua, now=now)
            form.errors["form"] = "That username or email and password do not match an account."
            return render(request, "auth/login.html", {"form": form}, status=422)
        if rehash:
            await queries.set_password_hash(svc.db, customer.id, await hash_password(str(data["password"])))

        if customer.email_verified_at is not None and not customer.otp_enabled:
            await sessions.sign_in(request, customer.id, customer.session_version, ip=ip, user_agent=ua)
            await audit.record(svc.db, "signed_in", customer_id=customer.id, ip=ip, user_agent=ua, now=now)
            return redirect(request, "/dashboard")

        purpose = otp.Purpose.REGISTRATION if customer.email_verified_at is None else otp.Purpose.LOGIN
        nonce = secrets.token_urlsafe(24)
        challenge_id = await _send_code(svc, customer, purpose=purpose, nonce=nonce, ip=ip, ua=ua)
        # The owner lets a right code go the one-UPDATE way; a registration code (an address
        # not yet proven) takes the full path, which also marks the address verified.
        owner = (customer.id, customer.session_version) if purpose is otp.Purpose.LOGIN else None
        sessions.start_pending(request, challenge_id=challenge_id, nonce=nonce, owner=owner)
        return await _code_step_after_post(request)


async def _issue_code(
    svc: Services, *, customer_id: int, email: str, name: str, purpose: otp.Purpose, nonce: str, sent_to: str,
    now: datetime,
) -> tuple[otp.Issued, outbox.Queued]:
    """A new code and its mail, queued together (call inside a transaction; then _dispatch)."""
    issued = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer_id,
                             purpose=purpose, nonce=nonce, sent_to=sent_to)
    queued = await outbox.enqueue(
        svc.db, svc.sealer, now=now, recipient=email, customer_id=customer_id,
        kind="registration_code" if purpose is otp.Purpose.REGISTRATION else "login_code",
        challenge_id=issued.challenge_id, expires_at=issued.expires_at,
        context={"name": name, "code": issued.code, "minutes": minutes(svc.policy.ttl(purpose))},
        claim=svc.mailer.has_room(),
    )
    return issued, queued


def _dispatch(svc: Services, queued: outbox.Queued) -> None:
    """After the commit: send a mail this process claimed, or wake the dispatcher."""
    if queued.tries:
        svc.mailer.hand(queued)
    else:
        svc.mailer.notify()


async def _send_code(svc: Services, customer: Customer, *, purpose: otp.Purpose, nonce: str, ip: str, ua: str) -> int:
    """Issue and queue a code; inside the cooldown, hand over the open one or a placeholder."""
    now = svc.clock.now()
    sent_to = forms.mask_email(customer.email)
    try:
        issued, queued = await transact(svc.db, lambda: _issue_code(
            svc, customer_id=customer.id, email=customer.email, name=customer.full_name or customer.username or "",
            purpose=purpose, nonce=nonce, sent_to=sent_to, now=now,
        ))
    except otp.Cooldown:
        reused = await otp.rebind_open(svc.db, keys=svc.keys, customer_id=customer.id, purpose=purpose,
                                       nonce=nonce, now=now)
        if reused is not None:
            return reused
        return await otp.stand_in(
            svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer.id,
            purpose=purpose, nonce=nonce, sent_to=sent_to, kind=otp.PLACEHOLDER,
        )
    _dispatch(svc, queued)
    await audit.record(svc.db, "code_sent", customer_id=customer.id, ip=ip, user_agent=ua, now=now)
    return issued.challenge_id


# --- the code step -----------------------------------------------------------------------


async def _load(request: Request) -> otp.Challenge | None:
    p = sessions.pending(request)
    if p is None:
        return None
    svc = services(request)
    return await otp.load_challenge(svc.db, keys=svc.keys, challenge_id=p["c"], nonce=p["n"])


async def _step_context(request: Request, challenge: otp.Challenge, **extra: Any) -> dict[str, Any]:
    svc = services(request)
    now = svc.clock.now()
    wait = challenge.resend_wait(svc.policy, now)
    locked = challenge.locked_until if challenge.locked_until and challenge.locked_until > now else None
    state = challenge.delivery if challenge.kind != otp.PLACEHOLDER else None
    if challenge.kind == otp.DECOY and state is None:
        state = outbox.SENT  # no mail went out (cooldown): shaped like a sent one
    ctx: dict[str, Any] = {
        "challenge": challenge,
        "sent_to": challenge.sent_to,
        "purpose": challenge.purpose.value,
        "resend_wait": wait,
        "asked_at": challenge.created_at,
        "expires_at": challenge.expires_at,
        "expired": challenge.expires_at <= now,
        "locked_until": locked,
        "delivery": state,
        "placeholder": challenge.kind == otp.PLACEHOLDER,
        "error": None,
        "notice": None,
        "announce": False,
    }
    ctx.update(extra)
    return ctx


async def _code_step_after_post(request: Request) -> Response:
    """After register or sign-in: htmx gets the code step in place, a plain browser a 303."""
    if not wants_fragment(request):
        return redirect(request, "/verify")
    challenge = await _load(request)
    assert challenge is not None
    ctx = await _step_context(request, challenge, announce=True)
    return render(request, "auth/verify.html", ctx, headers={"HX-Push-Url": "/verify"})


@one_connection
async def verify_form(request: Request) -> Response:
    challenge = await _load(request)
    if challenge is None or challenge.used_at is not None:
        request.session.pop("pending", None)
        return redirect(request, "/login")
    notice = RESENT if request.session.pop("notice", None) == "resent" else None
    return render(request, "auth/verify.html", await _step_context(request, challenge, notice=notice))


RESENT = "A new code is on its way. Earlier codes no longer work."
MESSAGES = {
    "invalid": "This code has been replaced by a newer one or already used. Use the newest code, or request a new one.",
    "dead": "Too many wrong entries for this code. Request a new code.",
    "expired": "This code has expired. Request a new one.",
}


@guarded("verify")
@one_connection
async def verify_submit(request: Request) -> Response:
    svc = services(request)
    p = sessions.pending(request)
    if p is None:
        return redirect(request, "/login")
    code, problem = forms.code(dict(await request.form()))
    owner = sessions.pending_owner(p)
    if code is not None and owner is not None and await otp.use_code(
        svc.db, keys=svc.keys, policy=svc.policy, now=svc.clock.now(), challenge_id=p["c"], nonce=p["n"],
        customer_id=owner[0], code=code,
    ):
        return await _signed_in(request, owner[0], owner[1], registration=False)
    # Anything but a right code on the sign-in path: the whole challenge decides.
    challenge = await _load(request)
    if challenge is None or challenge.used_at is not None:
        request.session.pop("pending", None)
        return redirect(request, "/login")
    if code is None:
        ctx = await _step_context(request, challenge, error=problem)
        return render(request, "auth/verify.html", ctx, status=422)
    verdict = await otp.verify(svc.db, keys=svc.keys, policy=svc.policy, now=svc.clock.now(), challenge=challenge,
                               code=code)
    ip, ua, now = ip_of(request), ua_of(request), svc.clock.now()
    if verdict.status == "verified" and verdict.customer_id is not None:
        return await _signed_in(request, verdict.customer_id, challenge.session_version,
                                registration=verdict.purpose is otp.Purpose.REGISTRATION)

    if challenge.kind != otp.DECOY and challenge.customer_id is not None and verdict.status in ("wrong", "locked"):
        await audit.record(svc.db, "code_failed", customer_id=challenge.customer_id, ip=ip, user_agent=ua, now=now)
        if verdict.status == "locked" and verdict.customer_id is not None:
            await audit.record(svc.db, "locked", customer_id=challenge.customer_id, ip=ip, user_agent=ua, now=now)
    if verdict.status == "wrong":
        left = verdict.attempts_left
        error = f"That code is not right. {left} {'attempt' if left == 1 else 'attempts'} left."
    elif verdict.status == "locked":
        error = "Too many wrong codes. For your safety, codes are paused until the time below."
    else:
        error = MESSAGES[verdict.status]
    fresh = await _load(request)
    ctx = await _step_context(request, fresh or challenge, error=error)
    if verdict.status == "locked":
        ctx["locked_until"] = verdict.locked_until
    return render(request, "auth/verify.html", ctx, status=422)


async def _signed_in(request: Request, customer_id: int, session_version: int, *, registration: bool) -> Response:
    """A right code was used: the address is proven, a signed-in session starts."""
    svc = services(request)
    ip, ua, now = ip_of(request), ua_of(request), svc.clock.now()
    if registration:
        await queries.mark_verified(svc.db, customer_id, now)
    try:
        await sessions.sign_in(request, customer_id, session_version, ip=ip, user_agent=ua)
    except INTEGRITY_ERRORS:  # the customer was deleted while the code was on its way
        request.session.clear()
        return redirect(request, "/login")
    await audit.record(svc.db, "verified", "signed_in", customer_id=customer_id, ip=ip, user_agent=ua, now=now)
    return redirect(request, "/dashboard")


@guarded("resend")
@one_connection
async def resend(request: Request) -> Response:
    svc = services(request)
    challenge = await _load(request)
    p = sessions.pending(request)
    if challenge is None or p is None or challenge.used_at is not None:
        request.session.pop("pending", None)  # a finished step is not a way back in
        return redirect(request, "/login")
    now, ip, ua = svc.clock.now(), ip_of(request), ua_of(request)
    if challenge.locked_until and challenge.locked_until > now:
        ctx = await _step_context(request, challenge, error="Codes are paused until the time below.")
        return render(request, "auth/verify.html", ctx, status=422)

    if challenge.kind == otp.DECOY:
        wait = challenge.resend_wait(svc.policy, now)
        if wait:
            return await _cooldown(request, challenge, wait)
        owner = await queries.get_customer(svc.db, challenge.customer_id) if challenge.customer_id else None
        new_id = await otp.stand_in(
            svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=challenge.customer_id,
            purpose=challenge.purpose, nonce=p["n"], sent_to=challenge.sent_to, kind=otp.DECOY, carry=challenge,
        )
        if owner is not None:
            await _notify_owner(svc, owner, challenge_id=new_id, now=now)
    else:
        assert challenge.customer_id is not None
        customer = await queries.get_customer(svc.db, challenge.customer_id)
        assert customer is not None
        try:
            issued, queued = await transact(svc.db, lambda: _issue_code(
                svc, customer_id=customer.id, email=customer.email,
                name=customer.full_name or customer.username or "", purpose=challenge.purpose, nonce=p["n"],
                sent_to=challenge.sent_to, now=now,
            ))
        except otp.Cooldown as exc:
            await audit.record(svc.db, "resend_refused", customer_id=customer.id, ip=ip, user_agent=ua, now=now)
            return await _cooldown(request, challenge, exc.retry_after)
        _dispatch(svc, queued)
        await audit.record(svc.db, "code_sent", customer_id=customer.id, ip=ip, user_agent=ua, now=now)
        new_id = issued.challenge_id
    sessions.set_pending_challenge(request, new_id)
    if not wants_fragment(request):
        request.session["notice"] = "resent"  # shown once by the next GET /verify
        return redirect(request, "/verify")
    fresh = await _load(request)
    assert fresh is not None
    ctx = await _step_context(request, fresh, notice=RESENT, announce=True)
    return render(request, "auth/verify.html", ctx)


async def _cooldown(request: Request, challenge: otp.Challenge, wait: int) -> Response:
    ctx = await _step_context(request, challenge, resend_wait=wait,
                              error=f"Please wait {wait} seconds before asking for another code.")
    return render(request, "auth/verify.html", ctx, status=429, headers={"Retry-After": str(wait)})


@one_connection
async def delivery(request: Request) -> Response:
    """The mail's delivery state, polled by the code step while it is not final."""
    challenge = await _load(request)
    if challenge is None:
        return Response(status_code=204)
    ctx = await _step_context(request, challenge)
    return render(request, "auth/verify.html", ctx, block="delivery", fragment=True)


# --- sign-out ----------------------------------------------------------------------------


@csrf_only
@one_connection
async def logout(request: Request) -> Response:
    svc = services(request)
    customer_id = await sessions.end(request)
    if customer_id is not None:
        await audit.record(svc.db, "signed_out", customer_id=customer_id, ip=ip_of(request),
                           user_agent=ua_of(request), now=svc.clock.now())
    return redirect(request, "/login?signed_out=1")


@csrf_only
@one_connection
async def logout_everywhere(request: Request) -> Response:
    svc = services(request)
    signed = await sessions.current(request)
    if signed is not None:
        now = svc.clock.now()
        await queries.revoke_all(svc.db, signed[1].id, now)
        await audit.record(svc.db, "session_revoked", customer_id=signed[1].id, ip=ip_of(request),
                           user_agent=ua_of(request), now=now)
    request.session.clear()
    return redirect(request, "/login?signed_out=all")


routes = [
    Route("/register", register_form, methods=["GET"], name="auth:register"),
    Route("/register", register_submit, methods=["POST"], name="auth:register_submit"),
    Route("/login", login_form, methods=["GET"], name="auth:login"),
    Route("/login", login_submit, methods=["POST"], name="auth:login_submit"),
    Route("/verify", verify_form, methods=["GET"], name="auth:verify"),
    Route("/verify", verify_submit, methods=["POST"], name="auth:verify_submit"),
    Route("/verify/resend", resend, methods=["POST"], name="auth:resend"),
    Route("/verify/delivery", delivery, methods=["GET"], name="auth:delivery"),
    Route("/logout", logout, methods=["POST"], name="auth:logout"),
    Route("/logout/everywhere", logout_everywhere, methods=["POST"], name="auth:logout_everywhere"),
]

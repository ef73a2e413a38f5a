"""Register, sign in, the code step, resend, sign out. Thin: each endpoint parses the form
(forms.py), calls one use case (flows.py), and renders a page or a fragment."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app import otp
from app.auth import flows, forms, sessions
from app.auth.flows import SignedIn, Step
from app.htmx import redirect, wants_fragment
from app.mail.outbox import MailStatus
from app.otp import Kind, Outcome
from app.templating import render
from app.web.guards import csrf_only, guarded, one_connection
from app.web.request import client_of, services
from app.web.session import cookie_of

WRONG_LOGIN = "That username or email and password do not match an account."
# The step says "Sending your code…" this long after a challenge is made, whatever its mail's
# state: a decoy that shows the state of a notice sent earlier reads exactly like a new code.
SHOWN_PENDING_FOR = 1.5
MAIL_DELAYED_AFTER = 15


# --- registration ------------------------------------------------------------------------


async def register_form(request: Request) -> Response:
    return render(request, "auth/register.html", {"form": forms.Form()})


@guarded("register")
async def register_submit(request: Request) -> Response:
    data = dict(await request.form())
    form = forms.registration(data)
    if not form.ok:
        return render(request, "auth/register.html", {"form": form}, status=422)
    seed = cookie_of(request).csrf  # the guard checked it: the same form sent twice shares it
    step = await flows.register(
        services(request), client_of(request), full_name=form.values["full_name"], username=form.values["username"],
        email=form.values["email"], password=str(data["password"]), seed=seed,
    )
    sessions.start_pending(request, step)
    return await _code_step_after_post(request, step)


# --- sign-in -----------------------------------------------------------------------------


async def login_form(request: Request) -> Response:
    return render(request, "auth/login.html", {"form": forms.Form()})


@guarded("login")
async def login_submit(request: Request) -> Response:
    data = dict(await request.form())
    form = forms.login(data)
    if not form.ok:
        return render(request, "auth/login.html", {"form": form}, status=422)
    result = await flows.sign_in(services(request), client_of(request), login=form.values["login"],
                                 password=str(data["password"]))
    if result is None:
        form.errors["form"] = WRONG_LOGIN
        return render(request, "auth/login.html", {"form": form}, status=422)
    if isinstance(result, SignedIn):
        sessions.signed_in(request, result)
        return redirect(request, "/dashboard")
    sessions.start_pending(request, result)
    async with services(request).db.connection():
        return await _code_step_after_post(request, result)


# --- the code step -----------------------------------------------------------------------


def _step_context(request: Request, challenge: otp.Challenge, **extra: Any) -> dict[str, Any]:
    svc = services(request)
    now = svc.clock.now()
    wait = challenge.resend_wait(svc.policy, now)
    locked = challenge.locked_until if challenge.locked_until and challenge.locked_until > now else None
    state = challenge.delivery if challenge.kind is not Kind.PLACEHOLDER else None
    if challenge.kind is Kind.DECOY and state is None:
        state = MailStatus.SENT.value  # no mail to show: shaped like a sent one
    age = (now - challenge.created_at).total_seconds()
    if age < SHOWN_PENDING_FOR and state in (MailStatus.QUEUED, MailStatus.SENDING, MailStatus.SENT):
        state = MailStatus.SENDING.value
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
        # Still not out after this long: say so, and what to do (the mail server may be down).
        "delayed": state in (MailStatus.QUEUED, MailStatus.SENDING) and age >= MAIL_DELAYED_AFTER,
        "placeholder": challenge.kind is Kind.PLACEHOLDER,
        "error": None,
        "notice": None,
        "announce": False,
    }
    ctx.update(extra)
    return ctx


async def _code_step_after_post(request: Request, step: Step) -> Response:
    """After register or sign-in: htmx gets the code step in place, a plain browser a 303."""
    if not wants_fragment(request):
        return redirect(request, "/verify")
    challenge = await flows.load(services(request), step)
    assert challenge is not None
    return render(request, "auth/verify.html", _step_context(request, challenge, announce=True),
                  headers={"HX-Push-Url": "/verify"})


def _gone(request: Request) -> Response:
    """The pending step is finished or was never there: a finished step is not a way back in."""
    sessions.drop_pending(request)
    return redirect(request, "/login")


@one_connection
async def verify_form(request: Request) -> Response:
    step = sessions.pending_step(request)
    challenge = await flows.load(services(request), step) if step else None
    if challenge is None or challenge.used_at is not None:
        return _gone(request)
    cookie = cookie_of(request)
    notice = RESENT if cookie.notice == "resent" else None
    if cookie.notice:
        cookie.notice = None  # shown once
    return render(request, "auth/verify.html", _step_context(request, challenge, notice=notice))


RESENT = "A new code is on its way. Earlier codes no longer work."
MESSAGES = {
    Outcome.INVALID: "This code has been replaced by a newer one or already used. Use the newest code, or request a new one.",
    Outcome.DEAD: "Too many wrong entries for this code. Request a new code.",
    Outcome.EXPIRED: "This code has expired. Request a new one.",
}


@guarded("verify")
@one_connection
async def verify_submit(request: Request) -> Response:
    step = sessions.pending_step(request)
    if step is None:
        return redirect(request, "/login")
    code, problem = forms.code(dict(await request.form()))
    result = await flows.submit_code(services(request), client_of(request), step, code, problem)
    if result.signed_in is not None:
        sessions.signed_in(request, result.signed_in)
        return redirect(request, "/dashboard")
    if result.challenge is None:
        return _gone(request)
    verdict = result.verdict
    if verdict is None:
        return render(request, "auth/verify.html", _step_context(request, result.challenge, error=result.problem),
                      status=422)
    if verdict.status is Outcome.WRONG:
        left = verdict.attempts_left
        error = f"That code is not right. {left} {'attempt' if left == 1 else 'attempts'} left."
    elif verdict.status is Outcome.LOCKED:
        error = "Too many wrong codes. For your safety, codes are paused until the time below."
    else:
        error = MESSAGES[verdict.status]
    ctx = _step_context(request, result.challenge, error=error)
    if verdict.status is Outcome.LOCKED:
        ctx["locked_until"] = verdict.locked_until
    return render(request, "auth/verify.html", ctx, status=422)


@guarded("resend")
@one_connection
async def resend(request: Request) -> Response:
    step = sessions.pending_step(request)
    result = await flows.resend(services(request), client_of(request), step) if step else flows.ResendResult()
    if result.challenge is None:
        return _gone(request)
    if result.locked:
        ctx = _step_context(request, result.challenge, error="Codes are paused until the time below.")
        return render(request, "auth/verify.html", ctx, status=422)
    if result.wait:
        ctx = _step_context(request, result.challenge, resend_wait=result.wait,
                            error=f"Please wait {result.wait} seconds before asking for another code.")
        return render(request, "auth/verify.html", ctx, status=429, headers={"Retry-After": str(result.wait)})
    assert step is not None and result.new_challenge_id is not None
    sessions.set_pending_challenge(request, result.new_challenge_id)
    if not wants_fragment(request):
        cookie_of(request).notice = "resent"  # shown once by the next GET /verify
        return redirect(request, "/verify")
    fresh = await flows.load(services(request), Step(result.new_challenge_id, step.nonce, step.purpose, step.owner))
    assert fresh is not None
    return render(request, "auth/verify.html", _step_context(request, fresh, notice=RESENT, announce=True))


@one_connection
async def delivery(request: Request) -> Response:
    """The mail's delivery state, polled by the code step while it is not final."""
    step = sessions.pending_step(request)
    challenge = await flows.load(services(request), step) if step else None
    if challenge is None:
        return Response(status_code=204)
    return render(request, "auth/verify.html", _step_context(request, challenge), block="delivery", fragment=True)


# --- sign-out ----------------------------------------------------------------------------


@csrf_only
@one_connection
async def logout(request: Request) -> Response:
    cookie = cookie_of(request)
    if cookie.session_token and cookie.customer_id is not None:
        await flows.sign_out(services(request), client_of(request), session_token=cookie.session_token,
                             customer_id=cookie.customer_id)
    cookie.clear()
    return redirect(request, "/login?signed_out=1")


@csrf_only
@one_connection
async def logout_everywhere(request: Request) -> Response:
    signed = await sessions.current(request)
    if signed is not None:
        await flows.sign_out_everywhere(services(request), client_of(request), signed[1].id)
    cookie_of(request).clear()
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

"""Register, sign in, forgot password, the code step, resend, sign out. Thin: each endpoint
parses the form (forms.py), calls one use case (flows.py, recovery.py), and renders a page or a
fragment."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app import otp
from app.auth import factor_routes, factor_step, flows, forms, recovery, sessions
from app.auth.flows import Refused, SignedIn, Step
from app.htmx import redirect, wants_fragment
from app.mail.outbox import MailStatus
from app.otp import Kind, Outcome, Purpose
from app.templating import render
from app.web.devices import device_tokens, remember_device
from app.web.guards import guarded, one_connection, signing_out
from app.web.request import client_of, services
from app.web.session import cookie_of

WRONG_LOGIN = "That username or email and password do not match an account."
# The step says "Sending your code…" this long after a challenge is made, whatever its mail's
# state: a decoy that shows the state of a notice sent earlier reads exactly like a new code.
SHOWN_PENDING_FOR = 1.5
MAIL_DELAYED_AFTER = 15
# One-time messages a redirect carries to the next page (cookie.notice), by name.
NOTICES = {
    "resent": "A new code is on its way. The codes we sent before still work until they expire.",
    "reused": "We did not send another code: the one we sent you a moment ago still works for this step.",
    "password-reset": "Your new password is set. Every other device was signed out.",
    "password-changed": "Your password was changed. Every other device was signed out.",
    "email-changed": "Your email address was changed.",
}
HEADINGS = {Purpose.REGISTRATION: "Confirm your email", Purpose.LOGIN: "Enter your sign-in code",
            Purpose.RESET: "Enter your reset code", Purpose.EMAIL: "Confirm your new email address",
            Purpose.DELETE: "Confirm deleting your account"}
# Where "Start again" (or "Cancel") leads from the code step.
START_AGAIN = {Purpose.REGISTRATION: "/register", Purpose.LOGIN: "/login", Purpose.RESET: "/password/forgot",
               Purpose.EMAIL: "/account", Purpose.DELETE: "/account"}


async def _signed_in_elsewhere(request: Request) -> Response | None:
    """A signed-in customer has no business on the sign-in pages: to the dashboard."""
    if await sessions.current(request) is not None:
        return redirect(request, "/dashboard")
    return None


# --- registration ------------------------------------------------------------------------


@one_connection
async def register_form(request: Request) -> Response:
    return await _signed_in_elsewhere(request) or render(request, "auth/register.html", {"form": forms.Form()})


@guarded("register")
async def register_submit(request: Request) -> Response:
    data = dict(await request.form())
    form = forms.registration(data)
    if not form.ok:
        return render(request, "auth/register.html", {"form": form}, status=422)
    seed = cookie_of(request).csrf  # the guard checked it: the same form sent twice shares it
    result = await flows.register(
        services(request), client_of(request), full_name=form.values["full_name"], username=form.values["username"],
        email=form.values["email"], password=str(data["password"]), seed=seed,
    )
    if isinstance(result, Refused):
        form.errors[result.field] = result.message
        return render(request, "auth/register.html", {"form": form}, status=422)
    sessions.start_pending(request, result)
    return await code_step_after_post(request, result)


@one_connection
async def register_email_form(request: Request) -> Response:
    """Change the address of a pending registration (the customer mistyped it)."""
    step = sessions.pending_step(request)
    challenge = await flows.load(services(request), step) if step and step.purpose is Purpose.REGISTRATION else None
    if challenge is None or challenge.used_at is not None:
        return _gone(request)
    form = forms.Form(values={"email": challenge.sent_to})
    return render(request, "auth/register_email.html", {"form": form})


@guarded("register")
async def register_email_submit(request: Request) -> Response:
    step = sessions.pending_step(request)
    if step is None or step.purpose is not Purpose.REGISTRATION:
        return _gone(request)
    form = forms.forgot(dict(await request.form()))
    if not form.ok:
        return render(request, "auth/register_email.html", {"form": form}, status=422)
    result = await flows.change_registration_email(services(request), client_of(request), step, form.values["email"])
    if result is None:
        return _gone(request)
    if isinstance(result, Refused):
        form.errors[result.field] = result.message
        return render(request, "auth/register_email.html", {"form": form}, status=422)
    sessions.start_pending(request, result)
    return await code_step_after_post(request, result)


# --- sign-in -----------------------------------------------------------------------------


@one_connection
async def login_form(request: Request) -> Response:
    return await _signed_in_elsewhere(request) or render(request, "auth/login.html", {"form": forms.Form()})


@guarded("login")
async def login_submit(request: Request) -> Response:
    data = dict(await request.form())
    form = forms.login(data)
    if not form.ok:
        return render(request, "auth/login.html", {"form": form}, status=422)
    result = await flows.sign_in(services(request), client_of(request), login=form.values["login"],
                                 password=str(data["password"]), device_tokens=device_tokens(request))
    if result is None or isinstance(result, Refused):
        form.errors["form"] = WRONG_LOGIN if result is None else result.message
        return render(request, "auth/login.html", {"form": form}, status=422)
    if isinstance(result, SignedIn):
        sessions.signed_in(request, result)
        return redirect(request, "/dashboard")
    sessions.start_pending(request, result)
    async with services(request).db.connection():
        return await code_step_after_post(request, result)


# --- forgot password ---------------------------------------------------------------------


@one_connection
async def forgot_form(request: Request) -> Response:
    return await _signed_in_elsewhere(request) or render(request, "auth/forgot.html", {"form": forms.Form()})


@guarded("forgot")
async def forgot_submit(request: Request) -> Response:
    form = forms.forgot(dict(await request.form()))
    if not form.ok:
        return render(request, "auth/forgot.html", {"form": form}, status=422)
    step = await recovery.request_reset(services(request), client_of(request), email=form.values["email"])
    sessions.start_pending(request, step)
    async with services(request).db.connection():
        return await code_step_after_post(request, step)


@one_connection
async def new_password_form(request: Request) -> Response:
    step = sessions.pending_step(request)
    customer = await recovery.reset_customer(services(request), step) if step else None
    if customer is None:
        if step is not None and step.purpose is Purpose.RESET:
            challenge = await flows.load(services(request), step)
            if challenge is not None and challenge.used_at is None:
                return redirect(request, "/verify")  # the code first
        return _gone(request, "/password/forgot")
    return render(request, "auth/new_password.html", {"form": forms.Form()})


@guarded("reset")
async def new_password_submit(request: Request) -> Response:
    step = sessions.pending_step(request)
    svc = services(request)
    customer = await recovery.reset_customer(svc, step) if step else None
    if step is None or customer is None:
        return _gone(request, "/password/forgot")
    data = dict(await request.form())
    form = forms.new_password(data, email=customer.email, username=customer.username or "")
    if not form.ok:
        return render(request, "auth/new_password.html", {"form": form}, status=422)
    signed = await recovery.set_new_password(svc, client_of(request), step, password=str(data["new_password"]))
    if signed is None:
        return _gone(request, "/password/forgot")
    if isinstance(signed, recovery.StillLocked):
        sessions.drop_pending(request)
        return render(request, "auth/password_set.html", {"locked_until": signed.until})
    sessions.signed_in(request, signed)
    cookie_of(request).notice = "password-reset"
    return redirect(request, "/dashboard")


# --- the code step -----------------------------------------------------------------------


def _step_context(request: Request, challenge: otp.Challenge, **extra: Any) -> dict[str, Any]:
    svc = services(request)
    now = svc.clock.now()
    wait = challenge.resend_wait(svc.policy, now)
    locked = challenge.locked_until if challenge.locked_until and challenge.locked_until > now else None
    # A proven step waiting out the customer's cooldown says so (a placeholder); an unproven one
    # never does: it looks like every other step for an address, whatever stands behind it.
    placeholder = challenge.kind is Kind.PLACEHOLDER and challenge.proven
    state = challenge.delivery if not placeholder else None
    if state is None and (challenge.kind is Kind.DECOY or not challenge.proven):
        state = MailStatus.SENT.value  # no mail to show: shaped like a sent one
    if challenge.purpose is Purpose.RESET:
        # Only an account gets a reset mail: its delivery would tell which addresses have one.
        state = None
    age = (now - challenge.sent_at).total_seconds()
    if age < SHOWN_PENDING_FOR and state in (MailStatus.QUEUED, MailStatus.SENDING, MailStatus.SENT):
        state = MailStatus.SENDING.value
    ctx: dict[str, Any] = {
        "challenge": challenge,
        "sent_to": challenge.sent_to,
        "purpose": challenge.purpose.value,
        "heading": HEADINGS[challenge.purpose],
        "start_again": START_AGAIN[challenge.purpose],
        "resend_wait": 0 if locked else wait,
        "asked_at": challenge.sent_at,
        "tag": challenge.tag if not placeholder else "",
        "step_words": flows.STEP_WORDS[challenge.purpose],
        "expires_at": challenge.expires_at,
        "expired": challenge.expires_at <= now,
        "locked_until": locked,
        "delivery": state,
        # Still not out after this long: say so, and what to do (the mail server may be down).
        "delayed": state in (MailStatus.QUEUED, MailStatus.SENDING) and age >= MAIL_DELAYED_AFTER,
        "placeholder": placeholder,
        # "Don't ask again on this device": offered where the code is the second step of a sign-in.
        "offer_trust": challenge.purpose is Purpose.LOGIN and challenge.proven and svc.settings.trusted_device_days > 0,
        "trust_days": svc.settings.trusted_device_days,
        "error": None,
        "notice": None,
        "announce": False,
    }
    ctx.update(extra)
    return ctx


async def code_step_after_post(request: Request, step: Step) -> Response:
    """After a form that starts a code step: htmx gets the step in place, a plain browser a 303."""
    if not wants_fragment(request):
        if step.reused:
            cookie_of(request).notice = "reused"  # said once by the next GET /verify
        return redirect(request, "/verify")
    challenge = await flows.load(services(request), step)
    if challenge is None:  # ended at once (another request of this customer's): start again
        return _gone(request)
    headers = {"HX-Push-Url": "/verify", "HX-Retarget": "#main", "HX-Reswap": "innerHTML show:window:top"}
    if challenge.kind is Kind.FACTOR:
        found = await factor_step.pending(services(request), step)
        if found is None:
            return _gone(request)
        response = factor_routes.factor_page(request, found)
        response.headers.update(headers)
        return response
    ctx = _step_context(request, challenge, announce=True, notice=NOTICES["reused"] if step.reused else None)
    # The step replaces the whole of <main>, whichever part of a page the form swapped.
    return render(request, "auth/verify.html", ctx, headers={"HX-Push-Url": "/verify", "HX-Retarget": "#main",
                                                             "HX-Reswap": "innerHTML show:window:top"})


def _gone(request: Request, to: str = "/login") -> Response:
    """The pending step is finished or was never there: a finished step is not a way back in."""
    sessions.drop_pending(request)
    return redirect(request, to)


def take_notice(request: Request) -> str | None:
    cookie = cookie_of(request)
    name = cookie.notice
    if name:
        cookie.notice = None  # shown once
    return NOTICES.get(name or "")


async def _signed_in_as(request: Request, step: Step) -> int | None:
    """Changing the address or deleting the account is a step inside a signed-in session."""
    if step.purpose not in (Purpose.EMAIL, Purpose.DELETE):
        return None
    signed = await sessions.current(request)
    return signed[1].id if signed else None


@one_connection
async def verify_form(request: Request) -> Response:
    step = sessions.pending_step(request)
    if step is None:
        return await _signed_in_elsewhere(request) or redirect(request, "/login")
    svc = services(request)
    challenge = await flows.load(svc, step)
    if step.purpose is Purpose.RESET and challenge is not None and challenge.used_at is not None:
        return redirect(request, "/password/new")  # the code was right: the new password is next
    if challenge is None or challenge.used_at is not None or challenge.invalidated_at is not None:
        return await _signed_in_elsewhere(request) or _gone(request)
    if step.purpose in (Purpose.EMAIL, Purpose.DELETE) and await _signed_in_as(request, step) != challenge.customer_id:
        return _gone(request)
    if challenge.kind is Kind.FACTOR:
        found = await factor_step.pending(svc, step)
        return factor_routes.factor_page(request, found) if found else _gone(request)
    return render(request, "auth/verify.html", _step_context(request, challenge, notice=take_notice(request)))


MESSAGES = {
    Outcome.INVALID: "This code has been replaced by a newer one or already used. Use the newest code, or request a new one.",
    Outcome.DEAD: "Too many wrong entries for this code. Request a new code.",
    Outcome.EXPIRED: "This code has expired.",
}


@guarded("verify")
@one_connection
async def verify_submit(request: Request) -> Response:
    step = sessions.pending_step(request)
    if step is None:
        return redirect(request, "/login")
    if step.owner is None and await factor_step.pending(services(request), step) is not None:
        return await factor_routes.answer_app(request)  # a factor step: six digits are the app's
    data = dict(await request.form())
    code, problem = forms.code(data)
    result = await flows.submit_code(services(request), client_of(request), step, code, problem,
                                     signed_in_as=await _signed_in_as(request, step),
                                     trust_device=str(data.get("trust_device", "")) in ("1", "on"))
    return _after_code(request, result)


def _after_code(request: Request, result: flows.CodeResult) -> Response:
    """What a code entry (typed, or from the mail's link) leads to."""
    if result.signed_in is not None:
        sessions.signed_in(request, result.signed_in)
        return remember_device(request, redirect(request, "/dashboard"), result.signed_in.device_token)
    if result.reset_ready:
        return redirect(request, "/password/new")
    if result.next_step is not None:  # the code was right; a factor is asked next
        sessions.set_pending_challenge(request, result.next_step.challenge_id)
        return redirect(request, "/verify")
    if result.email_changed is not None:
        sessions.drop_pending(request)
        cookie_of(request).notice = "email-changed"
        return redirect(request, "/account")
    if result.deleted:
        cookie_of(request).clear()
        return redirect(request, "/login?deleted=1")
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
        paused = result.challenge.paused_until
        error = ("Sign-in codes are paused: someone pressed “Not you?” in one of our code mails."
                 if not verdict.checked and paused is not None and paused == verdict.locked_until
                 else "Too many wrong codes.")
    else:
        error = MESSAGES[verdict.status]
    ctx = _step_context(request, result.challenge, error=error)
    if verdict.status is Outcome.LOCKED:
        ctx["locked_until"], ctx["resend_wait"] = verdict.locked_until, 0
    return render(request, "auth/verify.html", ctx, status=422)


@guarded("resend")
@one_connection
async def resend(request: Request) -> Response:
    step = sessions.pending_step(request)
    svc = services(request)
    result = (await flows.resend(svc, client_of(request), step, signed_in_as=await _signed_in_as(request, step))
              if step else flows.ResendResult())
    if result.challenge is None:
        return _gone(request)
    if result.factor:  # nothing is mailed for a factor step
        return redirect(request, "/verify")
    if result.locked:
        return render(request, "auth/verify.html", _step_context(request, result.challenge), status=422)
    if result.wait:
        ctx = _step_context(request, result.challenge, resend_wait=result.wait,
                            error=f"Please wait {result.wait} seconds before asking for another code.")
        return render(request, "auth/verify.html", ctx, status=429, headers={"Retry-After": str(result.wait)})
    assert step is not None and result.new_challenge_id is not None
    sessions.set_pending_challenge(request, result.new_challenge_id)
    if not wants_fragment(request):
        cookie_of(request).notice = "resent"  # said once by the next GET /verify
        return redirect(request, "/verify")
    fresh = await flows.load(svc, Step(result.new_challenge_id, step.nonce, step.purpose, step.owner))
    if fresh is None:
        return _gone(request)
    return render(request, "auth/verify.html", _step_context(request, fresh, notice=NOTICES["resent"], announce=True))


@one_connection
async def delivery(request: Request) -> Response:
    """The mail's delivery state, polled by the code step while it is not final."""
    step = sessions.pending_step(request)
    challenge = await flows.load(services(request), step) if step else None
    if challenge is None or challenge.kind is Kind.FACTOR:
        return Response(status_code=204)
    return render(request, "auth/verify.html", _step_context(request, challenge), block="delivery", fragment=True)


# --- the mail's links --------------------------------------------------------------------

CONFIRM_BUTTONS = {Purpose.REGISTRATION: "Confirm my email", Purpose.LOGIN: "Confirm sign-in",
                   Purpose.RESET: "Continue to a new password", Purpose.EMAIL: "Confirm the new address",
                   Purpose.DELETE: "Delete my account"}


async def _link_context(request: Request) -> tuple[str, otp.Link | None, Step | None]:
    """(token, the link if it still works, this browser's pending step if the link is its own)."""
    token_value = request.path_params["token"]
    svc = services(request)
    link = await otp.find_link(svc.db, token_value=token_value, now=svc.clock.now())
    if link is None or not link.works:
        return token_value, None, None
    step = sessions.pending_step(request)
    if step is not None and step.challenge_id == link.challenge_id and await flows.load(svc, step) is not None:
        return token_value, link, step
    return token_value, link, None


@one_connection
async def link_page(request: Request) -> Response:
    """The link in a code mail. A GET never uses anything (mail scanners open links): in the
    browser that asked it offers a button; anywhere else it shows the code to type there."""
    token_value, link, step = await _link_context(request)
    ctx: dict[str, Any] = {"link": link, "heading": HEADINGS[link.purpose] if link else "", "code": None,
                           "button": CONFIRM_BUTTONS[link.purpose] if link else "", "own": step is not None,
                           "step_words": flows.STEP_WORDS[link.purpose] if link else ""}
    if link is not None and step is None:
        ctx["code"] = flows.code_of_link(link, token_value)
    return render(request, "auth/link.html", ctx, status=200 if link else 410)


@guarded("verify")
@one_connection
async def link_confirm(request: Request) -> Response:
    token_value, link, step = await _link_context(request)
    if link is None or step is None:
        return await link_page(request)
    code = flows.code_of_link(link, token_value)
    result = await flows.submit_code(services(request), client_of(request), step, code, None if code else "gone",
                                     signed_in_as=await _signed_in_as(request, step))
    return _after_code(request, result)


@one_connection
async def not_you_page(request: Request) -> Response:
    """"Not you?" from a code mail: the GET explains and asks; only the POST acts."""
    known = await otp.customer_of_stop_token(services(request).db, request.path_params["token"]) is not None
    return render(request, "auth/not_you.html", {"known": known, "done": False}, status=200 if known else 410)


@guarded("not-you")
@one_connection
async def not_you_submit(request: Request) -> Response:
    done = await flows.not_me(services(request), client_of(request), request.path_params["token"])
    return render(request, "auth/not_you.html", {"known": done, "done": done}, status=200 if done else 410)


# --- sign-out ----------------------------------------------------------------------------


@signing_out
@one_connection
async def logout(request: Request) -> Response:
    cookie = cookie_of(request)
    if cookie.session_token and cookie.customer_id is not None:
        await flows.sign_out(services(request), client_of(request), session_token=cookie.session_token,
                             customer_id=cookie.customer_id)
    cookie.clear()
    return redirect(request, "/login?signed_out=1")


@signing_out
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
    Route("/register/email", register_email_form, methods=["GET"], name="auth:register_email"),
    Route("/register/email", register_email_submit, methods=["POST"], name="auth:register_email_submit"),
    Route("/login", login_form, methods=["GET"], name="auth:login"),
    Route("/login", login_submit, methods=["POST"], name="auth:login_submit"),
    Route("/password/forgot", forgot_form, methods=["GET"], name="auth:forgot"),
    Route("/password/forgot", forgot_submit, methods=["POST"], name="auth:forgot_submit"),
    Route("/password/new", new_password_form, methods=["GET"], name="auth:new_password"),
    Route("/password/new", new_password_submit, methods=["POST"], name="auth:new_password_submit"),
    Route("/verify", verify_form, methods=["GET"], name="auth:verify"),
    Route("/verify", verify_submit, methods=["POST"], name="auth:verify_submit"),
    Route("/verify/resend", resend, methods=["POST"], name="auth:resend"),
    Route("/verify/delivery", delivery, methods=["GET"], name="auth:delivery"),
    Route("/verify/link/{token}", link_page, methods=["GET"], name="auth:link"),
    Route("/verify/link/{token}", link_confirm, methods=["POST"], name="auth:link_confirm"),
    Route("/not-you/{token}", not_you_page, methods=["GET"], name="auth:not_you"),
    Route("/not-you/{token}", not_you_submit, methods=["POST"], name="auth:not_you_submit"),
    Route("/logout", logout, methods=["POST"], name="auth:logout"),
    Route("/logout/everywhere", logout_everywhere, methods=["POST"], name="auth:logout_everywhere"),
]

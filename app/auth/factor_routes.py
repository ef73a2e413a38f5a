"""The factor step's answers (authenticator app, backup code, passkey) and signing in with a
passkey alone. Thin: forms parse, app.auth.factor_step decides, the page or JSON says what
happened. The passkey endpoints answer JSON to static/passkeys.js."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.auth import factor_step, sessions
from app.auth.flows import CodeResult, Step
from app.factors import Method, backup_codes, passkeys, totp
from app.htmx import redirect
from app.otp import Outcome, Purpose
from app.security.csrf import CsrfVerdict, csrf_token, csrf_verdict
from app.templating import render
from app.web.devices import remember_device
from app.web.guards import guarded
from app.web.request import client_of, services

HEADINGS = {Purpose.LOGIN: "Confirm it’s you", Purpose.RESET: "One more step to reset your password"}
WRONG = {Method.APP: "That code from your authenticator app is not right.",
         Method.BACKUP: "That backup code is not right, or it was used already.",
         Method.PASSKEY: "That passkey could not be used for this account."}
MESSAGES = {
    Outcome.DEAD: "Too many wrong entries for this step. Please start again.",
    Outcome.EXPIRED: "This step has expired. Please start again.",
    Outcome.INVALID: "This step was already used or ended. Please start again.",
}


def relying_party(request: Request) -> passkeys.RelyingParty:
    """Passkeys belong to PUBLIC_ORIGIN's host (or WEBAUTHN_RP_ID); in development and test, to
    the host this request came to."""
    settings = services(request).settings
    origin = settings.public_origin or f"{request.url.scheme}://{request.url.netloc}"
    rp_id = settings.webauthn_rp_id or urlsplit(origin).hostname or "localhost"
    return passkeys.RelyingParty(id=rp_id, name="Computer Shop", origin=origin)


def factor_page(request: Request, found: factor_step.Pending, *, status: int = 200, error: str | None = None,
                method: Method | None = None, locked_until: Any = None) -> Response:
    svc = services(request)
    challenge, now = found.challenge, svc.clock.now()
    locked = locked_until or (challenge.locked_until if challenge.locked_until and challenge.locked_until > now
                              else None)
    ctx = {"heading": HEADINGS.get(challenge.purpose, HEADINGS[Purpose.LOGIN]), "factors": found.factors,
           "purpose": challenge.purpose.value, "error": error, "method": method.value if method else "",
           "locked_until": locked, "expires_at": challenge.expires_at,
           "offer_trust": challenge.purpose is Purpose.LOGIN and svc.settings.trusted_device_days > 0,
           "trust_days": svc.settings.trusted_device_days, "warn_at": backup_codes.WARN_AT}
    return render(request, "auth/factor.html", ctx, status=status)


def after_answer(request: Request, step: Step, result: CodeResult, found: factor_step.Pending,
                 method: Method) -> Response:
    """Where an answer leads: signed in, on to the new password, or the page again saying why."""
    if result.signed_in is not None:
        sessions.signed_in(request, result.signed_in)
        return remember_device(request, redirect(request, "/dashboard"), result.signed_in.device_token)
    if result.reset_ready:
        return redirect(request, "/password/new")
    if result.challenge is None and result.verdict is None:
        sessions.drop_pending(request)
        return redirect(request, "/login")
    verdict = result.verdict
    if verdict is None:
        return factor_page(request, found, status=422, error=result.problem, method=method)
    fresh = factor_step.Pending(result.challenge or found.challenge, found.factors)
    if verdict.status is Outcome.WRONG:
        left = verdict.attempts_left
        return factor_page(request, fresh, status=422, method=method,
                           error=f"{WRONG[method]} {left} {'attempt' if left == 1 else 'attempts'} left.")
    if verdict.status is Outcome.LOCKED:
        return factor_page(request, fresh, status=422, method=method, locked_until=verdict.locked_until,
                           error="Too many wrong entries." if verdict.checked else None)
    return factor_page(request, fresh, status=422, method=method, error=MESSAGES[verdict.status])


async def _pending(request: Request) -> tuple[Step, factor_step.Pending] | None:
    step = sessions.pending_step(request)
    if step is None:
        return None
    found = await factor_step.pending(services(request), step)
    return None if found is None else (step, found)


def _trust(data: Any) -> bool:
    return str(data.get("trust_device", "")) in ("1", "on", "true", "True")


@guarded("verify")
async def app_submit(request: Request) -> Response:
    return await answer_app(request)


async def answer_app(request: Request) -> Response:
    """An authenticator-app code (also what a 6-digit entry at /verify means on a factor step)."""
    pending = await _pending(request)
    if pending is None:
        return redirect(request, "/login")
    step, found = pending
    data = await request.form()
    entry = totp.normalized(str(data.get("code", "")))
    if not found.factors.app:
        return factor_page(request, found, status=422, error="There is no authenticator app on this account.")
    if entry is None:
        return factor_page(request, found, status=422, method=Method.APP,
                           error="Enter the 6 digits your authenticator app shows.")
    result = await factor_step.answer(services(request), client_of(request), step, method=Method.APP, entry=entry,
                                      trust_device=_trust(data))
    return after_answer(request, step, result, found, Method.APP)


@guarded("verify")
async def backup_submit(request: Request) -> Response:
    pending = await _pending(request)
    if pending is None:
        return redirect(request, "/login")
    step, found = pending
    data = await request.form()
    entry = backup_codes.normalized(str(data.get("backup_code", "")))
    if entry is None:
        return factor_page(request, found, status=422, method=Method.BACKUP,
                           error=f"A backup code has {backup_codes.LENGTH} letters and digits, like "
                                 f"{backup_codes.grouped('ABCDE23456')}.")
    result = await factor_step.answer(services(request), client_of(request), step, method=Method.BACKUP,
                                      entry=entry, trust_device=_trust(data))
    return after_answer(request, step, result, found, Method.BACKUP)


# --- JSON for static/passkeys.js ---------------------------------------------------------------


def json_guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """CSRF (header or field) and the per-address limit, answered as JSON the script can show."""

    @wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        verdict = await csrf_verdict(request)
        if verdict is not CsrfVerdict.OK:
            return JSONResponse({"error": "This page is out of date. Please reload it and try again."},
                                status_code=403)
        wait = await services(request).limiter.hit("verify", client_of(request).ip)
        if wait:
            return JSONResponse({"error": f"Too many attempts. Please wait {wait} seconds."}, status_code=429,
                                headers={"Retry-After": str(wait)})
        return await endpoint(request)

    wrapper.csrf_protected = True  # type: ignore[attr-defined]
    return wrapper


async def json_body(request: Request) -> dict[str, Any]:
    """The JSON object the script sent; {} for anything else: another content type (whose body
    the CSRF check may have read as a form already), bad or deeply nested JSON, not an object."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        return {}
    try:
        body = await request.json()
    except (ValueError, RecursionError, RuntimeError):
        return {}
    return body if isinstance(body, dict) else {}


def _options(options: str | None) -> Response:
    if options is None:
        return JSONResponse({"error": "There is no passkey on this account for this step."})
    return Response(options, media_type="application/json")


@json_guarded
async def second_options(request: Request) -> Response:
    step = sessions.pending_step(request)
    if step is None:
        return JSONResponse({"redirect": "/login"})
    return _options(await factor_step.second_options(services(request), relying_party(request), step))


@json_guarded
async def second_verify(request: Request) -> Response:
    pending = await _pending(request)
    if pending is None:
        return JSONResponse({"redirect": "/login"})
    step, found = pending
    body = await json_body(request)
    result, refused = await factor_step.answer_with_passkey(
        services(request), client_of(request), relying_party(request), step,
        response_json=json.dumps(body.get("response")), trust_device=bool(body.get("trust_device")))
    if result.signed_in is not None:
        sessions.signed_in(request, result.signed_in)
        return remember_device(request, JSONResponse({"redirect": "/dashboard"}), result.signed_in.device_token)
    if result.reset_ready:
        return JSONResponse({"redirect": "/password/new"})
    verdict = result.verdict
    if verdict is None:
        return JSONResponse({"redirect": "/login"})
    if verdict.status is Outcome.LOCKED:
        return JSONResponse({"redirect": "/verify"})  # the page says until when
    if verdict.status is Outcome.WRONG:
        left = verdict.attempts_left
        return JSONResponse({"error": f"{refused or WRONG[Method.PASSKEY]} {left} "
                                      f"{'attempt' if left == 1 else 'attempts'} left."})
    return JSONResponse({"error": MESSAGES[verdict.status]})


def _signed_out_nonce(request: Request) -> str:
    """A signed-out browser's passkey ceremony is bound to its cookie session (its CSRF secret)."""
    return csrf_token(request)


@json_guarded
async def alone_options(request: Request) -> Response:
    if await sessions.current(request) is not None:
        return JSONResponse({"redirect": "/dashboard"})
    return _options(await factor_step.alone_options(services(request), relying_party(request),
                                                    _signed_out_nonce(request)))


@json_guarded
async def alone_verify(request: Request) -> Response:
    body = await json_body(request)
    try:
        signed = await factor_step.sign_in_with_passkey(services(request), client_of(request), relying_party(request),
                                                        nonce=_signed_out_nonce(request),
                                                        response_json=json.dumps(body.get("response")))
    except factor_step.PasskeySignInRefused as exc:
        return JSONResponse({"error": exc.message})
    sessions.signed_in(request, signed)
    return JSONResponse({"redirect": "/dashboard"})


routes = [
    Route("/verify/app", app_submit, methods=["POST"], name="auth:verify_app"),
    Route("/verify/backup", backup_submit, methods=["POST"], name="auth:verify_backup"),
    Route("/verify/passkey/options", second_options, methods=["POST"], name="auth:verify_passkey_options"),
    Route("/verify/passkey", second_verify, methods=["POST"], name="auth:verify_passkey"),
    Route("/passkey/options", alone_options, methods=["POST"], name="auth:passkey_options"),
    Route("/passkey/verify", alone_verify, methods=["POST"], name="auth:passkey_verify"),
]

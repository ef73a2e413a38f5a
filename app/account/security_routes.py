"""/account/security: ways to sign in (authenticator app, passkeys, backup codes, trusted
devices). Thin: app.account.factors decides. Every change needs a sign-in (or a password
entered again) within REAUTH_MINUTES."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import wraps

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from app.account import factors as account
from app.auth import sessions
from app.auth.factor_routes import json_body, json_guarded, relying_party
from app.auth.queries import Customer, SessionRow
from app.auth.routes import take_notice
from app.factors import Method, backup_codes, devices, factors_of, passkeys, totp
from app.htmx import redirect
from app.templating import render
from app.web.guards import guarded, one_connection
from app.web.request import client_of, services
from app.web.session import cookie_of

SECURITY = "/account/security"
NOTICES = {
    "app-added": "Your authenticator app is set up. From now on it is asked for when you sign in.",
    "app-removed": "Your authenticator app was removed.",
    "passkey-added": "Your passkey was added.",
    "passkey-removed": "The passkey was removed.",
    "device-revoked": "That device will be asked for the second step again.",
    "devices-revoked": "Every device will be asked for the second step again.",
    "confirmed": "Thank you. You can change your ways to sign in for the next few minutes.",
}
Signed = tuple[SessionRow, Customer]
Handler = Callable[[Request, SessionRow, Customer], Awaitable[Response]]


def signed_in(*, recent: bool, as_json: bool = False) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """The endpoint runs for a signed-in customer; with `recent`, only within REAUTH_MINUTES of
    the last password or factor, otherwise the password is asked for again first."""

    def decorate(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @wraps(handler)
        async def wrapper(request: Request) -> Response:
            signed = await sessions.current(request)
            if signed is None:
                return JSONResponse({"redirect": "/login"}) if as_json else redirect(request, "/login")
            session, customer = signed
            svc = services(request)
            if recent and not account.recent(svc, session, svc.clock.now()):
                to = f"/account/confirm?next={SECURITY}"
                return JSONResponse({"redirect": to}) if as_json else redirect(request, to)
            return await handler(request, session, customer)

        return wrapper

    return decorate


def _notice(request: Request, name: str) -> None:
    cookie_of(request).notice = "security:" + name


def _take(request: Request) -> str | None:
    cookie = cookie_of(request)
    name = cookie.notice or ""
    if name.startswith("security:"):
        cookie.notice = None
        return NOTICES.get(name.split(":", 1)[1])
    return take_notice(request)


@one_connection
@signed_in(recent=False)
async def security_page(request: Request, session: SessionRow, customer: Customer) -> Response:
    svc = services(request)
    now = svc.clock.now()
    ctx = {"customer": customer, "factors": await factors_of(svc.db, customer.id),
           "passkeys": await passkeys.list_passkeys(svc.db, customer.id),
           "devices": await devices.list_devices(svc.db, customer.id, now),
           "recent": account.recent(svc, session, now), "reauth_minutes": svc.settings.reauth_minutes,
           "warn_at": backup_codes.WARN_AT, "notice": _take(request), "Method": Method}
    return render(request, "account/security.html", ctx)


# --- re-authentication -------------------------------------------------------------------


def _next(request: Request) -> str:
    wanted = request.query_params.get("next", SECURITY)
    return wanted if wanted.startswith(SECURITY) and "//" not in wanted else SECURITY


@one_connection
@signed_in(recent=False)
async def confirm_form(request: Request, session: SessionRow, customer: Customer) -> Response:
    return render(request, "account/confirm.html", {"next": _next(request), "error": None,
                                                    "minutes": services(request).settings.reauth_minutes})


@guarded("account")
@signed_in(recent=False)
async def confirm_submit(request: Request, session: SessionRow, customer: Customer) -> Response:
    data = await request.form()
    password = str(data.get("password", ""))
    if not password or not await account.reauthenticate(services(request), client_of(request), customer, session,
                                                        password=password):
        return render(request, "account/confirm.html",
                      {"next": _next(request), "error": account.WRONG_PASSWORD if password else "Enter your password.",
                       "minutes": services(request).settings.reauth_minutes}, status=422)
    _notice(request, "confirmed")
    return redirect(request, _next(request))


def _row_id(request: Request) -> int | None:
    """A row id from the path: digits in the range of a database id, else None."""
    value = str(request.path_params.get("id", ""))
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    return int(value) or None


# --- authenticator app ---------------------------------------------------------------------


def _app_page(request: Request, customer: Customer, secret: str, *, error: str | None = None,
              status: int = 200) -> Response:
    uri = totp.provisioning_uri(secret, account=customer.email)
    return render(request, "account/app_setup.html", {"qr": totp.qr_svg(uri), "secret": totp.grouped(secret),
                                                      "error": error}, status=status)


@one_connection
@signed_in(recent=True)
async def app_form(request: Request, session: SessionRow, customer: Customer) -> Response:
    secret = await account.app_setup(services(request), customer)
    if secret is None:
        return redirect(request, SECURITY)  # one app per account: remove it to set up another
    return _app_page(request, customer, secret)


@guarded("account")
@signed_in(recent=True)
async def app_submit(request: Request, session: SessionRow, customer: Customer) -> Response:
    svc = services(request)
    code = totp.normalized(str((await request.form()).get("code", "")))
    secret = await account.app_setup(svc, customer)
    if secret is None:
        return redirect(request, SECURITY)
    if code is None:
        return _app_page(request, customer, secret, error="Enter the 6 digits your app shows.", status=422)
    first = await account.confirm_app(svc, client_of(request), customer, code=code)
    if first is None:
        return _app_page(request, customer, secret, status=422,
                         error="That code is not right. Check that the app shows “Computer Shop”, and try the "
                               "newest code.")
    if first:
        return _codes_page(request, customer, first, first_time=True)
    _notice(request, "app-added")
    return redirect(request, SECURITY)


@guarded("account")
@signed_in(recent=True)
async def app_remove(request: Request, session: SessionRow, customer: Customer) -> Response:
    if await account.remove_app(services(request), client_of(request), customer):
        _notice(request, "app-removed")
    return redirect(request, SECURITY)


# --- passkeys ------------------------------------------------------------------------------


@json_guarded
@signed_in(recent=True, as_json=True)
async def passkey_options(request: Request, session: SessionRow, customer: Customer) -> Response:
    options = await account.passkey_options(services(request), relying_party(request), customer, session)
    return Response(options, media_type="application/json")


@json_guarded
@signed_in(recent=True, as_json=True)
async def passkey_add(request: Request, session: SessionRow, customer: Customer) -> Response:
    body = await json_body(request)
    if not body:
        return JSONResponse({"error": "The passkey could not be read. Please try again."})
    label = str(body.get("label") or "")[:100] or "Passkey"
    try:
        first = await account.add_passkey(services(request), client_of(request), relying_party(request), customer,
                                          session, response_json=json.dumps(body.get("response")), label=label)
    except passkeys.PasskeyRefused as exc:
        return JSONResponse({"error": exc.message})
    if first:
        return JSONResponse({"post": f"{SECURITY}/backup-codes/first"})
    _notice(request, "passkey-added")
    return JSONResponse({"redirect": SECURITY})


@guarded("account")
@signed_in(recent=True)
async def passkey_remove(request: Request, session: SessionRow, customer: Customer) -> Response:
    authenticator_id = _row_id(request)
    if authenticator_id is None:
        return redirect(request, SECURITY)
    if await account.remove_passkey(services(request), client_of(request), customer, authenticator_id):
        _notice(request, "passkey-removed")
    return redirect(request, SECURITY)


# --- backup codes --------------------------------------------------------------------------


def _codes_page(request: Request, customer: Customer, codes: list[str], *, first_time: bool) -> Response:
    return render(request, "account/backup_codes.html",
                  {"codes": [backup_codes.grouped(c) for c in codes], "first_time": first_time})


@guarded("account")
@signed_in(recent=True)
async def codes_new(request: Request, session: SessionRow, customer: Customer) -> Response:
    codes = await account.new_backup_codes(services(request), client_of(request), customer)
    return redirect(request, SECURITY) if codes is None else _codes_page(request, customer, codes, first_time=False)


@guarded("account")
@signed_in(recent=True)
async def codes_first(request: Request, session: SessionRow, customer: Customer) -> Response:
    codes = await account.first_backup_codes(services(request), client_of(request), customer)
    if codes is None:
        _notice(request, "passkey-added")
        return redirect(request, SECURITY)
    return _codes_page(request, customer, codes, first_time=True)


@guarded("account")
@signed_in(recent=False)
async def codes_download(request: Request, session: SessionRow, customer: Customer) -> Response:
    """The codes the page shows, as a .txt: only what has the shape of a backup code goes in."""
    form = await request.form()
    codes = [c for c in (backup_codes.normalized(str(v)) for v in form.getlist("code")) if c][:backup_codes.COUNT]
    text = account.backup_codes_file(customer, codes, services(request).clock.now())
    return PlainTextResponse(text, headers={"Content-Disposition": 'attachment; filename="computer-shop-backup-codes.txt"',
                                            "Cache-Control": "no-store"})


# --- trusted devices -------------------------------------------------------------------------


@guarded("account")
@signed_in(recent=False)
async def device_revoke(request: Request, session: SessionRow, customer: Customer) -> Response:
    device_id = _row_id(request)
    if device_id is None:
        return redirect(request, SECURITY)
    if await account.revoke_device(services(request), client_of(request), customer, device_id):
        _notice(request, "device-revoked")
    return redirect(request, SECURITY)


@guarded("account")
@signed_in(recent=False)
async def devices_revoke_all(request: Request, session: SessionRow, customer: Customer) -> Response:
    await account.revoke_all_devices(services(request), client_of(request), customer)
    _notice(request, "devices-revoked")
    return redirect(request, SECURITY)


routes = [
    Route(SECURITY, security_page, methods=["GET"], name="account:security"),
    Route("/account/confirm", confirm_form, methods=["GET"], name="account:confirm"),
    Route("/account/confirm", confirm_submit, methods=["POST"], name="account:confirm_submit"),
    Route(f"{SECURITY}/app", app_form, methods=["GET"], name="account:app"),
    Route(f"{SECURITY}/app", app_submit, methods=["POST"], name="account:app_submit"),
    Route(f"{SECURITY}/app/remove", app_remove, methods=["POST"], name="account:app_remove"),
    Route(f"{SECURITY}/passkeys/options", passkey_options, methods=["POST"], name="account:passkey_options"),
    Route(f"{SECURITY}/passkeys", passkey_add, methods=["POST"], name="account:passkey_add"),
    Route(f"{SECURITY}/passkeys/{{id}}/remove", passkey_remove, methods=["POST"], name="account:passkey_remove"),
    Route(f"{SECURITY}/backup-codes", codes_new, methods=["POST"], name="account:backup_codes"),
    Route(f"{SECURITY}/backup-codes/first", codes_first, methods=["POST"], name="account:backup_codes_first"),
    Route(f"{SECURITY}/backup-codes/download", codes_download, methods=["POST"], name="account:backup_codes_file"),
    Route(f"{SECURITY}/devices/{{id}}/revoke", device_revoke, methods=["POST"], name="account:device_revoke"),
    Route(f"{SECURITY}/devices/revoke-all", devices_revoke_all, methods=["POST"], name="account:devices_revoke"),
]

"""The console's way in and its staff pages: sign-in (password, then the authenticator app),
set-up from the one-time link, sign-out, the home page, the staff list and disabling. Thin:
app.staff.accounts decides, app.staff.web guards and keeps the cookie."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.auth.forms import Form
from app.factors import totp
from app.security.crypto import sha256_hex
from app.security.passwords import check_password
from app.staff import Role, Staff, accounts, sessions
from app.staff.web import (
    admin_cookie,
    console_form,
    current_staff,
    drop_pending,
    pending_staff_id,
    redirect,
    render_admin,
    signed_in,
    signed_out,
    staff_action,
    staff_page,
    staff_signing_out,
    start_pending,
)
from app.web.request import client_of, services

ISSUER = "Computer Shop staff"
MAX_ID = 2**31 - 1
SECTIONS = (  # the console's parts, as the home page links them: (path, name, what, role needed)
    ("/admin/customers", "Customers", "Find a customer; unlock, disable, end sessions.", Role.VIEWER),
    ("/admin/audit", "Audit", "Every sign-in event and staff action.", Role.VIEWER),
    ("/admin/funnel", "Funnel", "How many codes are asked for, delivered and used.", Role.VIEWER),
    ("/admin/staff", "Staff", "Who can use this console; disable an account.", Role.ADMIN),
)


def _text(value: object, limit: int = 1024) -> str:
    return value[:limit] if isinstance(value, str) else ""


# --- sign-in ---------------------------------------------------------------------------------


async def login_form(request: Request) -> Response:
    if await current_staff(request) is not None:
        return redirect(request, "/admin", full=True)
    return render_admin(request, "admin/login.html", {"form": Form()})


@console_form
async def login_submit(request: Request) -> Response:
    svc = services(request)
    data = await request.form()
    form = Form(values={"email": _text(data.get("email"), 300).strip()})
    password = _text(data.get("password"))
    if not form.values["email"]:
        form.errors["email"] = "Enter your email address."
    if not password:
        form.errors["password"] = "Enter your password."
    if form.errors:
        return render_admin(request, "admin/login.html", {"form": form}, status=422)
    address = accounts.normalized_email(form.values["email"]) or form.values["email"].lower()
    now = svc.clock.now()
    if await svc.limiter.hit_account("admin-login", "staff:" + sha256_hex(address)):
        # The address's own limit: answered like a wrong password, after the same work.
        await check_password(None, password[:1024])
        staff = None
    else:
        staff = await accounts.sign_in(svc.db, email=form.values["email"], password=password, now=now,
                                       client=client_of(request))
    if staff is None:
        form.errors["form"] = "That email and password do not match a staff account that can sign in."
        return render_admin(request, "admin/login.html", {"form": form}, status=422)
    start_pending(request, staff.id, now)  # a new cookie session: fresh CSRF token, the pending step only
    return redirect(request, "/admin/login/code")


async def code_form(request: Request) -> Response:
    if pending_staff_id(request, services(request).clock.now()) is None:
        return redirect(request, "/admin/login")
    return render_admin(request, "admin/login_code.html", {"error": None})


@console_form
async def code_submit(request: Request) -> Response:
    svc = services(request)
    now = svc.clock.now()
    staff_id = pending_staff_id(request, now)
    if staff_id is None:
        drop_pending(request)
        return redirect(request, "/admin/login?expired=1")
    code = _text((await request.form()).get("code"), 32)
    if not code.strip():
        return render_admin(request, "admin/login_code.html",
                            {"error": "Enter the 6-digit code your authenticator app shows."}, status=422)
    client = client_of(request)
    result = await accounts.check_code(svc.db, svc.factors, staff_id=staff_id, code=code, now=now, client=client)
    if result.verdict is accounts.CodeVerdict.OK:
        session_token = await sessions.create(svc.db, staff_id=staff_id, ip=client.ip, user_agent=client.user_agent,
                                              now=now)
        signed_in(request, session_token)  # a new cookie session: fresh token and CSRF token
        return redirect(request, "/admin", full=True)
    if result.verdict is accounts.CodeVerdict.GONE:
        drop_pending(request)
        return redirect(request, "/admin/login?expired=1")
    if result.verdict is accounts.CodeVerdict.LOCKED:
        drop_pending(request)
        form = Form(errors={"form": "Too many wrong codes: this account is locked for 15 minutes. "
                                    "Then sign in again."})
        return render_admin(request, "admin/login.html", {"form": form}, status=422)
    left = result.attempts_left
    return render_admin(request, "admin/login_code.html", {
        "error": f"That code is not right. Enter the code the app shows now "
                 f"({left} {'try' if left == 1 else 'tries'} left before a 15-minute lock)."}, status=422)


# --- set-up ----------------------------------------------------------------------------------


async def _setup_page(request: Request, token: str, form: Form, *, status: int = 200) -> Response:
    svc = services(request)
    setup = await accounts.setup_of(svc.db, svc.factors, token=token, now=svc.clock.now())
    if setup is None:
        return render_admin(request, "admin/setup.html", {"setup": None}, status=404)
    uri = totp.provisioning_uri(setup.secret, account=setup.email, issuer=ISSUER)
    return render_admin(request, "admin/setup.html", {
        "setup": setup, "qr": totp.qr_svg(uri), "key": totp.grouped(setup.secret), "form": form,
        "token": token}, status=status)


async def setup_form(request: Request) -> Response:
    return await _setup_page(request, request.path_params["token"], Form())


@console_form
async def setup_submit(request: Request) -> Response:
    svc = services(request)
    token = request.path_params["token"]
    data = await request.form()
    result = await accounts.set_up(svc.db, svc.factors, token=token, password=_text(data.get("password")),
                                   confirm=_text(data.get("confirm_password")), code=_text(data.get("code"), 32),
                                   now=svc.clock.now(), client=client_of(request))
    if result.gone:
        return render_admin(request, "admin/setup.html", {"setup": None}, status=404)
    if not result.done:
        return await _setup_page(request, token, Form(errors=result.errors), status=422)
    return redirect(request, "/admin/login?set_up=1")


# --- signed in -------------------------------------------------------------------------------


@staff_signing_out
async def logout(request: Request, staff: Staff) -> Response:
    svc = services(request)
    session_token = admin_cookie(request).token
    if session_token:
        await accounts.signed_out(svc.db, staff=staff, token=session_token, now=svc.clock.now(),
                                  client=client_of(request))
    signed_out(request)
    return redirect(request, "/admin/login?signed_out=1", full=True)


@staff_page(Role.VIEWER)
async def home(request: Request, staff: Staff) -> Response:
    sections = [(path, name, what) for path, name, what, role in SECTIONS if staff.role.may(role)]
    return render_admin(request, "admin/home.html", {"sections": sections})


async def _staff_page(request: Request, *, status: int = 200, error: str | None = None,
                      notice: str | None = None) -> Response:
    members = await accounts.list_staff(services(request).db)
    return render_admin(request, "admin/staff.html", {"members": members, "error": error, "notice": notice},
                        status=status)


@staff_page(Role.ADMIN)
async def staff_list(request: Request, staff: Staff) -> Response:
    notice = "The account is disabled and its sessions have ended." if request.query_params.get("disabled") else None
    return await _staff_page(request, notice=notice)


@staff_action(Role.ADMIN)
async def staff_disable(request: Request, staff: Staff) -> Response:
    raw = request.path_params["id"]
    staff_id = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 10 else 0
    if not 0 < staff_id <= MAX_ID:
        return await _staff_page(request, status=422, error="There is no such staff member.")
    svc = services(request)
    result = await accounts.disable(svc.db, staff_id=staff_id, by=staff, now=svc.clock.now(),
                                    client=client_of(request))
    if result is accounts.DisableResult.SELF:
        return await _staff_page(request, status=422, error="You cannot disable your own account.")
    if result is accounts.DisableResult.UNKNOWN:
        return await _staff_page(request, status=422, error="There is no such staff member.")
    if result is accounts.DisableResult.ALREADY:
        return await _staff_page(request, notice="That account was already disabled.")
    return redirect(request, "/admin/staff?disabled=1")


routes = [
    Route("/admin", home, methods=["GET"], name="admin:home"),
    Route("/admin/login", login_form, methods=["GET"], name="admin:login"),
    Route("/admin/login", login_submit, methods=["POST"], name="admin:login_submit"),
    Route("/admin/login/code", code_form, methods=["GET"], name="admin:login_code"),
    Route("/admin/login/code", code_submit, methods=["POST"], name="admin:login_code_submit"),
    Route("/admin/setup/{token}", setup_form, methods=["GET"], name="admin:setup"),
    Route("/admin/setup/{token}", setup_submit, methods=["POST"], name="admin:setup_submit"),
    Route("/admin/logout", logout, methods=["POST"], name="admin:logout"),
    Route("/admin/staff", staff_list, methods=["GET"], name="admin:staff"),
    Route("/admin/staff/{id}/disable", staff_disable, methods=["POST"], name="admin:staff_disable"),
]

"""The dashboard and account settings. Thin: forms.py validates, account/flows.py decides."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.account import flows
from app.auth import forms, queries, sessions
from app.auth.flows import Refused
from app.auth.routes import code_step_after_post, take_notice
from app.factors import METHOD_WORDS, Method, backup_codes, factors_of
from app.htmx import redirect
from app.templating import render
from app.web.guards import guarded, one_connection
from app.web.request import client_of, services
from app.web.session import cookie_of


@one_connection
async def dashboard(request: Request) -> Response:
    signed = await sessions.current(request)
    if signed is None:
        return redirect(request, "/login")
    svc = services(request)
    current, customer = signed
    active, sign_ins = await queries.dashboard_lists(
        svc.db, customer.id, now=svc.clock.now(), idle=svc.settings.session_idle_timeout,
        absolute=svc.settings.session_absolute_timeout,
    )
    ctx = {"customer": customer, "current_session": current.id, "sign_ins": sign_ins, "active": active,
           "notice": take_notice(request), "factors": await factors_of(svc.db, customer.id),
           "warn_at": backup_codes.WARN_AT, "method_words": METHOD_WORDS}
    return render(request, "account/dashboard.html", ctx)


def _settings(request: Request, customer: queries.Customer, **forms_: forms.Form) -> dict[str, object]:
    return {"customer": customer, "password_form": forms_.get("password_form", forms.Form()),
            "email_form": forms_.get("email_form", forms.Form()), "notice": take_notice(request)}


@one_connection
async def settings(request: Request) -> Response:
    signed = await sessions.current(request)
    if signed is None:
        return redirect(request, "/login")
    sessions.drop_pending(request)  # back here: any half-done change of address or deletion is dropped
    return render(request, "account/settings.html", _settings(request, signed[1]))


@guarded("account")
async def change_password(request: Request) -> Response:
    signed = await sessions.current(request)
    if signed is None:
        return redirect(request, "/login")
    customer = signed[1]
    data = dict(await request.form())
    form = forms.change_password(data, email=customer.email, username=customer.username or "")
    if form.ok:
        result = await flows.change_password(services(request), client_of(request), customer,
                                             current=str(data["current_password"]), new=str(data["new_password"]),
                                             method=Method(signed[0].method))
        if not isinstance(result, Refused):
            sessions.signed_in(request, result)
            cookie_of(request).notice = "password-changed"
            return redirect(request, "/account")
        form.errors[result.field] = result.message
    return render(request, "account/settings.html", _settings(request, customer, password_form=form), status=422,
                  block="password")


@guarded("account")
async def change_email(request: Request) -> Response:
    signed = await sessions.current(request)
    if signed is None:
        return redirect(request, "/login")
    customer = signed[1]
    data = dict(await request.form())
    form = forms.change_email(data, current=customer.email)
    if form.ok:
        result = await flows.start_email_change(services(request), client_of(request), customer,
                                                new_email=form.values["new_email"], password=str(data["password"]))
        if not isinstance(result, Refused):
            sessions.start_side_step(request, result)
            async with services(request).db.connection():
                return await code_step_after_post(request, result)
        form.errors[result.field] = result.message
    return render(request, "account/settings.html", _settings(request, customer, email_form=form), status=422,
                  block="email")


@one_connection
async def delete_form(request: Request) -> Response:
    signed = await sessions.current(request)
    if signed is None:
        return redirect(request, "/login")
    return render(request, "account/delete.html", {"customer": signed[1], "form": forms.Form()})


@guarded("account")
async def delete_submit(request: Request) -> Response:
    signed = await sessions.current(request)
    if signed is None:
        return redirect(request, "/login")
    customer = signed[1]
    data = dict(await request.form())
    form = forms.password_only(data)
    if form.ok:
        result = await flows.start_deletion(services(request), client_of(request), customer,
                                            password=str(data["password"]))
        if not isinstance(result, Refused):
            sessions.start_side_step(request, result)
            async with services(request).db.connection():
                return await code_step_after_post(request, result)
        form.errors[result.field] = result.message
    return render(request, "account/delete.html", {"customer": customer, "form": form}, status=422)


routes = [
    Route("/dashboard", dashboard, methods=["GET"], name="account:dashboard"),
    Route("/account", settings, methods=["GET"], name="account:settings"),
    Route("/account/password", change_password, methods=["POST"], name="account:change_password"),
    Route("/account/email", change_email, methods=["POST"], name="account:change_email"),
    Route("/account/delete", delete_form, methods=["GET"], name="account:delete"),
    Route("/account/delete", delete_submit, methods=["POST"], name="account:delete_submit"),
]

"""Dashboard: who you are, your sign-in codes setting, recent sign-ins, active sessions."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.auth import queries, sessions
from app.htmx import redirect
from app.templating import render
from app.web.guards import one_connection
from app.web.request import services


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
    ctx = {"customer": customer, "current_session": current.id, "sign_ins": sign_ins, "active": active}
    return render(request, "account/dashboard.html", ctx)


routes = [Route("/dashboard", dashboard, methods=["GET"], name="account:dashboard")]

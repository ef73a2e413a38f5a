"""The console's customer pages, their actions, and the audit view. Thin: app.staff.customers
and app.staff.audit_view decide; every action is confirmed first (a second POST with
confirm=yes), works without JavaScript, and with htmx swaps the customer's page in place."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.audit import EVENTS
from app.staff import Role, Staff, audit_view, customers
from app.staff.web import redirect, render_admin, staff_action, staff_page
from app.web.request import client_of, services

# Each action: (the question asked before it runs, the words of its confirm button).
ACTIONS: dict[str, tuple[str, str]] = {
    "codes-on": ("Turn sign-in codes on for {email}?", "Turn codes on"),
    "codes-off": ("Turn sign-in codes off for {email}? The password alone will sign them in.", "Turn codes off"),
    "unlock": ("Unlock {email}? Their failure count starts again from 0.", "Unlock"),
    "end-sessions": ("Sign {email} out on every device?", "End all sessions"),
    "revoke-devices": ("Stop trusting every device of {email}?", "Revoke all devices"),
    "disable": ("Disable the account of {email}? They are signed out and cannot sign in.", "Disable account"),
    "enable": ("Enable the account of {email} again?", "Enable account"),
    "bypass": ("Let {email} complete the second step with an emailed code for {hours} hours?", "Grant bypass"),
    "revoke-device": ("Stop trusting this device of {email}?", "Revoke device"),
    "resend-confirmation": ("Send {email} a mail asking them to confirm their address?", "Resend email confirmation"),
}


def _int(value: Any, default: int | None = None, *, limit: int = 2**62) -> int | None:
    text = str(value or "").strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        return default
    number = int(text)
    return number if 0 < number < limit else default


def _actor(request: Request, staff: Staff) -> customers.Actor:
    client = client_of(request)
    return customers.Actor(staff.id, staff.email, client.ip, client.user_agent)


@staff_page(Role.VIEWER)
async def customer_list(request: Request, staff: Staff) -> Response:
    params = request.query_params
    found = await customers.search(services(request).db, query=params.get("q", ""), sort=params.get("sort", "id"),
                                   page=_int(params.get("page"), 1) or 1)
    return render_admin(request, "admin/customers.html", {"found": found, "sorts": list(customers.SORTS)})


async def _detail_page(request: Request, staff: Staff, customer_id: int, *, status: int = 200,
                       error: str | None = None, notice: str | None = None,
                       confirm: dict[str, Any] | None = None) -> Response:
    svc = services(request)
    found = await customers.detail(svc.db, customer_id, now=svc.clock.now(), idle=svc.settings.session_idle_timeout)
    if found is None:
        return render_admin(request, "admin/customer.html", {"found": None}, status=404)
    return render_admin(request, "admin/customer.html", {"found": found, "error": error, "notice": notice,
                                                         "confirm": confirm, "is_admin": staff.role is Role.ADMIN},
                        status=status)


@staff_page(Role.VIEWER)
async def customer_page(request: Request, staff: Staff) -> Response:
    customer_id = _int(request.path_params.get("id"))
    if customer_id is None:
        return render_admin(request, "admin/customer.html", {"found": None}, status=404)
    return await _detail_page(request, staff, customer_id)


@staff_action(Role.ADMIN)
async def customer_action(request: Request, staff: Staff) -> Response:
    """POST /admin/customers/{id}/{action}: without confirm=yes, the question; with it, the change."""
    customer_id = _int(request.path_params.get("id"))
    action = str(request.path_params.get("action", ""))
    if customer_id is None or action not in ACTIONS:
        return render_admin(request, "admin/customer.html", {"found": None}, status=404)
    form = await request.form()
    svc, now = services(request), services(request).clock.now()
    customer = await customers.queries.get_customer(svc.db, customer_id)
    if customer is None:
        return render_admin(request, "admin/customer.html", {"found": None}, status=404)
    hours = _int(form.get("hours"), 24, limit=10_000) or 24
    reason = str(form.get("reason", "")).strip()[:500]
    device_id = _int(form.get("device"))
    if action == "bypass" and not reason:
        return await _detail_page(request, staff, customer_id, status=422,
                                  error="Type the reason for the bypass (what you checked).")
    if form.get("confirm") != "yes":
        question, button = ACTIONS[action]
        return await _detail_page(request, staff, customer_id, confirm={
            "action": action, "question": question.format(email=customer.email, hours=hours), "button": button,
            "hours": hours, "reason": reason, "device": device_id or ""})
    actor = _actor(request, staff)
    try:
        if action in ("codes-on", "codes-off"):
            await customers.set_codes(svc.db, actor, customer_id, on=action == "codes-on", now=now)
        elif action == "unlock":
            await customers.unlock(svc.db, actor, customer_id, now=now)
        elif action == "end-sessions":
            await customers.end_sessions(svc.db, actor, customer_id, now=now)
        elif action == "revoke-devices":
            await customers.revoke_devices(svc.db, actor, customer_id, now=now)
        elif action == "revoke-device":
            if device_id is None:
                raise customers.Refused("Choose a device.")
            await customers.revoke_device(svc.db, actor, customer_id, device_id, now=now)
        elif action in ("disable", "enable"):
            await customers.set_disabled(svc.db, actor, customer_id, disabled=action == "disable", now=now)
        elif action == "resend-confirmation":
            svc.mailer.dispatch(await customers.resend_confirmation(
                svc.db, svc.sealer, actor, customer_id, origin=client_of(request).origin, now=now))
        elif action == "bypass":
            await customers.grant_bypass(svc.db, actor, customer_id, hours=hours, reason=reason, now=now)
    except customers.Refused as exc:
        return await _detail_page(request, staff, customer_id, status=422, error=str(exc))
    return await _detail_page(request, staff, customer_id, notice=f"Done: {ACTIONS[action][1].lower()}.")


def _filters(request: Request) -> tuple[audit_view.Filters, str | None]:
    p = request.query_params
    error = None

    def day(name: str) -> datetime | None:
        nonlocal error
        text = p.get(name, "").strip()
        if not text:
            return None
        try:
            return datetime.fromisoformat(text[:32]).replace(tzinfo=UTC) if "T" not in text else \
                datetime.fromisoformat(text[:32]).astimezone(UTC)
        except ValueError:
            error = f"“{text[:40]}” is not a date like 2026-11-28."
            return None

    event = p.get("event", "").strip() or None
    if event is not None and event not in EVENTS:
        error, event = f"There is no event type “{event[:40]}”.", None
    until = day("to")
    return audit_view.Filters(
        customer_id=_int(p.get("customer")), staff_id=_int(p.get("staff")), event=event,
        ip=(p.get("ip", "").strip()[:45] or None), since=day("from"),
        until=until + timedelta(days=1) if until is not None and "T" not in p.get("to", "") else until,
    ), error


@staff_page(Role.VIEWER)
async def audit_page(request: Request, staff: Staff) -> Response:
    filters, error = _filters(request)
    page = await audit_view.events(services(request).db, filters, page=_int(request.query_params.get("page"), 1) or 1)
    return render_admin(request, "admin/audit.html", {"page": page, "error": error, "events": sorted(EVENTS),
                                                      "query": request.url.query},
                        status=422 if error else 200)


@staff_page(Role.VIEWER)
async def audit_csv(request: Request, staff: Staff) -> Response:
    filters, error = _filters(request)
    if error:
        return redirect(request, "/admin/audit?" + request.url.query)
    text = await audit_view.as_csv(services(request).db, filters)
    return Response(text, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="audit.csv"', "Cache-Control": "no-store"})


routes = [
    Route("/admin/customers", customer_list, methods=["GET"], name="admin:customers"),
    Route("/admin/customers/{id}", customer_page, methods=["GET"], name="admin:customer"),
    Route("/admin/customers/{id}/{action}", customer_action, methods=["POST"], name="admin:customer_action"),
    Route("/admin/audit", audit_page, methods=["GET"], name="admin:audit"),
    Route("/admin/audit.csv", audit_csv, methods=["GET"], name="admin:audit_csv"),
]

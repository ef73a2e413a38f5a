"""The staff console's customer pages, actions and audit view, on both backends (issue 18):
search and paging, a customer's page, each action confirmed, audited with before and after,
and refused for a viewer; the audit view's filters and CSV."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import timedelta

import httpx
import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.staff import Role
from app.tables import auth_events, auth_sessions, customers, trusted_devices
from tests.conftest import Capture, Running, login, registered, wait_mail
from tests.staff_support import staff_cookies

pytestmark = pytest.mark.anyio


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]


async def act(c: httpx.AsyncClient, customer_id: int, action: str, **data: str) -> httpx.Response:
    """An action as a person does it: the question first, then the confirm button."""
    page = await c.get(f"/admin/customers/{customer_id}")
    token = csrf_of(page.text)
    asked = await c.post(f"/admin/customers/{customer_id}/{action}", data={"csrf_token": token, **data})
    assert asked.status_code == 200 and "alertdialog" in asked.text, asked.text[:500]
    return await c.post(f"/admin/customers/{customer_id}/{action}",
                        data={"csrf_token": csrf_of(asked.text), "confirm": "yes", **data})


async def staff_events(server: Running) -> list[dict[str, object]]:
    rows = await server.services.db.fetch_all(
        sa.select(auth_events.c.staff_id, auth_events.c.customer_id, auth_events.c.detail)
        .where(auth_events.c.event == "staff_action").order_by(auth_events.c.id))
    return [{**json.loads(r.detail), "staff_id": r.staff_id, "customer": r.customer_id} for r in rows]


async def jane(server: Running, smtp: Capture) -> int:
    async with server.client() as c:
        await registered(c, smtp)
    return int(await server.services.db.fetch_val(sa.select(customers.c.id)))


async def test_search_finds_by_email_username_name_and_id_and_pages_by_50(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    db = server.services.db
    rows = [{"username": f"user{i:03d}", "email": f"user{i:03d}@example.com", "full_name": f"Person {i:03d}",
             "password_hash": "x", "otp_enabled": True, "otp_attempts": 0, "otp_lockouts": 0, "session_version": 0,
             "source": "signup", "created_at": clock.now()} for i in range(120)]
    await db.execute_many(customers.insert(), rows)
    cookies, _ = await staff_cookies(server, role=Role.VIEWER)
    async with server.client(cookies=cookies) as c:
        first = await c.get("/admin/customers", params={"q": "user", "sort": "email"})
        assert first.status_code == 200
        emails = re.findall(r">(user\d{3}@example\.com)<", first.text)
        assert emails == [f"user{i:03d}@example.com" for i in range(50)]
        assert "Next page" in first.text
        third = await c.get("/admin/customers", params={"q": "user", "sort": "email", "page": "3"})
        assert re.findall(r">(user\d{3}@example\.com)<", third.text)[0] == "user100@example.com"
        assert "Next page" not in third.text
        assert "user007@example.com" in (await c.get("/admin/customers", params={"q": "Person 007"})).text
        assert "user042@example.com" in (await c.get("/admin/customers", params={"q": "USER042"})).text
        some_id = await db.fetch_val(sa.select(customers.c.id).where(customers.c.username == "user077"))
        assert "user077@example.com" in (await c.get("/admin/customers", params={"q": str(some_id)})).text
        odd = await c.get("/admin/customers", params={"q": "%_\\' OR 1=1 --", "page": "99999999999999999999"})
        assert odd.status_code == 200 and "No customer matches" in odd.text


async def test_customer_page_shows_state_and_codes_but_never_a_code(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    cid = await jane(server, smtp)
    code_mail = (await wait_mail(smtp, "jane@example.com"))[-1]
    code = re.search(r"^\s*(\d{6})\s*$", code_mail.get_body(("plain",)).get_content(), re.M).group(1)  # type: ignore[union-attr]
    cookies, _ = await staff_cookies(server, role=Role.VIEWER)
    async with server.client(cookies=cookies) as c:
        page = await c.get(f"/admin/customers/{cid}")
        assert page.status_code == 200
        for text in ("jane@example.com", "Sign-in codes", "registration", "verified", "Last sign-ins"):
            assert text in page.text
        assert code not in page.text
        assert "Turn codes off" not in page.text  # a viewer sees no actions
        assert (await c.get("/admin/customers/999999")).status_code == 404
        assert (await c.get("/admin/customers/abc")).status_code == 404


async def test_each_action_is_confirmed_then_done_and_audited_with_before_and_after(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    cid = await jane(server, smtp)
    db = server.services.db
    await db.execute(customers.update().values(otp_attempts=3, otp_locked_until=clock.now() + timedelta(hours=1)))
    cookies, admin = await staff_cookies(server, role=Role.ADMIN)
    async with server.client(cookies=cookies) as c:
        page = await c.get(f"/admin/customers/{cid}")
        asked = await c.post(f"/admin/customers/{cid}/codes-off", data={"csrf_token": csrf_of(page.text)})
        assert "Turn sign-in codes off for jane@example.com?" in asked.text
        assert await db.fetch_val(sa.select(customers.c.otp_enabled)) in (True, 1)  # nothing yet
        r = await act(c, cid, "codes-off")
        assert r.status_code == 200 and "Done" in r.text
        assert await db.fetch_val(sa.select(customers.c.otp_enabled)) in (False, 0)
        await act(c, cid, "unlock")
        assert await db.fetch_val(sa.select(customers.c.otp_locked_until)) is None
        await act(c, cid, "end-sessions")
        live = await db.fetch_val(sa.select(sa.func.count()).select_from(auth_sessions)
                                  .where(auth_sessions.c.revoked_at.is_(None)))
        assert live == 0
        await act(c, cid, "disable")
        assert await db.fetch_val(sa.select(customers.c.disabled_at)) is not None
    events = await staff_events(server)
    assert [e["action"] for e in events] == ["sign-in codes", "unlock", "end all sessions", "account"]
    assert all(e["staff_id"] == admin.id and e["staff"] == admin.email and e["customer"] == cid for e in events)
    assert events[0]["before"] == "on" and events[0]["after"] == "off"
    assert events[1]["before"]["failures"] == 3 and events[1]["after"]["failures"] == 0  # type: ignore[index]
    assert events[3]["before"] == "enabled" and events[3]["after"] == "disabled"
    async with server.client() as customer:
        r = await login(customer)
        assert r.status_code == 422 and "disabled" in r.text


async def test_a_viewer_cannot_act(server: Running, smtp: Capture, clock: FixedClock) -> None:
    cid = await jane(server, smtp)
    cookies, _ = await staff_cookies(server, role=Role.VIEWER)
    async with server.client(cookies=cookies) as c:
        page = await c.get(f"/admin/customers/{cid}")
        r = await c.post(f"/admin/customers/{cid}/disable", data={"csrf_token": csrf_of(page.text), "confirm": "yes"})
        assert r.status_code == 403
    assert await server.services.db.fetch_val(sa.select(customers.c.disabled_at)) is None
    assert await staff_events(server) == []


async def test_revoking_trusted_devices_from_the_console(server: Running, smtp: Capture, clock: FixedClock) -> None:
    from app.factors import devices

    cid = await jane(server, smtp)
    db = server.services.db
    one = await devices.trust(db, customer_id=cid, label="Firefox on Windows", ip="192.0.2.1", now=clock.now(), days=30)
    await devices.trust(db, customer_id=cid, label="Chrome on Android", ip="192.0.2.2", now=clock.now(), days=30)
    assert one
    device_id = await db.fetch_val(sa.select(trusted_devices.c.id).where(trusted_devices.c.label == "Firefox on Windows"))
    cookies, _ = await staff_cookies(server)
    async with server.client(cookies=cookies) as c:
        await act(c, cid, "revoke-device", device=str(device_id))
        assert len(await devices.list_devices(db, cid, clock.now())) == 1
        await act(c, cid, "revoke-devices")
        assert await devices.list_devices(db, cid, clock.now()) == []


async def test_bypass_needs_a_reason_and_a_factor(server: Running, smtp: Capture, clock: FixedClock) -> None:
    cid = await jane(server, smtp)
    cookies, _ = await staff_cookies(server)
    async with server.client(cookies=cookies) as c:
        page = await c.get(f"/admin/customers/{cid}")
        r = await c.post(f"/admin/customers/{cid}/bypass", data={"csrf_token": csrf_of(page.text), "hours": "24"})
        assert r.status_code == 422 and "reason" in r.text
        r = await act(c, cid, "bypass", hours="24", reason="ID checked at the counter")
        assert r.status_code == 422 and "no authenticator app or passkey" in r.text


async def test_audit_view_filters_and_exports_csv(server: Running, smtp: Capture, clock: FixedClock) -> None:
    cid = await jane(server, smtp)
    async with server.client() as c:
        await login(c, password="wrong-password-1")
    cookies, admin = await staff_cookies(server, role=Role.VIEWER)
    async with server.client(cookies=cookies) as c:
        r = await c.get("/admin/audit", params={"customer": str(cid), "event": "password_failed"})
        assert r.status_code == 200
        assert r.text.count("<td>password_failed</td>") == 1 and "<td>registered</td>" not in r.text
        day = clock.now().date().isoformat()
        r = await c.get("/admin/audit", params={"from": day, "to": day, "event": "registered"})
        assert "<td>registered</td>" in r.text
        r = await c.get("/admin/audit", params={"from": "2020-01-01", "to": "2020-01-02"})
        assert "No events match" in r.text
        bad = await c.get("/admin/audit", params={"from": "yesterday", "event": "nope"})
        assert bad.status_code == 422 and "not a date" in bad.text
        exported = await c.get("/admin/audit.csv", params={"customer": str(cid)})
        assert exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(exported.text)))
        assert rows[0][0] == "time (UTC)" and {r[1] for r in rows[1:]} >= {"registered", "password_failed"}


async def test_resend_confirmation_mails_an_unconfirmed_sign_up_and_ends_its_cooldown(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    from tests.conftest import register

    async with server.client() as c:
        await register(c)  # never confirmed
    await wait_mail(smtp, "jane@example.com")
    db = server.services.db
    cid = int(await db.fetch_val(sa.select(customers.c.id)))
    cookies, _ = await staff_cookies(server)
    async with server.client(cookies=cookies) as c:
        r = await act(c, cid, "resend-confirmation")
        assert r.status_code == 200 and "Done" in r.text
    mail = (await wait_mail(smtp, "jane@example.com", 2))[-1]
    assert mail["Subject"] == "Confirm your Computer Shop email address"
    assert "/login" in mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert await db.fetch_val(sa.select(customers.c.otp_last_sent_at)) is None
    async with server.client() as customer:
        assert (await login(customer)).headers["location"] == "/verify"
        await wait_mail(smtp, "jane@example.com", 3)  # the code goes at once
    events = await staff_events(server)
    assert events[-1]["action"] == "resend email confirmation"
    async with server.client(cookies=cookies) as c:
        await c.get(f"/admin/customers/{cid}")
    await db.execute(customers.update().values(email_verified_at=clock.now()))
    async with server.client(cookies=cookies) as c:
        r = await act(c, cid, "resend-confirmation")
        assert r.status_code == 422 and "confirmed already" in r.text

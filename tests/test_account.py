"""Account settings (SECURITY.md 33): a password change needs the current one and ends the
other sessions; an address change needs the password and a code to the new address and tells
the old one; deleting needs the password and a code, and keeps only the customer id."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.tables import auth_events, auth_sessions, customers, mail_outbox, otp_codes
from app.tables import otp_verification as customer_otp_verification
from tests.conftest import (
    PASSWORD,
    Capture,
    Running,
    code_in,
    get_csrf,
    login,
    registered,
    submit_code,
    text_of,
    wait_mail,
)

pytestmark = pytest.mark.anyio
NEW_PASSWORD = "Quiet-Orchard-Lantern-58"


async def post(client: httpx.AsyncClient, path: str, page: str = "/account", htmx: bool = False,
               **data: str) -> httpx.Response:
    token = await get_csrf(client, page)
    return await client.post(path, data={"csrf_token": token, **data}, headers={"HX-Request": "true"} if htmx else {})


async def test_account_settings_need_a_session_and_show_every_control(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        assert (await c.get("/account")).headers["location"] == "/login"
        assert (await c.get("/account/delete")).headers["location"] == "/login"
        await registered(c, smtp)
        dashboard = await c.get("/dashboard")
        assert '<a href="/account">Account settings</a>' in dashboard.text
        page = await c.get("/account")
    for label in ("Current password", "New password", "Confirm new password", "New email"):
        assert f">{label}</label>" in page.text, label
    for button in ("Change password", "Change email"):
        assert f">{button}</button>" in page.text, button
    assert ">Delete account</a>" in page.text
    assert page.text.count(">Current password</label>") == 1, "one control per label on the page"


async def test_changing_the_password_needs_the_current_one_and_ends_the_other_sessions(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as other, server.client() as c:
        await registered(other, smtp)
        clock.advance(61)
        await login(c)
        await submit_code(c, code_in((await wait_mail(smtp, "jane@example.com", 2))[-1]))
        r = await post(c, "/account/password", current_password="Wrong-Password-1", new_password=NEW_PASSWORD,
                       confirm_new_password=NEW_PASSWORD, htmx=True)
        assert r.status_code == 422 and "That is not your current password." in r.text and "<html" not in r.text
        r = await post(c, "/account/password", current_password=PASSWORD, new_password="password",
                       confirm_new_password="password")
        assert r.status_code == 422 and "too common" in r.text
        r = await post(c, "/account/password", current_password=PASSWORD, new_password=NEW_PASSWORD,
                       confirm_new_password=NEW_PASSWORD)
        assert r.status_code == 303 and r.headers["location"] == "/account"
        page = await c.get("/account")
        assert page.status_code == 200 and "Your password was changed" in page.text
        assert (await other.get("/dashboard")).headers["location"] == "/login", "other sessions end"
    notice = (await wait_mail(smtp, "jane@example.com", 3))[-1]
    assert "password was changed" in notice["Subject"] and "Not you?" in text_of(notice)
    clock.advance(61)
    async with server.client() as c:
        assert (await login(c, "jane", NEW_PASSWORD)).headers["location"] == "/verify"
    events = {r.event for r in await server.services.db.fetch_all(sa.select(auth_events.c.event))}
    assert "password_changed" in events


async def test_changing_the_address_needs_a_code_sent_to_the_new_one(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    db = server.services.db
    async with server.client() as c:
        await registered(c, smtp)
        r = await post(c, "/account/email", new_email="jane@example.com", password=PASSWORD)
        assert r.status_code == 422 and "already your email address" in r.text
        r = await post(c, "/account/email", new_email="new.jane@example.com", password="Wrong-Password-1")
        assert r.status_code == 422 and "That is not your current password." in r.text
        clock.advance(61)
        r = await post(c, "/account/email", new_email="New.Jane@Example.com", password=PASSWORD, htmx=True)
        assert r.status_code == 200 and "Confirm your new email address" in r.text
        assert "new.jane@example.com" in r.text.lower() and "Cancel" in r.text
        assert await db.fetch_val(sa.select(customers.c.email)) == "jane@example.com", "nothing changes yet"
        (mail,) = await wait_mail(smtp, "new.jane@example.com")
        assert "Confirm your new Computer Shop email address" in mail["Subject"]
        r = await submit_code(c, code_in(mail))
        assert r.status_code == 303 and r.headers["location"] == "/account"
        assert "Your email address was changed" in (await c.get("/account")).text
    row = await db.fetch_one(sa.select(customers))
    assert row.email == "new.jane@example.com" and row.email_verified_at is not None
    old = (await wait_mail(smtp, "jane@example.com", 2))[-1]
    assert "email address was changed" in old["Subject"] and "n***@example.com" in text_of(old)
    clock.advance(61)
    async with server.client() as c:
        assert (await login(c, "new.jane@example.com")).headers["location"] == "/verify"


async def test_an_address_of_another_account_looks_the_same_and_tells_its_owner(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """Two customers alike, one asking for an address that has an account and one for a free
    one: every answer the same, through wrong codes (both on the customer's own failure count),
    the cooldown's resend refusal, a resend, and the lockout."""
    async with server.client() as owner:
        await registered(owner, smtp, email="taken@example.com", username="taken")
    scrub = re.compile(r'class="tag">\w{3}<|[A-Za-z0-9_-]{43}|datetime="[^"]+"|[a-z0-9.]+@example\.com|'
                       r'data-countdown="\d+"|<span data-seconds>\d+</span>')

    async def journey(who: str, new_email: str) -> list[tuple[int, str]]:
        seen = []
        async with server.client() as c:
            await registered(c, smtp, email=f"{who}@example.com", username=who)
            clock.advance(61)
            r = await post(c, "/account/email", new_email=new_email, password=PASSWORD, htmx=True)
            seen.append((r.status_code, scrub.sub("", r.text)))
            for i in range(6):
                if i == 2:
                    token = await get_csrf(c, "/verify")
                    r = await c.post("/verify/resend", data={"csrf_token": token}, headers={"HX-Request": "true"})
                    seen.append((r.status_code, scrub.sub("", r.text)))  # inside the cooldown: refused
                    clock.advance(61)
                    r = await c.post("/verify/resend", data={"csrf_token": token}, headers={"HX-Request": "true"})
                    seen.append((r.status_code, scrub.sub("", r.text)))
                r = await submit_code(c, "000001", htmx=True)
                seen.append((r.status_code, scrub.sub("", r.text)))
        return seen

    assert await journey("jane", "taken@example.com") == await journey("bob", "free@example.com")
    notice = (await wait_mail(smtp, "taken@example.com", 3))[-1]
    assert "tried to use your email address" in notice["Subject"]
    await asyncio.sleep(0.2)
    # The change and the resend a cooldown later: one notice each, never a code.
    assert [m["Subject"] for m in smtp.to("taken@example.com")].count(notice["Subject"]) == 2
    assert await server.services.db.fetch_val(
        sa.select(customers.c.email).where(customers.c.username == "jane")) == "jane@example.com"


async def test_a_change_of_address_completes_only_in_its_own_session(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        clock.advance(61)
        await post(c, "/account/email", new_email="new.jane@example.com", password=PASSWORD)
        code = code_in((await wait_mail(smtp, "new.jane@example.com"))[0])
        pending = dict(c.cookies)
        token = await get_csrf(c, "/verify")
        await c.post("/logout", data={"csrf_token": token})
    async with server.client(cookies=pending) as stale:  # the pending step, its session ended
        r = await stale.post("/verify", data={"csrf_token": token, "code": code})
        assert r.headers.get("location") != "/account"
    assert await server.services.db.fetch_val(sa.select(customers.c.email)) == "jane@example.com"


async def test_deleting_needs_the_password_and_a_code_and_keeps_only_the_id(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    db = server.services.db
    async with server.client() as other, server.client() as c:
        await registered(other, smtp)
        clock.advance(61)
        await login(c)
        await submit_code(c, code_in((await wait_mail(smtp, "jane@example.com", 2))[-1]))
        page = await c.get("/account/delete")
        assert ">Password</label>" in page.text and ">Delete account</button>" in page.text
        r = await post(c, "/account/delete", page="/account/delete", password="Wrong-Password-1")
        assert r.status_code == 422 and "That is not your current password." in r.text
        clock.advance(61)
        r = await post(c, "/account/delete", page="/account/delete", password=PASSWORD)
        assert r.headers["location"] == "/verify"
        assert "Confirm deleting your account" in (await c.get("/verify")).text
        assert await db.fetch_val(sa.select(sa.func.count()).select_from(customers)) == 1, "not before the code"
        code = code_in((await wait_mail(smtp, "jane@example.com", 3))[-1])
        r = await submit_code(c, code)
        assert r.status_code == 303 and r.headers["location"] == "/login?deleted=1"
        assert "Your account has been deleted" in (await c.get("/login?deleted=1")).text
        assert (await other.get("/dashboard")).headers["location"] == "/login"
    customer_id = await db.fetch_val(sa.select(auth_events.c.customer_id).limit(1))
    for table in (customers, auth_sessions, customer_otp_verification, otp_codes):
        assert await db.fetch_val(sa.select(sa.func.count()).select_from(table)) == 0, table.name
    kept = await db.fetch_all(sa.select(auth_events))
    assert kept and all(e.customer_id == customer_id and e.ip == "" and e.user_agent == "" for e in kept)
    assert "account_deleted" in {e.event for e in kept}
    goodbye = (await wait_mail(smtp, "jane@example.com", 4))[-1]
    assert "account was deleted" in goodbye["Subject"]
    outbox = await db.fetch_all(sa.select(mail_outbox.c.customer_id, mail_outbox.c.kind))
    assert all(m.customer_id is None for m in outbox), "no queued mail of the customer is left"
    clock.advance(61)
    async with server.client() as c:
        assert (await login(c)).status_code == 422

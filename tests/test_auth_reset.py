"""Forgot password (SECURITY.md 33): the same answer for every address, the rules of every code,
no way around a lockout, every session ended, a notice mailed."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.tables import auth_events, auth_sessions, customers
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


async def forgot(client: httpx.AsyncClient, email: str, htmx: bool = False) -> httpx.Response:
    token = await get_csrf(client, "/password/forgot")
    return await client.post("/password/forgot", data={"csrf_token": token, "email": email},
                             headers={"HX-Request": "true"} if htmx else {})


async def set_password(client: httpx.AsyncClient, password: str = NEW_PASSWORD,
                       confirm: str | None = None) -> httpx.Response:
    token = await get_csrf(client, "/password/new")
    return await client.post("/password/new", data={"csrf_token": token, "new_password": password,
                                                     "confirm_new_password": password if confirm is None else confirm})


async def test_the_sign_in_page_links_to_forgot_password(client: httpx.AsyncClient) -> None:
    page = await client.get("/login")
    assert '<a href="/password/forgot">Forgot password?</a>' in page.text
    form = await client.get("/password/forgot")
    assert form.status_code == 200 and '<label for="email">Email</label>' in form.text and ">Send code<" in form.text


async def test_forgot_password_answers_alike_for_every_address_and_mails_only_an_account(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(3600)
    scrub = re.compile(r'class="tag">\w{3}<|[A-Za-z0-9_-]{43}|datetime="[^"]+"|[a-z0-9.]+@example\.com')
    seen = []
    for email in ("jane@example.com", "nobody@example.com"):
        async with server.client() as c:
            r = await forgot(c, email, htmx=True)
            assert r.status_code == 200 and r.headers["HX-Push-Url"] == "/verify"
            assert email in r.text, "the address typed is shown whole"
            if email == "jane@example.com":
                await wait_mail(smtp, email, 2)  # a mail server that answers at once
            await server.services.mailer.drain()
            await asyncio.sleep(0.1)
            clock.advance(2)
            poll = await c.get("/verify/delivery", headers={"HX-Request": "true"})
            seen.append((scrub.sub("", r.text), scrub.sub("", (await c.get("/verify")).text), poll.text))
            assert "If there is an account with" in r.text
    assert seen[0] == seen[1]
    await asyncio.sleep(0.3)
    assert len(smtp.to("jane@example.com")) == 2 and smtp.to("nobody@example.com") == []
    assert "reset the password" in text_of(smtp.to("jane@example.com")[-1])


async def test_the_reset_code_then_a_new_password_signs_in_and_ends_every_other_session(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    db = server.services.db
    async with server.client() as elsewhere:
        await registered(elsewhere, smtp)
        clock.advance(61)
        async with server.client() as c:
            assert (await forgot(c, "Jane@Example.com")).headers["location"] == "/verify"
            code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
            r = await submit_code(c, code)
            assert r.status_code == 303 and r.headers["location"] == "/password/new"
            page = await c.get("/password/new")
            for label in ("New password", "Confirm new password"):
                assert f">{label}</label>" in page.text
            assert ">Set password<" in page.text
            r = await set_password(c)
            assert r.status_code == 303 and r.headers["location"] == "/dashboard"
            dashboard = await c.get("/dashboard")
            assert dashboard.status_code == 200 and "Your new password is set" in dashboard.text
        assert (await elsewhere.get("/dashboard")).headers["location"] == "/login", "every other session ended"
    stored = await db.fetch_val(sa.select(customers.c.password_hash))
    assert stored.startswith("$argon2id$")
    live = await db.fetch_val(sa.select(sa.func.count()).select_from(auth_sessions)
                              .where(auth_sessions.c.revoked_at.is_(None)))
    assert live == 1  # the one this reset started; the old one is revoked
    notice = (await wait_mail(smtp, "jane@example.com", 3))[-1]
    text = text_of(notice)
    assert "password was changed" in notice["Subject"] and "Chrome 130 on Linux" in text and "Not you?" in text
    assert re.search(r"on \w+day \d{1,2} \w+ \d{4} at \d\d:\d\d UTC", text)
    events = [r.event for r in await db.fetch_all(sa.select(auth_events.c.event).order_by(auth_events.c.id))]
    assert {"reset_requested", "password_reset", "session_revoked"} <= set(events)
    clock.advance(61)
    async with server.client() as c:
        assert (await login(c, "jane", PASSWORD)).status_code == 422
    async with server.client() as c:
        assert (await login(c, "jane", NEW_PASSWORD)).headers["location"] == "/verify"


async def test_a_reset_code_sets_the_password_once(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as c:
        assert (await c.get("/password/new")).headers["location"] == "/password/forgot", "no code entered yet"
        await forgot(c, "jane@example.com")
        assert (await c.get("/password/new")).headers["location"] == "/verify", "the code first"
        code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
        await submit_code(c, code)
        before = dict(c.cookies)
        token = await get_csrf(c, "/password/new")
        assert (await set_password(c)).headers["location"] == "/dashboard"
    async with server.client(cookies=before) as replay:
        r = await replay.post("/password/new", data={"csrf_token": token, "new_password": "Another-Secret-Pass-1",
                                                     "confirm_new_password": "Another-Secret-Pass-1"})
        assert r.status_code == 303 and r.headers["location"] == "/password/forgot"


async def test_the_new_password_follows_the_registration_rules(server: Running, smtp: Capture,
                                                               clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as c:
        await forgot(c, "jane@example.com")
        await submit_code(c, code_in((await wait_mail(smtp, "jane@example.com", 2))[-1]))
        r = await set_password(c, "password")
        assert r.status_code == 422 and 'id="new_password-error"' in r.text and "too common" in r.text
        r = await set_password(c, NEW_PASSWORD, "something-else")
        assert r.status_code == 422 and 'id="confirm_new_password-error"' in r.text
        r = await set_password(c, "jane@example.com")
        assert r.status_code == 422 and "must not be your email" in r.text
        assert (await set_password(c)).headers["location"] == "/dashboard"


async def test_a_locked_customer_stays_locked_through_a_reset(server: Running, smtp: Capture,
                                                              clock: FixedClock) -> None:
    """The reset itself answers as for anyone (the lockout is not shown to whoever asks), and a
    reset lifts no lockout: the password changes and every session ends, but none starts while
    codes are paused, and the failure count is untouched."""
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as c:
        await login(c)
        code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
        wrong = "000000" if code != "000000" else "111111"
        for _ in range(5):
            await submit_code(c, wrong)
    locked = await server.services.db.fetch_one(sa.select(customers))
    assert locked.otp_locked_until is not None and locked.otp_lockouts == 1
    async with server.client() as c:
        await forgot(c, "jane@example.com")
        page = await c.get("/verify")
        assert "codes are paused" not in page.text and not re.search(r'id="code"[^>]* disabled', page.text)
        reset_code = code_in((await wait_mail(smtp, "jane@example.com", 3))[-1])
        assert (await submit_code(c, reset_code)).headers["location"] == "/password/new"
        r = await set_password(c)
        assert r.status_code == 200 and "Your new password is set" in r.text and "codes stay paused" in r.text
        assert (await c.get("/dashboard")).headers["location"] == "/login", "no session while locked"
    row = await server.services.db.fetch_one(sa.select(customers))
    assert row.otp_locked_until == locked.otp_locked_until and row.otp_lockouts == 1
    assert row.password_hash != locked.password_hash
    async with server.client() as c:
        await login(c, "jane", NEW_PASSWORD)
        page = await c.get("/verify")
        assert "codes are paused" in page.text, "the new password meets the same lockout"


async def test_wrong_reset_codes_never_lock_the_owners_sign_in(server: Running, smtp: Capture,
                                                              clock: FixedClock) -> None:
    """Anyone can ask for a reset for any address: its wrong codes count on the address's own
    reset ledger (which locks resets), never on the customer's failure count, so the owner's
    sign-in codes keep working however often a stranger tries."""
    async with server.client() as c:
        await registered(c, smtp)
    for _ in range(3):
        clock.advance(3601)
        async with server.client() as stranger:
            await forgot(stranger, "jane@example.com")
            for _ in range(5):
                await submit_code(stranger, "000001")
            assert "codes are paused" in (await stranger.get("/verify")).text  # resets are paused
    row = await server.services.db.fetch_one(sa.select(customers))
    assert row.otp_attempts == 0 and row.otp_locked_until is None and row.otp_lockouts == 0
    clock.advance(61)
    async with server.client() as owner:
        await login(owner)
        code = code_in((await wait_mail(smtp, "jane@example.com", 5))[-1])
        assert (await submit_code(owner, code)).headers["location"] == "/dashboard"


async def test_a_reset_request_neither_ends_nor_holds_up_the_owners_sign_in(server: Running, smtp: Capture,
                                                                          clock: FixedClock) -> None:
    """A stranger's reset request does not end the owner's pending sign-in step, take the
    customer's resend cooldown, or hand the owner's step to the stranger."""
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as owner:
        await login(owner)
        sign_in_code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
        clock.advance(61)
        async with server.client() as stranger:
            await forgot(stranger, "jane@example.com")
            await wait_mail(smtp, "jane@example.com", 3)
        token = await get_csrf(owner, "/verify")
        r = await owner.post("/verify/resend", data={"csrf_token": token})
        assert r.status_code == 303, "the customer's cooldown was not taken by the reset"
        assert (await submit_code(owner, sign_in_code)).headers["location"] == "/dashboard"


async def test_a_second_reset_request_inside_a_minute_answers_as_for_an_unknown_address(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """Two browsers asking for the same address within a minute: the second gets a step of its
    own (the first keeps working) and no mail, whether the address has an account or not."""
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(3600)
    scrub = re.compile(r'class="tag">\w{3}<|[A-Za-z0-9_-]{43}|datetime="[^"]+"|[a-z0-9.]+@example\.com')
    seen = {}
    for email in ("jane@example.com", "nobody@example.com"):
        async with server.client() as a, server.client() as b:
            first = await forgot(a, email, htmx=True)
            second = await forgot(b, email, htmx=True)
            assert (await a.get("/verify")).status_code == 200, "the first browser keeps its step"
            seen[email] = (scrub.sub("", first.text), scrub.sub("", second.text),
                           scrub.sub("", (await b.get("/verify")).text))
    assert seen["jane@example.com"] == seen["nobody@example.com"]
    await asyncio.sleep(0.3)
    assert len(smtp.to("jane@example.com")) == 2  # the registration's, and the first reset's only


async def test_a_reset_code_is_a_code_like_every_other(server: Running, smtp: Capture, clock: FixedClock) -> None:
    """Purpose-bound (it never signs in), 10 minutes, 5 wrong entries."""
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as c:
        await forgot(c, "jane@example.com")
        code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
        clock.advance(601)
        r = await submit_code(c, code)
        assert r.status_code == 422 and "This code has expired. Press “Resend code” for a new one." in r.text
    assert r.text.count("This code has expired") == 1


async def test_an_unknown_address_reset_behaves_like_a_real_one_through_wrong_codes_and_resends(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as owner:
        await registered(owner, smtp)

    async def probe(email: str) -> list[tuple[int, str]]:
        scrub = re.compile(r'class="tag">\w{3}<|[A-Za-z0-9_-]{43}|datetime="[^"]+"|[a-z0-9.]+@example\.com|data-countdown="\d+"|'
                           r'<span data-seconds>\d+</span>|wait \d+ seconds|<p id="delivery".*?</p>', re.S)
        seen = []
        async with server.client() as c:
            await forgot(c, email)
            for step in range(9):
                if step == 7:
                    clock.advance(61)
                    token = await get_csrf(c, "/verify")
                    r = await c.post("/verify/resend", data={"csrf_token": token})
                    seen.append((r.status_code, ""))
                    continue
                r = await submit_code(c, "000001")
                seen.append((r.status_code, scrub.sub("", r.text)))
        return seen

    clock.advance(3600)
    real = await probe("jane@example.com")
    clock.advance(3600)
    unknown = await probe("stranger@example.com")
    assert real == unknown
    # A lockout tells nothing either: a new session for the same address starts where the last
    # one left off, as a real customer's failures would.
    clock.advance(3600)
    for email in ("jane@example.com", "stranger@example.com"):
        async with server.client() as c:
            await forgot(c, email)
            for _ in range(5):
                await submit_code(c, "000001")
        async with server.client() as c:
            await forgot(c, email)
            assert "codes are paused" in (await c.get("/verify")).text, email

"""The code step never says what is not true, and the rough edges a new customer hits
(issue 15): cooldown honesty, a mistyped address, where "Start again" goes, no reloads, titles,
times in words, disabled controls while locked, the header."""

from __future__ import annotations

import re

import httpx
import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.tables import customers
from tests.conftest import (
    PASSWORD,
    Capture,
    Running,
    code_in,
    get_csrf,
    login,
    register,
    registered,
    submit_code,
    text_of,
    wait_mail,
)

pytestmark = pytest.mark.anyio


async def test_a_used_code_ends_the_cooldown_so_signing_in_right_after_registering_mails_a_code(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(5)  # well inside the 60 s cooldown
    async with server.client() as c:
        await login(c)
        page = await c.get("/verify")
        assert "less than a minute ago for something else" not in page.text
        (_, mail) = await wait_mail(smtp, "jane@example.com", 2)
        assert (await submit_code(c, code_in(mail))).headers["location"] == "/dashboard"


async def test_a_cooldown_that_holds_a_code_back_says_which_code_still_works(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as first:
        await login(first)
    code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
    clock.advance(20)
    async with server.client() as c:
        r = await login(c, htmx=True)
        assert "We did not send another code: the one we sent you a moment ago still works" in r.text
        assert re.search(r"We sent a 6-digit code to .*20 seconds ago|just now", r.text)
        assert "You can ask for a new code in <span data-seconds>40</span>" in r.text
        r = await login(c)  # without JavaScript the notice comes with the next page, once
        page = await c.get("/verify")
        assert "still works for this step" in page.text
        assert "still works for this step" not in (await c.get("/verify")).text
        assert (await submit_code(c, code)).headers["location"] == "/dashboard"
    assert len(smtp.to("jane@example.com")) == 2, "no code was sent for the held-back sign-ins"


async def test_a_placeholder_says_plainly_that_no_earlier_code_works_here(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """A proven step inside the customer's cooldown, whose code went for another purpose."""
    async with server.client() as signed_in:
        await registered(signed_in, smtp)
        clock.advance(61)
        token = await get_csrf(signed_in, "/account")
        await signed_in.post("/account/email", data={"csrf_token": token, "new_email": "new.jane@example.com",
                                                     "password": PASSWORD})
        await wait_mail(smtp, "new.jane@example.com")
    async with server.client() as c:
        await login(c)
        page = await c.get("/verify")
        assert "at most one code a minute" in page.text and "it does not work here" in page.text


async def test_the_registration_address_can_be_changed_and_the_old_code_stops_working(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as c:
        await register(c, email="jane@exmaple.com")
        typo = code_in((await wait_mail(smtp, "jane@exmaple.com"))[0])
        page = await c.get("/register/email")
        assert page.status_code == 200 and 'value="jane@exmaple.com"' in page.text and ">Email</label>" in page.text
        token = await get_csrf(c, "/register/email")
        r = await c.post("/register/email", data={"csrf_token": token, "email": "jane@example.com"})
        assert r.status_code == 303 and r.headers["location"] == "/verify"
        assert "jane@example.com" in (await c.get("/verify")).text
        fixed = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        if typo != fixed:
            r = await submit_code(c, typo)
            assert r.status_code == 422
        assert (await submit_code(c, fixed)).headers["location"] == "/dashboard"
    row = await server.services.db.fetch_one(sa.select(customers))
    assert row.email == "jane@example.com" and row.email_verified_at is not None


async def test_changing_the_address_of_a_stand_in_registers_for_real(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """The first address had an account (a stand-in step): the change registers the details
    with the new address, as it would for a new one."""
    async with server.client() as owner:
        await registered(owner, smtp, email="taken@example.com", username="owner")
    clock.advance(61)
    async with server.client() as c:
        await register(c, username="newcomer", email="taken@example.com")
        token = await get_csrf(c, "/register/email")
        r = await c.post("/register/email", data={"csrf_token": token, "email": "newcomer@example.com"})
        assert r.headers["location"] == "/verify"
        code = code_in((await wait_mail(smtp, "newcomer@example.com"))[0])
        assert (await submit_code(c, code)).headers["location"] == "/dashboard"
    assert await server.services.db.fetch_val(
        sa.select(customers.c.username).where(customers.c.email == "newcomer@example.com")) == "newcomer"


async def test_changing_the_address_twice_in_a_minute_waits_for_the_cooldown(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as c:
        await register(c, email="a@example.com")
        for address, status in (("b@example.com", 303), ("a@example.com", 422)):
            token = await get_csrf(c, "/register/email")
            r = await c.post("/register/email", data={"csrf_token": token, "email": address})
            assert r.status_code == status, address
        assert "less than 60 seconds ago" in r.text
        assert "a@example.com" not in (await c.get("/verify")).text.split("Wrong address")[0]


@pytest.mark.parametrize(("start", "back"), [("register", "/register"), ("login", "/login"),
                                             ("forgot", "/password/forgot")])
async def test_start_again_goes_where_the_step_began(server: Running, smtp: Capture, clock: FixedClock,
                                                      start: str, back: str) -> None:
    if start != "register":
        async with server.client() as c:
            await registered(c, smtp)
        clock.advance(61)
    async with server.client() as c:
        if start == "register":
            await register(c)
        elif start == "login":
            await login(c)
        else:
            token = await get_csrf(c, "/password/forgot")
            await c.post("/password/forgot", data={"csrf_token": token, "email": "jane@example.com"})
        page = await c.get("/verify")
        assert f'<a href="{back}">Start again</a>' in page.text


async def test_without_javascript_no_page_asks_for_a_reload(server: Running, smtp: Capture) -> None:
    """A reload of a page that answered a POST sends the form again (a wrong code costs an
    attempt): the hint is a link, which GETs."""
    async with server.client() as c:
        await register(c)
        r = await submit_code(c, "000001")
        assert r.status_code == 422
        for text in (r.text, (await c.get("/verify")).text):
            assert "reload" not in text.lower()
            assert re.search(r'<noscript><p class="hint">When the time is up, <a href="/verify">check again</a>', text)


@pytest.mark.parametrize("path", ["/login", "/register", "/password/forgot", "/verify"])
async def test_signed_in_customers_skip_the_sign_in_pages(server: Running, smtp: Capture, path: str) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        r = await c.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard"
        r = await c.get(path, headers={"HX-Request": "true"})
        assert "/dashboard" in r.headers["HX-Location"]


async def test_every_fragment_names_the_step_in_its_title(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        r = await register(c, htmx=True)
        assert r.text.startswith("<title>Confirm your email · Computer Shop</title>")
        code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        r = await submit_code(c, code, htmx=True)
        assert r.headers["HX-Location"]  # htmx then GETs the dashboard as a fragment:
        r = await c.get("/dashboard", headers={"HX-Request": "true"})
        assert r.text.startswith("<title>Your account · Computer Shop</title>")
        page = await c.get("/dashboard")
        assert page.text.count("<title>") == 1, "a whole page has only its own title"


async def test_no_page_shows_a_bare_utc_time(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        assert "UTC" not in (await c.get("/dashboard")).text
    clock.advance(61)
    async with server.client() as c:
        await login(c)
        page = (await c.get("/verify")).text
        assert "UTC" not in page and "just now" in page and "for 10 more minutes" in page
        assert re.search(r'<time datetime="[^"]+" data-local="until">for 10 more minutes</time>', page)
        for _ in range(5):
            r = await submit_code(c, "000001")
        assert "UTC" not in r.text
        assert re.search(r"codes are paused <time datetime=\"[^\"]+\" data-local=\"until\">for 1 more minute</time>\. ",
                         r.text), "the lockout's time is in the same sentence"
    mail = (await wait_mail(smtp, "jane@example.com", 2))[-1]
    assert "valid for 10 minutes" in text_of(mail)


async def test_while_locked_the_code_field_and_verify_are_disabled_and_the_timer_agrees(
    server: Running, smtp: Capture
) -> None:
    async with server.client() as c:
        await register(c)
        for _ in range(5):
            r = await submit_code(c, "000001")
        assert re.search(r'<input id="code"[^>]* disabled>', r.text)
        assert re.search(r'<button type="submit" class="primary" disabled>Verify</button>', r.text)
        assert re.search(r'id="resend" disabled>Resend code', r.text)
        assert "once codes are no longer paused" in r.text and "You can ask for a new code in" not in r.text


async def test_an_overlong_address_is_told_it_is_too_long(client: httpx.AsyncClient) -> None:
    token = await get_csrf(client, "/register")
    r = await client.post("/register", data={"csrf_token": token, "full_name": "Jane", "username": "jane",
                                             "email": "a" * 300 + "@example.com", "password": PASSWORD,
                                             "confirm_password": PASSWORD})
    assert r.status_code == 422 and "That address is too long" in r.text and "at most 254 characters" in r.text


async def test_handles_are_never_capitalised_and_passwords_can_be_shown(client: httpx.AsyncClient) -> None:
    for path, handles in (("/register", ("username", "email")), ("/login", ("login",))):
        page = (await client.get(path)).text
        for name in handles:
            tag = re.search(rf'<input id="{name}"[^>]*>', page).group()  # type: ignore[union-attr]
            assert 'autocapitalize="none"' in tag and 'spellcheck="false"' in tag, tag
        assert re.search(r'<input id="(username|login)"[^>]*autocomplete="username( webauthn)?"', page)
        toggles = re.findall(r'<button type="button" class="reveal secondary" data-reveal="(\w+)" '
                             r'aria-controls="\1" aria-pressed="false" hidden>Show', page)
        assert toggles, "a show/hide button beside each password (revealed by the script)"


async def test_the_header_says_who_is_signed_in_with_a_way_out(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        assert 'class="who"' not in (await c.get("/login")).text
        await registered(c, smtp, name="Jane Doe")
        page = (await c.get("/account")).text
        header = page.split("</header>")[0]
        assert "Jane Doe" in header and 'action="/logout"' in header and ">Sign out</button>" in header
        dashboard = (await c.get("/dashboard")).text
        assert dashboard.count(">Sign out</button>") == 1, "the dashboard's own button is the only one there"

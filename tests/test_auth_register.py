"""Registration: validation, account creation, the code mail, the code step, enumeration."""

from __future__ import annotations

import asyncio

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
    html_of,
    login,
    register,
    registered,
    submit_code,
    text_of,
    wait_mail,
)

pytestmark = pytest.mark.anyio


async def post_register(client: httpx.AsyncClient, htmx: bool = False, **fields: str) -> httpx.Response:
    data = {"full_name": "Jane Doe", "username": "jane", "email": "jane@example.com",
            "password": PASSWORD, "confirm_password": PASSWORD}
    data.update(fields)
    data["csrf_token"] = await get_csrf(client, "/register")
    return await client.post("/register", data=data, headers={"HX-Request": "true"} if htmx else {})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"email": "not-an-email"}, "Enter an email address like name@example.com."),
        ({"email": ""}, "Enter your email address."),
        ({"username": "a"}, "Use 3 to 30 letters"),
        ({"username": "bad name!"}, "Use 3 to 30 letters"),
        ({"full_name": ""}, "Enter your full name."),
        ({"password": "short", "confirm_password": "short"}, "Use at least 8 characters."),
        ({"password": "x" * 129, "confirm_password": "x" * 129}, "Use at most 128 characters."),
        ({"password": "password1", "confirm_password": "password1"}, "too common"),
        ({"password": "jane@example.com", "confirm_password": "jane@example.com"}, "must not be your email"),
        ({"username": "longusername1", "password": "longusername1", "confirm_password": "longusername1"},
         "must not be your email address or username"),
        ({"confirm_password": "something-else-99"}, "The two passwords do not match."),
    ],
)
async def test_invalid_registration_rerenders_page_with_422(client: httpx.AsyncClient, fields: dict[str, str],
                                                           message: str) -> None:
    r = await post_register(client, **fields)
    assert r.status_code == 422
    assert "<!doctype html>" in r.text.lower()
    assert message in r.text


async def test_invalid_registration_answers_htmx_with_422_fragment(client: httpx.AsyncClient) -> None:
    r = await post_register(client, htmx=True, email="nope")
    assert r.status_code == 422
    assert "<html" not in r.text and 'data-step="register"' in r.text
    assert "Enter an email address like name@example.com." in r.text
    assert 'aria-invalid="true"' in r.text
    assert r.headers["vary"].lower().find("hx-request") >= 0


async def test_common_password_list_has_at_least_10000_entries() -> None:
    from app.auth.forms import common_passwords

    assert len(common_passwords()) >= 10000


async def test_registration_creates_customer_with_otp_on_and_email_unverified(
    client: httpx.AsyncClient, server: Running
) -> None:
    r = await post_register(client, email="Jane.Doe@Example.COM")
    assert r.status_code == 303 and r.headers["location"] == "/verify"
    row = await server.services.db.fetch_one(sa.select(customers))
    assert row.email == "jane.doe@example.com"  # normalised
    assert row.otp_enabled and row.email_verified_at is None
    assert row.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")


async def test_registration_mails_multipart_code_with_name_and_lifetime(client: httpx.AsyncClient,
                                                                       smtp: Capture) -> None:
    await post_register(client)
    (msg,) = await wait_mail(smtp, "jane@example.com")
    assert msg.is_multipart()
    code = code_in(msg)
    assert code in html_of(msg)
    assert "Jane Doe" in text_of(msg) and "Jane Doe" in html_of(msg)
    assert "15 minutes" in text_of(msg)


async def test_code_step_replaces_form_in_place_for_htmx_and_shows_the_address_whole(client: httpx.AsyncClient) -> None:
    """The customer has just typed the address: shown whole, a typo can be seen and mended."""
    r = await post_register(client, htmx=True)
    assert r.status_code == 200
    assert r.headers["HX-Push-Url"] == "/verify"
    assert "<html" not in r.text
    assert "jane@example.com" in r.text and "Change email address" in r.text
    assert 'autocomplete="one-time-code"' in r.text and 'inputmode="numeric"' in r.text


async def test_full_page_load_of_pushed_url_shows_code_step(client: httpx.AsyncClient) -> None:
    await post_register(client, htmx=True)
    r = await client.get("/verify")
    assert r.status_code == 200 and "<!doctype html>" in r.text.lower() and "Verification code" in r.text


async def test_right_code_verifies_email_signs_in_and_lands_on_dashboard(
    client: httpx.AsyncClient, smtp: Capture, server: Running
) -> None:
    await post_register(client)
    code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
    r = await submit_code(client, code)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    row = await server.services.db.fetch_one(sa.select(customers))
    assert row.email_verified_at is not None
    page = await client.get("/dashboard")
    assert page.status_code == 200 and "Hello, Jane Doe" in page.text


async def test_right_code_with_htmx_answers_hx_location(client: httpx.AsyncClient, smtp: Capture) -> None:
    await post_register(client, htmx=True)
    code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
    r = await submit_code(client, code, htmx=True)
    assert r.status_code == 200 and "/dashboard" in r.headers["HX-Location"]


async def test_existing_email_gets_same_answer_and_owner_gets_notice(server: Running, smtp: Capture,
                                                                     clock: FixedClock) -> None:
    async with server.client() as first:
        await registered(first, smtp)
    clock.advance(61)  # at most one unasked mail a minute to an address: the code went just now
    async with server.client() as second:
        new = await post_register(second, htmx=True, username="other", email="fresh@example.com")
    async with server.client() as third:
        dup = await post_register(third, htmx=True, username="janet", email="jane@example.com")
    assert dup.status_code == new.status_code == 200
    assert dup.headers.get("HX-Push-Url") == new.headers.get("HX-Push-Url")
    mails = await wait_mail(smtp, "jane@example.com", count=2)
    notice = mails[1]
    assert "already" in notice["Subject"]
    assert not CODE_IN(notice), "the notice carries no code"
    # the same page shape, only the masked address differs
    assert dup.text.replace("j***@example.com", "X") .count("<form") == new.text.count("<form")


def CODE_IN(msg: object) -> list[str]:
    import re

    return re.findall(r"(?m)^\s*(\d{6})\s*$", text_of(msg))  # type: ignore[arg-type]


async def test_a_taken_username_is_said_on_the_form(server: Running, smtp: Capture) -> None:
    """Usernames are public handles: a taken one is said inline (addresses stay secret)."""
    async with server.client() as first:
        await registered(first, smtp)
    async with server.client() as second:
        r = await post_register(second, username="JANE", email="someone@example.com")
        assert r.status_code == 422 and 'id="username-error"' in r.text and "That username is taken" in r.text
        assert 'value="JANE"' in r.text and 'value="someone@example.com"' in r.text  # nothing typed is lost
        r = await post_register(second, username="jane", email="jane@example.com")  # the owner's own pair too
        assert r.status_code == 422 and "That username is taken" in r.text
    await asyncio.sleep(0.2)
    assert smtp.to("someone@example.com") == []


async def test_double_submit_creates_exactly_one_account(server: Running, smtp: Capture) -> None:
    async def one() -> int:
        async with server.client() as c:
            return (await post_register(c)).status_code

    statuses = await asyncio.gather(*(one() for _ in range(8)))
    assert set(statuses) == {303}
    count = await server.services.db.fetch_val(sa.select(sa.func.count()).select_from(customers))
    assert count == 1


async def test_name_with_markup_renders_escaped(client: httpx.AsyncClient, smtp: Capture) -> None:
    evil = '<img src=x onerror="alert(1)">'
    await register(client, name=evil)
    code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
    await submit_code(client, code)
    page = await client.get("/dashboard")
    assert evil not in page.text and "&lt;img src=x onerror=" in page.text
    assert evil not in html_of(smtp.to("jane@example.com")[0])


async def test_unverified_address_can_be_registered_again_by_its_owner(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """Nobody proved the address: a squatter's unverified account does not block its owner."""
    async with server.client() as squatter:
        await post_register(squatter, full_name="Squatter", username="squat")
    clock.advance(61)
    async with server.client() as owner:
        r = await post_register(owner, full_name="Jane Owner", username="janeowner")
        assert r.status_code == 303
        code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
        assert (await submit_code(owner, code)).headers["location"] == "/dashboard"
        assert "Hello, Jane Owner" in (await owner.get("/dashboard")).text
    row = await server.services.db.fetch_one(sa.select(customers))
    assert row.username == "janeowner" and row.email_verified_at is not None
    assert await server.services.db.fetch_val(sa.select(sa.func.count()).select_from(customers)) == 1


async def _probe(server: Running, clock: FixedClock, email: str, username: str) -> list[tuple[int, str]]:
    """What a stranger sees: 7 wrong codes, the page, a resend, 5 more, another resend."""
    import re

    seen: list[tuple[int, str]] = []
    scrub = re.compile(r'class="tag">\w{3}<|[A-Za-z0-9_-]{43}|\d\d:\d\d UTC|datetime="[^"]+"|[a-z0-9.*]+@example\.com|'
                       r'data-countdown="\d+"|<span data-seconds>\d+</span>|wait \d+ seconds|\d+ s\.')
    # The mail's delivery line depends on how far the dispatcher got: timing, not identity.
    delivery = re.compile(r'<p id="delivery".*?</p>', re.S)
    async with server.client() as c:
        await register(c, username=username, email=email, htmx=True)
        for step in range(14):
            if step in (7, 13):
                clock.advance(61)
                token = await get_csrf(c, "/verify")
                r = await c.post("/verify/resend", data={"csrf_token": token}, headers={"HX-Request": "true"})
            elif step == 12:
                r = await c.get("/verify")
            else:
                r = await submit_code(c, "000001", htmx=True)
            seen.append((r.status_code, scrub.sub("", delivery.sub("", r.text))))
    return seen


async def test_stranger_cannot_tell_existing_address_by_wrong_codes_or_resends(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as owner:
        await registered(owner, smtp, email="owner@example.com", username="owner")
    clock.advance(3600)
    new = await _probe(server, clock, "fresh@example.com", "fresh")
    clock.advance(3600)
    existing = await _probe(server, clock, "owner@example.com", "someone")
    for i, (a, b) in enumerate(zip(new, existing, strict=True)):
        assert a == b, f"step {i} differs"


@pytest.mark.parametrize("name", ["Visit evil.com now", "http://x.example", "Jane\u2028Doe"])
async def test_names_with_links_or_line_separators_are_refused(client: httpx.AsyncClient, name: str) -> None:
    r = await post_register(client, full_name=name)
    assert r.status_code == 422 and 'id="full_name-error"' in r.text


# --- review fixes (issue 14) -------------------------------------------------------------


async def test_an_unconfirmed_sign_up_is_taken_over_only_through_the_code(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """A second registration of an address nobody confirmed changes nothing until its code is
    entered; then its details replace the first ones."""
    async with server.client() as squatter:
        await post_register(squatter, full_name="Squatter", username="squat", password="Squatters-Pass-77",
                            confirm_password="Squatters-Pass-77")
    clock.advance(61)
    async with server.client() as owner:
        await post_register(owner, full_name="Jane Owner", username="janeowner")
        row = await server.services.db.fetch_one(sa.select(customers))
        assert row.username == "squat" and row.full_name == "Squatter", "nothing changes before the code"
        code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
        assert (await submit_code(owner, code)).headers["location"] == "/dashboard"
    row = await server.services.db.fetch_one(sa.select(customers))
    assert row.username == "janeowner" and row.full_name == "Jane Owner" and row.email_verified_at is not None
    clock.advance(61)
    async with server.client() as c:
        assert (await login(c, "janeowner")).headers["location"] == "/verify"
    async with server.client() as c:
        assert (await login(c, "janeowner", "Squatters-Pass-77")).status_code == 422


async def test_double_submit_of_registration_lands_both_on_the_same_code_step(server: Running, smtp: Capture) -> None:
    """The same form sent twice from one tab (a double click): one account, one code mail, no
    "you already have an account" mail, and both answers hold the same step, whose code works."""
    import base64
    import json

    def payload(response: httpx.Response) -> dict[str, object]:
        value = response.headers["set-cookie"].split(";")[0].split("=", 1)[1].split(".")[0]
        return dict(json.loads(base64.b64decode(value + "=" * (-len(value) % 4))))

    async with server.client() as first:
        token = await get_csrf(first, "/register")
        cookies = dict(first.cookies)
    data = {"full_name": "Jane Doe", "username": "jane", "email": "jane@example.com", "password": PASSWORD,
            "confirm_password": PASSWORD, "csrf_token": token}

    async def submit() -> tuple[int, dict[str, object], dict[str, str]]:
        async with server.client(cookies=cookies) as tab:
            r = await tab.post("/register", data=data)
            return r.status_code, payload(r), {"session": r.headers["set-cookie"].split(";")[0].split("=", 1)[1]}

    (s1, p1, c1), (s2, p2, _) = await asyncio.gather(submit(), submit())
    assert s1 == s2 == 303
    assert p1["pending"] == p2["pending"], "both tabs hold the same code step"
    (mail,) = await wait_mail(smtp, "jane@example.com")
    await asyncio.sleep(0.3)
    assert len(smtp.to("jane@example.com")) == 1 and "already" not in mail["Subject"]
    assert await server.services.db.fetch_val(sa.select(sa.func.count()).select_from(customers)) == 1
    async with server.client(cookies=c1) as tab:
        assert (await submit_code(tab, code_in(mail))).headers["location"] == "/dashboard"


async def test_concurrent_registrations_of_an_existing_address_send_one_notice(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as owner:
        await registered(owner, smtp)
    clock.advance(3600)

    async def attempt(i: int) -> int:
        async with server.client() as c:
            return (await post_register(c, username=f"other{i}")).status_code

    assert set(await asyncio.gather(*(attempt(i) for i in range(8)))) == {303}
    await server.services.mailer.drain()
    await asyncio.sleep(0.3)
    notices = [m for m in smtp.to("jane@example.com") if "already" in m["Subject"]]
    assert len(notices) == 1


async def test_new_and_existing_address_read_the_same_at_every_poll(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """The delivery line of the code step, right after the form, at the first poll and once the
    mail went out: the same for a new address, an existing one, and an existing one inside its
    notice cooldown (where no mail goes out at all)."""
    import re

    async with server.client() as owner:
        await registered(owner, smtp, email="owner@example.com", username="owner")
    clock.advance(3600)
    line = re.compile(r'<p id="delivery".*?</p>', re.S)

    async def states(email: str, username: str, mails: int) -> list[str]:
        seen = []
        async with server.client() as c:
            r = await register(c, username=username, email=email, htmx=True)
            seen.append(line.search(r.text).group())  # type: ignore[union-attr]
            seen.append((await c.get("/verify/delivery", headers={"HX-Request": "true"})).text.strip())
            if mails:
                await wait_mail(smtp, email, mails)
            await server.services.mailer.drain()
            await asyncio.sleep(0.1)
            clock.advance(2)
            seen.append((await c.get("/verify/delivery", headers={"HX-Request": "true"})).text.strip())
        return seen

    fresh = await states("fresh@example.com", "fresh", 1)
    assert "Sending your code" in fresh[0] and "Email sent" in fresh[2]
    assert await states("owner@example.com", "someone", 2) == fresh
    # Inside the notice cooldown no mail goes out: the step shows the notice that did.
    assert await states("owner@example.com", "someone2", 0) == await states("fresh2@example.com", "fresh2", 1)


async def test_digits_in_a_name_never_make_a_second_six_digit_token(client: httpx.AsyncClient, smtp: Capture) -> None:
    import re

    await register(client, name="Jane 123456")
    (mail,) = await wait_mail(smtp, "jane@example.com")
    text = text_of(mail)
    tokens = re.findall(r"(?<!\d)\d{6}(?!\d)", text)
    assert tokens == [code_in(mail)], tokens
    assert "Jane 123 456" in text

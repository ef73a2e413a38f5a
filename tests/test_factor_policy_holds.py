"""The review of issue 17: the second-step policy holds at completion, not only at the start;
a deleted account leaves no factor behind; a bypass and a lockout bound trusted devices; a reset's
factor step cannot lock the owner out; bad ids and bodies get a clear answer, never a 500."""

from __future__ import annotations

import json

import pyotp
import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.tables import authenticators, customers
from tests.conftest import (
    PASSWORD,
    Capture,
    Running,
    code_in,
    get_csrf,
    login,
    registered,
    submit_code,
    wait_mail,
)
from tests.test_factors import EMAIL, enrol_app, method_of_newest_session, post, sign_out, with_app
from tests.webauthn_soft import SoftAuthenticator

pytestmark = pytest.mark.anyio
ORIGIN = "http://testserver"


async def json_post(c, path: str, page: str, body: dict | str | None = None):
    token = await get_csrf(c, page)
    content = body if isinstance(body, str) else json.dumps(body or {})
    return await c.post(path, content=content, headers={"x-csrf-token": token, "content-type": "application/json",
                                                         "origin": ORIGIN})


async def add_passkey(c, key: SoftAuthenticator):
    r = await json_post(c, "/account/security/passkeys/options", "/account/security")
    assert r.status_code == 200, r.text
    response = json.loads(key.registration(r.text, origin=ORIGIN))
    r = await json_post(c, "/account/security/passkeys", "/account/security", {"response": response, "label": "k"})
    assert r.status_code == 200 and "error" not in r.json(), r.text


async def passkey_alone(c, key: SoftAuthenticator):
    r = await json_post(c, "/passkey/options", "/login")
    assert r.status_code == 200, r.text
    answer = json.loads(key.assertion(r.text, origin=ORIGIN))
    return await json_post(c, "/passkey/verify", "/login", {"response": answer})


# 1 -- an emailed sign-in code step opened before the app was enrolled still signs in after it
async def test_code_step_begun_before_an_app_was_added_no_longer_signs_in(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as owner, server.client() as attacker:
        await registered(owner, smtp)
        clock.advance(61)
        assert (await login(attacker)).headers["location"] == "/verify"  # password known, no app yet
        code = code_in((await wait_mail(smtp, EMAIL, 2))[-1])
        token = await get_csrf(attacker, "/verify")
        mails = len(smtp.to(EMAIL))
        await enrol_app(owner, clock)  # the owner adds an app (clock +31 s): the step ends
        # Resends neither mail a code nor keep the step alive...
        for _ in range(12):
            clock.advance(61)
            r = await attacker.post("/verify/resend", data={"csrf_token": token})
            assert r.headers.get("location") == "/login"
        assert not [m for m in smtp.to(EMAIL)[mails:] if "sign-in code" in m["Subject"]]
        # ...and the code mailed before signs nobody in.
        r = await attacker.post("/verify", data={"csrf_token": token, "code": code})
        assert r.headers.get("location") != "/dashboard", \
            f"emailed code signed in a customer with an app ({await method_of_newest_session(server)})"


# 2 -- a trusted device made under the staff bypass outlives the bypass
async def test_no_device_trust_from_an_emailed_code_under_a_bypass(server: Running, smtp: Capture, clock: FixedClock) -> None:
    from app.factors import bypass

    async with server.client() as c:
        await with_app(c, smtp, clock)
        assert await bypass.grant(server.services.db, now=clock.now(), email=EMAIL, hours=1, reason="r", staff="s")
        clock.advance(61)
        n = len(smtp.to(EMAIL))
        await login(c)
        code = code_in((await wait_mail(smtp, EMAIL, n + 1))[-1])
        r = await post(c, "/verify", code=code, trust_device="1")
        assert r.headers["location"] == "/dashboard"
        await sign_out(c)
        clock.advance(3 * 3600)  # bypass over
        r = await login(c)
        assert r.headers["location"] == "/verify", \
            f"bypass ended but emailed-code trust skipped the app ({await method_of_newest_session(server)})"


# 3 -- deleting an account leaves its factors; on SQLite the next account reuses the id
async def test_a_deleted_accounts_passkey_signs_nobody_in(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    db = server.services.db
    key = SoftAuthenticator()
    async with server.client() as c:
        await registered(c, smtp)
        await add_passkey(c, key)
        jane_id = await db.fetch_val(sa.select(customers.c.id))
        clock.advance(61)
        r = await post(c, "/account/delete", page="/account/delete", password=PASSWORD)
        assert r.headers["location"] == "/verify"
        code = code_in((await wait_mail(smtp, EMAIL, 3))[-1])
        r = await submit_code(c, code)
        assert r.headers["location"] == "/login?deleted=1"
    left = await db.fetch_val(sa.select(sa.func.count()).select_from(authenticators))
    async with server.client() as c:
        clock.advance(61)
        await registered(c, smtp, username="max", email="max@example.com", name="Max")
        max_id = await db.fetch_val(sa.select(customers.c.id).where(customers.c.username == "max"))
        await sign_out(c)
    async with server.client() as c:
        r = await passkey_alone(c, key)
        dash = await c.get("/dashboard")
        assert left == 0 and r.json().get("redirect") != "/dashboard", \
            (f"authenticator rows left after deletion: {left}; jane={jane_id} max={max_id}; "
             f"jane's passkey -> {r.json()} dashboard={dash.status_code} max-in-page={'Max' in dash.text}")


# 4 -- huge ids in the path
@pytest.mark.parametrize("path", ["/account/security/passkeys/99999999999999999999999/remove",
                                  "/account/security/devices/99999999999999999999999/revoke",
                                  "/account/security/passkeys/-1/remove"])
async def test_huge_ids_in_security_paths_are_refused_without_500(server: Running, smtp: Capture, clock: FixedClock, path: str) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        r = await post(c, path, page="/account/security")
        assert r.status_code < 500, r.status_code


# 5 -- malformed JSON on the JSON endpoints
@pytest.mark.parametrize("body", ["{", "[]", "\"x\"", '{"response": {"response": []}}', b"\xff\xfe".decode("latin1"),
                                  '{"response": "' + "A" * 70000 + '"}'])
async def test_malformed_passkey_json_is_answered_without_500(server: Running, smtp: Capture, clock: FixedClock, body: str) -> None:
    async with server.client() as c:
        secret, _ = await with_app(c, smtp, clock)
        r = await json_post(c, "/passkey/verify", "/login", body)
        assert r.status_code < 500
        await login(c)
        r = await json_post(c, "/verify/passkey", "/verify", body)
        assert r.status_code < 500
        await post(c, "/verify/app", code=pyotp.TOTP(secret).at(clock.now()))
        r = await json_post(c, "/account/security/passkeys", "/account/security", body)
        assert r.status_code < 500


# 6 -- a trusted device signs a locked-out customer in (passkey alone refuses)
async def test_trusted_device_waits_out_a_lockout(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c, server.client() as attacker:
        secret, _ = await with_app(c, smtp, clock)
        await login(c)
        await post(c, "/verify/app", code=pyotp.TOTP(secret).at(clock.now()), trust_device="1")
        await sign_out(c)
        await login(attacker)
        for _ in range(5):
            await post(attacker, "/verify/app", code="000000")
        locked = await server.services.db.fetch_val(sa.select(customers.c.otp_locked_until))
        assert locked is not None and locked > clock.now()
        r = await login(c)
        assert r.headers["location"] != "/dashboard", "trusted device signed a locked-out customer in"


# 7 -- the reset link confirms into the factor step, not /password/new
async def test_reset_through_the_mail_link_asks_for_the_factor(server: Running, smtp: Capture, clock: FixedClock) -> None:
    import re

    async with server.client() as c:
        await with_app(c, smtp, clock)
        clock.advance(61)
        await post(c, "/password/forgot", page="/password/forgot", email=EMAIL)
        mail = (await wait_mail(smtp, EMAIL, 3))[-1]
        from tests.conftest import text_of
        link = re.search(r"http://testserver(/verify/link/[A-Za-z0-9_-]+)", text_of(mail)).group(1)
        token = await get_csrf(c, link)
        r = await c.post(link, data={"csrf_token": token})
        assert r.headers["location"] == "/verify"
        assert (await c.get("/password/new")).headers["location"] == "/verify"
        # a cookie from before the code (the code step's own) cannot reach /password/new either
        r = await c.get("/verify")
        assert "One more step" in r.text


# 8 -- confirm?next= stays on the site
@pytest.mark.parametrize("nxt", ["https://evil.example", "//evil.example", "/account/security/..%2f..%2f",
                                 "/account/security\\@evil.example", "/account/security%0d%0aX-Evil:1"])
async def test_confirm_next_stays_on_the_security_pages(server: Running, smtp: Capture, clock: FixedClock, nxt: str) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        r = await post(c, f"/account/confirm?next={nxt}", page="/account/confirm", password=PASSWORD)
        loc = r.headers.get("location", "")
        assert r.status_code < 500 and loc.startswith("/account/security") and "\n" not in loc, (r.status_code, loc)


# 9 -- a mailbox holder (no password) locks the customer out through the reset's factor step
async def test_wrong_answers_after_a_reset_code_do_not_lock_the_owner_out(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as owner, server.client() as mailbox:
        secret, _ = await with_app(owner, smtp, clock)
        clock.advance(61)
        await post(mailbox, "/password/forgot", page="/password/forgot", email=EMAIL)
        code = code_in((await wait_mail(smtp, EMAIL, 3))[-1])
        assert (await submit_code(mailbox, code)).headers["location"] == "/verify"
        for _ in range(5):
            await post(mailbox, "/verify/app", code="000000")
        await login(owner)
        r = await post(owner, "/verify/app", code=pyotp.TOTP(secret).at(clock.now()))
        assert r.headers.get("location") == "/dashboard", "owner locked out by someone holding only the mailbox"


# 1b -- without any resend: enrol, then the code mailed just before completes sign-in
async def test_code_mailed_just_before_an_app_was_added_no_longer_signs_in(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as owner, server.client() as attacker:
        await registered(owner, smtp)
        clock.advance(61)
        await login(attacker)
        code = code_in((await wait_mail(smtp, EMAIL, 2))[-1])
        token = await get_csrf(attacker, "/verify")
        await enrol_app(owner, clock)
        r = await attacker.post("/verify", data={"csrf_token": token, "code": code})
        assert r.headers.get("location") != "/dashboard", "emailed code signed in after the app was enrolled"


async def test_emailed_code_stops_counting_when_a_bypass_ends_mid_step(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    """Staff let the emailed code count for an hour; a code step begun inside that hour cannot be
    finished after it (neither by the fast path nor the full one)."""
    from app.factors import bypass

    async with server.client() as c:
        await with_app(c, smtp, clock)
    assert await bypass.grant(server.services.db, now=clock.now(), email=EMAIL, hours=1, reason="ID checked",
                              staff="test")
    clock.advance(55 * 60)
    async with server.client() as c:
        before = len(smtp.to(EMAIL))
        assert (await login(c)).headers["location"] == "/verify"
        code = code_in((await wait_mail(smtp, EMAIL, before + 1))[-1])
        token = await get_csrf(c, "/verify")
        clock.advance(6 * 60)  # the bypass is over, the code not yet expired
        r = await c.post("/verify", data={"csrf_token": token, "code": code})
        assert r.headers.get("location") != "/dashboard"
        assert (await c.get("/dashboard")).headers.get("location") == "/login"

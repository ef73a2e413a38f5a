"""Ways to sign in through HTTP, on both backends: the one second-step policy on every way in,
the authenticator app, backup codes, trusted devices, a reset with a factor, re-authentication
(issue 17; SECURITY.md's rules held for each factor)."""

from __future__ import annotations

import re
from datetime import timedelta

import httpx
import pyotp
import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.tables import auth_events, auth_sessions, customers, trusted_devices
from tests.conftest import (
    PASSWORD,
    Capture,
    Running,
    code_in,
    get_csrf,
    login,
    registered,
    resend,
    submit_code,
    text_of,
    wait_mail,
)

pytestmark = pytest.mark.anyio
EMAIL = "jane@example.com"


async def enrol_app(client: httpx.AsyncClient, clock: FixedClock) -> tuple[str, list[str]]:
    """Set up an authenticator app from /account/security; (the secret, the first backup codes)."""
    page = await client.get("/account/security/app")
    assert page.status_code == 200, page.text
    secret = re.search(r'<code class="secret"[^>]*>([A-Z2-7 ]+)</code>', page.text).group(1).replace(" ", "")
    assert "<svg" in page.text and "<title>" in page.text  # the QR code, inline
    token = await get_csrf(client, "/account/security/app")
    r = await client.post("/account/security/app", data={"csrf_token": token,
                                                          "code": pyotp.TOTP(secret).at(clock.now())})
    assert r.status_code == 200, r.text
    codes = re.findall(r"<li><code>([A-Z0-9]{5}-[A-Z0-9]{5})</code></li>", r.text)
    assert len(codes) == 10, r.text
    clock.advance(31)  # the enrolment code's step is used: the next sign-in needs the next one
    return secret, codes


async def with_app(client: httpx.AsyncClient, smtp: Capture, clock: FixedClock) -> tuple[str, list[str]]:
    await registered(client, smtp)
    found = await enrol_app(client, clock)
    await wait_mail(smtp, EMAIL, 2)  # the registration code, and "a new way to sign in was added"
    await sign_out(client)
    return found


async def sign_out(client: httpx.AsyncClient) -> None:
    token = await get_csrf(client, "/dashboard")
    await client.post("/logout", data={"csrf_token": token})


async def post(client: httpx.AsyncClient, path: str, page: str = "/verify", **data: str) -> httpx.Response:
    token = await get_csrf(client, page)
    return await client.post(path, data={"csrf_token": token, **data})


async def method_of_newest_session(server: Running) -> str:
    row = await server.services.db.fetch_one(
        sa.select(auth_sessions.c.method).where(auth_sessions.c.revoked_at.is_(None))
        .order_by(auth_sessions.c.created_at.desc()).limit(1))
    return str(row.method)


async def events(server: Running, name: str) -> int:
    return int(await server.services.db.fetch_val(
        sa.select(sa.func.count()).select_from(auth_events).where(auth_events.c.event == name)))


# --- the policy ------------------------------------------------------------------------------


async def test_customer_with_an_app_is_asked_for_it_never_an_emailed_code(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await with_app(c, smtp, clock)
        mails = len(smtp.to(EMAIL))
        r = await login(c)
        assert r.headers["location"] == "/verify"
        page = await c.get("/verify")
        assert "Code from your authenticator app" in page.text and "Use a backup code" in page.text
        assert "We sent a 6-digit code" not in page.text
        assert (await resend(c)).headers["location"] == "/verify"  # a factor step gets no mail
        clock.advance(120)
        assert (await resend(c)).headers["location"] == "/verify"
        assert len(smtp.to(EMAIL)) == mails, "an emailed code must never be sent for a factor step"


async def test_emailed_code_never_completes_a_factor_step(server: Running, smtp: Capture, clock: FixedClock) -> None:
    """Even a real, unused emailed code of this customer (one sent before the app was added)."""
    async with server.client() as c:
        await registered(c, smtp)
        await sign_out(c)
        clock.advance(61)
        await login(c)  # codes on, no app yet: an emailed code
        old_code = code_in((await wait_mail(smtp, EMAIL, 2))[-1])
    async with server.client() as other:
        await login(other)  # the same customer elsewhere... (cooldown: no second mail)
    async with server.client() as c2:
        clock.advance(61)
        await login(c2)
        code = code_in((await wait_mail(smtp, EMAIL, 3))[-1])
        assert (await submit_code(c2, code)).headers["location"] == "/dashboard"
        await enrol_app(c2, clock)
        await sign_out(c2)
        await login(c2)
        for entry in (old_code, code):
            r = await submit_code(c2, entry)
            assert r.status_code == 422 and "authenticator app is not right" in r.text
        assert (await c2.get("/dashboard")).headers.get("location") == "/login"


async def test_app_code_signs_in_and_the_session_says_how(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        secret, _ = await with_app(c, smtp, clock)
        await login(c)
        r = await post(c, "/verify/app", code=pyotp.TOTP(secret).at(clock.now()))
        assert r.headers["location"] == "/dashboard"
        assert await method_of_newest_session(server) == "app"
        assert "Password and authenticator app" in (await c.get("/dashboard")).text


async def test_app_code_cannot_be_replayed(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        secret, _ = await with_app(c, smtp, clock)
        code = pyotp.TOTP(secret).at(clock.now())
        await login(c)
        assert (await post(c, "/verify/app", code=code)).headers["location"] == "/dashboard"
        await sign_out(c)
        await login(c)
        r = await post(c, "/verify/app", code=code)
        assert r.status_code == 422 and "not right" in r.text


async def test_wrong_app_codes_lock_out_like_wrong_emailed_codes(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        secret, _ = await with_app(c, smtp, clock)
        await login(c)
        for _ in range(server.services.policy.max_attempts):
            r = await post(c, "/verify/app", code="000000" if pyotp.TOTP(secret).at(clock.now()) != "000000"
                           else "111111")
        assert r.status_code == 422 and "paused" in r.text
        locked = await server.services.db.fetch_val(sa.select(customers.c.otp_locked_until))
        assert locked is not None and locked > clock.now()
        r = await post(c, "/verify/app", code=pyotp.TOTP(secret).at(clock.now()))
        assert r.status_code == 422 and "paused" in r.text  # the right code waits out the lockout too
        assert await events(server, "factor_failed") == server.services.policy.max_attempts


async def test_backup_code_signs_in_once_and_is_mailed(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        _, codes = await with_app(c, smtp, clock)
        await login(c)
        before = len(smtp.to(EMAIL))
        r = await post(c, "/verify/backup", backup_code=codes[0].lower())
        assert r.headers["location"] == "/dashboard"
        assert await method_of_newest_session(server) == "backup_code"
        mail = (await wait_mail(smtp, EMAIL, before + 1))[-1]
        assert mail["Subject"] == "A Computer Shop backup code was used"
        assert "9 unused codes are left" in text_of(mail)
        await sign_out(c)
        await login(c)
        r = await post(c, "/verify/backup", backup_code=codes[0])
        assert r.status_code == 422 and "used already" in r.text
        assert await events(server, "backup_code_used") == 1


async def test_backup_code_of_the_wrong_shape_is_said_and_not_counted(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await with_app(c, smtp, clock)
        await login(c)
        r = await post(c, "/verify/backup", backup_code="hello")
        assert r.status_code == 422 and "10 letters and digits" in r.text
        assert await events(server, "factor_failed") == 0


# --- trusted devices -------------------------------------------------------------------------


async def test_trusted_device_skips_the_second_step_only(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        secret, _ = await with_app(c, smtp, clock)
        await login(c)
        r = await post(c, "/verify/app", code=pyotp.TOTP(secret).at(clock.now()), trust_device="1")
        assert r.headers["location"] == "/dashboard"
        assert "device=" in r.headers.get("set-cookie", "")
        await sign_out(c)
        assert (await login(c, password="wrong-password-1")).status_code == 422  # never the password
        r = await login(c)
        assert r.headers["location"] == "/dashboard"
        assert await method_of_newest_session(server) == "device"


async def test_trusted_device_counts_only_for_its_customer(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        secret, _ = await with_app(c, smtp, clock)
        await login(c)
        await post(c, "/verify/app", code=pyotp.TOTP(secret).at(clock.now()), trust_device="1")
        await sign_out(c)
        clock.advance(61)
        await registered(c, smtp, username="max", email="max@example.com", name="Max")
        await enrol_app(c, clock)
        await sign_out(c)
        r = await login(c, "max")
        assert r.headers["location"] == "/verify"  # Jane's trust on this browser is not Max's


async def test_revoking_a_device_asks_it_again(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        secret, _ = await with_app(c, smtp, clock)
        await login(c)
        await post(c, "/verify/app", code=pyotp.TOTP(secret).at(clock.now()), trust_device="1")
        device_id = await server.services.db.fetch_val(sa.select(trusted_devices.c.id))
        page = await c.get("/account/security")
        assert "Stop trusting" in page.text
        r = await post(c, f"/account/security/devices/{device_id}/revoke", page="/account/security")
        assert r.headers["location"] == "/account/security"
        await sign_out(c)
        assert (await login(c)).headers["location"] == "/verify"


async def test_password_change_revokes_trusted_devices(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        secret, _ = await with_app(c, smtp, clock)
        await login(c)
        await post(c, "/verify/app", code=pyotp.TOTP(secret).at(clock.now()), trust_device="1")
        new = PASSWORD + "-new"
        r = await post(c, "/account/password", page="/account", current_password=PASSWORD, new_password=new,
                       confirm_new_password=new)
        assert r.headers["location"] == "/account"
        live = await server.services.db.fetch_val(
            sa.select(sa.func.count()).select_from(trusted_devices).where(trusted_devices.c.revoked_at.is_(None)))
        assert live == 0


# --- reset --------------------------------------------------------------------------------------


async def test_reset_of_a_customer_with_an_app_asks_for_the_app(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        secret, _ = await with_app(c, smtp, clock)
        clock.advance(61)
        r = await post(c, "/password/forgot", page="/password/forgot", email=EMAIL)
        code = code_in((await wait_mail(smtp, EMAIL, 3))[-1])
        r = await submit_code(c, code)
        assert r.headers["location"] == "/verify"
        page = await c.get("/verify")
        assert "One more step to reset your password" in page.text
        assert (await c.get("/password/new")).headers["location"] == "/verify"  # the mailbox alone: no
        r = await post(c, "/verify/app", code=pyotp.TOTP(secret).at(clock.now()))
        assert r.headers["location"] == "/password/new"
        new = PASSWORD + "-new"
        r = await post(c, "/password/new", page="/password/new", new_password=new, confirm_new_password=new)
        assert r.headers["location"] == "/dashboard"
        assert await method_of_newest_session(server) == "reset"


# --- re-authentication and changes ------------------------------------------------------------------


async def test_changing_ways_to_sign_in_needs_a_recent_sign_in(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        clock.advance(11 * 60)
        r = await c.get("/account/security/app")
        assert r.headers["location"] == "/account/confirm?next=/account/security"
        r = await post(c, "/account/confirm?next=/account/security", page="/account/confirm",
                       password="wrong-password-1")
        assert r.status_code == 422 and "not your password" in r.text
        r = await post(c, "/account/confirm?next=/account/security", page="/account/confirm", password=PASSWORD)
        assert r.headers["location"] == "/account/security"
        assert (await c.get("/account/security/app")).status_code == 200
        assert await events(server, "reauthenticated") == 1


async def test_adding_and_removing_an_app_mails_the_customer(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        await enrol_app(c, clock)
        added = (await wait_mail(smtp, EMAIL, 2))[-1]
        assert added["Subject"] == "A new way to sign in was added to your Computer Shop account"
        r = await post(c, "/account/security/app/remove", page="/account/security")
        assert r.headers["location"] == "/account/security"
        removed = (await wait_mail(smtp, EMAIL, 3))[-1]
        assert removed["Subject"] == "A way to sign in was removed from your Computer Shop account"
        await sign_out(c)
        clock.advance(61)
        assert (await login(c)).headers["location"] == "/verify"
        assert "We sent a 6-digit code" in (await c.get("/verify")).text  # back to the emailed code


async def test_new_backup_codes_replace_the_old_set(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        _, first = await enrol_app(c, clock)
        r = await post(c, "/account/security/backup-codes", page="/account/security")
        second = re.findall(r"<li><code>([A-Z0-9]{5}-[A-Z0-9]{5})</code></li>", r.text)
        assert len(second) == 10 and not set(first) & set(second)
        await sign_out(c)
        await login(c)
        r = await post(c, "/verify/backup", backup_code=first[0])
        assert r.status_code == 422
        assert (await post(c, "/verify/backup", backup_code=second[0])).headers["location"] == "/dashboard"


async def test_backup_codes_download_as_a_text_file(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        _, codes = await enrol_app(c, clock)
        r = await post(c, "/account/security/backup-codes/download", page="/account/security",
                       code=codes[0])
        assert r.headers["content-type"].startswith("text/plain")
        assert "attachment" in r.headers["content-disposition"] and codes[0] in r.text


async def test_staff_bypass_lets_the_emailed_code_count_for_a_while(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await with_app(c, smtp, clock)
    from app.factors import bypass

    assert await bypass.grant(server.services.db, now=clock.now(), email=EMAIL, hours=24,
                              reason="lost phone, ID checked", staff="cli")
    async with server.client() as c:
        clock.advance(61)
        assert (await login(c)).headers["location"] == "/verify"
        assert "We sent a 6-digit code" in (await c.get("/verify")).text
        clock.advance(25 * 3600)
        await login(c)
        assert "Code from your authenticator app" in (await c.get("/verify")).text  # undone by itself
    assert await events(server, "factor_bypass") == 1


async def test_session_started_long_ago_is_not_recent(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        clock.advance(9 * 60)
        assert (await c.get("/account/security/app")).status_code == 200
        clock.advance(2 * 60)
        assert (await c.get("/account/security/app")).status_code == 303
    assert timedelta(minutes=server.services.settings.reauth_minutes) == timedelta(minutes=10)


async def test_cleanup_forgets_what_ways_to_sign_in_leave_behind(
        server: Running, smtp: Capture, clock: FixedClock) -> None:
    """Expired passkey challenges, trusted devices gone for a day, and app set-ups never finished."""
    from app.factors import devices, passkeys, totp
    from app.otp.cleanup import cleanup
    from app.tables import authenticators, webauthn_challenges

    db = server.services.db
    async with server.client() as c:
        await registered(c, smtp)
    cid = int(await db.fetch_val(sa.select(customers.c.id)))
    rp = passkeys.RelyingParty(id="testserver", name="Computer Shop", origin="http://testserver")
    await passkeys.authentication_options(db, rp, purpose=passkeys.Purpose.ALONE, customer_id=None, binding="b",
                                          now=clock.now())
    await devices.trust(db, customer_id=cid, label="Chrome on Linux", ip="127.0.0.1", now=clock.now(), days=1)
    await totp.start(db, server.services.factors, customer_id=cid, now=clock.now())
    clock.advance(3 * 86400)
    await cleanup(db, now=clock.now())
    for table in (webauthn_challenges, trusted_devices, authenticators):
        assert await db.fetch_val(sa.select(sa.func.count()).select_from(table)) == 0, table.name

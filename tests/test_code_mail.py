"""The code mail customers trust (issue 16): one tag ties the step and its mails, the mail says
who asked, a link that confirms only in the browser that asked and is safe against scanners,
"Not you?", the code at the end of the subject on request, DKIM, a pool that grows."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.mail.messages import build
from app.mail.transport import SmtpTransport
from app.settings import Settings
from app.tables import customers, otp_codes, otp_verification
from tests.conftest import (
    Capture,
    Running,
    code_in,
    get_csrf,
    html_of,
    login,
    register,
    registered,
    resend,
    running,
    submit_code,
    text_of,
    wait_mail,
    with_,
)

pytestmark = pytest.mark.anyio
LINK = re.compile(r"(https?://[^\s/]+)(/verify/link/[A-Za-z]+)")
STOP = re.compile(r"(https?://[^\s/]+)(/not-you/[A-Za-z]+)")


async def test_the_step_and_its_mails_share_one_tag(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await register(c)
        tag = await server.services.db.fetch_val(sa.select(otp_verification.c.tag))
        assert re.fullmatch(r"[ACDEFHJKMNPRTUVWXY3479]{3}", tag)
        page = (await c.get("/verify")).text
        assert f'Code for registration <strong class="tag">{tag}</strong>' in page
        clock.advance(61)
        await resend(c)
        first, second = await wait_mail(smtp, "jane@example.com", 2)
    for mail in (first, second):
        assert mail["Subject"] == f"Your Computer Shop verification code ({tag})"
        assert f"This code is for registration {tag}." in text_of(mail)


async def test_a_code_mail_says_who_asked(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        await register(c)
    text = text_of((await wait_mail(smtp, "jane@example.com"))[0])
    assert re.search(r"Who asked: on (Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day \d{1,2} \w+ \d{4} at \d\d:\d\d UTC "
                     r"\(UTC\+00:00\), with Chrome 130 on Linux, from IP address 127\.0\.0\.1\.", text), text
    assert re.findall(r"(?<!\d)\d{6}(?!\d)", text) == [code_in((await wait_mail(smtp, "jane@example.com"))[0])]


async def test_the_mail_link_confirms_only_in_the_browser_that_asked(server: Running, smtp: Capture) -> None:
    db = server.services.db
    async with server.client() as c:
        await register(c)
        mail = (await wait_mail(smtp, "jane@example.com"))[0]
        link = LINK.search(text_of(mail)).group(2)  # type: ignore[union-attr]
        assert LINK.search(html_of(mail)), "the HTML part has it too"
        page = await c.get(link)
        assert page.status_code == 200 and ">Confirm my email</button>" in page.text
        assert await db.fetch_val(sa.select(otp_verification.c.used_at)) is None, "a GET uses nothing"
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        r = await c.post(link, data={"csrf_token": token})
        assert r.status_code == 303 and r.headers["location"] == "/dashboard"
        assert (await c.get("/dashboard")).status_code == 200
        assert (await c.get(link)).status_code == 410, "the link dies with its code"


async def test_the_mail_link_elsewhere_shows_the_code_and_signs_in_nothing(server: Running, smtp: Capture) -> None:
    db = server.services.db
    async with server.client() as asker:
        await register(asker)
        mail = (await wait_mail(smtp, "jane@example.com"))[0]
        link = LINK.search(text_of(mail)).group(2)  # type: ignore[union-attr]
        async with server.client() as elsewhere:
            page = await elsewhere.get(link)
            assert page.status_code == 200 and code_in(mail) in page.text and "Confirm" not in page.text
            token = await get_csrf(elsewhere, "/login")
            r = await elsewhere.post(link, data={"csrf_token": token})
            assert r.status_code == 200 and code_in(mail) in r.text, "a POST from elsewhere does nothing either"
            assert (await elsewhere.get("/dashboard")).headers["location"] == "/login"
        assert await db.fetch_val(sa.select(otp_verification.c.used_at)) is None
        assert (await submit_code(asker, code_in(mail))).headers["location"] == "/dashboard"


async def test_a_link_scanner_opening_every_link_changes_nothing(server: Running, smtp: Capture,
                                                                clock: FixedClock) -> None:
    db = server.services.db
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as c:
        await login(c)
        mail = (await wait_mail(smtp, "jane@example.com", 2))[-1]
        text = text_of(mail)
        before = [dict(r._mapping) for r in await db.fetch_all(sa.select(otp_verification))]
        paused_before = await db.fetch_val(sa.select(customers.c.signin_paused_until))
        async with server.client() as scanner:
            for path in (LINK.search(text).group(2), STOP.search(text).group(2)):  # type: ignore[union-attr]
                for method in ("GET", "HEAD"):
                    assert (await scanner.request(method, path)).status_code in (200, 405)
        assert [dict(r._mapping) for r in await db.fetch_all(sa.select(otp_verification))] == before
        assert await db.fetch_val(sa.select(customers.c.signin_paused_until)) == paused_before
        assert (await submit_code(c, code_in(mail))).headers["location"] == "/dashboard"


async def test_links_hold_random_letters_never_the_code_or_the_address(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        await register(c)
    mail = (await wait_mail(smtp, "jane@example.com"))[0]
    for pattern in (LINK, STOP):
        path = pattern.search(text_of(mail)).group(2)  # type: ignore[union-attr]
        token = path.rsplit("/", 1)[1]
        assert re.fullmatch(r"[A-Za-z]{24}", token) and code_in(mail) not in path and "jane" not in path
    rows = await server.services.db.fetch_all(sa.select(otp_codes))
    for row in rows:  # only hashes of the tokens, and the code sealed under the token
        for value in dict(row._mapping).values():
            assert code_in(mail) not in str(value)


async def test_not_you_ends_every_pending_step_and_pauses_sign_in_codes(server: Running, smtp: Capture,
                                                                        clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as c:
        await login(c)
        mail = (await wait_mail(smtp, "jane@example.com", 2))[-1]
        stop = STOP.search(text_of(mail)).group(2)  # type: ignore[union-attr]
        async with server.client() as owner:  # the mailbox owner, on another device
            page = await owner.get(stop)
            assert page.status_code == 200 and "It was not me: stop it" in page.text
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
            done = await owner.post(stop, data={"csrf_token": token})
            assert done.status_code == 200 and "We stopped it" in done.text and "/password/forgot" in done.text
        assert (await c.get("/verify")).headers["location"] == "/login", "the pending sign-in has ended"
    clock.advance(61)
    async with server.client() as c:
        await login(c)
        page = (await c.get("/verify")).text
        assert "codes are paused" in page
    await asyncio.sleep(0.2)
    assert len(smtp.to("jane@example.com")) == 2, "no sign-in code during the pause"
    async with server.client() as c:  # a password reset still works: it is what to do next
        token = await get_csrf(c, "/password/forgot")
        await c.post("/password/forgot", data={"csrf_token": token, "email": "jane@example.com"})
        assert "reset" in (await wait_mail(smtp, "jane@example.com", 3))[-1]["Subject"]
    clock.advance(15 * 60)
    async with server.client() as c:
        await login(c)
        await wait_mail(smtp, "jane@example.com", 4)


async def test_the_code_goes_at_the_end_of_the_subject_only_when_asked(settings: Settings, clock: FixedClock,
                                                                       smtp: Capture) -> None:
    async with running(with_(settings, mail_code_in_subject="end"), clock) as server, server.client() as c:
        await register(c)
        mail = (await wait_mail(smtp, "jane@example.com"))[0]
    assert mail["Subject"].endswith(f": {code_in(mail)}") and not mail["Subject"].startswith(code_in(mail))
    plain = build("login_code", {"name": "J", "code": "042817", "minutes": 10, "tag": "K7Q", "step": "sign-in"},
                  recipient="j@example.com", sender="a@b.c")
    assert "042817" not in plain.subject


async def test_dkim_signs_every_mail_and_the_signature_verifies(settings: Settings, clock: FixedClock,
                                                                smtp: Capture, tmp_path: Path) -> None:
    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "dkim.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()))
    public = base64.b64encode(key.public_key().public_bytes(serialization.Encoding.DER,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    signed = with_(settings, dkim_domain="shop.example", dkim_selector="mail", dkim_private_key=str(pem),
                   mail_from="Computer Shop <no-reply@shop.example>")
    async with running(signed, clock) as server, server.client() as c:
        await register(c)
        mail = (await wait_mail(smtp, "jane@example.com"))[0]
    raw = mail.as_bytes()
    assert mail["DKIM-Signature"] and "d=shop.example" in mail["DKIM-Signature"]
    assert mail["Message-ID"] and mail["Date"] and mail["Auto-Submitted"] == "auto-generated"

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"mail._domainkey.shop.example."
        return f"v=DKIM1; k=rsa; p={public}".encode()

    assert dkim.verify(raw, dnsfunc=dns)
    tampered = raw.replace(b"Subject: Your", b"Subject: Our", 1)
    assert not dkim.verify(tampered, dnsfunc=dns)


async def test_the_smtp_pool_grows_while_mail_waits_and_shrinks_when_idle(smtp: Capture) -> None:
    smtp.delay = 0.5
    transport = SmtpTransport("127.0.0.1", smtp.port, security="none", timeout=5, size=2, max_size=8, idle_close=0)
    messages = [build("account_exists", {"name": "x", "username": "x"}, recipient=f"p{i}@example.com",
                      sender="a@b.c") for i in range(8)]
    started = time.monotonic()
    await asyncio.gather(*(transport.send(m) for m in messages))
    elapsed = time.monotonic() - started
    try:
        assert elapsed < 1.5, f"8 messages held 0.5 s each took {elapsed:.2f} s: the pool did not grow"
        assert transport.opened == 8 and transport.open_connections == 8
        await transport.prune()
        assert transport.open_connections == 2, "idle connections beyond SMTP_POOL_SIZE are closed"
    finally:
        await transport.close()


async def test_pool_settings_are_checked(settings: Settings) -> None:
    from app.settings import SettingsError

    with pytest.raises(SettingsError, match="SMTP_POOL_MAX"):
        with_(settings, smtp_pool_size=8, smtp_pool_max=4)
    with pytest.raises(SettingsError, match="MAIL_CODE_IN_SUBJECT"):
        with_(settings, mail_code_in_subject="start")
    with pytest.raises(SettingsError, match="DKIM"):
        with_(settings, dkim_domain="shop.example")


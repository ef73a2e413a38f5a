"""Mail: multipart messages, the outbox, retries, slow and dead servers, several dispatchers."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from app.clock import FixedClock, SystemClock
from app.mail import outbox
from app.mail.dispatcher import CODE_BACKOFF_CAP, Dispatcher, backoff, claim_seconds
from app.mail.messages import build
from app.mail.outbox import MailStatus
from app.mail.transport import ConsoleTransport, SmtpTransport
from app.settings import Settings
from app.tables import mail_outbox
from tests.conftest import (
    CODE_LINE,
    PUBLIC_ORIGIN,
    Capture,
    Running,
    code_in,
    free_port,
    get_csrf,
    html_of,
    production,
    register,
    running,
    start_capture,
    text_of,
    wait_mail,
    with_,
)

pytestmark = pytest.mark.anyio
CLAIM = claim_seconds(10)  # SMTP_TIMEOUT's default


async def outbox_row_when(svc: Any, ready: Callable[[Any], bool], timeout: float = 4.0) -> Any:
    """The (only) outbox row, once the dispatcher has brought it to the state wanted."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        row = await svc.db.fetch_one(sa.select(mail_outbox))
        if ready(row) or loop.time() > deadline:
            return row
        await asyncio.sleep(0.02)


def test_code_mail_is_multipart_with_one_standalone_code() -> None:
    msg = build("login_code", {"name": "Jane", "code": "012345", "minutes": 10}, recipient="j@example.com",
                sender="Computer Shop <no-reply@shop.example>").parsed()
    assert msg.is_multipart() and msg.get_content_type() == "multipart/alternative"
    assert CODE_LINE.findall(text_of(msg)) == ["012345"]
    assert not re.search(r"(?<!\d)\d{6}(?!\d)", text_of(msg).replace("012345", ""))
    html = html_of(msg)
    assert "012345" in html and "<script" not in html.lower() and "<img" not in html.lower()
    assert "display:none" in html  # the preheader
    assert msg["From"] == "Computer Shop <no-reply@shop.example>"


def test_user_values_are_escaped_and_header_injection_is_impossible() -> None:
    msg = build("registration_code", {"name": "<b>Jane</b>\r\nBcc: victim@example.com", "code": "123456",
                                      "minutes": 15}, recipient="j@example.com", sender="no-reply@shop.example").parsed()
    assert "&lt;b&gt;Jane&lt;/b&gt;" in html_of(msg)
    assert msg["Bcc"] is None and "\r\nBcc" not in text_of(msg)
    for bad in ("a@example.com\r\nBcc: b@example.com", "a@example.com>, <b@example.com"):
        with pytest.raises(ValueError):
            build("login_code", {"name": "x", "code": "123456", "minutes": 10}, recipient=bad,
                  sender="no-reply@shop.example")


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3, 10)] == [2, 4, 8, 300]


async def test_code_is_queued_in_the_same_transaction_and_sent(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        await register(c)
    (msg,) = await wait_mail(smtp, "jane@example.com")
    assert code_in(msg) in html_of(msg)
    await asyncio.sleep(0.05)
    row = await server.services.db.fetch_one(sa.select(mail_outbox))
    assert row.status == "sent" and row.tries == 1 and row.sent_at is not None


async def test_smtp_down_then_up_delivers_within_retry_schedule_and_never_500(
    settings: Settings, smtp: Capture
) -> None:
    port = free_port()  # nothing listens yet: connection refused
    clock = FixedClock()
    async with running(with_(settings, smtp_port=port), clock) as server, server.client() as c:
        r = await register(c, htmx=True)
        assert r.status_code == 200
        await asyncio.sleep(0.3)
        row = await server.services.db.fetch_one(sa.select(mail_outbox))
        assert row.status == "queued" and row.tries == 1 and "Connect" in (row.last_error or "")
        page = await c.get("/verify")
        assert "Sending your code" in page.text  # the customer sees the state, not an error
        capture = Capture()
        controller = start_capture(capture, port)
        try:
            clock.advance(backoff(1))
            server.services.mailer.notify()
            (msg,) = await wait_mail(capture, "jane@example.com")
            assert CODE_LINE.search(text_of(msg))
            await asyncio.sleep(0.05)
            page = await c.get("/verify/delivery")
            assert "Email sent" in page.text
        finally:
            controller.stop()


async def test_slow_server_never_holds_up_the_page(settings: Settings, smtp: Capture, clock: FixedClock) -> None:
    smtp.delay = 3.0
    async with running(settings, clock) as server, server.client() as c:
        await register(c, username="first", email="first@example.com")
        await asyncio.sleep(0.2)
        assert smtp.holding.is_set(), "the server is holding the first message"
        r = await register(c, username="second", email="second@example.com")
        assert r.status_code == 303
        assert smtp.holding.is_set() and smtp.to("first@example.com") == []  # answered while the mail waits
        page = await c.get("/verify")
        assert "Sending your code" in page.text and 'hx-get="/verify/delivery"' in page.text
        await wait_mail(smtp, "second@example.com", timeout=10)


async def test_expired_message_is_not_sent(server: Running, smtp: Capture, clock: FixedClock) -> None:
    svc = server.services
    await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient="late@example.com", now=clock.now(),
                         context={"name": "x", "code": "123456", "minutes": 10},
                         expires_at=clock.now())
    await svc.mailer.drain()
    row = await svc.db.fetch_one(sa.select(mail_outbox))
    assert row.status == "expired" and row.payload is None and smtp.to("late@example.com") == []


async def test_permanent_rejection_fails_without_retry(server: Running, smtp: Capture, clock: FixedClock) -> None:
    smtp.reply = "550 No such user"
    svc = server.services
    await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient="gone@example.com", now=clock.now(),
                         context={"name": "x", "code": "123456", "minutes": 10})
    svc.mailer.notify()
    row = await outbox_row_when(svc, lambda r: r.status == "failed")
    assert row.status == "failed" and row.tries == 1 and "550" in row.last_error


async def test_transient_failures_stop_after_the_limit(settings: Settings, clock: FixedClock) -> None:
    port = free_port()
    async with running(with_(settings, smtp_port=port, mail_max_tries=3), clock) as server:
        svc = server.services
        await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient="x@example.com", now=clock.now(),
                             context={"name": "x", "code": "123456", "minutes": 10})
        for _ in range(3):
            await svc.mailer.drain()
            clock.advance(600)
        row = await svc.db.fetch_one(sa.select(mail_outbox))
        assert row.status == "failed" and row.tries == 3


async def test_a_code_mail_is_retried_past_the_try_limit_until_its_code_expires(
    settings: Settings, clock: FixedClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The mail server down for minutes: a code mail keeps its place (every 10 s at most) for as
    long as its code works, then is marked expired, never sent dead; a notice keeps MAIL_MAX_TRIES."""
    port = free_port()
    async with running(with_(settings, smtp_port=port, mail_max_tries=3), clock) as server:
        svc = server.services
        queued = await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient="wait@example.com",
                                      now=clock.now(),
                             context={"name": "x", "code": "123456", "minutes": 2},
                             expires_at=clock.now() + timedelta(seconds=120))
        tries = 0
        for _ in range(40):
            await svc.mailer.drain()
            row = await svc.db.fetch_one(sa.select(mail_outbox).where(mail_outbox.c.id == queued.id))
            if row.status not in ("queued", "sending"):  # (the app's own dispatcher may hold it)
                break
            tries = max(tries, row.tries)
            clock.advance(CODE_BACKOFF_CAP)  # no wait between tries is longer than this
        assert tries > 3, "retried past MAIL_MAX_TRIES while the code worked"
        assert row.status == "expired" and row.payload is None, row
        assert "code expired before delivery" in row.last_error
    assert any(r.levelname == "WARNING" and "mail expired" in r.getMessage() for r in caplog.records)


async def test_a_server_that_accepts_but_answers_late_gets_a_code_mail_twice_at_most(
    settings: Settings, smtp: Capture, clock: FixedClock
) -> None:
    """Each send is cut off after the message went over (the server holds it, then answers too
    late), so each try may be a copy in the customer's inbox: one more try, then given up, not a
    copy every 10 s until the code expires (the security review of issue 19)."""
    smtp.delay = 2.5  # after DATA: longer than the send's cut-off (2 x SMTP_TIMEOUT = 1 s)
    async with running(with_(settings, smtp_port=smtp.port, smtp_timeout=0.5), clock) as server:
        svc = server.services
        queued = await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient="slow@example.com",
                                      now=clock.now(),
                             context={"name": "x", "code": "123456", "minutes": 10},
                             expires_at=clock.now() + timedelta(seconds=600))
        await svc.mailer.stop()  # one dispatcher only, driven by the test: every try is counted
        mailer = Dispatcher(svc.db, SmtpTransport("127.0.0.1", smtp.port, security="none", timeout=0.5),
                            svc.sealer, clock, sender="a@b.c", smtp_timeout=0.5)
        for _ in range(10):
            await mailer.drain()
            row = await svc.db.fetch_one(sa.select(mail_outbox).where(mail_outbox.c.id == queued.id))
            if row.status != "queued":
                break
            clock.advance(CODE_BACKOFF_CAP)
        await mailer.transport.close()
        assert row.status == "failed" and row.tries == 2, (row.status, row.tries, row.last_error)
        assert "maybe delivered" in row.last_error and "not sent again" in row.last_error
    # Every try handed the whole message over: one copy per try the server may keep.
    assert smtp.arrived.count("slow@example.com") == 2, "two copies at most, not one every 10 s"


async def test_two_dispatchers_on_one_database_send_every_message_exactly_once(
    settings: Settings, smtp: Capture
) -> None:
    async with running(settings, SystemClock()) as server:
        svc = server.services
        await svc.mailer.stop()  # only the two under test send
        for i in range(40):
            await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient=f"m{i}@example.com",
                                 now=SystemClock().now(), context={"name": "x", "code": "123456", "minutes": 10})
        transports = [SmtpTransport("127.0.0.1", smtp.port, security="none", size=4) for _ in range(2)]
        dispatchers = [Dispatcher(svc.db, t, svc.sealer, SystemClock(), sender="a@b.c", concurrency=4)
                       for t in transports]
        await asyncio.gather(*(d.drain() for d in dispatchers))
        for t in transports:
            await t.close()
    for i in range(40):
        assert len(smtp.to(f"m{i}@example.com")) == 1, i
    assert len(smtp.messages) == 40


async def test_mail_queued_claimed_is_left_to_its_process_until_the_claim_runs_out(
    server: Running, clock: FixedClock
) -> None:
    svc = server.services
    queued = await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient="c@example.com", now=clock.now(),
                                  context={"name": "x", "code": "123456", "minutes": 10}, claim_for=CLAIM)
    assert queued.tries == 1  # the first try is counted at queueing
    assert (await outbox.due(svc.db, svc.sealer, now=clock.now(), limit=10)).ready == []
    # The process that claimed it died: once the claim runs out, any dispatcher may send it.
    later = clock.now() + timedelta(seconds=CLAIM + 1)
    (again,) = (await outbox.due(svc.db, svc.sealer, now=later, limit=10)).ready
    assert again.id == queued.id and again.context["code"] == "123456"
    assert await outbox.claim(svc.db, again, now=later, claim_for=CLAIM)


async def test_sends_concurrently_over_a_bounded_pool(settings: Settings, smtp: Capture) -> None:
    smtp.delay = 0.5
    async with running(with_(settings, smtp_pool_size=4), SystemClock()) as server:
        svc = server.services
        for i in range(8):
            await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient=f"p{i}@example.com",
                                 now=SystemClock().now(), context={"name": "x", "code": "123456", "minutes": 10})
        svc.mailer.notify()
        loop = asyncio.get_running_loop()
        start = loop.time()
        while len(smtp.messages) < 8:
            await asyncio.sleep(0.02)
        elapsed = loop.time() - start
    # 8 messages held 0.5 s each over 4 connections: two rounds, not eight
    assert elapsed < 8 * 0.5 and len(smtp.messages) == 8


async def test_production_with_server_down_logs_no_code(settings: Settings, clock: FixedClock,
                                                        capsys: pytest.CaptureFixture[str],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    prod = production(settings, smtp_port=free_port())
    async with running(prod, clock) as server:
        svc = server.services
        await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient="x@example.com", now=clock.now(),
                             context={"name": "x", "code": "987654", "minutes": 10})
        svc.mailer.notify()
        row = await outbox_row_when(svc, lambda r: r.status == "queued" and bool(r.last_error))
        assert row.status == "queued" and row.last_error
    out = capsys.readouterr()
    assert "987654" not in out.out + out.err + caplog.text


async def test_console_delivery_prints_the_whole_message_in_development(capsys: pytest.CaptureFixture[str]) -> None:
    msg = build("registration_code", {"name": "Jane", "code": "424242", "minutes": 15}, recipient="j@example.com",
                sender="no-reply@localhost")
    await ConsoleTransport().send(msg)
    out = capsys.readouterr().out
    assert "424242" in out and "To: j@example.com" in out and "development only" in out


def test_production_never_uses_console_delivery() -> None:
    from app.settings import SettingsError

    with pytest.raises(SettingsError, match="SMTP_HOST"):
        Settings(app_env="production", secret_key="k" * 40)


async def test_dev_inbox_exists_only_in_development(settings: Settings, clock: FixedClock, smtp: Capture) -> None:
    async with running(settings, clock) as test_mode, test_mode.client() as c:
        assert (await c.get("/dev/mail")).status_code == 404
    async with running(production(settings), clock) as prod, prod.client(base_url=PUBLIC_ORIGIN) as c:
        assert (await c.get("/dev/mail")).status_code == 404
    dev = with_(settings, app_env="development", smtp_host=None)
    async with running(dev, clock) as server, server.client() as c:
        await register(c)
        await server.services.mailer.drain()
        page = await c.get("/dev/mail")
        assert page.status_code == 200 and "Your Computer Shop verification code" in page.text
        assert CODE_LINE.search(page.text.replace("<pre>", "\n").replace("</pre>", "\n")) or re.search(r"\b\d{6}\b", page.text)
        code = code_in((await wait_mail(smtp, "jane@example.com"))[0]) if smtp.to("jane@example.com") else None
        shown = re.search(r"<mark>(\d{6})</mark>", page.text)
        assert shown and (code is None or shown.group(1) == code), "each code is highlighted"
        assert 'hx-trigger="every 3s"' in page.text, "the inbox looks for new mail by itself"
        message_id = re.search(r'src="/dev/mail/(\d+)"', page.text).group(1)  # type: ignore[union-attr]
        frame = await c.get(f"/dev/mail/{message_id}")
        assert frame.status_code == 200 and "Welcome to Computer Shop" in frame.text
        assert "unsafe-inline" in frame.headers["content-security-policy"]
        assert "script" not in frame.headers["content-security-policy"]


async def test_delivery_state_fragment_polls_until_final(server: Running, smtp: Capture, clock: FixedClock) -> None:
    smtp.delay = 1.0
    async with server.client() as c:
        await register(c)
        r = await c.get("/verify/delivery", headers={"HX-Request": "true"})
        assert "Sending your code" in r.text and 'hx-trigger="load delay:1s"' in r.text
        await wait_mail(smtp, "jane@example.com")
        await asyncio.sleep(0.05)
        clock.advance(2)  # past the first moments, where every step reads "Sending"
        r = await c.get("/verify/delivery", headers={"HX-Request": "true"})
        assert "Email sent" in r.text and "hx-get" not in r.text


async def test_outbox_payload_is_sealed_and_wiped_once_sent(server: Running, smtp: Capture) -> None:
    smtp.delay = 0.5
    async with server.client() as c:
        await register(c)
    payload = await server.services.db.fetch_val(sa.select(mail_outbox.c.payload))
    code = server.services.sealer.open(payload)["code"]
    assert payload and code not in payload and "Jane" not in payload
    assert code_in((await wait_mail(smtp, "jane@example.com"))[0]) == code
    await asyncio.sleep(0.05)
    assert await server.services.db.fetch_val(sa.select(mail_outbox.c.payload)) is None
    _ = get_csrf


async def test_cleanup_wipes_the_payload_of_mail_whose_code_expired_unsent(
    server: Running, smtp: Capture, clock: FixedClock,
) -> None:
    """Sent mail lost its payload when marked; what never went out loses it once its code has
    expired. Development's kept sent mail (/dev/mail) goes too, and only there."""
    from app.otp.cleanup import cleanup

    svc = server.services
    ctx = {"name": "x", "code": "123456", "minutes": 10}
    expires = clock.now() + timedelta(minutes=10)
    stuck = await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient="stuck@example.com",
                                 now=clock.now(), context=ctx, expires_at=expires, claim_for=CLAIM)  # its process died
    kept = await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient="kept@example.com",
                                now=clock.now(), context=ctx, expires_at=expires, claim_for=CLAIM)
    await outbox.mark(svc.db, kept.id, MailStatus.SENT, now=clock.now(), keep_sent=True)
    # Queued for a retry later than its code lives (the dispatcher leaves it alone until then).
    retry = await outbox.enqueue(svc.db, svc.sealer, kind="login_code", recipient="retry@example.com",
                                 now=clock.now(), context=ctx, expires_at=expires, claim_for=CLAIM)
    await outbox.mark(svc.db, retry.id, MailStatus.QUEUED, now=clock.now(), error="421 try later",
                      retry_at=clock.now() + timedelta(hours=1))

    async def payloads() -> dict[int, bool]:
        rows = await svc.db.fetch_all(sa.select(mail_outbox.c.id, mail_outbox.c.payload))
        return {r.id: r.payload is not None for r in rows}

    await cleanup(svc.db, now=clock.now(), sent_kept=True)
    assert await payloads() == {stuck.id: True, kept.id: True, retry.id: True}  # codes still valid
    clock.advance(11 * 60)
    await cleanup(svc.db, now=clock.now())
    assert await payloads() == {stuck.id: False, kept.id: True, retry.id: False}
    clock.advance(2 * 24 * 3600)  # however long ago it expired
    await cleanup(svc.db, now=clock.now(), sent_kept=True)
    assert await payloads() == {stuck.id: False, kept.id: False, retry.id: False}

"""Faults injected for real: a Redis, MariaDB, SMTP server or app worker that the test itself
started on its own port is killed, and the app must lose no sign-in and no mail (issue 14)."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.database import migrate
from app.mail.dispatcher import CODE_BACKOFF_CAP, backoff
from app.settings import Settings
from app.tables import mail_outbox
from tests.conftest import (
    PASSWORD,
    Capture,
    code_in,
    get_csrf,
    login,
    register,
    registered,
    running,
    submit_code,
    wait_mail,
    with_,
)
from tests.faults import (  # noqa: F401  (fixtures)
    AppProcess,
    OwnMariaDB,
    OwnRedis,
    OwnSmtp,
    own_mariadb_fixture,
    own_redis_fixture,
    own_smtp_fixture,
    start_app_fixture,
)

pytestmark = pytest.mark.anyio


def wait_for(what: Callable[[], Any], timeout: float = 15, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


async def await_for(what: Callable[[], Any], timeout: float = 15, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(every)


# --- Redis -------------------------------------------------------------------------------


async def test_redis_down_never_takes_sign_in_down(
    settings: Settings, clock: FixedClock, smtp: Capture, own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Rate-limit storage gone: sign-in and codes go on, limited per process, one WARNING; back
    on Redis by itself once it returns."""
    caplog.set_level(logging.INFO)
    limited = with_(settings, rate_limit_storage=own_redis.url, rate_limit="5/minute")
    async with running(limited, clock) as server:
        async with server.client() as c:
            await registered(c, smtp)
        own_redis.stop(kill=True)
        clock.advance(61)
        async with server.client() as c:
            assert (await login(c)).headers["location"] == "/verify"
            code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
            assert (await submit_code(c, code)).headers["location"] == "/dashboard"
        async with server.client() as c:
            token = await get_csrf(c, "/login")
            statuses = [(await c.post("/login", data={"csrf_token": token, "login": "x", "password": "y"})).status_code
                        for _ in range(6)]
        assert 500 not in statuses and statuses[-1] == 429, statuses  # still limited, per process
        warnings = [r for r in caplog.records if r.name == "app.ratelimit" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
        assert server.services.limiter.degraded
        own_redis.restart()
        await asyncio.sleep(1.2)  # the next probe
        async with server.client() as c:
            assert (await c.get("/register")).status_code == 200
            await register(c, username="after", email="after@example.com")
        assert not server.services.limiter.degraded
        with own_redis.client() as r:
            assert any(k.startswith(b"rl:addr:register:") for k in r.keys("rl:*")), "counting in Redis again"


# --- a worker killed while it sends ------------------------------------------------------


def _app_env(tmp_path: Path, smtp: OwnSmtp, **extra: str) -> dict[str, str]:
    return {
        "APP_ENV": "test", "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}",
        "SECRET_KEY": secrets.token_urlsafe(48), "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port),
        "SMTP_SECURITY": "none", "SMTP_TIMEOUT": "2", "RATE_LIMIT": "1000/minute", **extra,
    }


def _register_over_http(c: httpx.Client, email: str = "jane@example.com") -> None:
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/register").text).group(1)  # type: ignore[union-attr]
    r = c.post("/register", data={"csrf_token": token, "full_name": "Jane Doe", "username": email.split("@")[0],
                                  "email": email, "password": PASSWORD, "confirm_password": PASSWORD})
    assert r.status_code == 303, r.text


def _submit_over_http(c: httpx.Client, code: str) -> httpx.Response:
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/verify").text).group(1)  # type: ignore[union-attr]
    return c.post("/verify", data={"csrf_token": token, "code": code})


def _kill_every_worker(app: AppProcess) -> None:
    # All at once: killed one by one (each waiting for its replacement, 2-4 s), the worker holding
    # a stalled send could finish it before its turn came, and the test would see it sent twice.
    app.kill_workers(app.worker_pids())


@pytest.mark.slow
def test_a_worker_killed_mid_send_is_taken_over_once_and_the_code_works(
    tmp_path: Path, own_smtp: OwnSmtp, start_app: Callable[..., AppProcess]
) -> None:
    own_smtp.capture.stall_rcpt = 3  # the send is under way, no message handed over yet
    app = start_app(_app_env(tmp_path, own_smtp))
    with httpx.Client(base_url=app.url) as c:
        _register_over_http(c)
        assert own_smtp.capture.stalled.wait(5)
        _kill_every_worker(app)
        own_smtp.capture.stall_rcpt = 0
        started = time.monotonic()
        (mail,) = wait_for(lambda: own_smtp.to("jane@example.com"), timeout=20)
        taken_over_after = time.monotonic() - started
        time.sleep(1.5)
        assert len(own_smtp.to("jane@example.com")) == 1, "sent exactly once"
        assert _submit_over_http(c, code_in(mail)).headers["location"] == "/dashboard"
    # The claim lasts 3 x SMTP_TIMEOUT (6 s here), not minutes.
    assert taken_over_after < 10, taken_over_after
    assert "stopped before it finished; sending it from here" in app.log_text()


@pytest.mark.slow
def test_a_code_whose_step_was_used_while_its_mail_was_stuck_is_never_sent(
    tmp_path: Path, own_smtp: OwnSmtp, start_app: Callable[..., AppProcess]
) -> None:
    """The first mail is stuck in a worker that dies; the customer resends and signs in with the
    second code. The first mail's code is of no use any more: it is cancelled, not sent late."""
    own_smtp.capture.stall_rcpt = 3
    app = start_app(_app_env(tmp_path, own_smtp, OTP_RESEND_COOLDOWN="1"))
    with httpx.Client(base_url=app.url) as c:
        _register_over_http(c)
        assert own_smtp.capture.stalled.wait(5)
        _kill_every_worker(app)
        own_smtp.capture.stall_rcpt = 0
        time.sleep(1.1)
        token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/verify").text).group(1)  # type: ignore[union-attr]
        assert c.post("/verify/resend", data={"csrf_token": token}).status_code == 303
        (mail,) = wait_for(lambda: own_smtp.to("jane@example.com"))
        assert _submit_over_http(c, code_in(mail)).headers["location"] == "/dashboard"
        time.sleep(8)  # past the dead worker's claim: the old mail is settled, not sent
        assert len(own_smtp.to("jane@example.com")) == 1
        with sqlite3.connect(tmp_path / "shop.db") as db:
            statuses = sorted(r[0] for r in db.execute("SELECT status FROM mail_outbox"))
        assert statuses == ["cancelled", "sent"], statuses


@pytest.mark.slow
def test_a_late_mail_taken_over_from_a_dead_worker_still_signs_in(
    tmp_path: Path, own_smtp: OwnSmtp, start_app: Callable[..., AppProcess]
) -> None:
    """Issue 16: resending never kills the earlier codes, so the mail that arrives late (taken
    over after the worker died) carries a code that still works."""
    own_smtp.capture.stall_rcpt = 3
    app = start_app(_app_env(tmp_path, own_smtp, OTP_RESEND_COOLDOWN="1"))
    with httpx.Client(base_url=app.url) as c:
        _register_over_http(c)
        assert own_smtp.capture.stalled.wait(5)
        _kill_every_worker(app)
        own_smtp.capture.stall_rcpt = 0
        time.sleep(1.1)
        token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/verify").text).group(1)  # type: ignore[union-attr]
        assert c.post("/verify/resend", data={"csrf_token": token}).status_code == 303
        # The resend's mail comes at once; the first one only once its claim ran out (6 s).
        _resent, late = wait_for(lambda: len(own_smtp.to("jane@example.com")) >= 2 and own_smtp.to("jane@example.com"),
                                 timeout=20)
        assert _submit_over_http(c, code_in(late)).headers["location"] == "/dashboard"


# --- MariaDB -----------------------------------------------------------------------------


async def test_the_sent_mark_survives_the_database_dying_mid_send(
    settings: Settings, clock: FixedClock, own_mariadb: OwnMariaDB, own_smtp: OwnSmtp,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The mail went out while MariaDB died: the "sent" mark is tried again until it lands, so
    the message is never sent a second time."""
    caplog.set_level(logging.INFO)
    url = own_mariadb.create_database("shop")
    migrate(url)
    local = with_(settings, database_url=url, smtp_port=own_smtp.port, smtp_timeout=2)
    own_smtp.capture.stall_rcpt = 0.5  # the POST answers before the message is handed over
    own_smtp.capture.on_data = lambda: own_mariadb.stop(kill=True)
    async with running(local, clock) as server:
        async with server.client() as c:
            assert (await register(c)).status_code == 303
        await await_for(lambda: own_smtp.to("jane@example.com"))
        await asyncio.sleep(1.5)  # the mark fails against the dead server, and is tried again
        own_smtp.capture.on_data = None
        await asyncio.to_thread(own_mariadb.start)

        def status() -> str | None:
            with own_mariadb.connect("shop") as conn, conn.cursor() as cur:
                cur.execute("SELECT status FROM mail_outbox")
                row = cur.fetchone()
                return row[0] if row and row[0] == "sent" else None

        assert await await_for(status, timeout=20) == "sent"
        clock.advance(3600)  # long past any claim: nothing is due again
        await server.services.mailer.drain()
        await asyncio.sleep(0.5)
    assert len(own_smtp.to("jane@example.com")) == 1
    assert any("recording sent failed" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.slow
def test_a_worker_restarted_while_mariadb_is_down_comes_back_with_it(
    tmp_path: Path, own_mariadb: OwnMariaDB, own_smtp: OwnSmtp, start_app: Callable[..., AppProcess]
) -> None:
    url = own_mariadb.create_database("shop")
    app = start_app({**_app_env(tmp_path, own_smtp), "DATABASE_URL": url})
    own_mariadb.stop(kill=True)
    (victim,) = app.worker_pids()[:1]
    app.kill_worker(victim)  # its replacement starts with the database down
    assert app.pids(), "uvicorn is still up"
    with httpx.Client(base_url=app.url) as c:
        health = c.get("/healthz")
        assert health.status_code == 503
        own_mariadb.start()
        wait_for(lambda: c.get("/healthz").status_code == 200)
        for _ in range(4):  # every worker answers again
            _ = c.get("/healthz")
        _register_over_http(c)
    wait_for(lambda: own_smtp.to("jane@example.com"))


# --- the mail server ---------------------------------------------------------------------


async def test_mail_server_back_wakes_every_waiting_code_at_once(
    settings: Settings, clock: FixedClock, own_smtp: OwnSmtp, caplog: pytest.LogCaptureFixture
) -> None:
    """Codes queued while the mail server was down go out as soon as one send succeeds, not
    each after its own backoff; a code mail never backs off past CODE_BACKOFF_CAP."""
    caplog.set_level(logging.INFO)
    local = with_(settings, smtp_port=own_smtp.port, smtp_timeout=2)
    own_smtp.stop()
    async with running(local, clock) as server:
        for i in range(3):
            async with server.client() as c:
                await register(c, username=f"early{i}", email=f"early{i}@example.com")

        async def retries() -> list[Any]:
            rows = await server.services.db.fetch_all(sa.select(mail_outbox))
            return [r for r in rows if r.status == "queued" and r.last_error]

        while len(await retries()) < 3:
            await asyncio.sleep(0.05)
        for row in await retries():
            waits = (row.next_attempt_at.replace(tzinfo=clock.now().tzinfo) - clock.now()).total_seconds()
            assert 0 < waits <= CODE_BACKOFF_CAP
        assert any(r.levelno == logging.WARNING and "mail retry" in r.getMessage() for r in caplog.records)
        own_smtp.start()
        # The clock does not move: only the wake-up can make the backed-off ones due.
        async with server.client() as c:
            await register(c, username="late", email="late@example.com")
        for address in ("late@example.com", "early0@example.com", "early1@example.com", "early2@example.com"):
            await await_for(lambda a=address: own_smtp.to(a), timeout=8)


async def test_a_code_mail_still_out_after_15_seconds_says_so_and_what_to_do(
    settings: Settings, clock: FixedClock, own_smtp: OwnSmtp
) -> None:
    own_smtp.stop()
    async with running(with_(settings, smtp_port=own_smtp.port, smtp_timeout=2), clock) as server:
        async with server.client() as c:
            await register(c)
            clock.advance(10)
            page = await c.get("/verify/delivery", headers={"HX-Request": "true"})
            assert "Sending your code" in page.text and "longer than usual" not in page.text
            clock.advance(6)
            page = await c.get("/verify/delivery", headers={"HX-Request": "true"})
            assert "taking longer than usual" in page.text and "spam" in page.text and "Resend code" in page.text
            assert 'hx-get="/verify/delivery"' in page.text  # it goes on watching


def test_code_mail_backoff_is_capped_while_someone_waits() -> None:
    assert [backoff(n, code=True) for n in range(1, 8)] == [2, 4, 8, 10, 10, 10, 10]
    assert backoff(7) == 128  # other mail keeps the long schedule


async def test_giving_up_a_mail_is_an_error_in_the_log(
    settings: Settings, clock: FixedClock, own_smtp: OwnSmtp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    own_smtp.capture.reply = "550 5.1.1 no such user"
    async with running(with_(settings, smtp_port=own_smtp.port), clock) as server, server.client() as c:
        await register(c)

        async def failed() -> bool:
            row = await server.services.db.fetch_one(sa.select(mail_outbox))
            return row is not None and row.status == "failed"

        while not await failed():
            await asyncio.sleep(0.05)
    assert any(r.levelno == logging.ERROR and "mail failed" in r.getMessage() for r in caplog.records)

"""Shared fixtures: both database backends, a real SMTP capture, a fixed clock, and an
in-process app with an httpx client that speaks to it through ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pymysql
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy.engine import make_url

from app.clock import FixedClock
from app.database import migrate
from app.main import create_app
from app.settings import Settings

CODE_LINE = re.compile(r"(?m)^\s*(\d{6})\s*$")
PASSWORD = "Blue-Harbor-Lamp-42"
TABLES = ("staff_sessions", "staff", "auth_daily", "webauthn_challenges", "trusted_devices", "authenticators", "otp_codes", "otp_ledgers", "mail_throttle", "mail_outbox", "auth_events", "auth_sessions", "otp_stats", "customer_otp_verification", "customers")


# --- backends ----------------------------------------------------------------------------


def redis_url_or_skip() -> str:
    """TEST_REDIS_URL (default 127.0.0.1:6379) when Redis answers; skipped otherwise, but
    never in CI, where a missing Redis fails the test."""
    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
    try:
        import redis

        redis.Redis.from_url(url).ping()
    except Exception:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("Redis is not running")
    return url


def _backends() -> list[str]:
    names = ["sqlite"]
    if os.environ.get("TEST_MYSQL_URL"):
        names.append("mysql")
    return names


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("CI") == "true" and not os.environ.get("TEST_MYSQL_URL"):
        raise pytest.UsageError("CI=true needs TEST_MYSQL_URL: MariaDB tests are never skipped in CI")


def mysql_server() -> dict[str, Any]:
    url = make_url(os.environ["TEST_MYSQL_URL"])
    return {"host": url.host or "127.0.0.1", "port": url.port or 3306, "user": url.username or "root",
            "password": url.password or ""}


def mysql_url(name: str) -> str:
    s = mysql_server()
    return f"mysql+aiomysql://{s['user']}:{s['password']}@{s['host']}:{s['port']}/{name}"


def create_mysql_database(prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with contextlib.closing(pymysql.connect(**mysql_server())) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    return name


def drop_mysql_database(name: str) -> None:
    with contextlib.closing(pymysql.connect(**mysql_server())) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(scope="session", params=_backends())
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A freshly migrated database per run and backend, built with the real migrations."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
        migrate(url)
        yield url
        return
    name = create_mysql_database("shop_test")
    url = mysql_url(name)
    try:
        migrate(url)
        yield url
    finally:
        drop_mysql_database(name)


def wipe(url: str) -> None:
    """Empty every table (each test starts from nothing)."""
    if url.startswith("sqlite"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(url.split("///", 1)[1])) as conn:
            for table in TABLES:
                conn.execute(f"DELETE FROM {table}")
            conn.commit()
        return
    u = make_url(url)
    with contextlib.closing(pymysql.connect(**mysql_server(), database=u.database)) as conn, conn.cursor() as cur:
        cur.execute("SET FOREIGN_KEY_CHECKS=0")
        for table in TABLES:
            cur.execute(f"DELETE FROM {table}")
        conn.commit()


@pytest.fixture
def db_url(database_url: str) -> str:
    wipe(database_url)
    return database_url


@pytest.fixture
def backend(db_url: str) -> str:
    return "sqlite" if db_url.startswith("sqlite") else "mysql"


# --- mail capture ------------------------------------------------------------------------


@dataclass
class Capture:
    """A real SMTP server (aiosmtpd) keeping what it receives."""

    port: int = 0
    messages: list[EmailMessage] = field(default_factory=list)
    delay: float = 0.0
    reply: str = "250 OK"
    holding: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Fault hooks: hold each RCPT this long (before any message is handed over), and call
    # on_data (in the server's thread) when a message arrives, before it is accepted.
    stall_rcpt: float = 0.0
    stalled: threading.Event = field(default_factory=threading.Event)
    on_data: Any = None
    arrived: list[str] = field(default_factory=list)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        if self.stall_rcpt:
            self.stalled.set()
            await asyncio.sleep(self.stall_rcpt)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.arrived.extend(envelope.rcpt_tos)  # every message that reached us, kept or not
        if self.on_data is not None:
            self.on_data()
        if self.delay:
            self.holding.set()
            await asyncio.sleep(self.delay)
            self.holding.clear()
        if not self.reply.startswith("250"):
            return self.reply
        msg = message_from_bytes(envelope.content, policy=policy.default)
        with self.lock:
            self.messages.append(msg)  # type: ignore[arg-type]
        return "250 OK"

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()
        self.delay, self.reply, self.stall_rcpt, self.on_data = 0.0, "250 OK", 0.0, None
        self.arrived.clear()
        self.stalled.clear()

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [m for m in self.messages if m["To"] == address]


def text_of(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def html_of(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


def code_in(msg: EmailMessage) -> str:
    codes = CODE_LINE.findall(text_of(msg))
    assert len(codes) == 1, codes
    return str(codes[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_capture(capture: Capture, port: int | None = None) -> Controller:
    capture.port = port or free_port()
    controller = Controller(capture, hostname="127.0.0.1", port=capture.port)
    controller.start()
    return controller


@pytest.fixture(scope="session")
def _smtp_session() -> Iterator[Capture]:
    capture = Capture()
    controller = start_capture(capture)
    yield capture
    controller.stop()


@pytest.fixture
def smtp(_smtp_session: Capture) -> Capture:
    _smtp_session.clear()
    return _smtp_session


# --- the app -----------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock()


@pytest.fixture
def settings(db_url: str, smtp: Capture) -> Settings:
    return Settings(
        app_env="test",
        database_url=db_url,
        secret_key=secrets.token_urlsafe(48),
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_security="none",
        smtp_timeout=5,
        rate_limit="10000/minute",
        login_account_rate_limit="10000/minute",
        otp_cleanup_interval=3600,
    )


class Running:
    """An app whose lifespan is running, and the state it yields."""

    def __init__(self, app: Any, state: dict[str, Any]) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        scope["state"] = dict(self.state)
        await self.app(scope, receive, send)

    @property
    def services(self) -> Any:
        return self.state["services"]

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("base_url", "http://testserver")
        kwargs.setdefault("headers", {"user-agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/130.0 Safari/537.36"})
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self), follow_redirects=False, **kwargs)


@contextlib.asynccontextmanager
async def running(settings: Settings, clock: Any = None) -> AsyncIterator[Running]:
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app) as state:
        yield Running(app, state)


@pytest.fixture
async def server(settings: Settings, clock: FixedClock) -> AsyncIterator[Running]:
    async with running(settings, clock) as r:
        yield r


@pytest.fixture
async def client(server: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with server.client() as c:
        yield c


# --- flow helpers ------------------------------------------------------------------------

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    m = CSRF.search(html)
    assert m, "no CSRF token in page"
    return m.group(1)


async def get_csrf(client: httpx.AsyncClient, path: str) -> str:
    r = await client.get(path)
    assert r.status_code == 200, (path, r.status_code)
    return csrf_from(r.text)


async def wait_mail(smtp: Capture, address: str, count: int = 1, timeout: float = 10) -> list[EmailMessage]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = smtp.to(address)
        if len(got) >= count:
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {count} mail(s) to {address}, got {len(smtp.to(address))}")


async def register(
    client: httpx.AsyncClient, *, username: str = "jane", email: str = "jane@example.com",
    name: str = "Jane Doe", password: str = PASSWORD, htmx: bool = False,
) -> httpx.Response:
    token = await get_csrf(client, "/register")
    headers = {"HX-Request": "true"} if htmx else {}
    return await client.post(
        "/register",
        data={"csrf_token": token, "full_name": name, "username": username, "email": email,
              "password": password, "confirm_password": password},
        headers=headers,
    )


async def submit_code(client: httpx.AsyncClient, code: str, htmx: bool = False) -> httpx.Response:
    token = await get_csrf(client, "/verify")
    return await client.post("/verify", data={"csrf_token": token, "code": code},
                             headers={"HX-Request": "true"} if htmx else {})


async def login(client: httpx.AsyncClient, who: str = "jane", password: str = PASSWORD,
                htmx: bool = False) -> httpx.Response:
    token = await get_csrf(client, "/login")
    return await client.post("/login", data={"csrf_token": token, "login": who, "password": password},
                             headers={"HX-Request": "true"} if htmx else {})


async def resend(client: httpx.AsyncClient) -> httpx.Response:
    token = await get_csrf(client, "/verify")
    return await client.post("/verify/resend", data={"csrf_token": token})


async def registered(client: httpx.AsyncClient, smtp: Capture, **kwargs: Any) -> str:
    """Register and verify; returns the email. The client ends signed in."""
    email = kwargs.setdefault("email", "jane@example.com")
    r = await register(client, **kwargs)
    assert r.status_code == 303, r.text
    code = code_in((await wait_mail(smtp, email))[-1])
    r = await submit_code(client, code)
    assert r.headers.get("location") == "/dashboard", r.text
    return email


def with_(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)


PUBLIC_ORIGIN = "https://shop.example"


def production(settings: Settings, **changes: Any) -> Settings:
    """The same settings in production mode (which needs PUBLIC_ORIGIN); talk to it over
    `server.client(base_url=PUBLIC_ORIGIN)`: plain http is redirected there."""
    return replace(settings, app_env="production", public_origin=PUBLIC_ORIGIN, **changes)


ROOT = Path(__file__).resolve().parent.parent

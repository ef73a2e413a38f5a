"""The foundation: health, error pages, migrations (fresh and legacy), commands, modes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pymysql
import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.database import migrate
from app.settings import Settings
from app.tables import customers, otp_ledgers
from tests.conftest import (
    PASSWORD,
    PUBLIC_ORIGIN,
    ROOT,
    Capture,
    Running,
    code_in,
    create_mysql_database,
    drop_mysql_database,
    free_port,
    get_csrf,
    login,
    mysql_server,
    mysql_url,
    production,
    register,
    registered,
    running,
    submit_code,
    wait_mail,
    with_,
)

pytestmark = pytest.mark.anyio
LEGACY_ROWS = [(1, "alice@example.com", "alice-hash", "+44 1234", 120), (2, "bob@example.com", "bob-hash", None, 0)]


async def test_home_page_renders_with_htmx_vendored(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 200 and 'name="viewport"' in r.text
    assert "/static/vendor/htmx-2.0.11.min.js" in r.text
    js = await client.get("/static/vendor/htmx-2.0.11.min.js")
    assert js.status_code == 200 and 'version:"2.0.11"' in js.text.replace(" ", "")


async def test_healthz_is_200_when_the_database_answers(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"database": "ok"}


async def test_unknown_page_is_a_friendly_404_and_wrong_method_405(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope")
    assert r.status_code == 404 and "Page not found" in r.text
    r = await client.put("/login")
    assert r.status_code == 405


async def test_test_clock_hook_exists_only_in_test_mode(settings: Settings) -> None:
    async with running(settings) as server, server.client() as c:
        before = (await c.get("/_test/clock")).json()["offset"]
        r = await c.post("/_test/clock", json={"advance": 90})
        assert r.status_code == 200 and r.json()["offset"] == before + 90
    for changed in (with_(settings, app_env="development"), production(settings)):
        async with running(changed) as server, server.client(base_url=PUBLIC_ORIGIN) as c:
            assert (await c.post("/_test/clock", json={"advance": 90})).status_code in (404, 405)
            assert (await c.get("/_test/clock")).status_code == 404


# --- database down (31) ------------------------------------------------------------------


class Proxy:
    """A TCP proxy in front of MariaDB that the test can cut and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()
        await asyncio.sleep(0.05)


async def test_database_down_gives_503_page_and_counters_survive(
    backend: str, settings: Settings, smtp: Capture, tmp_path: Path, clock: FixedClock
) -> None:
    if backend == "sqlite":
        db_dir = tmp_path / "dbdir"
        db_dir.mkdir()
        url = f"sqlite+aiosqlite:///{db_dir / 'shop.db'}"
        migrate(url)
        local = with_(settings, database_url=url)
        proxy = None
    else:
        name = create_mysql_database("shop_down")
        migrate(mysql_url(name))
        s = mysql_server()
        proxy = Proxy((s["host"], s["port"]))
        await proxy.start()
        local = with_(settings, database_url=f"mysql+aiomysql://{s['user']}:{s['password']}@127.0.0.1:{proxy.port}/{name}")
    try:
        async with running(local, clock) as server, server.client() as c:
            await register(c)
            code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
            await c.post("/verify", data={"csrf_token": (await c.get("/verify")).text.split('name="csrf_token" value="')[1].split('"')[0],
                                          "code": "000000" if code != "000000" else "111111"})
            if proxy is None:
                shutil.move(str(db_dir), str(tmp_path / "moved"))
            else:
                await proxy.cut()
            health = await c.get("/healthz")
            assert health.status_code == 503
            page = await c.get("/verify")
            assert page.status_code == 503 and "back in a moment" in page.text and "Retry-After" in page.headers
            frag = await c.get("/verify", headers={"HX-Request": "true"})
            assert frag.status_code == 503 and "<html" not in frag.text
            if proxy is None:
                shutil.move(str(tmp_path / "moved"), str(db_dir))
            else:
                await proxy.start()
            for _ in range(50):
                if (await c.get("/healthz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await c.get("/healthz")).status_code == 200
            # nothing lost (a registration form's step counts on its address's ledger)
            assert await server.services.db.fetch_val(sa.select(otp_ledgers.c.failures)) == 1
            r = await submit_code(c, code)
            assert r.headers["location"] == "/dashboard"
    finally:
        if proxy is not None:
            proxy.server.close()  # type: ignore[union-attr]
            drop_mysql_database(name)


# --- migrations --------------------------------------------------------------------------


@contextlib.contextmanager
def legacy_database(backend: str, tmp_path: Path) -> Iterator[tuple[str, object]]:
    """An existing shop database: customers(id, email, password_hash) plus columns of its own."""
    ddl = ("CREATE TABLE customers (id INTEGER PRIMARY KEY {auto}, email VARCHAR(254) NOT NULL UNIQUE, "
           "password_hash VARCHAR(255) NOT NULL, phone VARCHAR(32), loyalty_points INTEGER NOT NULL DEFAULT 0)")
    insert = "INSERT INTO customers (id, email, password_hash, phone, loyalty_points) VALUES ({p}, {p}, {p}, {p}, {p})"
    if backend == "sqlite":
        path = tmp_path / "legacy.db"
        conn = sqlite3.connect(path)
        conn.execute(ddl.format(auto="AUTOINCREMENT"))
        conn.executemany(insert.format(p="?"), LEGACY_ROWS)
        conn.commit()
        conn.close()
        yield f"sqlite+aiosqlite:///{path}", lambda q: sqlite3.connect(path).execute(q).fetchall()
        return
    name = create_mysql_database("shop_legacy")
    try:
        with contextlib.closing(pymysql.connect(**mysql_server(), database=name)) as conn, conn.cursor() as cur:
            cur.execute(ddl.format(auto="AUTO_INCREMENT"))
            cur.executemany(insert.format(p="%s"), LEGACY_ROWS)
            conn.commit()

        def query(q: str) -> list[tuple[object, ...]]:
            with contextlib.closing(pymysql.connect(**mysql_server(), database=name)) as conn, conn.cursor() as cur:
                cur.execute(q)
                return list(cur.fetchall())

        yield mysql_url(name), query
    finally:
        drop_mysql_database(name)


async def test_migration_upgrades_legacy_customers_keeping_rows_and_columns(backend: str, tmp_path: Path) -> None:
    with legacy_database(backend, tmp_path) as (url, query):
        migrate(url)
        migrate(url)  # idempotent
        rows = query("SELECT id, email, password_hash, phone, loyalty_points, otp_enabled, otp_attempts, "  # type: ignore[operator]
                     "session_version FROM customers ORDER BY id")
        assert [tuple(r[:5]) for r in rows] == LEGACY_ROWS
        assert all(r[5] in (0, False) and r[6] == 0 and r[7] == 0 for r in rows)
        tables = {r[0] for r in query("SELECT name FROM sqlite_master WHERE type='table'" if backend == "sqlite"  # type: ignore[operator]
                                      else "SHOW TABLES")}
        assert {"customer_otp_verification", "auth_sessions", "auth_events", "mail_outbox", "otp_stats"} <= tables


async def test_legacy_customer_signs_in_after_upgrade_and_otp_enable(
    backend: str, tmp_path: Path, settings: Settings, smtp: Capture, clock: FixedClock
) -> None:
    from werkzeug.security import generate_password_hash

    with legacy_database(backend, tmp_path) as (url, query):
        migrate(url)
        env = {**os.environ, "DATABASE_URL": url, "APP_ENV": "test", "SECRET_KEY": "k" * 40}
        legacy_hash = generate_password_hash(PASSWORD, method="pbkdf2:sha256:600000")
        if backend == "sqlite":
            conn = sqlite3.connect(url.split("///")[1])
            conn.execute("UPDATE customers SET password_hash = ?, email_verified_at = created_at", (legacy_hash,))
            conn.commit()
            conn.close()
        else:
            name = url.rsplit("/", 1)[1]
            with contextlib.closing(pymysql.connect(**mysql_server(), database=name)) as conn, conn.cursor() as cur:
                cur.execute("UPDATE customers SET password_hash = %s, email_verified_at = created_at", (legacy_hash,))
                conn.commit()
        out = subprocess.run([sys.executable, "-m", "app", "otp", "enable", "--email", "alice@example.com"],
                             env=env, capture_output=True, text=True, cwd=ROOT, check=True)
        assert "Sign-in codes on for alice@example.com: 1 changed" in out.stdout
        missing = subprocess.run([sys.executable, "-m", "app", "otp", "enable", "--email", "nobody@example.com"],
                                 env=env, capture_output=True, text=True, cwd=ROOT)
        assert missing.returncode == 1 and "No customer" in missing.stderr
        async with running(with_(settings, database_url=url), clock) as server:
            async with server.client() as c:
                r = await login(c, "alice@example.com")
                assert r.headers["location"] == "/verify"  # OTP on: a code step
                assert (await submit_code(c, code_in((await wait_mail(smtp, "alice@example.com"))[0]))).headers[
                    "location"] == "/dashboard"
            async with server.client() as c:
                r = await login(c, "bob@example.com")
                assert r.headers["location"] == "/dashboard"  # OTP still off for bob
            hashes = [r.password_hash for r in await server.services.db.fetch_all(sa.select(customers.c.password_hash))]
            assert all(h.startswith("$argon2id$") for h in hashes)
        out = subprocess.run([sys.executable, "-m", "app", "otp", "enable", "--all"],
                             env=env, capture_output=True, text=True, cwd=ROOT, check=True)
        assert "Sign-in codes on for every customer" in out.stdout


def test_otp_cleanup_and_migrate_commands(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cmd.db'}"
    env = {**os.environ, "DATABASE_URL": url, "APP_ENV": "test", "SECRET_KEY": "k" * 40}
    out = subprocess.run([sys.executable, "-m", "app", "migrate"], env=env, capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert "up to date" in out.stdout
    out = subprocess.run([sys.executable, "-m", "app", "otp", "cleanup"], env=env, capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert "Deleted 0 finished code(s)" in out.stdout


def test_bad_configuration_is_a_clear_message_not_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "APP_ENV": "production", "SECRET_KEY": "short"}
    out = subprocess.run([sys.executable, "-m", "app", "migrate"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "configuration error: SECRET_KEY" in out.stderr and "Traceback" not in out.stderr


def test_python_m_app_serves_home_and_healthz_on_embedded_sqlite(tmp_path: Path) -> None:
    """The README's first command, on a directory with nothing in it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "SECRET_KEY", "SMTP_", "APP_ENV"))}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        home = httpx.get(f"http://127.0.0.1:{port}/")
        assert home.status_code == 200 and "Computer Shop" in home.text
        assert (tmp_path / "shop.db").exists() and (tmp_path / ".dev-secret-key").exists()
        assert httpx.get(f"http://127.0.0.1:{port}/dev/mail").status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    # The newcomer is told where the codes are.
    assert f"http://127.0.0.1:{port}/dev/mail" in (tmp_path / "serve.log").read_text()


async def test_dashboard_shows_account_and_last_sign_ins(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        page = (await c.get("/dashboard")).text
    for text in ("Hello, Jane Doe", "jane@example.com", "Sign-in codes", "On:", "Last sign-ins", "Chrome 130 on Linux",
                 "127.0.0.1", "Sign out everywhere"):
        assert text in page, text


async def test_dashboard_lists_come_in_one_query_newest_first_and_only_the_customers_own(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    from datetime import timedelta

    from app import audit
    from app.auth import queries

    svc = server.services
    async with server.client() as c:
        await registered(c, smtp)
    me = await svc.db.fetch_val(sa.select(customers.c.id))
    other = await queries.create_customer(svc.db, username="otto", email="otto@example.com", full_name="Otto",
                                          password_hash="x", now=clock.now())
    start = clock.now()
    for i in range(25):  # more than the 20 sessions and 5 sign-ins shown
        at = start + timedelta(seconds=i)
        await queries.create_session(svc.db, session_hash=f"s{i:02d}", customer_id=me, version=0, ip=f"198.18.0.{i}",
                                     user_agent="ua", now=at)
        await audit.record(svc.db, "signed_in", customer_id=me, ip=f"198.18.1.{i}", user_agent="ua", now=at)
    await queries.create_session(svc.db, session_hash="theirs", customer_id=other, version=0, ip="203.0.113.9",
                                 user_agent="ua", now=start + timedelta(seconds=99))
    await audit.record(svc.db, "signed_in", customer_id=other, ip="203.0.113.9", user_agent="ua",
                       now=start + timedelta(seconds=99))
    await queries.revoke_session(svc.db, "s24", me, start)
    active, sign_ins = await queries.dashboard_lists(svc.db, me, now=start + timedelta(seconds=30), idle=1800,
                                                     absolute=43200)
    assert [s.id for s in active] == [f"s{i:02d}" for i in range(23, 3, -1)]  # 20, newest use first, revoked gone
    assert all(s.customer_id == me for s in active)
    assert [e["ip"] for e in sign_ins] == [f"198.18.1.{i}" for i in range(24, 19, -1)]  # the last 5
    idle, _ = await queries.dashboard_lists(svc.db, me, now=start + timedelta(seconds=1815), idle=1800,
                                            absolute=43200)
    assert [s.id for s in idle] == ["s23", "s22", "s21", "s20", "s19", "s18", "s17", "s16"]  # the rest idled out


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"x=" + b"a" * 70_000, {"content-type": "application/x-www-form-urlencoded"}, 413),
        (b"--zz\r\nbroken", {"content-type": "multipart/form-data; boundary=zz"}, (400, 403)),
        (b"\xff\xfe\x00garbage", {"content-type": "application/x-www-form-urlencoded"}, 403),
        (b"{}", {"content-type": "application/json"}, 403),
    ],
)
async def test_malformed_or_huge_posts_get_a_clear_answer_never_500(
    client: httpx.AsyncClient, body: bytes, headers: dict[str, str], status: object
) -> None:
    await client.get("/login")
    r = await client.post("/login", content=body, headers=headers)
    assert r.status_code in (status if isinstance(status, tuple) else (status,))
    assert r.status_code < 500 and "Computer Shop" in r.text


async def test_forged_or_garbled_session_cookie_is_ignored(server: Running) -> None:
    async with server.client(cookies={"session": "eyJzaWQiOiAieCJ9.forged.sig"}) as c:
        r = await c.get("/dashboard")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert (await c.get("/verify")).status_code == 303


async def test_startup_compiles_every_statement_and_template_before_the_first_request(
    settings: Settings, clock: FixedClock,
) -> None:
    """A new worker's first customers must not pay for compiling SQL and Jinja on the event loop."""
    from app import sql, templating
    from app.mail import messages

    for env in (templating.env, messages.html_env, messages.text_env):
        env.cache.clear()  # type: ignore[union-attr]
    for q in list(sql._LIVE):
        q._prepared.clear()
    async with running(settings, clock) as app:
        name = sql.dialect(app.services.db)
        unprepared = [str(q.statement)[:60] for q in list(sql._LIVE) if name not in q._prepared]
        assert unprepared == []
        cached = {key[1] for key in templating.env.cache}  # type: ignore[union-attr]
        pages = {n for n in templating.env.list_templates() if n.endswith(".html")}
        assert pages and pages <= cached
        mails = {key[1] for key in messages.html_env.cache} | {key[1] for key in messages.text_env.cache}  # type: ignore[union-attr]
        assert {f"{kind}.{ext}" for kind in messages.SUBJECTS for ext in ("txt", "html")} <= mails


async def test_loop_monitor_reports_a_stall_in_the_period_it_happened(caplog: pytest.LogCaptureFixture) -> None:
    import gc

    from app.web.loop_monitor import loop_monitor

    task = asyncio.create_task(loop_monitor(interval=0.005, period=0.2))
    await asyncio.sleep(0.25)
    time.sleep(0.06)  # blocks the event loop
    await asyncio.sleep(0.25)
    garbage = [[i] for i in range(300_000)]  # a full collection that takes a while
    gc.collect()
    del garbage
    await asyncio.sleep(0.25)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    lines = [dict(kv.split("=") for kv in r.getMessage().split()[1:]) for r in caplog.records
             if r.getMessage().startswith("loop-monitor ")]
    stalls = [float(v["max_stall_ms"]) for v in lines]
    gcs = [float(v["gc_max_ms"]) for v in lines]
    assert len(stalls) >= 4
    assert max(stalls) >= 50
    assert min(stalls) < 50  # periods are separate: the others do not carry the stall
    assert max(gcs) > 2 and min(gcs) < max(gcs) / 2  # the collection shows in its own period only
    assert all(float(v["steal_ms"]) >= 0 for v in lines)  # the hypervisor's share, on Linux
    assert gc.callbacks == [cb for cb in gc.callbacks if "loop_monitor" not in getattr(cb, "__qualname__", "")]


# --- review fixes (issue 14) -------------------------------------------------------------


async def test_405_names_the_methods_the_path_takes(client: httpx.AsyncClient) -> None:
    r = await client.put("/login")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
    r = await client.delete("/verify/resend")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_only_connection_failures_count_as_the_database_being_down() -> None:
    from app.database import is_missing_schema, is_unavailable

    down = [pymysql.err.OperationalError(2003, "Can't connect"), pymysql.err.OperationalError(2013, "Lost"),
            pymysql.err.InterfaceError(0, ""), ConnectionRefusedError(), ConnectionResetError(),
            sqlite3.OperationalError("unable to open database file"), sqlite3.OperationalError("database is locked")]
    not_down = [TimeoutError(), OSError(28, "No space left on device"), ValueError("x"),
                pymysql.err.OperationalError(1213, "Deadlock"), pymysql.err.ProgrammingError(1146, "no table"),
                sqlite3.OperationalError("no such table: customers")]
    assert all(is_unavailable(e) for e in down), [e for e in down if not is_unavailable(e)]
    assert not any(is_unavailable(e) for e in not_down), [e for e in not_down if is_unavailable(e)]
    assert is_missing_schema(sqlite3.OperationalError("no such column: customers.source"))
    assert is_missing_schema(pymysql.err.OperationalError(1054, "Unknown column"))
    assert is_missing_schema(pymysql.err.ProgrammingError(1146, "Table doesn't exist"))


def _one_migration_behind(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'behind.db'}"
    else:
        url = mysql_url(create_mysql_database("shop_behind"))
    migrate(url, "0001")
    return url


async def test_a_missing_column_is_a_500_whose_log_says_to_migrate(
    backend: str, tmp_path: Path, settings: Settings, clock: FixedClock, caplog: pytest.LogCaptureFixture
) -> None:
    url = _one_migration_behind(backend, tmp_path)
    try:
        async with running(with_(settings, database_url=url), clock) as server, server.client() as c:
            r = await login(c, "jane@example.com", "Whatever-123")
            assert r.status_code == 500 and "Something went wrong" in r.text and "Retry-After" not in r.headers
        assert "python -m app migrate" in caplog.text
    finally:
        if backend == "mysql":
            drop_mysql_database(url.rsplit("/", 1)[1])


async def test_production_refuses_to_start_while_migrations_are_pending(
    backend: str, tmp_path: Path, settings: Settings, clock: FixedClock
) -> None:
    from app.settings import SettingsError

    url = _one_migration_behind(backend, tmp_path)
    try:
        with pytest.raises(SettingsError, match="0002.*python -m app migrate"):
            async with running(production(settings, database_url=url), clock):
                pass
        migrate(url)
        async with running(production(settings, database_url=url), clock) as server:
            async with server.client(base_url=PUBLIC_ORIGIN) as c:
                assert (await c.get("/healthz")).status_code == 200
    finally:
        if backend == "mysql":
            drop_mysql_database(url.rsplit("/", 1)[1])


async def test_trailing_slash_redirect_is_relative_whatever_the_host_header(client: httpx.AsyncClient) -> None:
    r = await client.get("/login/?next=1", headers={"Host": "evil.example"})
    assert r.status_code == 308 and r.headers["location"] == "/login?next=1"
    assert (await client.get("/nowhere/")).status_code == 404


async def test_a_client_that_goes_away_mid_form_is_one_line_not_a_traceback(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO)
    async with server.client() as c:
        token = await get_csrf(c, "/login")
        cookie = f"session={c.cookies['session']}".encode()
    sent: list[dict[str, object]] = []
    parts = [{"type": "http.request", "body": f"csrf_token={token}&login=ja".encode(), "more_body": True},
             {"type": "http.disconnect"}]

    async def receive() -> dict[str, object]:
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/login", "raw_path": b"/login", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/x-www-form-urlencoded"),
                         (b"content-length", b"200"), (b"cookie", cookie)],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    await server(scope, receive, send)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    lines = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None


async def test_otp_enable_finds_mixed_case_addresses_and_says_when_no_one_matches(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "DATABASE_URL": url, "APP_ENV": "test", "SECRET_KEY": "k" * 40}

    def app_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True, cwd=ROOT)

    assert app_cli("migrate").returncode == 0
    empty = app_cli("otp", "enable", "--all")
    assert empty.returncode == 1 and "no customers" in empty.stderr.lower()
    conn = sqlite3.connect(tmp_path / "cli.db")
    conn.execute("INSERT INTO customers (email, password_hash, otp_enabled) VALUES ('Alice@Example.COM', 'x', 0)")
    conn.commit()
    on = app_cli("otp", "enable", "--email", "alice@example.com")
    assert on.returncode == 0 and "1 changed" in on.stdout, on.stdout + on.stderr
    assert conn.execute("SELECT otp_enabled FROM customers").fetchone()[0] == 1
    again = app_cli("otp", "enable", "--email", "ALICE@example.com")
    assert again.returncode == 0 and "0 changed, 1 already on" in again.stdout
    nobody = app_cli("otp", "disable", "--email", "nobody@example.com")
    assert nobody.returncode == 1 and "No customer has the email nobody@example.com" in nobody.stderr
    off = app_cli("otp", "disable", "--all")
    assert off.returncode == 0 and conn.execute("SELECT otp_enabled FROM customers").fetchone()[0] == 0
    conn.close()


async def test_registration_never_rewrites_a_migrated_shop_customer(
    backend: str, tmp_path: Path, settings: Settings, smtp: Capture, clock: FixedClock
) -> None:
    """A row from the shop's own table is a customer, not an abandoned sign-up: a stranger
    registering its address changes nothing, and (codes off) its owner signs in with the
    password alone."""
    from werkzeug.security import generate_password_hash

    with legacy_database(backend, tmp_path) as (url, query):
        migrate(url)
        legacy_hash = generate_password_hash(PASSWORD, method="pbkdf2:sha256:1000")
        before = query("SELECT id, username, full_name, email_verified_at FROM customers WHERE id = 1")  # type: ignore[operator]
        async with running(with_(settings, database_url=url), clock) as server:
            await server.services.db.execute(customers.update().values(password_hash=legacy_hash))
            async with server.client() as stranger:
                r = await register(stranger, username="mallory", email="alice@example.com",
                                   password="Mallorys-Pass-99")
                assert r.status_code == 303
            (notice,) = await wait_mail(smtp, "alice@example.com")
            assert "already" in notice["Subject"]
            assert query("SELECT id, username, full_name, email_verified_at FROM customers WHERE id = 1") == before  # type: ignore[operator]
            async with server.client() as alice:
                assert (await login(alice, "alice@example.com")).headers["location"] == "/dashboard"
            async with server.client() as mallory:
                assert (await login(mallory, "alice@example.com", "Mallorys-Pass-99")).status_code == 422


def test_domain_packages_load_no_web_framework() -> None:
    """The rules (codes, mail, crypto, passwords) import nothing of Starlette: they can be used
    and tested without HTTP, and a web framework change cannot reach them."""
    domain = ["app.otp", "app.otp.engine", "app.otp.cleanup", "app.mail.outbox", "app.mail.dispatcher",
              "app.mail.messages", "app.mail.transport", "app.security.crypto", "app.security.passwords"]
    probe = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in domain) + \
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'jinja2_fragments', 'uvicorn')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout

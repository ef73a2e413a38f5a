"""The fault harness (tests/faults.py) itself: each server really goes down, refuses connections
while down, and comes back on the same port with the same data; nothing is left running."""

from __future__ import annotations

import contextlib
import secrets
import smtplib
import socket
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import httpx
import pymysql
import pytest
import redis

from tests.faults import (
    AppProcess,
    OwnMariaDB,
    OwnRedis,
    OwnSmtp,
    ServerFailed,
    find_binary,
    free_port,
    group_members,
    own_mariadb_fixture,  # noqa: F401
    own_redis_fixture,  # noqa: F401
    own_smtp_fixture,  # noqa: F401
    pid_alive,
    start_app_fixture,  # noqa: F401
)


def refused(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


def message(to: str = "jane@example.com", subject: str = "hello") -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "shop@example.com", to, subject
    msg.set_content("body")
    return msg


# --- binaries and ports ------------------------------------------------------------------


def test_missing_binary_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-server is not installed"):
        find_binary("no-such-server", "/nonexistent/no-such-server")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="never skipped in CI"):
        find_binary("no-such-server", "/nonexistent/no-such-server")
    assert find_binary("sh").endswith("/sh")


def test_free_ports_are_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(p < low for p in ports) if low > 11000 else ports
    assert len(ports) > 1  # random, so parallel sessions rarely collide


# --- Redis -------------------------------------------------------------------------------


def test_redis_kill_9_and_restart_on_the_same_port(own_redis: OwnRedis) -> None:
    port, first = own_redis.port, own_redis.pid
    assert own_redis.url == f"redis://127.0.0.1:{port}" and port != 6379
    client = own_redis.client()
    assert client.set("k", "v") and client.get("k") == b"v"

    own_redis.stop(kill=True)
    assert first is not None and not pid_alive(first)
    assert refused(port)
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()

    own_redis.restart()
    assert own_redis.port == port and own_redis.pid not in (None, first)
    assert client.ping()  # the same client reconnects
    assert client.get("k") is None  # no persistence: a crashed Redis comes back empty
    assert "--- faults: start #2" in own_redis.log_text()

    own_redis.stop(kill=False)  # graceful: SIGTERM, and Redis says so in its log
    assert refused(port) and "ready to exit" in own_redis.log_text().lower()
    client.close()


def test_context_manager_stops_the_server_when_the_body_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), OwnRedis(tmp_path) as server:  # noqa: SIM117
        pid, port = server.pid, server.port
        raise RuntimeError("boom")
    assert pid is not None and not pid_alive(pid) and refused(port)


def test_a_freshly_picked_port_taken_before_the_first_start_is_replaced(tmp_path: Path) -> None:
    server = OwnRedis(tmp_path)
    taken = server.port
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", taken))
    try:
        server.start()
        assert server.port != taken and server.client().ping()
        assert "Address already in use" in server.log_text()
    finally:
        blocker.close()
        server.close()


# --- MariaDB -----------------------------------------------------------------------------


def test_mariadb_keeps_a_committed_row_through_kill_9(own_mariadb: OwnMariaDB) -> None:
    port, first = own_mariadb.port, own_mariadb.pid
    assert port != 3306 and "init" in own_mariadb.timings
    url = own_mariadb.create_database("faults")
    assert url == f"mysql+aiomysql://root@127.0.0.1:{port}/faults"
    with contextlib.closing(own_mariadb.connect("faults")) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (id INT PRIMARY KEY, name VARCHAR(20)) ENGINE=InnoDB")
        cur.execute("INSERT INTO t VALUES (1, 'kept')")  # autocommit: committed when it returns
        cur.execute("SELECT @@character_set_database")
        assert cur.fetchone() == ("utf8mb4",)

    own_mariadb.stop()  # kill -9 by default
    assert first is not None and not pid_alive(first)
    with pytest.raises(pymysql.err.OperationalError) as refusal:
        own_mariadb.connect()
    assert refusal.value.args[0] == 2003  # can't connect: nothing listens

    own_mariadb.restart()
    assert own_mariadb.port == port and own_mariadb.pid not in (None, first)
    assert "crash recovery" in own_mariadb.log_text().split("--- faults: start #2")[1]
    with contextlib.closing(own_mariadb.connect("faults")) as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM t WHERE id = 1")
        assert cur.fetchone() == ("kept",)

    own_mariadb.restart(kill=False)  # a clean shutdown and start work too
    with contextlib.closing(own_mariadb.connect("faults")) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM t")
        assert cur.fetchone() == (1,)


def test_mariadb_start_failure_raises_with_its_log(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))  # bound, not listening: the server's bind fails, connects are refused
    try:
        server = OwnMariaDB(tmp_path, port=blocker.getsockname()[1])  # a fixed port is never moved
        with pytest.raises(ServerFailed, match="(?s)exited.*already in use"):
            server.start()
        assert not server.running
    finally:
        blocker.close()
        server.close()
    assert not server.rundir.exists() and not server.datadir.exists()


# --- SMTP --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_smtp_refuses_while_stopped_and_receives_after_restart(own_smtp: OwnSmtp) -> None:
    port = own_smtp.port
    # An async sender on the test's own event loop: the capture runs in its own thread.
    await aiosmtplib.send(message(subject="one"), hostname="127.0.0.1", port=port, timeout=5)
    assert [m["Subject"] for m in own_smtp.to("jane@example.com")] == ["one"]

    own_smtp.stop()
    assert refused(port)
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await aiosmtplib.send(message(subject="lost"), hostname="127.0.0.1", port=port, timeout=5)

    own_smtp.restart()
    assert own_smtp.port == port
    await aiosmtplib.send(message(subject="two"), hostname="127.0.0.1", port=port, timeout=5)
    assert [m["Subject"] for m in own_smtp.messages] == ["one", "two"]


def test_smtp_can_be_slow_or_answer_4xx(own_smtp: OwnSmtp) -> None:
    own_smtp.fail("451 4.3.0 Try again later")
    with smtplib.SMTP("127.0.0.1", own_smtp.port, timeout=5) as smtp, pytest.raises(smtplib.SMTPDataError) as err:
        smtp.send_message(message())
    assert err.value.smtp_code == 451 and own_smtp.messages == []

    own_smtp.heal()
    own_smtp.slow(0.5)
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", own_smtp.port, timeout=5) as smtp:
        smtp.send_message(message())
    assert time.monotonic() - started >= 0.5 and len(own_smtp.messages) == 1


# --- the app in uvicorn ------------------------------------------------------------------


def healthz(url: str) -> int:
    # A new connection each time: a kept-alive one could lead to the worker just killed.
    return httpx.get(f"{url}/healthz", timeout=5).status_code


def test_app_survives_a_worker_kill_and_leaves_nothing_behind(tmp_path: Path, own_smtp: OwnSmtp) -> None:
    env = {
        "APP_ENV": "test",
        "SECRET_KEY": secrets.token_urlsafe(36),  # 48 characters
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(own_smtp.port),
        "SMTP_SECURITY": "none",
        "RATE_LIMIT_STORAGE": "memory://",
    }
    app = AppProcess(tmp_path, env, workers=2)
    try:
        app.start()
        master = app.pid
        assert master is not None and healthz(app.url) == 200
        before = app.worker_pids()
        assert len(before) == 2 and master not in before

        after = app.kill_worker(before[0])
        assert not pid_alive(before[0])
        assert before[0] not in after and before[1] in after and len(after) == 2
        assert app.pid == master  # the supervisor lived on and replaced the worker
        assert all(healthz(app.url) == 200 for _ in range(10))
        assert f"Child process [{before[0]}] died" in app.log_text()

        everything = {master, *before, *after, *app.pids()}
    finally:
        app.stop()
    assert not app.running and refused(app.port)
    # Gone, or a zombie waiting for PID 1: multiprocessing's resource tracker outlives the master
    # by a moment and is reparented; nothing is left running.
    assert [pid for pid in everything if pid_alive(pid)] == []
    assert group_members(master) == []


def test_app_start_failure_raises_with_the_log(tmp_path: Path, start_app: Callable[..., AppProcess]) -> None:
    env = {"APP_ENV": "test", "SECRET_KEY": "short", "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"}
    with pytest.raises(ServerFailed, match="(?s)migrate exited 2.*SECRET_KEY must be at least 32 bytes"):
        start_app(env)

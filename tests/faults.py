"""Real fault injection: servers a test starts for itself, on its own loopback port, in its own
tmp dir, so it can stop them hard (kill -9) or gracefully and bring them back on the same port
with the same data. The shared MariaDB (127.0.0.1:3306) and Redis (127.0.0.1:6379) are never
touched.

Every piece is a plain synchronous class and a context manager; call it from sync tests, or
directly from async ones (a call blocks the test's loop while it waits: about 0.1 s for a server,
1 s for the app; the servers and the app run elsewhere, so nothing they do needs that loop). The
fixtures below close them whatever the test did. Child processes run in their own process group
(start_new_session) and are stopped by group; an atexit hook kills any group still running when
the interpreter exits. Only a SIGKILL (or an unhandled SIGTERM) of pytest itself leaves them
running.

Ports are picked at random *below* the kernel's ephemeral range (ip_local_port_range), so that a
client connecting to a stopped server cannot be handed the server's port as its own source port
(a TCP self-connect, or a stray outgoing socket, would then block the restart on that port).

OwnRedis(tmp_path)
    `redis-server --port P --bind 127.0.0.1 --save "" --appendonly no`, output in
    tmp_path/redis/redis.log. `.url` is "redis://127.0.0.1:P"; `.start()` waits until it answers
    PING (and INFO's process_id is its own pid, so it is not someone else's server on the port);
    `.stop(kill=True)` (SIGKILL to its group; kill=False: SIGTERM, then SIGKILL after a timeout);
    `.restart(kill=True)`: same port. There is no persistence: a restarted Redis is empty, as a
    production Redis without persistence would be after a crash. Fixture: `own_redis`.

OwnMariaDB(tmp_path)
    A private mariadbd. The first `.start()` initialises tmp_path/mariadb/data with
    `mariadb-install-db --no-defaults --auth-root-authentication-method=normal --skip-test-db`
    (root@127.0.0.1 with an empty password; `--user=root` when running as root), then runs
    `mariadbd --no-defaults --datadir --port P --bind-address=127.0.0.1` with a small buffer pool
    and redo log, utf8mb4 like the shared server, innodb_flush_log_at_trx_commit=1 (the default:
    a committed row survives kill -9). Its socket lives in a short dir under /tmp (the 108-byte
    limit on socket paths), removed on close. `.start()` waits until root can connect over TCP and
    @@datadir is its own, or raises with the tail of its log (tmp_path/mariadb/mariadb.log).
    `.stop(kill=True)` is the hard fault (SIGKILL), `.stop(kill=False)` a clean shutdown;
    `.restart(kill=True)` comes back on the same port and datadir (InnoDB crash recovery).
    `.url_for(db)` -> "mysql+aiomysql://root@127.0.0.1:P/db", `.create_database(name)` (utf8mb4,
    returns url_for(name)), `.connect(database=None)` -> a pymysql connection. `.timings` holds
    the seconds "init" and the last "start" took (here: init 0.5-0.6 s, start 0.1 s, also after a
    kill -9 with crash recovery), so no template datadir is needed. `close()` deletes the datadir
    (~40 MB) unless keep_datadir=True. Fixture: `own_mariadb`.

OwnSmtp()
    The SMTP capture of tests/conftest.py (its `Capture` handler, aiosmtpd's threaded
    Controller, so it works while the test's own event loop runs). `.messages`, `.to(address)`,
    `.port`; `.stop()` closes the port (connection refused), `.restart()` listens on the same port
    again, keeping the messages received; `.slow(seconds)` holds each DATA that long,
    `.fail("451 4.3.0 try later")` answers DATA with that reply, `.heal()` undoes both.
    Fixture: `own_smtp`.

AppProcess(tmp_path, env, workers=2)
    `python -m uvicorn app.main:app --host 127.0.0.1 --port P --workers N` in tmp_path/app (its
    cwd, so no stray .env is read), with os.environ minus every setting the app reads, plus `env`
    (APP_ENV, DATABASE_URL, SECRET_KEY, SMTP_HOST/PORT, SMTP_SECURITY=none, RATE_LIMIT_STORAGE...).
    The first `.start()` runs `python -m app migrate` with that env (migrate=False to skip), then
    waits until GET /healthz answers 200 (healthy=False: any answer) and every worker has logged
    "Application startup complete", or raises with the log tail. `.url`, `.worker_pids()` (the
    master's children, from /proc; [] with workers=1, where uvicorn runs no supervisor),
    `.kill_worker(pid)` (SIGKILL one worker, then waits for uvicorn's supervisor to start its
    replacement; returns the new worker pids), `.stop()` (SIGTERM to the master, which stops its
    workers; SIGKILL to the group after the timeout; kill=True: SIGKILL at once), `.restart()`,
    `.log_text()`, `.log_tail()`, `.pids()` (every live process of its group). Fixture:
    `start_app(env, workers=2, **kw)`, a factory closing every app it started.

Missing binaries (redis-server, mariadbd, mariadb-install-db) skip the test with a reason, or
fail it when CI=true.

Use the fixtures from a test module with `from tests.faults import own_redis_fixture  # noqa: F401`
(the function is own_redis_fixture, the fixture own_redis: importing the fixture's own name would
make ruff report F811 at every test taking it), or `pytest_plugins = ["tests.faults"]`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pymysql
import pytest
from aiosmtpd.controller import Controller

from app.settings import Settings
from tests.conftest import Capture

__all__ = [
    "AppProcess", "OwnMariaDB", "OwnRedis", "OwnSmtp", "ServerFailed", "find_binary", "free_port", "group_members",
    "own_mariadb_fixture", "own_redis_fixture", "own_smtp_fixture", "pid_alive", "start_app_fixture",
]


class ServerFailed(RuntimeError):
    """A server did not come up (or go down) in time; the message carries the tail of its log."""


# --- processes and ports -----------------------------------------------------------------


def find_binary(name: str, *candidates: str) -> str:
    """The path of a server binary. Missing: the test is skipped, or fails when CI=true."""
    found = shutil.which(name)
    if found:
        return found
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    reason = f"{name} is not installed (looked in PATH and {', '.join(candidates) or 'nowhere else'})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: fault tests are never skipped in CI")
    pytest.skip(reason)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free 127.0.0.1 port below the ephemeral range (see the module docstring)."""
    low = _ephemeral_low()
    if low > 11000:
        for _ in range(200):
            port = random.randint(10000, low - 1)
            with socket.socket() as s:  # no SO_REUSEADDR: a port with TIME_WAIT leftovers is skipped too
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, ..."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _live_pids() -> Iterator[tuple[int, list[str]]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X"):
                yield int(entry.name), fields


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    return sorted(pid for pid, fields in _live_pids() if int(fields[2]) == pgid)


def children_of(pid: int) -> list[int]:
    """Live direct children of a process."""
    return sorted(child for child, fields in _live_pids() if int(fields[1]) == pid)


_LIVE: set[_Process] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        left = list(_LIVE)
    for proc in left:
        with contextlib.suppress(Exception):
            proc.stop(kill=True, timeout=5)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class _Process:
    """One server process in its own process group, its output appended to `log_path`."""

    name = "server"
    port_in_use = re.compile(r"already in use|another server running", re.IGNORECASE)
    default_kill = True

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.timings: dict[str, float] = {}  # seconds: "start" (the last start), "init" (MariaDB)

    # subclasses ------------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None

    def ready(self) -> bool:
        """True when the server answers (and is ours); exceptions mean "not yet"."""
        raise NotImplementedError

    def before_start(self) -> None:
        """Once-per-instance preparation (a datadir, migrations)."""

    # lifecycle -------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def pids(self) -> list[int]:
        """Every live process of the server's group (the server and anything it started)."""
        return group_members(self.proc.pid) if self.proc is not None else []

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        if self.starts == 0:
            self.before_start()
        for attempt in range(3):
            spawned = time.monotonic()
            self._spawn()
            try:
                self._wait_ready(timeout)
                self.timings["start"] = time.monotonic() - spawned
                return
            except ServerFailed:
                in_use = self.port_in_use.search(self._log_since_start())
                self.stop(kill=True)
                # Someone took a freshly picked port between the check and the bind: pick another,
                # but never move a server that was already running on its port (a restart).
                if in_use and not self._fixed_port and self.starts == 1 and attempt < 2:
                    self.port = free_port()
                    self.starts = 0
                    continue
                raise

    def _spawn(self) -> None:
        self.starts += 1
        with self.log_path.open("ab") as log:
            self._start_offset = log.tell()
            log.write(f"--- faults: start #{self.starts} of {self.name} on port {self.port} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), cwd=self.workdir, env=self.environment(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _log_since_start(self) -> str:
        with contextlib.suppress(OSError), self.log_path.open("rb") as f:
            f.seek(getattr(self, "_start_offset", 0))
            return f.read().decode(errors="replace")
        return ""

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.name} exited with {self.proc.returncode} on port {self.port}:\n"
                                   f"{self.log_tail()}")
            try:
                if self.ready():
                    return
            except ServerFailed:
                raise
            except Exception as exc:
                last = exc
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.name} not ready on port {self.port} within {timeout:.0f} s "
                                   f"(last check: {last!r}):\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, kill: bool | None = None, timeout: float = 30.0) -> None:
        """kill=True: SIGKILL to the whole group (the crash). kill=False: SIGTERM to the server,
        SIGKILL to the group after `timeout`. Returns when no process of the group is left."""
        if kill is None:
            kill = self.default_kill
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid
        if proc.poll() is not None and not group_members(pgid):
            self._forget()
            return
        if not kill and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)
            if proc.poll() is not None and not group_members(pgid):
                break
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.name}: processes {group_members(pgid)} survived SIGKILL")
        self._forget()

    def _forget(self) -> None:
        # Never signal this group again: its number may be reused once it is empty.
        self.proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def restart(self, kill: bool | None = None, timeout: float = 30.0) -> None:
        """Stop (if running) and start again on the same port, with the same data."""
        self.stop(kill=kill)
        self.start(timeout=timeout)

    def close(self) -> None:
        self.stop(kill=True)

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- Redis -------------------------------------------------------------------------------


class OwnRedis(_Process):
    name = "redis"

    def __init__(self, tmp_path: Path, port: int | None = None) -> None:
        self.binary = find_binary("redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")
        super().__init__(tmp_path / "redis", port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "yes"]

    def client(self, **kwargs: Any) -> Any:
        import redis

        kwargs.setdefault("socket_timeout", 2)
        kwargs.setdefault("socket_connect_timeout", 2)
        return redis.Redis.from_url(self.url, **kwargs)

    def ready(self) -> bool:
        with contextlib.closing(self.client(socket_timeout=1, socket_connect_timeout=1)) as r:
            if not r.ping():
                return False
            if int(r.info("server")["process_id"]) != self.pid:
                raise ServerFailed(f"another Redis answers on port {self.port}")
            return True


# --- MariaDB -----------------------------------------------------------------------------


class OwnMariaDB(_Process):
    name = "mariadb"

    def __init__(self, tmp_path: Path, port: int | None = None, *, keep_datadir: bool = False) -> None:
        self.mariadbd = find_binary("mariadbd", "/usr/sbin/mariadbd", "/usr/libexec/mariadbd", "/usr/local/bin/mariadbd")
        self.install_db = find_binary("mariadb-install-db", "/usr/bin/mariadb-install-db", "/usr/local/bin/mariadb-install-db")
        super().__init__(tmp_path / "mariadb", port)
        self.datadir = self.workdir / "data"
        self.keep_datadir = keep_datadir
        # Unix socket paths are limited to 108 bytes; pytest's tmp paths can be longer.
        self.rundir = Path(tempfile.mkdtemp(prefix="ownmdb-"))
        self._root_args = ["--user=root"] if os.geteuid() == 0 else []

    # Shared by the bootstrap and the server: the redo log size must match or it is rebuilt.
    SERVER_ARGS = ("--innodb-log-file-size=8M", "--innodb-buffer-pool-size=32M", "--innodb-use-native-aio=0",
                   "--skip-name-resolve")

    def before_start(self) -> None:
        if (self.datadir / "mysql").is_dir():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        out = subprocess.run(
            [self.install_db, "--no-defaults", f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
             "--skip-test-db", *self._root_args, *self.SERVER_ARGS],
            cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=120, start_new_session=True,
        )
        self.log_path.write_bytes(out.stdout)
        if out.returncode != 0:
            raise ServerFailed(f"mariadb-install-db exited {out.returncode}:\n{self.log_tail()}")
        self.timings["init"] = time.monotonic() - started

    def command(self) -> list[str]:
        return [
            self.mariadbd, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
            "--bind-address=127.0.0.1", f"--socket={self.rundir / 'sock'}", f"--pid-file={self.rundir / 'pid'}",
            f"--tmpdir={self.rundir}", "--skip-networking=0", *self._root_args, *self.SERVER_ARGS,
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
            "--innodb-buffer-pool-dump-at-shutdown=0", "--innodb-buffer-pool-load-at-startup=0",
        ]

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)

    def connect(self, database: str | None = None, **kwargs: Any) -> pymysql.Connection[Any]:
        kwargs.setdefault("connect_timeout", 2)
        # Without a read timeout a server that accepts but never greets (hung, or not MariaDB)
        # would block the test for ever.
        kwargs.setdefault("read_timeout", 30)
        kwargs.setdefault("write_timeout", 30)
        kwargs.setdefault("autocommit", True)
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", database=database,
                               charset="utf8mb4", **kwargs)

    def ready(self) -> bool:
        try:
            conn = self.connect(connect_timeout=1, read_timeout=2, write_timeout=2)
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] == 1045:  # access denied: waiting will not help
                raise ServerFailed(f"root cannot sign in over TCP: {exc}\n{self.log_tail()}") from exc
            raise
        with contextlib.closing(conn), conn.cursor() as cur:
            cur.execute("SELECT @@datadir")
            (datadir,) = cur.fetchone()  # type: ignore[misc]
        if Path(datadir).resolve() != self.datadir.resolve():
            raise ServerFailed(f"another MariaDB answers on port {self.port} (datadir {datadir})")
        return True

    def url_for(self, database: str) -> str:
        return f"mysql+aiomysql://root@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
        return self.url_for(name)

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self.rundir, ignore_errors=True)
            if not self.keep_datadir:
                shutil.rmtree(self.datadir, ignore_errors=True)


# --- SMTP --------------------------------------------------------------------------------


class OwnSmtp:
    """An aiosmtpd capture (tests.conftest.Capture) that can be stopped and restarted."""

    def __init__(self, port: int | None = None) -> None:
        self.capture = Capture(port=port or free_port())
        self.controller: Controller | None = None

    host = "127.0.0.1"

    @property
    def port(self) -> int:
        return self.capture.port

    @property
    def running(self) -> bool:
        return self.controller is not None

    @property
    def messages(self) -> list[EmailMessage]:
        with self.capture.lock:
            return list(self.capture.messages)

    def to(self, address: str) -> list[EmailMessage]:
        return self.capture.to(address)

    def start(self) -> None:
        if self.controller is not None:
            return
        controller = Controller(self.capture, hostname=self.host, port=self.port, ready_timeout=10)
        controller.start()
        self.controller = controller

    def stop(self) -> None:
        """Close the port (connections are refused) and drop every open session."""
        controller, self.controller = self.controller, None
        if controller is not None:
            controller.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def slow(self, seconds: float) -> None:
        """Hold every DATA this long before answering."""
        self.capture.delay = seconds

    def fail(self, reply: str = "451 4.3.0 Try again later") -> None:
        """Answer DATA with this (a 4xx: a temporary failure) instead of storing the message."""
        self.capture.reply = reply

    def heal(self) -> None:
        self.capture.delay, self.capture.reply = 0.0, "250 OK"

    def clear(self) -> None:
        self.capture.clear()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> OwnSmtp:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the app -----------------------------------------------------------------------------

# Every variable the app's settings read, dropped from the inherited environment.
APP_VARS = frozenset({f.name.upper() for f in dataclasses.fields(Settings)} | {"WEB_CONCURRENCY", "FORWARDED_ALLOW_IPS"})
STARTUP_LINE = "Application startup complete"


class AppProcess(_Process):
    name = "app"
    port_in_use = re.compile(r"address already in use", re.IGNORECASE)
    default_kill = False

    def __init__(self, tmp_path: Path, env: dict[str, str], workers: int = 2, port: int | None = None, *,
                 migrate: bool = True, healthy: bool = True) -> None:
        super().__init__(tmp_path / "app", port)
        self.env = dict(env)
        self.workers = workers
        self.needs_migration = migrate
        self.healthy = healthy

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in APP_VARS}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def command(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers)]

    def migrate(self) -> None:
        """`python -m app migrate` with the app's environment."""
        with self.log_path.open("ab") as log:
            log.write(b"--- faults: python -m app migrate ---\n")
            log.flush()
            done = subprocess.run([sys.executable, "-m", "app", "migrate"], cwd=self.workdir, env=self.environment(),
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=120)
        if done.returncode != 0:
            raise ServerFailed(f"python -m app migrate exited {done.returncode}:\n{self.log_tail()}")

    def before_start(self) -> None:
        if self.needs_migration:
            self.migrate()

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)

    def ready(self) -> bool:
        if self._log_since_start().count(STARTUP_LINE) < self.workers:
            return False
        r = httpx.get(f"{self.url}/healthz", timeout=2)
        return r.status_code == 200 or not self.healthy

    def worker_pids(self) -> list[int]:
        """The uvicorn master's live children (multiprocessing's resource tracker excluded)."""
        if self.proc is None or self.proc.poll() is not None or self.workers < 2:
            return []
        out = []
        for pid in children_of(self.proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" not in cmd:
                out.append(pid)
        return out

    def kill_worker(self, pid: int, timeout: float = 30.0) -> list[int]:
        """SIGKILL one worker; return the worker pids once the supervisor's replacement has started
        its app (one more "Application startup complete")."""
        return self.kill_workers([pid], timeout)

    def kill_workers(self, pids: list[int], timeout: float = 30.0) -> list[int]:
        """SIGKILL these workers at the same instant (none of them gets to finish what it was
        doing while another is replaced); return the worker pids once every replacement started."""
        live = self.worker_pids()
        for pid in pids:
            if pid not in live:
                raise ValueError(f"{pid} is not a worker of this app (workers: {live})")
        started = self._log_since_start().count(STARTUP_LINE)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ServerFailed(f"the uvicorn master exited after workers {pids} were killed:\n{self.log_tail()}")
            workers = self.worker_pids()
            if (not set(pids) & set(workers) and len(workers) >= self.workers
                    and self._log_since_start().count(STARTUP_LINE) >= started + len(pids)):
                return workers
            time.sleep(0.05)
        raise ServerFailed(f"no replacement for workers {pids} within {timeout:.0f} s:\n{self.log_tail()}")


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(name="own_redis")
def own_redis_fixture(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(name="own_mariadb")
def own_mariadb_fixture(tmp_path: Path) -> Iterator[OwnMariaDB]:
    server = OwnMariaDB(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(name="own_smtp")
def own_smtp_fixture() -> Iterator[OwnSmtp]:
    server = OwnSmtp()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(name="start_app")
def start_app_fixture(tmp_path: Path) -> Iterator[Callable[..., AppProcess]]:
    """A factory: start_app(env, workers=2, **kw) returns a started AppProcess; all are stopped
    at the end of the test (each in tmp_path/app-N)."""
    apps: list[AppProcess] = []

    def start(env: dict[str, str], workers: int = 2, **kwargs: Any) -> AppProcess:
        app = AppProcess(tmp_path / f"app-{len(apps)}", env, workers, **kwargs)
        apps.append(app)
        app.start()
        return app

    try:
        yield start
    finally:
        errors = []
        for app in apps:
            try:
                app.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

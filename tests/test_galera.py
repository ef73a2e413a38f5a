"""MariaDB Galera (deploy/galera, deploy/GALERA.md): the code's rules hold with two app instances
writing through different nodes of a 3-node cluster, Galera's conflicts are retried, and a node
killed mid-load costs no flow more than a retried request.

The cluster tests start their own cluster (about 20 s each) and run only with GALERA_TESTS=1:

    GALERA_TESTS=1 python -m pytest -q -p no:randomly tests/test_galera.py

Without it they are skipped; with it and CI=true, a machine without galera-4 fails them. The first
tests (error classification, DATABASE_FAILOVER, the connection handed back) run in the normal suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pymysql
import pytest
import sqlalchemy.exc

from app.database import FailoverDatabase, is_deadlock, is_unavailable, make_database, transact
from app.settings import Settings, SettingsError, load_settings, parse_nodes
from tests.conftest import PASSWORD, code_in, create_mysql_database, drop_mysql_database, mysql_url
from tests.faults import AppProcess, OwnMariaDB, OwnSmtp, free_port, own_mariadb_fixture  # noqa: F401  (fixture)
from tests.test_deploy import load_script

REPO = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI") == "true"
GALERA = os.environ.get("GALERA_TESTS") == "1"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
RETRIED = "database conflict 1213"  # app.database.retrying's log line


galera = load_script("galera")


# --- without a cluster (the normal suite) ------------------------------------------------------


def test_galera_conflicts_are_retried_and_a_node_out_of_the_cluster_is_unavailable() -> None:
    # What MariaDB 10.11 with galera-4 answers (seen in the cluster tests below): a certification
    # failure or a brute-force abort is 1213; a node that is not part of the Primary component 1047.
    conflict = pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock; try restarting transaction")
    not_primary = pymysql.err.OperationalError(1047, "WSREP has not yet prepared node for application use")
    assert is_deadlock(conflict) and not is_unavailable(conflict)
    assert is_deadlock(sqlalchemy.exc.OperationalError("COMMIT", {}, conflict))  # wrapped, as Alembic's are
    assert is_unavailable(not_primary) and not is_deadlock(not_primary)
    assert not is_deadlock(pymysql.err.OperationalError(1062, "Duplicate entry"))


def test_database_failover_is_a_list_of_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_nodes("") == ()
    assert parse_nodes(" db2:3307, db3 ,[fd00::3]:3308,") == (("db2", 3307), ("db3", 3306), ("fd00::3", 3308))
    for bad in ("db2:port", "db2:70000", "user@db2:3306", "db2/x:1", ":3306", "db2:1:2"):
        with pytest.raises(SettingsError, match="DATABASE_FAILOVER"):
            parse_nodes(bad)
    monkeypatch.setenv("SECRET_KEY", secrets.token_urlsafe(48))
    monkeypatch.setenv("DATABASE_URL", "mysql+aiomysql://shop:pw@db1:3306/shop")
    monkeypatch.setenv("DATABASE_FAILOVER", "db2:3306,db3:3306")
    assert load_settings(env_file=None, app_env="test").database_failover == (("db2", 3306), ("db3", 3306))
    monkeypatch.setenv("DATABASE_FAILOVER", "db2;db3")
    with pytest.raises(SettingsError, match="DATABASE_FAILOVER: 'db2;db3' is not host:port"):
        load_settings(env_file=None, app_env="test")
    with pytest.raises(SettingsError, match="must be mysql"):
        Settings(secret_key="k" * 32, database_failover=(("db2", 3306),))


@pytest.fixture(name="mysql_db")
def mysql_db_fixture() -> Iterator[str]:
    if not os.environ.get("TEST_MYSQL_URL"):
        pytest.skip("TEST_MYSQL_URL is not set")
    name = create_mysql_database("shop_galera")
    try:
        yield name
    finally:
        drop_mysql_database(name)


def test_a_refused_node_is_passed_over_for_the_next(mysql_db: str) -> None:
    """DATABASE_URL names a port nothing listens on; DATABASE_FAILOVER the real server."""
    real = mysql_url(mysql_db)
    host, port = real.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)
    dead = real.replace(f"@{host}:{port}/", f"@127.0.0.1:{free_port()}/")
    settings = Settings(app_env="test", secret_key="k" * 32, database_url=dead, database_failover=((host, int(port)),))

    async def run() -> None:
        db = make_database(settings)
        assert isinstance(db, FailoverDatabase)
        await db.connect()
        try:
            for _ in range(3):
                assert await db.fetch_val("SELECT 1") == 1
            pool = db._backend._pool
            assert pool.node == (host, int(port)) and pool.current == 1
        finally:
            await db.disconnect()

    asyncio.run(run())


def test_a_node_that_stops_answering_is_left_for_the_next(
    mysql_db: str, own_mariadb: OwnMariaDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that keeps its connections but answers nothing (here: the test's own MariaDB,
    stopped with SIGSTOP) fails its statement after QUERY_TIMEOUT and the pool moves on, instead
    of every request waiting until TCP gives up (security review of issue 19)."""
    import app.database

    monkeypatch.setattr(app.database, "QUERY_TIMEOUT", 2.0)
    server = _server()
    with contextlib.closing(own_mariadb.connect()) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{mysql_db}`")
        cur.execute("CREATE USER %s@'127.0.0.1' IDENTIFIED BY %s", (server["user"], server["password"]))
        cur.execute(f"GRANT ALL ON `{mysql_db}`.* TO %s@'127.0.0.1'", (server["user"],))
    frozen = mysql_url(mysql_db).replace(f"@{server['host']}:{server['port']}/", f"@127.0.0.1:{own_mariadb.port}/")
    settings = Settings(app_env="test", secret_key="k" * 32, database_url=frozen,
                        database_failover=((server["host"], int(server["port"])),))
    pid = own_mariadb.pid
    assert pid is not None

    async def run() -> None:
        db = make_database(settings)
        await db.connect()
        try:
            assert await db.fetch_val("SELECT @@port") == own_mariadb.port
            os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(Exception) as failed:
                await asyncio.wait_for(db.fetch_val("SELECT 1"), 10)  # without the timeout: TCP's minutes
            assert is_unavailable(failed.value) and time.monotonic() - started < 5
            assert await asyncio.wait_for(db.fetch_val("SELECT @@port"), 10) == int(server["port"])
            assert db._backend._pool.current == 1
        finally:
            os.kill(pid, signal.SIGCONT)
            await db.disconnect()

    asyncio.run(run())


def test_a_commit_that_fails_hands_its_connection_back(mysql_db: str) -> None:
    """`databases` keeps the connection when COMMIT fails (where Galera reports its conflicts):
    transact gives it back, so the pool never runs dry. Here the COMMIT fails for real because the
    connection is killed from another one just before it."""
    settings = Settings(app_env="test", secret_key="k" * 32, database_url=mysql_url(mysql_db), db_pool_size=2)

    async def run() -> None:
        db = make_database(settings)
        await db.connect()
        try:
            await db.execute("CREATE TABLE t (id INT PRIMARY KEY, v INT)")
            await db.execute("INSERT INTO t VALUES (1, 0)")
            for _ in range(4):  # twice the pool
                async def work() -> None:
                    await db.execute("UPDATE t SET v = v + 1 WHERE id = 1")
                    own = await db.fetch_val("SELECT CONNECTION_ID()")
                    killer = await asyncio.to_thread(pymysql.connect, **_server(), autocommit=True)
                    with contextlib.closing(killer), killer.cursor() as cur:
                        cur.execute(f"KILL CONNECTION {int(own)}")

                with pytest.raises(Exception) as failed:
                    await asyncio.wait_for(transact(db, work), 10)  # without the fix: the pool runs dry
                assert is_unavailable(failed.value)
            pool = db._backend._pool
            assert not pool._used, "every connection is back"
            assert await asyncio.wait_for(db.fetch_val("SELECT v FROM t"), 5) == 0
        finally:
            await db.disconnect()

    asyncio.run(run())


def _server() -> dict[str, Any]:
    from tests.conftest import mysql_server

    return mysql_server()


# --- the cluster ---------------------------------------------------------------------------------


def _need_galera() -> None:
    if not GALERA:
        pytest.skip("set GALERA_TESTS=1 to start a Galera cluster (deploy/GALERA.md)")
    missing = [p for p in ("/usr/sbin/mariadbd", str(galera.PROVIDER), "/usr/bin/rsync") if not os.path.exists(p)]
    if missing:
        reason = f"{', '.join(missing)} missing (Debian: apt-get install mariadb-server galera-4 rsync)"
        if CI:
            pytest.fail(f"CI: {reason}", pytrace=False)
        pytest.skip(reason)


class Shop:
    """A cluster, an SMTP capture and app instances on it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.run = base / "cluster"
        self.run.mkdir()
        self.state: dict[str, Any] = {}
        self.smtp = OwnSmtp()
        self.apps: list[AppProcess] = []
        self.secret = secrets.token_urlsafe(48)

    def start(self) -> None:
        started = time.monotonic()
        try:
            self.state = galera.Cluster(self.run).start(3)
        except BaseException:
            galera.stop(self.run)
            raise
        self.cluster_seconds = time.monotonic() - started
        self.smtp.start()

    def node_url(self, n: int) -> str:
        port = self.state["nodes"][0]["sql_port"]
        return str(self.state["database_url"]).replace(f":{port}/", f":{self.node(n)['sql_port']}/")

    def node(self, n: int) -> dict[str, Any]:
        return dict(self.state["nodes"][n - 1])

    def app(self, node: int, *, failover: bool = False, **extra: str) -> AppProcess:
        others = ",".join(f"127.0.0.1:{n['sql_port']}" for n in self.state["nodes"] if n["n"] != node)
        env = {
            "APP_ENV": "test", "DATABASE_URL": self.node_url(node), "SECRET_KEY": self.secret,
            "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.smtp.port), "SMTP_SECURITY": "none", "SMTP_TIMEOUT": "5",
            "RATE_LIMIT": "10000/minute", "LOGIN_ACCOUNT_RATE_LIMIT": "10000/minute", "DB_POOL_SIZE": "10",
            **({"DATABASE_FAILOVER": others} if failover else {}), **extra,
        }
        app = AppProcess(self.base / f"app-{len(self.apps)}", env, workers=2, migrate=not self.apps)
        self.apps.append(app)
        app.start(timeout=90)
        return app

    def conflicts(self) -> int:
        """Galera's conflicts so far, on the nodes that are up: certification failures and brute-force
        aborts (a local transaction aborted by a replicated one)."""
        total = 0
        for node in self.state["nodes"]:
            if galera.pid_alive(node["pid"]):
                s = galera.wsrep_status(node, self.state["admin"], "wsrep_local_cert_failures", "wsrep_local_bf_aborts")
                total += int(s["wsrep_local_cert_failures"]) + int(s["wsrep_local_bf_aborts"])
        return total

    def query(self, sql: str, *args: Any, node: int = 1) -> list[Any]:
        conn = galera.connect(self.node(node), password=self.state["admin"], database=galera.APP_DATABASE)
        with contextlib.closing(conn), conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def retried(self) -> int:
        return sum(app.log_text().count(RETRIED) for app in self.apps)

    def close(self) -> None:
        errors = []
        for app in self.apps:
            try:
                app.stop()
            except Exception as exc:
                errors.append(exc)
        self.smtp.close()
        galera.stop(self.run)
        if errors:
            raise errors[0]


@contextlib.contextmanager
def shop_cluster() -> Iterator[Shop]:
    _need_galera()
    # The nodes run as `mysql` when we are root: their directory must be reachable by it.
    base = Path(tempfile.mkdtemp(prefix="galera-test-"))
    base.chmod(0o755)
    shop = Shop(base)
    try:
        shop.start()
        yield shop
    finally:
        shop.close()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", name="shop")
def shop_fixture() -> Iterator[Shop]:
    """One cluster, instance A on node 1 and instance B on node 2, for the rules' tests."""
    with shop_cluster() as shop:
        shop.app(1, OTP_RESEND_COOLDOWN="3")
        shop.app(2, OTP_RESEND_COOLDOWN="3")
        yield shop


# --- HTTP ------------------------------------------------------------------------------------------


def _csrf(c: httpx.Client, path: str) -> str:
    r = c.get(path)
    assert r.status_code == 200, (path, r.status_code, r.text[:300])
    m = CSRF.search(r.text)
    assert m, path
    return m.group(1)


def _mail(shop: Shop, email: str, count: int = 1, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while len(shop.smtp.to(email)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} mail(s) to {email} expected, {len(shop.smtp.to(email))} came")
        time.sleep(0.05)
    return shop.smtp.to(email)


def _register(shop: Shop, c: httpx.Client, name: str) -> str:
    email = f"{name}@example.com"
    r = c.post("/register", data={"csrf_token": _csrf(c, "/register"), "full_name": "Jane Doe", "username": name,
                                  "email": email, "password": PASSWORD, "confirm_password": PASSWORD})
    assert r.status_code == 303, r.text[:300]
    code = code_in(_mail(shop, email)[-1])
    r = c.post("/verify", data={"csrf_token": _csrf(c, "/verify"), "code": code})
    assert r.headers.get("location") == "/dashboard", r.text[:300]
    return email


def _at_code_step(shop: Shop, app: AppProcess, name: str) -> tuple[httpx.Client, str]:
    """A registered customer, signed out, then past the password on `app`: (client, email)."""
    with httpx.Client(base_url=app.url, timeout=30) as c:
        email = _register(shop, c, name)
    c = httpx.Client(base_url=app.url, timeout=30)
    r = c.post("/login", data={"csrf_token": _csrf(c, "/login"), "login": name, "password": PASSWORD})
    assert r.headers.get("location") == "/verify", r.text[:300]
    _mail(shop, email, 2)
    return c, email


def _all_at_once(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Run every call on a thread of its own, released together."""
    gate = threading.Barrier(len(calls))

    def run(call: Callable[[], httpx.Response]) -> httpx.Response:
        gate.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _same_session(c: httpx.Client, app: AppProcess) -> httpx.Client:
    """Another client on `app` with `c`'s cookies: the same browser, through another instance."""
    return httpx.Client(base_url=app.url, cookies=dict(c.cookies), timeout=30)


def _post(app: AppProcess, c: httpx.Client, path: str, data: dict[str, str]) -> Callable[[], httpx.Response]:
    def call() -> httpx.Response:
        with _same_session(c, app) as other:
            return other.post(path, data=data)

    return call


# --- the rules, through two nodes ------------------------------------------------------------------


RESULTS: dict[str, Any] = {}


def test_one_code_signs_in_once_through_two_nodes(shop: Shop) -> None:
    a, b = shop.apps
    c, email = _at_code_step(shop, a, "single")
    code = code_in(shop.smtp.to(email)[-1])
    token = _csrf(c, "/verify")
    before = shop.conflicts()
    sessions = shop.query("SELECT COUNT(*) FROM auth_sessions")[0][0]
    answers = _all_at_once([_post(app, c, "/verify", {"csrf_token": token, "code": code}) for app in (a, b) * 4])
    signed_in = [r for r in answers if r.headers.get("location") == "/dashboard"]
    assert len(signed_in) == 1, [(r.status_code, r.headers.get("location")) for r in answers]
    assert not [r for r in answers if r.status_code >= 500]
    assert shop.query("SELECT COUNT(*) FROM auth_sessions", node=3)[0][0] == sessions + 1
    RESULTS["single use conflicts"] = shop.conflicts() - before


def test_wrong_codes_through_two_nodes_lock_at_exactly_the_cap(shop: Shop) -> None:
    a, b = shop.apps
    c, email = _at_code_step(shop, b, "capped")
    code = code_in(shop.smtp.to(email)[-1])
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    token = _csrf(c, "/verify")
    before, retried = shop.conflicts(), shop.retried()
    answers = _all_at_once([_post(app, c, "/verify", {"csrf_token": token, "code": wrong}) for app in (a, b) * 8])
    assert not [r for r in answers if r.status_code >= 500], [r.status_code for r in answers]
    (attempts,) = shop.query("SELECT v.attempts FROM customer_otp_verification v JOIN customers c "
                             "ON c.id = v.customer_id WHERE c.email = %s AND v.purpose = 'login'", email, node=3)
    assert attempts[0] == 5, attempts  # OTP_MAX_ATTEMPTS, not one more through the other node
    r = _post(a, c, "/verify", {"csrf_token": token, "code": code})()
    assert r.headers.get("location") != "/dashboard", "the right code after the cap must not sign in"
    RESULTS["attempt cap conflicts"] = shop.conflicts() - before
    RESULTS["attempt cap retries"] = shop.retried() - retried


def test_concurrent_resends_through_two_nodes_send_one_mail(shop: Shop) -> None:
    a, b = shop.apps
    c, email = _at_code_step(shop, a, "resender")
    time.sleep(3.2)  # OTP_RESEND_COOLDOWN=3
    token = _csrf(c, "/verify")
    before = shop.conflicts()
    answers = _all_at_once([_post(app, c, "/verify/resend", {"csrf_token": token}) for app in (a, b) * 4])
    assert not [r for r in answers if r.status_code >= 500], [r.status_code for r in answers]
    _mail(shop, email, 3)
    time.sleep(3)  # any second resend would have been sent by now
    assert len(shop.smtp.to(email)) == 3, "registration, sign-in, one resend"
    RESULTS["resend conflicts"] = shop.conflicts() - before


def test_conflicts_between_nodes_happened_and_were_retried(shop: Shop) -> None:
    """The rule tests only prove something if the two nodes do conflict: after them (or alone,
    in any order), rounds of 16 simultaneous wrong codes through both nodes, each round on a new
    step, until the nodes have counted a conflict (at most 6 rounds); every one was retried."""
    a, b = shop.apps
    for n in range(6):
        if shop.conflicts() > 0 and shop.retried() > 0:
            break
        c, email = _at_code_step(shop, (a, b)[n % 2], f"conflict{n}")
        code = code_in(shop.smtp.to(email)[-1])
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        token = _csrf(c, "/verify")
        answers = _all_at_once([_post(app, c, "/verify", {"csrf_token": token, "code": wrong}) for app in (a, b) * 8])
        assert not [r for r in answers if r.status_code >= 500], [r.status_code for r in answers]
        RESULTS[f"extra round {n + 1}"] = shop.conflicts()
    conflicts, retried = shop.conflicts(), shop.retried()
    print(f"\nGalera conflicts (cert failures + BF aborts) on the nodes: {conflicts}; retried by the app: "
          f"{retried}; per test: {RESULTS}")
    assert conflicts > 0 and retried > 0


# --- a node killed mid-load ------------------------------------------------------------------------


def test_a_node_killed_mid_load_costs_no_flow_beyond_a_retry() -> None:
    """Instance A on node 1, B on node 2, each with DATABASE_FAILOVER naming the other nodes. Node 1
    is killed (-9) while 24 customers register and sign in across both; each request may be
    retried once (what a browser's user does after an error page). Every flow ends signed in."""
    with shop_cluster() as shop:
        a = shop.app(1, failover=True)
        b = shop.app(2, failover=True)
        failed: list[str] = []
        done: list[str] = []
        lock = threading.Lock()
        killed = threading.Event()

        def step(c: httpx.Client, what: str, do: Callable[[], httpx.Response], ok: Callable[[httpx.Response], bool]
                 ) -> httpx.Response:
            for attempt in range(2):
                try:
                    r = do()
                    if ok(r):
                        return r
                    problem = f"{r.status_code} {r.headers.get('location')}"
                except httpx.HTTPError as exc:
                    problem = repr(exc)
                with lock:
                    failed.append(f"{what} (try {attempt + 1}): {problem}")
            raise AssertionError(f"{what} failed twice: {failed[-2:]}")

        def flow(i: int) -> None:
            app = (a, b)[i % 2]
            name, email = f"load{i}", f"load{i}@example.com"
            with httpx.Client(base_url=app.url, timeout=30) as c:
                def register() -> httpx.Response:
                    return c.post("/register", data={
                        "csrf_token": _csrf(c, "/register"), "full_name": "Load", "username": name, "email": email,
                        "password": PASSWORD, "confirm_password": PASSWORD})

                step(c, f"{name} register", register, lambda r: r.status_code == 303)
                code = code_in(_mail(shop, email, timeout=40)[-1])
                step(c, f"{name} code", lambda: c.post("/verify", data={"csrf_token": _csrf(c, "/verify"),
                                                                        "code": code}),
                     lambda r: r.headers.get("location") == "/dashboard")
            with lock:
                done.append(name)
                if len(done) == 8:
                    os.kill(shop.node(1)["pid"], signal.SIGKILL)
                    killed.set()

        started = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: _catch(flow, i), range(24)))
        seconds = time.monotonic() - started
        errors = [r for r in results if r]
        assert killed.is_set()
        assert not errors, (errors, failed)
        assert len(done) == 24
        (count,) = shop.query("SELECT COUNT(*) FROM customers WHERE username LIKE 'load%%'", node=2)[0:1]
        assert count[0] == 24
        assert "failed" in a.log_text() and "using 127.0.0.1:" in a.log_text(), "A moved off node 1"
        print(f"\nkill -9 of node 1 mid-load: 24 flows done in {seconds:.1f} s, failed requests (each retried "
              f"once, successfully): {len(failed)} {failed}")
        assert len(failed) <= 6, failed  # at most the requests in flight on node 1 (one per thread)


def _catch(flow: Callable[[int], None], i: int) -> str | None:
    try:
        flow(i)
    except Exception as exc:
        return f"flow {i}: {exc!r}"
    return None

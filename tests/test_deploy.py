"""The deployment in deploy/, run here: `deploy/stack start` (nginx with TLS and HTTP/2 in front of two
app instances of two workers each, APP_ENV=production, MariaDB, Redis, an SMTP capture), checked
from outside as a client sees it, then `deploy/stack stop`.

Needs nginx (Debian: apt-get install nginx), redis-server, openssl and the MariaDB of TEST_MYSQL_URL.
Missing ones skip these tests with the reason; with CI=true they fail. The tests share one stack
(about 10 s to start) and run in file order: the last one stops it and checks nothing is left.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import pymysql
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PASSWORD = "Blue-Harbor-Lamp-42"
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
CODE_LINE = re.compile(r"(?m)^\s*(\d{6})\s*$")
HTMX = "/static/vendor/htmx-2.0.11.min.js"
FLOW_LINE = re.compile(r'"(?:GET|POST) /(?:register|verify|login|dashboard|logout)\b')
CI = os.environ.get("CI") == "true"
pytestmark = pytest.mark.slow  # each module starts a whole stack (about 10 s)


def load_script(name: str) -> ModuleType:
    """deploy/stack and deploy/galera are scripts and modules: their helpers, without running them."""
    module_name = f"computer_shop_{name}"
    if module_name in sys.modules:  # e2e/test_through_nginx.py loads deploy/stack too
        return sys.modules[module_name]
    loader = SourceFileLoader(module_name, str(DEPLOY / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


def load_stack() -> ModuleType:
    return load_script("stack")


stack_tool = load_stack()


def missing(reason: str) -> None:
    if CI:
        pytest.fail(f"CI: {reason} (never skipped in CI)", pytrace=False)
    pytest.skip(reason)


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not found:
        missing("nginx is not installed (Debian: apt-get install nginx)")
    assert found is not None
    return found


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key, as deploy/stack makes them."""
    openssl = shutil.which("openssl")
    if not openssl:
        missing("openssl is not installed (Debian: apt-get install openssl)")
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run([str(openssl), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def stack() -> Iterator[Any]:
    nginx_binary()
    # Under /tmp itself rather than pytest's 0700 tmp_path: nginx's workers (nobody) go through it.
    run_dir = Path(tempfile.mkdtemp(prefix="computer-shop-stack-"))
    try:
        # A 1 s resend cooldown: the sign-in right after the sign-up mails its code at once.
        launched = stack_tool.Launched.start(run_dir, "--set", "OTP_RESEND_COOLDOWN=1")
    except stack_tool.Unavailable as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        missing(str(exc))
    yield launched
    launched.stop()  # again after test_stop_leaves_nothing_running: stop is idempotent
    shutil.rmtree(run_dir, ignore_errors=True)


class AppLogs:
    """What the app instances logged from now on (uvicorn's access log among it)."""

    names = ("app-1", "app-2")

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        self.mark = {name: len(stack.log(name)) for name in self.names}

    def new(self, name: str | None = None) -> str:
        return "".join(self.stack.log(n)[self.mark[n]:] for n in self.names if name in (None, n))

    def wait_for(self, text: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.new():
            assert time.monotonic() < deadline, f"{text!r} not in the app logs: {self.new()[-2000:]}"
            time.sleep(0.05)


def client(base_url: str, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=base_url, verify=False, timeout=15.0, follow_redirects=False, **kwargs)


def csrf(html: str) -> str:
    found = CSRF_FIELD.search(html)
    assert found, f"no CSRF token in:\n{html[:500]}"
    return found.group(1)


def wait_for_mail(stack: Any, address: str, after: int, timeout: float = 15.0) -> str:
    """The text part of the newest message to `address` beyond the first `after`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = stack.mail(address)
        if len(messages) > after:
            body = messages[-1].get_body(preferencelist=("plain",))
            return str(body.get_content())
        time.sleep(0.05)
    raise AssertionError(f"no mail to {address} in {stack.run_dir / 'mail'} within {timeout} s")


def code_in(text: str) -> str:
    found = CODE_LINE.findall(text)
    assert len(found) == 1, text
    return str(found[0])


def sign_up_and_in(stack: Any, http: httpx.Client, email: str, username: str) -> list[str]:
    """Register (code from the captured mail), sign out, sign in (code again), sign out: the texts
    of the two code mails."""
    mails = []
    token = csrf(http.get("/register").text)
    before = len(stack.mail(email))
    response = http.post("/register", data={"full_name": "Grace Deploy", "username": username, "email": email,
                                            "password": PASSWORD, "confirm_password": PASSWORD, "csrf_token": token})
    assert (response.status_code, response.headers.get("location")) == (303, "/verify"), response.text[:500]
    mails.append(wait_for_mail(stack, email, before))
    token = csrf(http.get("/verify").text)
    response = http.post("/verify", data={"code": code_in(mails[-1]), "csrf_token": token})
    assert (response.status_code, response.headers.get("location")) == (303, "/dashboard"), response.text[:500]
    dashboard = http.get("/dashboard")
    assert dashboard.status_code == 200 and "Hello, Grace Deploy" in dashboard.text
    assert http.post("/logout", data={"csrf_token": csrf(dashboard.text)}).status_code == 303

    time.sleep(1.2)  # past the stack's 1 s resend cooldown
    token = csrf(http.get("/login").text)
    before = len(stack.mail(email))
    response = http.post("/login", data={"login": username, "password": PASSWORD, "csrf_token": token})
    assert (response.status_code, response.headers.get("location")) == (303, "/verify"), response.text[:500]
    mails.append(wait_for_mail(stack, email, before))
    token = csrf(http.get("/verify").text)
    response = http.post("/verify", data={"code": code_in(mails[-1]), "csrf_token": token})
    assert (response.status_code, response.headers.get("location")) == (303, "/dashboard"), response.text[:500]
    dashboard = http.get("/dashboard")
    assert dashboard.status_code == 200
    assert http.post("/logout", data={"csrf_token": csrf(dashboard.text)}).status_code == 303
    return mails


# --- HTTP/2 without an HTTP/2 client library: the frames, by hand (RFC 9113, RFC 7541) ---------


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(index: int, value: str) -> bytes:
    """HPACK literal without indexing, name from the static table, short raw value."""
    data = value.encode()
    assert index < 15 and len(data) < 127
    return bytes([index, len(data)]) + data


def h2_get(port: int, path: str, host: str = "localhost") -> tuple[str, int]:
    """GET over TLS with ALPN h2: (the protocol negotiated, the response's :status)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        protocol = tls.selected_alpn_protocol() or ""
        if protocol != "h2":
            return protocol, 0
        block = (b"\x82\x87" + _literal(4, path) + _literal(1, f"{host}:{port}"))  # GET, https, :path, :authority
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0) + _frame(1, 0x5, 1, block))
        buffer = b""
        while True:
            while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                chunk = tls.recv(65536)
                assert chunk, "the server closed the HTTP/2 connection without an answer"
                buffer += chunk
            length, kind, stream = int.from_bytes(buffer[:3], "big"), buffer[3], int.from_bytes(buffer[5:9], "big")
            payload, buffer = buffer[9:9 + length], buffer[9 + length:]
            if kind == 1 and stream == 1:  # HEADERS: nginx sends :status first
                first = payload[0]
                indexed = {0x88: 200, 0x89: 204, 0x8A: 206, 0x8B: 304, 0x8C: 400, 0x8D: 404, 0x8E: 500}
                if first in indexed:
                    return protocol, indexed[first]
                assert first & 0x0F == 8, f"unexpected first header field {payload[:8]!r}"
                return protocol, int(payload[2:5])


# --- through the stack --------------------------------------------------------------------


def test_start_prints_the_address_and_where_mail_lands(stack: Any) -> None:
    assert stack.base_url.startswith("https://localhost:")
    assert stack.base_url in stack.output
    assert str(stack.run_dir / "mail") in stack.output
    assert "deploy/stack stop" in stack.output or "stack stop" in stack.output
    for name in ("nginx", "app-1", "app-2", "redis", "smtp"):
        pid = int((stack.run_dir / "pids" / f"{name}.pid").read_text())
        assert stack_tool.pid_alive(pid), f"{name} (pid {pid}) is not running"


def test_https_answers_with_http2(stack: Any) -> None:
    port = stack.state["https_port"]
    assert h2_get(port, "/healthz") == ("h2", 200)
    assert h2_get(port, HTMX) == ("h2", 200)
    if shutil.which("curl"):  # the same with a real client, where there is one
        done = subprocess.run(["curl", "-sk", "--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                               f"{stack.base_url}/healthz"], capture_output=True, text=True, timeout=30)
        assert done.stdout == "2 200", done
    with client(stack.base_url) as http:  # HTTP/1.1 still works (ALPN falls back)
        response = http.get("/healthz")
        assert (response.status_code, response.http_version) == (200, "HTTP/1.1")
        assert response.headers["server"] == "nginx", "server_tokens off: no version"


def test_plain_http_is_redirected_to_the_https_origin(stack: Any) -> None:
    logs = AppLogs(stack)
    # To the TLS port itself (nginx's 497) and to the plain HTTP port: 308 keeps the method.
    for url in (f"http://localhost:{stack.state['https_port']}", stack.state["http_url"]):
        with httpx.Client(timeout=10.0) as http:
            response = http.post(f"{url}/login?next=%2Fdashboard", data={"x": "1"})
        assert response.status_code == 308, (url, response.status_code, response.text[:200])
        assert response.headers["location"] == f"{stack.base_url}/login?next=%2Fdashboard"
    assert "/login" not in logs.new(), "nginx answered: the app saw nothing"


def test_vendored_static_file_comes_from_nginx_with_a_long_cache_life(stack: Any) -> None:
    logs = AppLogs(stack)
    with client(stack.base_url) as http:
        vendored = http.get(HTMX)
        own = http.get("/static/app.js")
        again = http.get("/static/app.js", headers={"If-None-Match": own.headers["etag"]})

    assert vendored.status_code == 200
    assert vendored.content == (ROOT / "static" / "vendor" / "htmx-2.0.11.min.js").read_bytes()
    assert vendored.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert vendored.headers["content-type"].startswith("application/javascript")
    assert vendored.headers["x-content-type-options"] == "nosniff"
    # Unversioned names: kept by the browser, but revalidated on each use (a 304 costs bytes, not a stale script).
    assert own.headers["cache-control"] == "no-cache"
    assert again.status_code == 304

    with client(stack.base_url) as http:  # the access log is on: a request that reaches an app shows
        assert http.get("/healthz").status_code == 200
    logs.wait_for("GET /healthz")
    assert "/static/" not in logs.new(), "a static file reached an app instance"
    served = [line for line in stack.log("nginx-access").splitlines() if f"GET {HTMX} " in line]
    assert served and all("upstream=- " in line for line in served), served


def test_a_large_body_is_refused_by_nginx_before_the_app(stack: Any) -> None:
    logs = AppLogs(stack)
    with client(stack.base_url) as http:
        response = http.post("/login", content=b"a=" + b"x" * 1_000_000,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413
    assert "content-security-policy" not in response.headers, "the app answered, not nginx"
    assert "/login" not in logs.new()
    assert "client intended to send too large body" in stack.log("nginx-error")


def test_nginx_access_log_keeps_no_link_token_and_no_query(stack: Any) -> None:
    with client(stack.base_url) as http:
        http.get("/verify/link/TokenFromAMail123")
        http.get("/not-you/AnotherToken456")
        http.get("/login?next=%2Fdashboard&secret=QueryValue789")
    log = stack.log("nginx-access")
    assert '"GET /verify/link/[redacted] HTTP/1.1"' in log and '"GET /not-you/[redacted] HTTP/1.1"' in log
    assert '"GET /login HTTP/1.1"' in log
    for secret in ("TokenFromAMail123", "AnotherToken456", "QueryValue789"):
        assert secret not in log


def test_one_sign_in_flow_is_served_by_both_instances_and_audited_with_the_real_address(stack: Any) -> None:
    tag = uuid.uuid4().hex[:10]
    email, username = f"deploy.{tag}@example.com", f"deploy_{tag}"
    logs = AppLogs(stack)
    spoofed = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "evil.example",
               "Forwarded": "for=198.51.100.1;proto=http"}
    with client(stack.base_url, headers=spoofed) as http:
        mails = sign_up_and_in(stack, http, email, username)

    # Round robin: each instance answered part of this one customer's sign-up and sign-in.
    served = {name: len(FLOW_LINE.findall(logs.new(name))) for name in AppLogs.names}
    assert all(n > 0 for n in served.values()), f"requests of the flow per instance: {served}"
    ports = {int(p) for p in re.findall(r"upstream=127\.0\.0\.1:(\d+) ", stack.log("nginx-access"))}
    assert ports == set(stack.state["app_ports"])

    # nginx replaced the client's X-Forwarded-For with the address it saw, and the app, trusting
    # 127.0.0.1 only, took that hop: the audit and the code mails name 127.0.0.1, never the spoof.
    url = urlsplit(stack.state["database_url"])
    with contextlib.closing(pymysql.connect(host=url.hostname, port=url.port or 3306, user=url.username,
                                            password=url.password or "", database=url.path.lstrip("/"))) as db, \
            db.cursor() as cur:
        cur.execute("SELECT e.event, e.ip FROM auth_events e JOIN customers c ON c.id = e.customer_id "
                    "WHERE c.email = %s ORDER BY e.id", (email,))
        events = cur.fetchall()
    assert {"registered", "signed_in", "signed_out"} <= {event for event, _ in events}, events
    assert {ip for _, ip in events} == {"127.0.0.1"}, events
    for text in mails:
        assert "from IP address 127.0.0.1." in text and "203.0.113.7" not in text, text
    # And the app believed nginx's X-Forwarded-Proto: https (else production would have answered 308).


def test_stop_leaves_nothing_running(stack: Any) -> None:
    processes = stack.state["processes"]
    assert {p["name"] for p in processes} == {"redis", "smtp", "app-1", "app-2", "nginx"}
    workers = {p["pid"]: stack_tool.group_members(p["pid"]) for p in processes}
    assert len(workers[next(p["pid"] for p in processes if p["name"] == "app-1")]) >= 3, "uvicorn and 2 workers"

    output = stack.stop()

    assert "stopped:" in output
    for pid, members in workers.items():
        assert not stack_tool.pid_alive(pid), f"pid {pid} is still running"
        assert not [m for m in members if stack_tool.pid_alive(m)], f"children of {pid} are still running"
        assert not stack_tool.group_members(pid)
    for port in (stack.state["https_port"], stack.state["http_port"], stack.state["redis_port"],
                 stack.state["smtp_port"], *stack.state["app_ports"]):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"
    assert not list((stack.run_dir / "pids").glob("*.pid"))
    url = urlsplit(stack.state["admin_url"])
    with contextlib.closing(pymysql.connect(host=url.hostname, port=url.port or 3306, user=url.username,
                                            password=url.password or "")) as db, db.cursor() as cur:
        cur.execute("SHOW DATABASES LIKE %s", (stack.state["database"],))
        assert cur.fetchall() == (), "the stack's database was not dropped"


# --- the nginx configuration alone ----------------------------------------------------------


class _Upstream(threading.Thread):
    """A fake app instance: `answer` ones reply 200, the others read the request whole and then
    drop the connection (an instance that died mid-request). Each counts what it received."""

    def __init__(self, *, answer: bool) -> None:
        super().__init__(daemon=True)
        self.answer, self.seen = answer, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) \
                    if re.search(rb"(?i)content-length", head) else 0
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                self.seen.append(head.split(b" ", 1)[0].decode())
                if not self.answer:
                    return  # drop the connection: no response
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


@pytest.fixture
def lone_nginx(tmp_path: Path) -> Iterator[Any]:
    """nginx with the site template in front of a dropping and an answering fake instance."""
    binary = nginx_binary()
    dropping, answering = _Upstream(answer=False), _Upstream(answer=True)
    dropping.start()
    answering.start()
    https, http = stack_tool.free_ports(2)
    cert, key = make_cert(tmp_path, "localhost")
    (tmp_path / "nginx" / "tmp").mkdir(parents=True)
    site = tmp_path / "nginx" / "site.conf"
    # max_fails=0: the dropping instance is never left out, so round robin keeps sending it requests.
    site.write_text(stack_tool.render_site(
        https_listen=f"127.0.0.1:{https}", http_listen=f"127.0.0.1:{http}", server_name="localhost",
        public_origin=f"https://localhost:{https}", upstreams=[f"127.0.0.1:{dropping.port}",
                                                               f"127.0.0.1:{answering.port}"],
        upstream_params="max_fails=0", cert=cert, key=key, app_root=ROOT, access_log=tmp_path / "access.log"))
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "nginx" / "nginx.conf"
    conf.write_text(stack_tool.render_main(run_dir=tmp_path, site=site, user=None if os.geteuid() else "root root"))
    argv = [binary, "-p", str(tmp_path / "nginx"), "-c", str(conf), "-e", str(tmp_path / "logs" / "nginx-error.log")]
    checked = subprocess.run([*argv, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", https)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        yield https, dropping, answering
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        dropping.sock.close()
        answering.sock.close()


def test_a_request_whose_instance_dropped_it_is_tried_on_the_other_posts_too(lone_nginx: Any) -> None:
    """An instance that dies (or restarts) under a kept-alive connection drops what nginx just
    wrote to it: the request goes to the other instance, a POST as well (`non_idempotent`; every
    form of the app is safe to receive twice), so the customer sees no 502."""
    port, dropping, answering = lone_nginx
    with client(f"https://localhost:{port}") as http:
        posts = [http.post("/login", data={"n": str(i)}).status_code for i in range(4)]
        post_seen = (list(dropping.seen), list(answering.seen))
        gets = [http.get(f"/dashboard?n={i}").status_code for i in range(4)]

    # Round robin gave the dropping instance half the POSTs: each went on to the other.
    assert posts == [200, 200, 200, 200], posts
    assert post_seen == (["POST", "POST"], ["POST"] * 4), post_seen
    assert gets == [200, 200, 200, 200]
    assert answering.seen.count("GET") == 4 and dropping.seen.count("GET") >= 1


def test_nginx_conf_for_a_server_passes_nginx_t(tmp_path: Path) -> None:
    binary = nginx_binary()
    cert, key = make_cert(tmp_path, "shop.example")
    done = subprocess.run([sys.executable, str(DEPLOY / "stack"), "nginx-conf", "--server-name", "shop.example",
                           "--upstream", "127.0.0.1:8000", "--upstream", "127.0.0.1:8001", "--cert", str(cert),
                           "--key", str(key), "--app-root", str(ROOT), "--access-log", str(tmp_path / "a.log")],
                          capture_output=True, text=True, check=True)
    site = done.stdout
    assert "return 308 https://shop.example$request_uri;" in site
    assert "server 127.0.0.1:8001 max_fails=1 fail_timeout=10s;" in site
    assert "listen 443 ssl http2;" in site and "listen 80;" in site
    assert "proxy_next_upstream error timeout non_idempotent;" in site
    # A POST that timed out is never sent to the other instance: the window for trying another
    # closes before the first could time out.
    seconds = {name: int(v) for name, v in re.findall(r"(proxy_next_upstream_timeout|proxy_read_timeout|"
                                                       r"proxy_send_timeout) (\d+)s;", site)}
    assert seconds["proxy_next_upstream_timeout"] < min(seconds["proxy_read_timeout"], seconds["proxy_send_timeout"])
    assert "error_page 502 504 =503 $computer_shop_unavailable;" in site
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx" / "tmp").mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(stack_tool.render_main(run_dir=tmp_path, site=tmp_path / "site.conf", user=None))
    checked = subprocess.run([binary, "-t", "-p", str(tmp_path), "-c", str(conf),
                              "-e", str(tmp_path / "logs" / "error.log")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_systemd_unit_runs_uvicorn_hardened_and_restarts_on_failure(tmp_path: Path) -> None:
    text = (DEPLOY / "computer-shop.service").read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    service = unit["Service"]
    assert "--workers ${WEB_CONCURRENCY}" in service["ExecStart"] and "app.main:app" in service["ExecStart"]
    assert service["EnvironmentFile"] == "/etc/computer-shop/env"
    assert service["Restart"] == "on-failure"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ReadWritePaths": "/var/lib/computer-shop"}.items():
        assert service[key] == value, key
    analyze = shutil.which("systemd-analyze")
    if analyze:  # systemd's own check, with an ExecStart that exists on this machine
        copy = tmp_path / "computer-shop.service"
        copy.write_text(text.replace("/srv/computer-shop/.venv/bin/uvicorn", "/bin/true"))
        done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr

"""SECURITY.md sections 'Sessions, CSRF, cookies', 'Transport and headers', 'Logging', 13-15."""

from __future__ import annotations

import base64
import json
import logging
import re

import httpx
import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.settings import Settings, SettingsError
from app.tables import auth_events, auth_sessions
from tests.conftest import (
    PASSWORD,
    Capture,
    Running,
    code_in,
    get_csrf,
    login,
    production,
    redis_url_or_skip,
    register,
    registered,
    running,
    submit_code,
    wait_mail,
    with_,
)

pytestmark = pytest.mark.anyio


def cookie_payload(client: httpx.AsyncClient, name: str = "session") -> dict[str, object]:
    raw = client.cookies[name]
    data = raw.split(".")[0]
    return dict(json.loads(base64.b64decode(data + "=" * (-len(data) % 4))))


# --- CSRF (22) ---------------------------------------------------------------------------


def post_routes(server: Running) -> list[str]:
    return sorted({r.path for r in server.app.routes if "POST" in getattr(r, "methods", set())})


async def test_every_post_route_is_csrf_protected(server: Running) -> None:
    paths = post_routes(server)
    assert {"/register", "/login", "/verify", "/verify/resend", "/logout", "/logout/everywhere"} <= set(paths)
    for route in server.app.routes:
        # /_test/clock exists only with APP_ENV=test (see test_test_clock_hook_exists_only_in_test_mode)
        if "POST" in getattr(route, "methods", set()) and not route.path.startswith("/_test/"):
            assert getattr(route.endpoint, "csrf_protected", False), route.path


@pytest.mark.parametrize("path", ["/register", "/login", "/verify", "/verify/resend", "/password/forgot",
                                  "/password/new", "/register/email"])
async def test_post_without_csrf_token_is_refused_with_403(client: httpx.AsyncClient, path: str) -> None:
    """From this site but without this session's token: most likely a tab left open past its
    session, and the page says so (from another site it says so too: see below)."""
    await client.get("/login")  # a session with a token exists, but the request omits it
    r = await client.post(path, data={"login": "x", "password": "y", "code": "123456"})
    assert r.status_code == 403 and "Your session has ended, please sign in again" in r.text
    r = await client.post(path, data={"csrf_token": "forged"}, headers={"HX-Request": "true"})
    assert r.status_code == 403 and "<html" not in r.text and "Your session has ended" in r.text


@pytest.mark.parametrize("path", ["/logout", "/logout/everywhere"])
async def test_signing_out_without_a_live_session_says_you_are_signed_out(
    server: Running, smtp: Capture, path: str
) -> None:
    """A tab whose session already ended (signed out in another tab): "you are signed out",
    not a refusal. A live session is still ended only with its token."""
    async with server.client() as c:
        await registered(c, smtp)
        stale = await get_csrf(c, "/dashboard")
        r = await c.post(path, data={"csrf_token": "not-this-sessions-token"})
        assert r.status_code == 403 and "Your session has ended" in r.text
        assert (await c.get("/dashboard")).status_code == 200, "a live session is not ended without its token"
        await c.post("/logout", data={"csrf_token": stale})  # signed out in "another tab"
        r = await c.post(path, data={"csrf_token": stale})
        assert r.status_code == 303 and r.headers["location"] == "/login?signed_out=1"
        r = await c.post(path, data={"csrf_token": stale}, headers={"HX-Request": "true"})
        assert r.status_code == 200 and "/login?signed_out=1" in r.headers["HX-Location"]


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}],
)
async def test_cross_site_post_is_refused_even_with_token(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    token = await get_csrf(client, "/login")
    r = await client.post("/login", data={"csrf_token": token, "login": "jane", "password": PASSWORD}, headers=headers)
    assert r.status_code == 403


async def test_same_origin_post_with_token_header_is_accepted(client: httpx.AsyncClient) -> None:
    token = await get_csrf(client, "/login")
    r = await client.post("/login", data={"login": "jane", "password": PASSWORD},
                          headers={"X-CSRF-Token": token, "Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 422  # got past CSRF to the password check


# --- cookies (16, 17, 19) ----------------------------------------------------------------


async def test_cookie_is_httponly_samesite_lax_without_domain(client: httpx.AsyncClient) -> None:
    r = await client.get("/login")
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "domain" not in cookie and "path=/" in cookie


async def test_production_cookie_is_secure_with_host_prefix(settings: Settings, clock: FixedClock) -> None:
    prod = production(settings)
    async with running(prod, clock) as server, server.client(base_url="https://shop.example") as c:
        r = await c.get("/login")
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("__Host-session=") and "secure" in cookie.lower() and "domain" not in cookie.lower()
        assert r.headers["strict-transport-security"].startswith("max-age=")
        assert int(r.headers["strict-transport-security"].split("=")[1].split(";")[0]) >= 31536000


async def test_cookie_holds_ids_only(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        await register(c)
        pending = cookie_payload(c)
        assert set(pending) == {"csrf", "pending"}
        assert set(pending["pending"]) == {"challenge", "nonce", "purpose"}  # type: ignore[arg-type]
        code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        await submit_code(c, code)
        signed = cookie_payload(c)
        assert set(signed) == {"csrf", "session", "customer", "auth_time"} and isinstance(signed["customer"], int)
        text = json.dumps(pending) + json.dumps(signed)
        assert "jane" not in text and "example.com" not in text and code not in text


async def test_new_session_on_every_privilege_change(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        await c.get("/register")
        anonymous = cookie_payload(c)
        await register(c)
        pending = cookie_payload(c)
        await submit_code(c, code_in((await wait_mail(smtp, "jane@example.com"))[0]))
        signed = cookie_payload(c)
    assert anonymous["csrf"] != pending["csrf"] != signed["csrf"]
    assert "pending" not in signed


# --- revocation and timeouts (18, 20, 21) ------------------------------------------------


async def test_replayed_cookie_after_sign_out_is_not_signed_in(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        old = dict(c.cookies)
        token = await get_csrf(c, "/dashboard")
        r = await c.post("/logout", data={"csrf_token": token})
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
    async with server.client(cookies=old) as replay:
        r = await replay.get("/dashboard")
        assert r.status_code == 303 and r.headers["location"] == "/login"


async def test_other_browser_stays_signed_in_until_sign_out_everywhere(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as a:
        await registered(a, smtp)
        clock.advance(61)
        async with server.client(headers={"user-agent": "Mozilla/5.0 (iPhone) Safari/604.1"}) as b:
            await login(b)
            await submit_code(b, code_in((await wait_mail(smtp, "jane@example.com", 2))[-1]))
            page = await a.get("/dashboard")
            assert "Mobile Safari on iOS" in page.text and "(this device)" in page.text  # the list of sessions
            token = await get_csrf(a, "/dashboard")
            await a.post("/logout", data={"csrf_token": token})
            assert (await b.get("/dashboard")).status_code == 200  # sign-out ends only its own session
            clock.advance(61)
            await login(a)
            await submit_code(a, code_in((await wait_mail(smtp, "jane@example.com", 3))[-1]))
            token = await get_csrf(a, "/dashboard")
            r = await a.post("/logout/everywhere", data={"csrf_token": token})
            assert r.status_code == 303
            assert (await b.get("/dashboard")).status_code == 303
    revoked = await server.services.db.fetch_all(sa.select(auth_sessions.c.revoked_at))
    assert all(r.revoked_at is not None for r in revoked)


async def test_idle_timeout_ends_session(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        clock.advance(29 * 60)
        assert (await c.get("/dashboard")).status_code == 200
        clock.advance(29 * 60)
        assert (await c.get("/dashboard")).status_code == 200  # activity keeps it alive
        clock.advance(30 * 60 + 1)
        assert (await c.get("/dashboard")).status_code == 303


async def test_absolute_timeout_is_checked_on_the_server(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        for _ in range(30):
            clock.advance(29 * 60)
            r = await c.get("/dashboard")
            if r.status_code != 200:
                break
        assert r.status_code == 303
        assert clock.now() - FixedClock().now() <= __import__("datetime").timedelta(hours=12, minutes=30)


# --- settings (23) -----------------------------------------------------------------------


def test_secret_key_under_32_bytes_is_refused() -> None:
    with pytest.raises(SettingsError, match="32 bytes"):
        Settings(secret_key="short", app_env="test")


def test_production_refuses_to_start_without_secret_key_or_smtp(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import load_settings

    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    with pytest.raises(SettingsError, match="32 bytes"):
        load_settings(env_file=None)
    monkeypatch.setenv("SECRET_KEY", "k" * 40)
    monkeypatch.delenv("SMTP_HOST", raising=False)
    with pytest.raises(SettingsError, match="SMTP_HOST"):
        load_settings(env_file=None)


def test_development_generates_a_key_once_and_keeps_it(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import load_settings

    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.setenv("APP_ENV", "development")
    first = load_settings(env_file=None).secret_key
    assert len(first) >= 32 and load_settings(env_file=None).secret_key == first


# --- headers (24-27) ---------------------------------------------------------------------


async def test_security_headers_on_pages_fragments_and_errors(client: httpx.AsyncClient) -> None:
    token = await get_csrf(client, "/login")
    responses = [
        await client.get("/login"),
        await client.get("/no-such-page"),
        await client.post("/login", data={"csrf_token": token, "login": ""}, headers={"HX-Request": "true"}),
        await client.post("/login", data={}),
    ]
    for r in responses:
        csp = r.headers["content-security-policy"]
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        for part in ("object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'", "script-src 'self'"):
            assert part in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"]
        assert "camera=()" in r.headers["permissions-policy"]
        assert r.headers["cache-control"] == "no-store"
        assert "hx-request" in r.headers["vary"].lower()
    assert responses[1].status_code == 404 and "Page not found" in responses[1].text


async def test_security_headers_keep_what_a_response_set_and_never_repeat_one() -> None:
    from starlette.types import Message, Receive, Scope, Send

    from app.security.headers import SecurityHeadersMiddleware

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"Cache-Control", b"max-age=60"), (b"vary", b"Accept-Encoding"), (b"Vary", b"hx-request, Cookie"),
            (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    app = SecurityHeadersMiddleware(inner, production=True)
    await app({"type": "http", "path": "/login", "method": "GET", "headers": []}, receive, send)
    headers = [(bytes(k).lower(), bytes(v)) for k, v in sent[0]["headers"]]
    names = [k for k, _ in headers]
    assert len(names) == len(set(names)), names  # every header once
    got = dict(headers)
    assert got[b"cache-control"] == b"max-age=60"  # the response's own value is kept
    assert got[b"vary"] == b"Accept-Encoding, hx-request, Cookie"  # merged, HX-Request not added twice
    assert got[b"strict-transport-security"].startswith(b"max-age=63072000")
    assert b"frame-ancestors 'none'" in got[b"content-security-policy"]


async def test_pages_have_no_inline_scripts_styles_or_handlers(client: httpx.AsyncClient) -> None:
    for path in ("/", "/login", "/register"):
        html = (await client.get(path)).text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html)
        assert "<style" not in html and " style=" not in html
        assert not re.search(r"\son[a-z]+=", html)
        assert '"allowEval":false' in html and '"selfRequestsOnly":true' in html
        assert '"includeIndicatorStyles":false' in html and '"historyCacheSize":0' in html
        assert 'hx-history="false"' in html


async def test_codes_and_emails_never_appear_in_urls(server: Running, smtp: Capture) -> None:
    seen: list[str] = []

    async def record(response: httpx.Response) -> None:
        seen.append(str(response.request.url))
        for h in ("location", "hx-location", "hx-push-url", "hx-redirect"):
            if h in response.headers:
                seen.append(response.headers[h])

    async with server.client(event_hooks={"response": [record]}) as c:
        await register(c, htmx=True)
        code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        await submit_code(c, code, htmx=True)
    assert not any(code in u or "jane" in u or "%40" in u for u in seen), seen


# --- rate limits (13) --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/register", "/login", "/verify", "/verify/resend"])
async def test_per_ip_limit_answers_429_with_retry_after(settings: Settings, clock: FixedClock, path: str) -> None:
    async with running(with_(settings, rate_limit="3/minute"), clock) as server, server.client() as c:
        await register(c)  # a pending code step, so /verify routes have something to act on
        token = await get_csrf(c, "/verify" if path.startswith("/verify") else path)
        statuses = [(await c.post(path, data={"csrf_token": token})).status_code for _ in range(5)]
        assert statuses[-1] == 429, statuses
        r = await c.post(path, data={"csrf_token": token}, headers={"HX-Request": "true"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0 and "Too many attempts" in r.text


async def test_sign_out_is_never_rate_limited(server: Running, smtp: Capture, clock: FixedClock) -> None:
    """Customers behind one address share its budget: sign-out must end the session whatever
    that budget holds, so it takes nothing from it (and a 429 can never keep a session open)."""
    limiter = server.services.limiter
    scopes: list[str] = []
    real_hit = limiter.hit

    async def hit(scope: str, key: str) -> int:
        scopes.append(scope)
        return await real_hit(scope, key)

    limiter.hit = hit
    async with server.client() as c:
        await registered(c, smtp)
        assert scopes == ["register", "verify"]
        token = await get_csrf(c, "/dashboard")
        r = await c.post("/logout", data={"csrf_token": token})
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert (await c.get("/dashboard")).status_code == 303  # signed out for real
        clock.advance(61)  # past the resend cooldown
        await login(c, "jane")
        assert (await submit_code(c, code_in((await wait_mail(smtp, "jane@example.com", count=2))[-1]))).status_code == 303
        token = await get_csrf(c, "/dashboard")
        r = await c.post("/logout/everywhere", data={"csrf_token": token})
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert (await c.get("/dashboard")).status_code == 303
    assert scopes == ["register", "verify", "login", "verify"]


async def test_forwarded_for_is_believed_only_from_trusted_proxies(settings: Settings, clock: FixedClock) -> None:
    import ipaddress

    trusted = with_(settings, rate_limit="2/minute", trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    async with running(trusted, clock) as server:
        async with server.client() as c:
            token = await get_csrf(c, "/login")
            for i in range(4):
                r = await c.post("/login", data={"csrf_token": token, "login": "x", "password": "y"},
                                 headers={"X-Forwarded-For": f"198.18.0.{i}"})
                assert r.status_code == 422  # behind a trusted proxy, each is its own client
    async with running(with_(settings, rate_limit="2/minute"), clock) as server, server.client() as c:
        token = await get_csrf(c, "/login")
        codes = []
        for i in range(4):
            r = await c.post("/login", data={"csrf_token": token, "login": "x", "password": "y"},
                             headers={"X-Forwarded-For": f"198.18.0.{i}"})
            codes.append(r.status_code)
        assert codes[-1] == 429  # not trusted: spoofed headers change nothing


async def test_rate_limits_in_redis_are_shared_between_workers(settings: Settings, clock: FixedClock) -> None:
    import uuid

    url = redis_url_or_skip()
    shared = with_(settings, rate_limit="3/minute", rate_limit_storage=url)
    import ipaddress

    shared = with_(shared, trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    ip = f"198.19.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"
    statuses = []
    async with running(shared, clock) as w1, running(shared, clock) as w2:
        async with w1.client() as a, w2.client() as b:
            ta, tb = await get_csrf(a, "/login"), await get_csrf(b, "/login")
            for i in range(6):
                c, t = (a, ta) if i % 2 else (b, tb)
                r = await c.post("/login", data={"csrf_token": t, "login": "x", "password": "y"},
                                 headers={"X-Forwarded-For": ip})
                statuses.append(r.status_code)
    assert statuses[:3] == [422, 422, 422] and statuses[3:] == [429, 429, 429]


# --- enumeration (14, 15): see test_auth_register/test_auth_login -------------------------

# --- audit and logs (28, 29) -------------------------------------------------------------


async def test_every_auth_event_is_stored_and_logged(server: Running, smtp: Capture, clock: FixedClock,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.audit")
    async with server.client() as c:
        await register(c)
        right = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        for _ in range(5):
            await submit_code(c, "000000" if right != "000000" else "111111")
        clock.advance(61)
        await c.post("/verify/resend", data={"csrf_token": await get_csrf(c, "/verify")})
        clock.advance(3600)
        await c.post("/verify/resend", data={"csrf_token": await get_csrf(c, "/verify")})
        code = code_in((await wait_mail(smtp, "jane@example.com", 3))[-1])
        await submit_code(c, code)
        await c.post("/logout", data={"csrf_token": await get_csrf(c, "/dashboard")})
    rows = await server.services.db.fetch_all(sa.select(auth_events))
    events = {r.event for r in rows}
    assert {"registered", "code_sent", "code_failed", "locked", "verified", "signed_in", "signed_out"} <= events
    assert all(r.ip == "127.0.0.1" and r.created_at.tzinfo is not None for r in rows)
    logged = [r.getMessage() for r in caplog.records if r.name == "app.audit"]
    customer_id = rows[0].customer_id
    assert any(f"event=locked customer={customer_id} ip=127.0.0.1 time=" in m for m in logged)


async def test_cr_lf_in_user_input_is_escaped_in_logs(server: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.audit")
    async with server.client(headers={"user-agent": "evil\r\nauth event=signed_in customer=1"}) as c:
        await login(c, "nobody", "whatever-123")
    (line,) = [r.getMessage() for r in caplog.records if "password_failed" in r.getMessage()]
    assert "\n" not in line and "\r" not in line and "\\x0d\\x0a" in line


async def test_production_logs_never_hold_code_password_or_cookie_even_at_debug(
    settings: Settings, clock: FixedClock, smtp: Capture, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        prod = production(settings)
        async with running(prod, clock) as server, server.client(base_url="https://shop.example") as c:
            await register(c)
            code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
            await submit_code(c, code)
            cookie = c.cookies["__Host-session"]
            await c.get("/dashboard")
    finally:
        root.setLevel(old_level)
    out = capsys.readouterr()
    text = out.out + out.err + caplog.text + "\n".join(str(r.args) for r in caplog.records)
    assert code not in text and PASSWORD not in text and cookie not in text
    assert "event=verified" in text  # the flow did log


async def test_stale_header_token_with_current_form_token_is_accepted(server: Running, smtp: Capture) -> None:
    """htmx sends the body's hx-headers token from the first page load; the swapped-in form
    carries the rotated one. The current one in either place is enough."""
    async with server.client() as c:
        stale = await get_csrf(c, "/register")
        await register(c, htmx=True)
        current = await get_csrf(c, "/verify")
        assert current != stale
        r = await c.post("/verify", data={"csrf_token": current, "code": "12"},
                         headers={"HX-Request": "true", "X-CSRF-Token": stale})
        assert r.status_code == 422 and "The code is 6 digits" in r.text
        r = await c.post("/verify", data={"csrf_token": stale, "code": "12"},
                         headers={"HX-Request": "true", "X-CSRF-Token": stale})
        assert r.status_code == 403


async def test_one_account_is_limited_across_many_addresses(settings: Settings, clock: FixedClock,
                                                            smtp: Capture) -> None:
    import ipaddress

    limited = with_(settings, login_account_rate_limit="3/minute",
                    trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    async with running(limited, clock) as server:
        async with server.client() as c:
            await registered(c, smtp)
        clock.advance(61)
        answers = []
        for i in range(4):
            async with server.client(headers={"X-Forwarded-For": f"198.18.1.{i}"}) as c:
                answers.append(await login(c, "JANE", "Wrong-Password-123" if i < 3 else PASSWORD))
        assert [r.status_code for r in answers] == [422, 422, 422, 422]  # even the right password waits
        assert "do not match an account" in answers[3].text


async def test_origin_behind_a_trusted_proxy_that_rewrites_host(settings: Settings, clock: FixedClock) -> None:
    import ipaddress

    behind = with_(settings, trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    async with running(behind, clock) as server, server.client(base_url="http://app:8000") as c:
        token = await get_csrf(c, "/login")
        ok = await c.post("/login", data={"csrf_token": token, "login": "x", "password": "y"},
                          headers={"Origin": "https://shop.example", "X-Forwarded-Host": "shop.example"})
        assert ok.status_code == 422
    async with running(settings, clock) as server, server.client(base_url="http://app:8000") as c:
        token = await get_csrf(c, "/login")
        refused = await c.post("/login", data={"csrf_token": token, "login": "x", "password": "y"},
                               headers={"Origin": "https://shop.example", "X-Forwarded-Host": "shop.example"})
        assert refused.status_code == 403  # an untrusted peer's X-Forwarded-Host changes nothing


async def test_dev_inbox_is_hidden_from_other_machines(settings: Settings, clock: FixedClock) -> None:
    dev = with_(settings, app_env="development", smtp_host=None)
    async with running(dev, clock) as server:
        transport = httpx.ASGITransport(app=server, client=("203.0.113.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as remote:
            assert (await remote.get("/dev/mail")).status_code == 404
        async with server.client() as local:
            assert (await local.get("/dev/mail")).status_code == 200


async def test_signed_in_pages_never_read_the_password_hash(server: Running, smtp: Capture) -> None:
    """Every signed-in request loads its session and customer: without the password hash."""
    from app.auth import queries

    assert "password_hash" not in str(queries._LOAD_SESSION.statement)
    async with server.client() as c:
        await registered(c, smtp)
        assert (await c.get("/dashboard")).status_code == 200
        sid = await server.services.db.fetch_val(sa.select(auth_sessions.c.id))
        now = server.state["clock"].now()
        loaded = await queries.load_session(server.services.db, session_hash=sid, now=now, idle=1800, absolute=43200)
        assert loaded is not None and loaded[1].email == "jane@example.com" and loaded[1].password_hash == ""


# --- review fixes (issue 14) -------------------------------------------------------------


async def test_session_cookie_ends_when_the_browser_closes(server: Running, smtp: Capture) -> None:
    """No Max-Age or Expires on any cookie of a sign-up: a shared computer forgets the session
    with the browser, while the server enforces the idle and absolute timeouts."""
    async with server.client() as c:
        headers = []
        r = await c.get("/register")
        headers += r.headers.get_list("set-cookie")
        r = await register(c)
        headers += r.headers.get_list("set-cookie")
        code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        r = await submit_code(c, code)
        headers += r.headers.get_list("set-cookie")
    assert len(headers) >= 3
    for header in headers:
        assert "max-age" not in header.lower() and "expires" not in header.lower(), header


async def test_per_address_limit_frees_up_as_the_app_clock_moves(settings: Settings, clock: FixedClock) -> None:
    async with running(with_(settings, rate_limit="3/minute"), clock) as server, server.client() as c:
        token = await get_csrf(c, "/login")
        statuses = [(await c.post("/login", data={"csrf_token": token, "login": "x", "password": "y"})).status_code
                    for _ in range(4)]
        assert statuses == [422, 422, 422, 429]
        clock.advance(61)  # no real waiting: the window is the app's time
        r = await c.post("/login", data={"csrf_token": token, "login": "x", "password": "y"})
        assert r.status_code == 422


async def test_secret_key_fallbacks_keep_sessions_and_nothing_else(settings: Settings, clock: FixedClock,
                                                                 smtp: Capture) -> None:
    """SECURITY.md 34: after a rotation the old key still opens sessions (and queued mail, see
    test_mail); a cookie signed with a key that is in neither place opens nothing."""
    import secrets

    old_key = settings.secret_key
    async with running(settings, clock) as server, server.client() as c:
        await registered(c, smtp)
        cookie = c.cookies["session"]
    rotated = with_(settings, secret_key=secrets.token_urlsafe(48), secret_key_fallbacks=(old_key,))
    async with running(rotated, clock) as server, server.client(cookies={"session": cookie}) as c:
        page = await c.get("/dashboard")
        assert page.status_code == 200 and "Hello, Jane Doe" in page.text
        assert c.cookies["session"] == cookie, "nothing changed: the cookie is not re-signed"
    forgotten = with_(settings, secret_key=secrets.token_urlsafe(48))
    async with running(forgotten, clock) as server, server.client(cookies={"session": cookie}) as c:
        assert (await c.get("/dashboard")).headers["location"] == "/login"


async def test_production_sends_plain_http_to_the_public_origin(settings: Settings, clock: FixedClock) -> None:
    """SECURITY.md 24: HTTPS only in production. A request that reached us as http (directly, or
    as a trusted proxy says with X-Forwarded-Proto) goes to the same path on PUBLIC_ORIGIN; an
    X-Forwarded-Proto from anyone else is not believed."""
    import ipaddress

    behind = production(settings, trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    async with running(behind, clock) as server:
        async with server.client(base_url="http://shop.example") as c:
            r = await c.get("/login?x=1")
            assert r.status_code == 308 and r.headers["location"] == "https://shop.example/login?x=1"
            r = await c.post("/login", data={"login": "x"})
            assert r.status_code == 308 and r.headers["location"] == "https://shop.example/login"
        proxied = httpx.ASGITransport(app=server, client=("10.1.2.3", 4000))
        async with httpx.AsyncClient(transport=proxied, base_url="http://shop.example") as c:
            r = await c.get("/login", headers={"X-Forwarded-Proto": "http", "X-Forwarded-For": "203.0.113.9"})
            assert r.status_code == 308 and r.headers["location"] == "https://shop.example/login"
            r = await c.get("/login", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"})
            assert r.status_code == 200
            hsts = r.headers["strict-transport-security"]
            assert int(hsts.split("=")[1].split(";")[0]) >= 31536000
        stranger = httpx.ASGITransport(app=server, client=("203.0.113.5", 4000))
        async with httpx.AsyncClient(transport=stranger, base_url="http://shop.example") as c:
            r = await c.get("/login", headers={"X-Forwarded-Proto": "https"})
            assert r.status_code == 308, "only a trusted proxy may say the request came over HTTPS"
        async with server.client(base_url="https://shop.example") as c:
            assert (await c.get("/login")).status_code == 200


def test_production_needs_an_https_public_origin() -> None:
    with pytest.raises(SettingsError, match="PUBLIC_ORIGIN"):
        Settings(app_env="production", secret_key="k" * 40, smtp_host="smtp.example")
    with pytest.raises(SettingsError, match="PUBLIC_ORIGIN"):
        Settings(app_env="production", secret_key="k" * 40, smtp_host="smtp.example",
                 public_origin="http://shop.example")
    with pytest.raises(SettingsError, match="scheme and host only"):
        Settings(app_env="test", secret_key="k" * 40, public_origin="https://shop.example/path")


@pytest.mark.parametrize("workers", [1, 2])
def test_uvicorn_started_directly_believes_no_forwarded_for(tmp_path: object, workers: int) -> None:
    """`uvicorn app.main:app` with uvicorn's defaults (proxy headers on, 127.0.0.1 trusted) and
    TRUSTED_PROXIES unset: a client behind a local proxy cannot pick its own address, neither
    to dodge the per-address limit nor to forge the audit log."""
    import os
    import sqlite3
    import subprocess
    import sys
    import time
    from pathlib import Path

    from app.database import migrate
    from tests.conftest import ROOT, free_port
    from tests.faults import OwnRedis

    path = Path(str(tmp_path)) / "uvicorn.db"
    migrate(f"sqlite+aiosqlite:///{path}")
    shared = OwnRedis(Path(str(tmp_path)))  # the workers' limits, in a Redis of this test's own
    shared.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRUSTED_PROXIES", "FORWARDED_ALLOW_IPS"))}
    env.update(APP_ENV="test", DATABASE_URL=f"sqlite+aiosqlite:///{path}", SECRET_KEY="k" * 40,
               RATE_LIMIT="3/minute", LOGIN_ACCOUNT_RATE_LIMIT="100/minute", RATE_LIMIT_STORAGE=shared.url,
               OTP_CLEANUP_INTERVAL="3600")
    log = (Path(str(tmp_path)) / "uvicorn.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port),
                             "--workers", str(workers)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with httpx.Client(base_url=base) as c:
            token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)  # type: ignore[union-attr]
            statuses = [c.post("/login", data={"csrf_token": token, "login": "x", "password": "y"},
                               headers={"X-Forwarded-For": f"198.18.0.{i}"}).status_code for i in range(5)]
        assert statuses == [422, 422, 422, 429, 429], statuses
        with sqlite3.connect(path) as conn:
            addresses = {row[0] for row in conn.execute("SELECT ip FROM auth_events")}
        assert addresses == {"127.0.0.1"}, addresses
    finally:
        proc.terminate()
        proc.wait(10)
        shared.close()

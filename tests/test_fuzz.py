"""Fuzzing every form field, header and body (issue 19): hypothesis draws requests for every
route (arbitrary unicode with control characters, huge values, empty and repeated fields, wrong
types, broken multipart and odd content types, forged HX-* and Origin headers, garbage path
parameters and query strings), half of them with the real CSRF token so they reach the handler,
from browsers in every state (signed out, a pending step of each kind, signed in, a staff member
signed in or half-way through the console's sign-in). Every answer is held to: never a 5xx; a
refusal (4xx) is a friendly HTML page or fragment with words in it, or JSON with "error" from
the passkey endpoints; a redirect stays on this site.

The tests are synchronous: each owns an event loop, starts the app with its lifespan in it
(conftest's `running`), and hypothesis drives one request (sometimes two) per example through
httpx's ASGI transport. Answers are checked as they come and every distinct problem (by its
traceback's last app frame, or its kind and route) is kept with the request that showed it; the
test fails at the end with all of them, and the summary names FUZZ_SEED, which replays the
same draws. Budgets: FUZZ_SCALE (default 1) multiplies them; on MariaDB a tenth runs. With
FUZZ_DEBUG=1 the summary also counts answers by browser and by how the request was made.
What the fuzzing found is pinned by the `test_found_*` tests at the end (# FOUND:)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pyotp
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from app.clock import FixedClock
from app.security.crypto import token
from app.security.passwords import hash_password
from app.settings import Settings
from app.staff import Role, accounts, sessions
from app.staff.web import AdminCookie, PendingSignIn, cookie_value, name_for
from app.tables import customers
from tests.conftest import (
    PASSWORD,
    Capture,
    Running,
    code_in,
    get_csrf,
    login,
    register,
    registered,
    running,
    submit_code,
    text_of,
    wait_mail,
    with_,
)
from tests.staff_support import make_staff
from tests.test_factor_policy_holds import add_passkey
from tests.test_factors import enrol_app, sign_out
from tests.webauthn_soft import SoftAuthenticator, b64url

ORIGIN = "http://testserver"
UA = b"Mozilla/5.0 (X11; Linux x86_64) Chrome/130.0 Safari/537.36"
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def budget(examples: int, backend: str) -> int:
    """The number of examples of one test: all on SQLite, a tenth on MariaDB."""
    n = max(1, int(examples * SCALE))
    return n if backend == "sqlite" else max(20, n // 10)


# --- what is sent ----------------------------------------------------------------------------

# Strings that have broken parsers before: numbers of every kind (superscript and other
# scripts' digits pass str.isdigit() but not int()), JSON-looking text, markup, escapes.
INTERESTING = [
    "", " ", "\t", "\x00", "\x00abc", "\r\n", "\n\n\n", "0", "00", "-1", "+1", "1.5", "1e3", "1e309", "NaN",
    "Infinity", "9" * 19, "9" * 40, "18446744073709551616", "2147483648", "²", "³", "¹²³", "١٢٣", "١٢٣٤٥٦",
    "१२३४५६", "１２３４５６", "𝟗𝟗", "Ⅻ", "½", "null", "true", "false", "[]", "{}", '{"a": 1}', "[1,2]", "on",
    "yes", "YES", "no", "1", "123456", "000000", "999999", " 123 456 ", "123-456", "12345", "1234567",
    "ABCDE-23456", "abcde23456", "ABCDE23456", "ABCDE-2345", PASSWORD, "jane", "Jane Doe", "jane@example.com",
    "JANE@EXAMPLE.COM", "admin@shop.example", "a@b", "@", "a@", "@b.c", "a@b.c", "a" * 300 + "@example.com",
    "ü@例え.jp", "x@xn--", "jane@example.com\x00evil.com", "jane@example.com\r\nBcc: x@evil.com",
    "<script>alert(1)</script>", "{{7*7}}", "{% raw %}", "' OR '1'='1", "%00", "%ff", "%", "\\", "../../etc/passwd",
    "\u202e", "\ufeff", "\u200b", "\U0001f600", "ǅ", "ﬃ", "İ", "ß", "\U0010ffff", "\ufffd",
    "/account/security", "//evil.example", "/\\evil.example", "https://evil.example/", "javascript:alert(1)",
]
HUGE_SIZES = [255, 256, 1024, 1025, 4097, 30_000, 65_535, 65_536, 70_000, 100_000]


@cache  # strategies are built once: building one costs more than drawing from it
def huge() -> st.SearchStrategy[str]:
    """Long strings made by repetition (hypothesis's own buffers stay small), up to 100 KB."""
    return st.builds(lambda seed, n: (seed * (n // len(seed) + 1))[:n], st.text(min_size=1, max_size=4),
                     st.sampled_from(HUGE_SIZES) | st.integers(100, 100_000))


@cache
def text() -> st.SearchStrategy[str]:
    """Any text: arbitrary unicode (control characters included, surrogates excluded), edge cases,
    numbers, now and then a huge one."""
    return st.one_of(
        st.sampled_from(INTERESTING), st.sampled_from(INTERESTING), st.text(max_size=24),
        st.text(st.characters(codec="ascii"), max_size=24), st.integers().map(str),
        st.floats(allow_nan=True).map(str), huge(),
    )


@cache
def digits(n: int = 6) -> st.SearchStrategy[str]:
    return st.text(st.sampled_from("0123456789"), min_size=n, max_size=n)


# Plausible values per field name, so that some entries pass validation and go deeper.
@cache
def field_values(name: str) -> st.SearchStrategy[str]:
    plausible: dict[str, st.SearchStrategy[str]] = {
        "email": st.emails() | st.sampled_from(["jane@example.com", "fz1@example.com", "admin@shop.example"]),
        "new_email": st.emails() | st.sampled_from(["jane@example.com", "fz1@example.com"]),
        "login": st.sampled_from(["jane", "fz1x", "jane@example.com"]) | st.emails(),
        "username": st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{2,29}\Z"),
        "full_name": st.text(max_size=40),
        "password": st.sampled_from([PASSWORD, "Another-Strong-Pass-77", "password"]),
        "confirm_password": st.sampled_from([PASSWORD, "Another-Strong-Pass-77"]),
        "current_password": st.sampled_from([PASSWORD, "Another-Strong-Pass-77"]),
        "new_password": st.sampled_from([PASSWORD, "Another-Strong-Pass-77", "Green-Valley-Door-13"]),
        "confirm_new_password": st.sampled_from(["Another-Strong-Pass-77", "Green-Valley-Door-13"]),
        "code": digits() | st.sampled_from(["123 456", "12-34-56", "١٢٣٤٥٦", "１２３４５６", "²²²²²²"]),
        "backup_code": st.from_regex(r"\A[A-Z2-9]{5}-?[A-Z2-9]{5}\Z"),
        "trust_device": st.sampled_from(["1", "on", "true", "True", "0", ""]),
        "confirm": st.sampled_from(["yes", "YES", "no", ""]),
        "hours": st.sampled_from(["1", "24", "72", "73", "0", "-5", "10000", "9" * 30, "²", "⑤", "1.5", "٣"]),
        "reason": st.text(max_size=40),
        "device": st.sampled_from(["1", "2", "0", "-1", "9" * 20, "²", "١"]),
    }
    return plausible.get(name, st.nothing()) | text()


@dataclass(frozen=True)
class Upload:
    """A form field sent as a file: the wrong type for every field here."""

    filename: str
    content: bytes
    content_type: str = "application/octet-stream"


Value = str | Upload
# The form's last csrf_token counts: "wrong-then-real" reaches the handler, "real-then-wrong" not.
CSRF_MODES = ["field"] * 9 + ["header"] * 3 + ["both", "none", "none", "wrong", "real-then-wrong", "wrong-then-real",
                                               "upload"]
FORM_CT = "application/x-www-form-urlencoded"
ODD_CONTENT_TYPES = [
    "text/plain", "application/octet-stream", "application/json", "application/xml", "", " ", "garbage",
    "application/x-www-form-urlencoded; charset=utf-16", "application/x-www-form-urlencoded; charset=latin-1",
    "APPLICATION/X-WWW-FORM-URLENCODED", "multipart/form-data", "multipart/form-data; boundary=",
    "multipart/form-data; boundary=\"", "multipart/mixed; boundary=x", "multipart/form-data; boundary=" + "b" * 300,
    "multipart/form-data; charset=utf-8; boundary=zz", "application/json; charset=utf-32", "text/html\x00",
]


def _multipart_part(boundary: bytes, key: str, value: Value, nl: bytes = b"\r\n") -> bytes:
    if isinstance(value, Upload):
        head = (f'Content-Disposition: form-data; name="{key}"; filename="{value.filename}"'.encode("utf-8", "replace")
                + nl + b"Content-Type: " + value.content_type.encode("latin-1", "replace"))
        body = value.content
    else:
        head = f'Content-Disposition: form-data; name="{key}"'.encode("utf-8", "replace")
        body = value.encode("utf-8", "surrogatepass")
    return b"--" + boundary + nl + head + nl + nl + body + nl


def multipart(pairs: list[tuple[str, Value]], boundary: bytes) -> bytes:
    return b"".join(_multipart_part(boundary, k, v) for k, v in pairs) + b"--" + boundary + b"--\r\n"


def broken_multipart(draw: Callable[..., Any], pairs: list[tuple[str, Value]]) -> tuple[str, bytes]:
    """A multipart body broken in one of the ways a client or a proxy breaks them."""
    boundary = draw(st.sampled_from([b"fuzzbound", b"----WebKitFormBoundaryA1b2C3", b"x" * 70, b"a b", b"\xff\xfe"]))
    good = multipart(pairs, boundary)
    how = draw(st.sampled_from([
        "truncated", "no-final", "no-boundary-param", "other-boundary", "lf-only", "no-disposition",
        "header-garbage", "many-parts", "huge-header", "empty", "preamble-only", "nameless", "quoted-names",
    ]))
    ct = "multipart/form-data; boundary=" + boundary.decode("latin-1")
    if how == "truncated":
        return ct, good[: draw(st.integers(0, max(0, len(good) - 1)))]
    if how == "no-final":
        return ct, good.rsplit(b"--" + boundary + b"--", 1)[0]
    if how == "no-boundary-param":
        return "multipart/form-data", good
    if how == "other-boundary":
        return "multipart/form-data; boundary=notthisone", good
    if how == "lf-only":
        return ct, b"".join(_multipart_part(boundary, k, v, b"\n") for k, v in pairs) + b"--" + boundary + b"--\n"
    if how == "no-disposition":
        return ct, b"--" + boundary + b"\r\nContent-Type: text/plain\r\n\r\nabc\r\n--" + boundary + b"--\r\n"
    if how == "header-garbage":
        junk = draw(st.binary(max_size=60))
        return ct, b"--" + boundary + b"\r\n" + junk + b"\r\n\r\nabc\r\n" + good
    if how == "many-parts":
        n = draw(st.sampled_from([999, 1001, 1500, 3000]))
        return ct, multipart([("f", "v")] * n, boundary)
    if how == "huge-header":
        return ct, (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + b"n" * 20_000 + b'"\r\n\r\nv\r\n'
                    + good)
    if how == "empty":
        return ct, b""
    if how == "preamble-only":
        return ct, b"just some text, no parts at all\r\n"
    if how == "nameless":
        return ct, b"--" + boundary + b"\r\nContent-Disposition: form-data\r\n\r\nabc\r\n" + good
    return ct, (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="a\\"b"; name=c; filename*=UTF-8\'\'%ff'
                b"\r\n\r\nv\r\n" + good)


def garbage_urlencoded(draw: Callable[..., Any], pairs: list[tuple[str, Value]]) -> bytes:
    """Hand-made query-string bodies: stray separators, bad percent escapes, invalid UTF-8."""
    pieces = [quote(k, safe="") + "=" + quote(v if isinstance(v, str) else "file", safe="") for k, v in pairs]
    junk = st.sampled_from(["&", "&&", "=", "==", "%", "%zz", "%ff%fe", "%c3", "%00", "+", ";", "a", "a=b=c",
                            "%E2%82", "csrf_token", "csrf_token=", "\xff", "é", "[]=1", "a[b]=c"])
    for _ in range(draw(st.integers(1, 4))):
        pieces.insert(draw(st.integers(0, len(pieces))), draw(junk))
    sep = draw(st.sampled_from(["&", "&", ";", "&&"]))
    return sep.join(pieces).encode("utf-8", "surrogatepass")


@cache
def json_values() -> st.SearchStrategy[Any]:
    leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
              | st.sampled_from(INTERESTING))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=4), max_leaves=12)


def b64(draw: Callable[..., Any]) -> str:
    return b64url(draw(st.binary(max_size=80)))


def client_data(draw: Callable[..., Any], challenge: str | None) -> str:
    data = {"type": draw(st.sampled_from(["webauthn.get", "webauthn.create", "", "other"]) | json_values()),
            "challenge": challenge if challenge and draw(st.booleans()) else draw(st.text(max_size=20) | json_values()),
            "origin": draw(st.sampled_from([ORIGIN, "https://evil.example", ""]) | json_values()),
            "crossOrigin": draw(json_values())}
    return b64url(json.dumps(data).encode())


def credential(draw: Callable[..., Any], challenge: str | None) -> Any:
    """A PublicKeyCredential-shaped answer whose every member may be garbage or the wrong type."""
    def member() -> str:
        return str(draw(st.sampled_from(["good", "good", "garbage", "missing"])))

    fields: dict[str, Any] = {}
    for name, make in (
        ("id", lambda: b64(draw)), ("rawId", lambda: b64(draw)), ("type", lambda: "public-key"),
        ("authenticatorAttachment", lambda: "platform"), ("clientExtensionResults", lambda: {}),
    ):
        how = member()
        if how == "good":
            fields[name] = make()
        elif how == "garbage":
            fields[name] = draw(json_values())
    inner: dict[str, Any] = {}
    for name, make in (
        ("clientDataJSON", lambda: client_data(draw, challenge)), ("authenticatorData", lambda: b64(draw)),
        ("signature", lambda: b64(draw)), ("userHandle", lambda: b64(draw)),
        ("attestationObject", lambda: b64(draw)), ("transports", lambda: ["internal"]),
        ("publicKey", lambda: b64(draw)), ("publicKeyAlgorithm", lambda: -7),
    ):
        how = member()
        if how == "good":
            inner[name] = make()
        elif how == "garbage":
            inner[name] = draw(json_values())
    fields["response"] = inner if draw(st.integers(0, 5)) else draw(json_values())
    return fields


# --- who sends it ----------------------------------------------------------------------------


@dataclass
class Ctx:
    """A browser in some state: its cookies, its CSRF token, the tokens its mail held."""

    kind: str
    cookies: dict[str, str]
    csrf: str
    born: datetime
    tokens: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    uses: int = 0
    stale: bool = False


MAX_USES = {"anon": 400, "registering": 60, "login_code": 60, "factor": 60, "reset": 60, "signed_in": 150,
            "signed_in_app": 80, "admin": 300, "viewer": 300, "staff_anon": 300, "staff_pending": 12, "setup": 25}
PENDING = ("registering", "login_code", "factor", "reset")
LINK = re.compile(r"/verify/link/([A-Za-z0-9_-]+)")
STOP = re.compile(r"/not-you/([A-Za-z0-9_-]+)")


@dataclass
class Spec:
    """One request, as sent."""

    route: str  # the route it aims at, e.g. "POST /verify/app"
    method: str
    path: str  # encoded, with its query
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    json_endpoint: bool = False
    ctx: Ctx | None = None
    how: str = ""  # how it was made: the CSRF token's way, the body's encoding

    def describe(self, limit: int = 1500) -> str:
        body = self.body if len(self.body) <= limit else self.body[:limit] + b"...(%d bytes in all)" % len(self.body)
        headers = [(k.decode("latin-1"), v if len(v) <= 200 else v[:200] + b"...") for k, v in self.headers]
        return (f"{self.method} {self.path[:600]}\n  as: {self.ctx.kind if self.ctx else '-'} ({self.how})\n"
                f"  headers: {headers}\n  body: {body!r}")


@dataclass
class Problem:
    kind: str
    status: int | None
    spec: Spec
    detail: str
    seen: int = 1


class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name} {record.levelname} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        self.records.append(text)


def _last_app_frame(tb: str) -> str:
    frames = re.findall(r'File "([^"]*/app/[^"]+)", line (\d+)', tb)
    last_line = tb.strip().splitlines()[-1] if tb.strip() else ""
    where = f"{frames[-1][0].split('/app/', 1)[1]}:{frames[-1][1]}" if frames else "?"
    return f"{where} {last_line.split(':', 1)[0]}"


class Fuzz:
    """The running app in an event loop of this test's own, the browsers, and what was found."""

    def __init__(self, server: Running, loop: asyncio.AbstractEventLoop, smtp: Capture, clock: FixedClock,
                 backend: str) -> None:
        self.server, self.loop, self.smtp, self.clock, self.backend = server, loop, smtp, clock, backend
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=server), base_url=ORIGIN,
                                        follow_redirects=False, timeout=60)
        self.contexts: dict[str, Ctx] = {}
        self.counter = itertools.count(1)
        self.sent = self.setup_requests = self.unsendable = 0
        self.unsendable_why = ""
        self.statuses: dict[int, int] = {}
        self.spent: dict[str, float] = {}
        self.debug: dict[Any, Counter[int]] = {}
        self.building = 0.0
        self.problems: dict[str, Problem] = {}
        self.other_errors: list[str] = []
        self.json_html_refusals: Counter[int] = Counter()
        self.errors = ErrorRecords()
        self.victims: list[int] = []
        self.built: dict[str, int] = {}
        self.password_hash = ""
        self.extra_admin_pages: list[str] = []
        self.started = time.monotonic()
        self.seed = int(os.environ.get("FUZZ_SEED") or secrets.randbits(32))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    # --- browsers ---------------------------------------------------------------------------

    def context(self, kind: str) -> Ctx:
        ctx = self.contexts.get(kind)
        too_old = ctx is not None and (self.clock.now() - ctx.born).total_seconds() > 240
        if ctx is None or ctx.stale or ctx.uses >= MAX_USES[kind] or too_old:
            began = time.perf_counter()
            ctx = self.contexts[kind] = self.run(self._make(kind))
            self.building += time.perf_counter() - began
        ctx.uses += 1
        return ctx

    def _client(self) -> httpx.AsyncClient:
        return self.server.client()

    @staticmethod
    def _cookies(c: httpx.AsyncClient) -> dict[str, str]:
        return {cookie.name: cookie.value for cookie in c.cookies.jar}

    async def _customer(self, *, n: int | None = None) -> tuple[int, str, str]:
        """A confirmed customer with codes on, put straight into the database (no mail yet, so
        the next one to their address goes at once): (id, username, email)."""
        n = next(self.counter) if n is None else n
        username, email = f"fz{n}x", f"fz{n}@example.com"
        if not self.password_hash:
            self.password_hash = await hash_password(PASSWORD)
        now = self.clock.now()
        new_id = await self.server.services.db.execute(customers.insert().values(
            email=email, username=username, full_name=f"Fuzz Tester {n}", password_hash=self.password_hash,
            created_at=now, email_verified_at=now, otp_enabled=True, source="signup"))
        return int(new_id), username, email

    async def _sign_in(self, c: httpx.AsyncClient) -> tuple[int, str, str]:
        """A new customer, signed in on `c` with the password and the emailed code (recently)."""
        found = await self._customer()
        r = await login(c, found[1])
        assert r.headers.get("location") == "/verify", (r.status_code, r.text)
        r = await submit_code(c, code_in((await wait_mail(self.smtp, found[2]))[-1]))
        assert r.headers.get("location") == "/dashboard", (r.status_code, r.text)
        return found

    async def _enrol_app(self, c: httpx.AsyncClient) -> None:
        """An authenticator app for the signed-in customer (the clock stays where it is)."""
        page = await c.get("/account/security/app")
        found = re.search(r'<code class="secret"[^>]*>([A-Z2-7 ]+)</code>', page.text)
        assert found, page.text
        csrf = await get_csrf(c, "/account/security/app")
        r = await c.post("/account/security/app", data={
            "csrf_token": csrf, "code": pyotp.TOTP(found.group(1).replace(" ", "")).at(self.clock.now())})
        assert r.status_code == 200, r.text

    async def _make(self, kind: str) -> Ctx:
        self.built[kind] = self.built.get(kind, 0) + 1
        now = self.clock.now()
        svc = self.server.services
        if kind in ("admin", "viewer", "staff_anon", "staff_pending", "setup"):
            csrf = token()
            n = next(self.counter)
            cookie = AdminCookie(csrf=csrf)
            tokens: list[str] = []
            if kind in ("admin", "viewer"):
                member, _ = await make_staff(self.server, role=Role.ADMIN if kind == "admin" else Role.VIEWER,
                                             email=f"staff{n}@shop.example")
                cookie.token = await sessions.create(svc.db, staff_id=member.id, ip="127.0.0.1", user_agent="fuzz",
                                                     now=now)
            elif kind == "staff_pending":
                member, _ = await make_staff(self.server, email=f"staff{n}@shop.example")
                cookie.pending = PendingSignIn(member.id, token(), int(now.timestamp()))
            elif kind == "setup":
                tokens.append(await accounts.create(svc.db, email=f"new{n}@shop.example", role=Role.VIEWER, now=now))
            value = cookie_value(svc.settings, cookie)
            return Ctx(kind, {name_for(svc.settings): value}, csrf, now, tokens)
        async with self._client() as c:
            self.setup_requests += 1
            tokens = []
            ids: list[int] = []
            if kind == "anon":
                csrf = await get_csrf(c, "/login")
            elif kind == "registering":
                n = next(self.counter)
                email = f"fz{n}@example.com"
                r = await register(c, username=f"fz{n}x", email=email, name=f"Fuzz Tester {n}")
                assert r.status_code == 303, r.text
                mail = text_of((await wait_mail(self.smtp, email))[-1])
                tokens = LINK.findall(mail) + STOP.findall(mail)
                csrf = await get_csrf(c, "/verify")
            elif kind == "login_code":
                _, username, email = await self._customer()
                r = await login(c, username)
                assert r.headers.get("location") == "/verify", (r.status_code, r.text)
                mail = text_of((await wait_mail(self.smtp, email))[-1])
                tokens = LINK.findall(mail) + STOP.findall(mail)
                csrf = await get_csrf(c, "/verify")
            elif kind == "factor":
                _, username, _ = await self._sign_in(c)
                await self._enrol_app(c)
                await add_passkey(c, SoftAuthenticator())
                await sign_out(c)
                r = await login(c, username)
                assert r.headers.get("location") == "/verify", (r.status_code, r.text)
                csrf = await get_csrf(c, "/verify")
            elif kind == "reset":
                _, _, email = await self._customer()
                csrf = await get_csrf(c, "/password/forgot")
                r = await c.post("/password/forgot", data={"csrf_token": csrf, "email": email})
                assert r.status_code == 303, r.text
                mail = (await wait_mail(self.smtp, email))[-1]
                tokens = LINK.findall(text_of(mail)) + STOP.findall(text_of(mail))
                r = await submit_code(c, code_in(mail))
                assert r.headers.get("location") == "/password/new", (r.status_code, r.text)
                csrf = await get_csrf(c, "/password/new")
            elif kind in ("signed_in", "signed_in_app"):
                customer_id, _, _ = await self._sign_in(c)
                if kind == "signed_in_app":
                    await self._enrol_app(c)
                ids = [customer_id]
                csrf = await get_csrf(c, "/dashboard")
            else:
                raise AssertionError(kind)
            return Ctx(kind, self._cookies(c), csrf, self.clock.now(), tokens, ids)

    async def _victims(self) -> list[int]:
        """Customers for the console's actions (never the ones the fuzzing browsers are): the
        first with an authenticator app (a bypass needs a factor)."""
        ids = [(await self._customer())[0] for _ in range(2)]
        async with self._client() as c:
            ids.append((await self._sign_in(c))[0])
            await self._enrol_app(c)
        return ids

    # --- sending and checking ---------------------------------------------------------------

    def send(self, spec: Spec) -> httpx.Response | None:
        self.errors.records.clear()
        try:
            url = httpx.URL(ORIGIN).copy_with(raw_path=spec.path.encode())  # "//x" stays a path
            request = self.client.build_request(spec.method, url, headers=spec.headers,
                                                content=spec.body if spec.body else None)
        except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeError) as exc:
            self.unsendable += 1  # httpx refuses to make it: no server would get it either
            self.unsendable_why = f"{type(exc).__name__}: {exc}"[:200]
            return None
        began = time.perf_counter()
        try:
            response = self.run(self._send(request))
        except Exception:
            self.sent += 1
            tb = traceback.format_exc()
            self.note("exception out of the app", None, spec, tb, key=f"{_last_app_frame(tb)} via {spec.route}")
            return None
        self.sent += 1
        self.spent[spec.route.split(" (")[0]] = self.spent.get(spec.route.split(" (")[0], 0.0) + time.perf_counter() - began
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        if os.environ.get("FUZZ_DEBUG"):
            self.debug.setdefault((spec.ctx.kind if spec.ctx else "-", spec.how), Counter())[response.status_code] += 1
        logged = "\n".join(self.errors.records)
        if response.status_code >= 500:
            self.note(f"answered {response.status_code}", response.status_code, spec, logged or response.text[:500],
                      key=f"{_last_app_frame(logged) if logged else '?'} via {spec.route}")
        elif logged:
            self.other_errors.append(f"{spec.route}: {logged[:2000]}")
        for kind, detail in check(spec, response):
            if kind == "json endpoint refused with HTML":
                self.json_html_refusals[response.status_code] += 1
                continue
            self.note(kind, response.status_code, spec, detail, key=spec.route)
        self._mark_stale(spec, response)
        return response

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self.client.send(request)
        finally:
            self.client.cookies.clear()  # every request carries its browser's cookies, as sent

    def note(self, kind: str, status: int | None, spec: Spec, detail: str, *, key: str) -> None:
        full = f"{kind} | {key}"
        found = self.problems.get(full)
        if found is None:
            self.problems[full] = Problem(kind, status, spec, detail)
        else:
            found.seen += 1
            if len(spec.body) + len(spec.path) < len(found.spec.body) + len(found.spec.path):
                found.spec, found.detail = spec, detail  # keep the smallest request that shows it

    def _mark_stale(self, spec: Spec, response: httpx.Response) -> None:
        ctx = spec.ctx
        if ctx is None or ctx.kind == "anon" or not getattr(spec.headers, "intact", True):
            return
        where = destination(response)
        if where is None:
            return
        if ctx.kind in PENDING:  # the step ended ("Start again"), or was used: signed in
            ctx.stale = where.startswith(("/login", "/password/forgot", "/dashboard")) and "signed_out" not in where
        elif ctx.kind.startswith("signed_in"):
            ctx.stale = where.startswith(("/login", "/account/confirm"))
        elif ctx.kind in ("admin", "viewer"):
            ctx.stale = where.startswith("/admin/login")
        elif ctx.kind == "staff_pending":  # the code step was used up (or passed)
            ctx.stale = spec.route.startswith("POST /admin/login/code")
        elif ctx.kind == "setup":  # the link was used
            ctx.stale = spec.route.startswith("POST /admin/setup/")

    # --- driving hypothesis ---------------------------------------------------------------

    def explore(self, examples: int, draw_request: Callable[[Any, Fuzz], Spec]) -> None:
        @seed(self.seed)
        @settings(max_examples=budget(examples, self.backend), deadline=None, database=None, derandomize=False,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(st.data())
        def one(data: Any) -> None:
            spec = draw_request(data.draw, self)
            self.send(spec)

        one()

    def report(self, name: str) -> str:
        took = time.monotonic() - self.started
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        lines = [f"{name} [{self.backend}, FUZZ_SEED={self.seed}]: {self.sent} requests fuzzed (+{self.setup_requests} browsers set up) "
                 f"in {took:.1f} s; answers {statuses}; JSON endpoints refusing with an HTML page: "
                 f"{dict(self.json_html_refusals)}; requests httpx would not build: {self.unsendable} {self.unsendable_why}"]
        slowest = sorted(self.spent.items(), key=lambda kv: -kv[1])[:6]
        lines.append(f"setting up browsers: {self.building:.1f} s ({self.built}); slowest routes: "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in slowest))
        for k, v in sorted(self.debug.items(), key=str):
            lines.append(f"  {k}: {dict(v)}")
        for key, p in self.problems.items():
            lines.append(f"\n=== {key} (seen {p.seen}x, status {p.status})\n{p.spec.describe()}\n--- detail:\n"
                         f"{p.detail[-4000:]}")
        if self.other_errors:
            lines.append(f"\n(ERROR log lines without a 5xx: {len(self.other_errors)}; first: "
                         f"{self.other_errors[0][:1500]})")
        return "\n".join(lines)


def destination(response: httpx.Response) -> str | None:
    """Where an answer sends the browser: Location, or htmx's HX-Location / HX-Redirect."""
    if "location" in response.headers and 300 <= response.status_code < 400:
        return response.headers["location"]
    if "hx-redirect" in response.headers:
        return response.headers["hx-redirect"]
    if "hx-location" in response.headers:
        try:
            return str(json.loads(response.headers["hx-location"]).get("path", ""))
        except (ValueError, AttributeError):
            return response.headers["hx-location"]
    return None


TAGS = re.compile(r"<(script|style|title)\b.*?</\1>|<[^>]+>", re.S)
WORDS = re.compile(r"[A-Za-z]{2,}")


def check(spec: Spec, r: httpx.Response) -> list[tuple[str, str]]:
    """What is wrong with this answer, if anything: (kind, detail) pairs."""
    found: list[tuple[str, str]] = []
    status, ctype = r.status_code, r.headers.get("content-type", "")
    where = destination(r)
    if where is not None and (not where.startswith("/") or where.startswith(("//", "/\\")) or "\n" in where
                              or "\r" in where):
        found.append(("redirect off the site", where))
    if 300 <= status < 400 and status != 304 and "location" not in r.headers:
        found.append(("redirect without Location", str(dict(r.headers))))
    if status == 405 and "allow" not in r.headers:
        found.append(("405 without Allow", ""))
    if status == 429 and "retry-after" not in r.headers:
        found.append(("429 without Retry-After", ""))
    if status < 400 or spec.method == "HEAD":
        if spec.json_endpoint and status == 200 and ctype.startswith("application/json"):
            body = r.json()
            if not isinstance(body, dict) or not ({"redirect", "post", "error", "challenge"} & set(body)):
                found.append(("JSON answer of an unknown shape", r.text[:300]))
        return found
    text = r.text
    if "Traceback" in text or "Internal Server Error" in text or "jinja2.exceptions" in text:
        found.append(("traceback in a refusal", text[:800]))
    if spec.json_endpoint and ctype.startswith("application/json"):
        body = r.json()
        if not (isinstance(body, dict) and isinstance(body.get("error"), str) and WORDS.search(body["error"])):
            found.append(("JSON refusal without an error message", text[:300]))
        return found
    if not ctype.startswith("text/html"):
        found.append((f"refusal {status} is not HTML ({ctype or 'no content type'})", text[:300]))
        return found
    words = WORDS.findall(TAGS.sub(" ", text))
    if len(words) < 4:
        found.append((f"refusal {status} without a message", text[:300]))
    if spec.json_endpoint:
        found.append(("json endpoint refused with HTML", ""))
    return found


# --- building requests -------------------------------------------------------------------------


def encode_path(draw: Callable[..., Any], raw: str) -> str:
    """A path parameter, percent-encoded (now and then already-encoded dots and slashes, raw)."""
    special = ["..", ".", "%2e%2e", "%2E", "%2F", "%00", "%ff", "a%2Fb", ";x", "1;jsessionid=2", "%E2%80%AE"]
    if draw(st.integers(0, 12)) == 0:
        return draw(st.sampled_from(special))
    return quote(raw[:2000], safe="")  # a request line of at most some KB, as servers take


# Characters str.isdigit() accepts: int() takes some (other scripts' digits) and not others.
NUMERALS = ["²", "³", "¹²³", "⑤", "١٢٣", "٣", "௫", "𝟗𝟗", "１２", "Ⅻ", "½", "ᛮ", "0²", "1⁰"]


def id_param(draw: Callable[..., Any], real: list[int]) -> str:
    choices = (st.sampled_from([str(i) for i in real] or ["1"]) | st.integers(-5, 10**30).map(str)
               | st.sampled_from(NUMERALS) | text())
    return encode_path(draw, draw(choices))


def token_param(draw: Callable[..., Any], real: list[str]) -> str:
    if real and draw(st.booleans()):
        t = draw(st.sampled_from(real))
        return encode_path(draw, draw(st.sampled_from([t, t + "x", t[:-1], t.upper(), t + "/", t + "%00"])))
    return encode_path(draw, draw(text()))


QUERY_KEYS = {
    "/admin/customers": ["q", "sort", "page"],
    "/admin/audit": ["customer", "staff", "event", "ip", "from", "to", "page"],
    "/admin/audit.csv": ["customer", "staff", "event", "ip", "from", "to"],
    "/admin/funnel": ["range", "purpose", "domain", "from", "to", "days"],
    "/admin/funnel.csv": ["range", "purpose", "domain", "chart", "name"],
    "/admin/abuse": ["range", "days"],
    "/account/confirm": ["next"],
    "/login": ["signed_out", "deleted", "next"],
    "/admin/login": ["signed_out", "expired", "set_up"],
    "/admin/staff": ["disabled"],
}
QUERY_VALUES = [
    "id", "email", "name", "created", "-id", "2026-11-28", "2026-02-30", "2026-11-28T10:00", "2026-11-28T10:00+05:00",
    "2026-11-28T25:99", "9999-12-31", "0001-01-01", "+002026-01-01", "2026-W48", "1e10", "-0", "signed_in",
    "code_sent", "password_failed", "staff_action", "127.0.0.1", "::1", "1" * 50, "/account/security/app",
    "/account/security//evil", "/account/security/../../x", "/account/security\\x", "https://evil.example",
]


def query(draw: Callable[..., Any], path: str) -> str:
    if draw(st.integers(0, 3)) == 0:
        return ""
    keys = QUERY_KEYS.get(path, []) + ["x"]
    pieces = []
    for _ in range(draw(st.integers(1, 6))):
        key = draw(st.sampled_from(keys) | st.text(max_size=6))
        value = draw(st.sampled_from(QUERY_VALUES) | st.sampled_from(NUMERALS) | text())[:2000]
        pieces.append(quote(key, safe="") + "=" + quote(value, safe=""))
    if draw(st.integers(0, 5)) == 0:
        pieces.append(draw(st.sampled_from(["%", "%zz", "%ff%fe", "&&", "=", "a=%c3", "==", "%00=%00", "+%2B+"])))
    return "?" + "&".join(pieces)


@cache
def header_bytes() -> st.SearchStrategy[bytes]:
    """What a real server lets through in a header value: visible Latin-1, spaces, tabs, UTF-8."""
    latin = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
                    | st.just("\t"), max_size=40).map(lambda s: s.encode("latin-1"))
    utf8 = st.text(max_size=20).map(lambda s: s.replace("\r", "").replace("\n", "").encode("utf-8", "surrogatepass"))
    long = st.sampled_from([b"A" * 4096, b"x" * 16_000, "é".encode() * 3000])
    return latin | utf8 | long | st.sampled_from([b"", b" ", b"true", b"false", b"null", b"\t"])


HX_VALUES = [b"true", b"true", b"false", b"TRUE", b"1", b"", b"#main", b"main", b"body", b"#does-not-exist",
             b"http://testserver/verify", b"https://evil.example/", b"javascript:alert(1)", b"/../../etc/passwd"]
HX_HEADERS = [b"hx-request", b"hx-target", b"hx-current-url", b"hx-boosted", b"hx-history-restore-request",
              b"hx-trigger", b"hx-trigger-name", b"hx-prompt"]


class HeaderList(list[tuple[bytes, bytes]]):
    """Request headers, and whether they carry the browser's cookies as they are (an answer to
    forged or missing cookies says nothing about the browser's own state)."""

    intact = True


def headers(draw: Callable[..., Any], ctx: Ctx | None, *,
            extra: list[tuple[bytes, bytes]] | None = None) -> HeaderList:
    """The browser's cookies, htmx's headers (real or forged), Origin and Sec-Fetch-Site, junk."""
    out = HeaderList()
    if draw(st.integers(0, 9)):
        out.append((b"user-agent", UA))
    else:
        out.append((b"user-agent", draw(header_bytes())))
    cookies = dict(ctx.cookies) if ctx else {}
    how = draw(st.sampled_from(["as is"] * 16 + ["forged", "dropped", "junk added"]))
    if how == "forged" and cookies:
        name = draw(st.sampled_from(sorted(cookies)))
        cookies[name] = draw(st.sampled_from(["", "null", "x", cookies[name][:-2], cookies[name] + "A",
                                              "eyJjc3JmIjoiYSJ9.Zz.zz"]) | st.text(st.characters(codec="ascii"),
                                                                                   max_size=20))
    elif how == "dropped":
        cookies = {}
    elif how == "junk added":
        cookies[draw(st.sampled_from(["device", "admin_session", "session", "x", "__Host-session"]))] = draw(
            st.sampled_from(["", "junk", "a" * 5000, "\"quoted\"", "x=y"]))
    out.intact = how == "as is"
    if cookies:
        out.append((b"cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode("latin-1", "replace")))
    if draw(st.booleans()):  # htmx: some of its headers, real or forged
        for name in draw(st.lists(st.sampled_from(HX_HEADERS), max_size=5)):
            out.append((name, draw(st.sampled_from(HX_VALUES) | header_bytes())))
    if draw(st.integers(0, 4)):  # what a browser on this site sends
        origin = draw(st.sampled_from([None, ORIGIN.encode()]))
        site = draw(st.sampled_from([None, b"same-origin", b"none"]))
    else:  # forged, another site's, or garbage
        origin = draw(st.sampled_from([None, b"https://evil.example", b"null", b"", b"testserver",
                                       b"http://testserver:80", b"http://TESTSERVER", b"http://testserver/"])
                      | header_bytes())
        site = draw(st.sampled_from([None, b"cross-site", b"same-site", b"same-origin"]) | header_bytes())
    if origin is not None:
        out.append((b"origin", origin))
    if site is not None:
        out.append((b"sec-fetch-site", site))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from([b"accept", b"accept-language", b"referer", b"x-forwarded-for", b"x-forwarded-proto",
                                     b"x-forwarded-host", b"x-csrf-token", b"x-requested-with", b"content-length",
                                     b"host", b"if-none-match", b"range", b"transfer-encoding"]))
        value = draw(header_bytes())
        if name == b"content-length":
            value = draw(st.sampled_from([b"0", b"abc", b"-1", b"99999999999", b" 5", b"1e3"]))
        out.append((name, value))
    out.extend(extra or [])
    return out


def form_request(draw: Callable[..., Any], fz: Fuzz, route: str, path: str, fields: list[str], ctx: Ctx, *,
                 json_endpoint: bool = False) -> Spec:
    """A POST to a form endpoint: the fields (some missing, some repeated, some extra, some as
    files), the CSRF token in one of its ways (or not), in one of the encodings (or broken)."""
    pairs: list[tuple[str, Value]] = []
    for name in fields:
        if draw(st.integers(0, 7)) == 0:
            continue  # missing
        for _ in range(draw(st.sampled_from([1] * 8 + [2, 3]))):  # sometimes repeated
            pairs.append((name, draw(field_values(name))))
    for _ in range(draw(st.sampled_from([0] * 5 + [1, 2, 3]))):
        pairs.append((draw(st.sampled_from(fields + ["csrf_token", "", "code[]", "x"]) | st.text(max_size=8)),
                      draw(text())))
    if pairs and draw(st.integers(0, 9)) == 0:
        i = draw(st.integers(0, len(pairs) - 1))
        pairs[i] = (pairs[i][0], Upload(draw(st.sampled_from(["a.txt", "", "..\\..\\x", "é\x00.bin"])),
                                        draw(st.binary(max_size=100)),
                                        draw(st.sampled_from(["text/plain", "image/png", "", "x"]))))
    extra: list[tuple[bytes, bytes]] = []
    mode = draw(st.sampled_from(CSRF_MODES))
    wrong = draw(st.sampled_from(["", "x", ctx.csrf[:-1], ctx.csrf + "x", ctx.csrf.upper(), " " + ctx.csrf]) | text())
    if mode in ("field", "both"):
        pairs.insert(draw(st.integers(0, len(pairs))), ("csrf_token", ctx.csrf))
    if mode in ("header", "both"):
        extra.append((b"x-csrf-token", ctx.csrf.encode()))
    if mode == "wrong":
        pairs.insert(0, ("csrf_token", wrong))
    if mode == "real-then-wrong":
        pairs[:0] = [("csrf_token", ctx.csrf), ("csrf_token", wrong)]
    if mode == "wrong-then-real":
        pairs[:0] = [("csrf_token", wrong), ("csrf_token", ctx.csrf)]
    if mode == "upload":
        pairs.insert(0, ("csrf_token", Upload("csrf.txt", ctx.csrf.encode(), "text/plain")))
    encoding = draw(st.sampled_from(["urlencoded"] * 10 + ["multipart"] * 3 + ["broken multipart"] * 2
                                    + ["garbage urlencoded", "json", "none", "odd content type"]))
    if mode == "field" and encoding in ("broken multipart", "json", "none", "odd content type") and draw(st.booleans()):
        extra.append((b"x-csrf-token", ctx.csrf.encode()))  # the token where it still counts: the body reaches the handler
    if encoding == "urlencoded":
        ct = FORM_CT
        body = urlencode([(k, v if isinstance(v, str) else v.content.decode("latin-1")) for k, v in pairs],
                         encoding="utf-8", errors="surrogatepass").encode()
    elif encoding == "multipart":
        boundary = b"fz" + secrets.token_hex(8).encode()
        ct, body = "multipart/form-data; boundary=" + boundary.decode(), multipart(pairs, boundary)
    elif encoding == "broken multipart":
        ct, body = broken_multipart(draw, pairs)
    elif encoding == "garbage urlencoded":
        ct, body = FORM_CT, garbage_urlencoded(draw, pairs)
    elif encoding == "json":
        ct = draw(st.sampled_from(["application/json", FORM_CT]))
        body = json.dumps({k: (v if isinstance(v, str) else [1, 2]) for k, v in pairs} if draw(st.booleans())
                          else [list(p) if isinstance(p[1], str) else [p[0], None] for p in pairs]).encode()
    elif encoding == "none":
        ct, body = draw(st.sampled_from([FORM_CT, "", "multipart/form-data; boundary=x"])), b""
    else:
        ct = draw(st.sampled_from(ODD_CONTENT_TYPES))
        body = urlencode([(k, v) for k, v in pairs if isinstance(v, str)], errors="surrogatepass").encode()
    hdrs = headers(draw, ctx, extra=extra)
    if ct or draw(st.booleans()):
        hdrs.append((b"content-type", ct.encode("latin-1", "replace")))
    if draw(st.integers(0, 20)) == 0:  # the content type twice
        hdrs.append((b"content-type", draw(st.sampled_from(ODD_CONTENT_TYPES)).encode("latin-1", "replace")))
    return Spec(route, "POST", path, hdrs, body, json_endpoint, ctx, f"csrf {mode}, {encoding}")


def json_request(draw: Callable[..., Any], fz: Fuzz, route: str, path: str, ctx: Ctx,
                 options_path: str | None = None) -> Spec:
    """A POST to a passkey endpoint: JSON the way passkeys.js sends it, with garbage inside (or
    not JSON at all); half the time the real challenge from the options endpoint first."""
    challenge = None
    if options_path and draw(st.integers(0, 3)) == 0:
        r = fz.send(Spec(f"POST {options_path}", "POST", options_path,
                         headers(draw, ctx, extra=[(b"x-csrf-token", ctx.csrf.encode()),
                                                   (b"content-type", b"application/json")]), b"{}", True, ctx))
        with contextlib.suppress(Exception):
            challenge = r.json().get("challenge") if r is not None else None
    shape = draw(st.sampled_from(["credential"] * 5 + ["any json"] * 2 + ["garbage", "empty", "form"]))
    ct = b"application/json"
    if shape == "credential":
        body_obj: Any = {"response": credential(draw, challenge)}
        for key, strategy in (("trust_device", json_values()), ("label", json_values() | st.text())):
            if draw(st.booleans()):
                body_obj[key] = draw(strategy)
        body = json.dumps(body_obj).encode()
    elif shape == "any json":
        body = json.dumps(draw(json_values() | st.fixed_dictionaries({"response": json_values()}))).encode()
    elif shape == "garbage":
        body = draw(st.sampled_from([b"{", b"[", b'{"response": ', b"\xff\xfe{}", b"null", b"1e999999", b"NaN",
                                     b'{"a":1}{"b":2}', b"[" * 5000 + b"]" * 5000, b'"' + b"x" * 70_000 + b'"'])
                    | st.binary(max_size=200))
    elif shape == "empty":
        body = b""
    else:
        body, ct = urlencode({"response": "x", "csrf_token": ctx.csrf}).encode(), FORM_CT.encode()
    mode = draw(st.sampled_from(["header"] * 6 + ["none", "wrong", "both"]))
    extra: list[tuple[bytes, bytes]] = []
    if mode in ("header", "both"):
        extra.append((b"x-csrf-token", ctx.csrf.encode()))
    if mode in ("wrong", "both"):
        extra.append((b"x-csrf-token", draw(header_bytes())))
    extra.append((b"content-type", draw(st.sampled_from([ct, ct, ct, b"text/plain", b"", b"application/json; x"]))))
    return Spec(route, "POST", path, headers(draw, ctx, extra=extra), body, True, ctx, f"csrf {mode}, {shape}")


def get_request(draw: Callable[..., Any], fz: Fuzz, paths: list[str], ctx: Ctx | None) -> Spec:
    template = draw(st.sampled_from(paths))
    path = template
    if "{token}" in path:
        path = path.replace("{token}", token_param(draw, ctx.tokens if ctx else []))
    if "{id}" in path:
        path = path.replace("{id}", id_param(draw, fz.victims + (ctx.ids if ctx else [])))
    method = draw(st.sampled_from(["GET"] * 9 + ["HEAD"]))
    return Spec(f"{method} {template}", method, path + query(draw, template), headers(draw, ctx), b"", False, ctx)


# --- the routes, by who uses them -------------------------------------------------------------

SIGN_IN_FORMS = {
    "/register": ["full_name", "username", "email", "password", "confirm_password"],
    "/login": ["login", "password"],
    "/password/forgot": ["email"],
    "/register/email": ["email"],
    "/verify": ["code", "trust_device"],
    "/verify/resend": [],
    "/password/new": ["new_password", "confirm_new_password"],
    "/verify/link/{token}": [],
    "/not-you/{token}": [],
    "/logout": [],
    "/logout/everywhere": [],
}
PUBLIC_PAGES = ["/", "/healthz", "/register", "/login", "/verify", "/verify/delivery", "/verify/link/{token}",
                "/not-you/{token}", "/register/email", "/password/forgot", "/password/new", "/static/app.css",
                "/static/{token}"]
FACTOR_FORMS = {"/verify/app": ["code", "trust_device"], "/verify/backup": ["backup_code", "trust_device"],
                "/verify": ["code", "trust_device"]}
FACTOR_JSON = {"/verify/passkey/options": None, "/verify/passkey": "/verify/passkey/options",
               "/passkey/options": None, "/passkey/verify": "/passkey/options"}
ACCOUNT_FORMS = {
    "/account/password": ["current_password", "new_password", "confirm_new_password"],
    "/account/email": ["new_email", "password"],
    "/account/delete": ["password"],
    "/account/confirm": ["password"],
    "/account/security/app": ["code"],
    "/account/security/app/remove": [],
    "/account/security/passkeys/{id}/remove": [],
    "/account/security/backup-codes": [],
    "/account/security/backup-codes/first": [],
    "/account/security/backup-codes/download": ["code", "code", "code"],
    "/account/security/devices/{id}/revoke": [],
    "/account/security/devices/revoke-all": [],
    "/logout": [],
}
ACCOUNT_JSON = {"/account/security/passkeys/options": None,
                "/account/security/passkeys": "/account/security/passkeys/options"}
ACCOUNT_PAGES = ["/dashboard", "/account", "/account/security", "/account/confirm", "/account/security/app",
                 "/account/delete", "/verify", "/login"]
ADMIN_FORMS = {
    "/admin/login": ["email", "password"],
    "/admin/login/code": ["code"],
    "/admin/setup/{token}": ["password", "confirm_password", "code"],
    "/admin/customers/{id}/{action}": ["confirm", "hours", "reason", "device"],
    "/admin/staff/{id}/disable": [],
    "/admin/logout": [],
}
ADMIN_PAGES = ["/admin", "/admin/login", "/admin/login/code", "/admin/setup/{token}", "/admin/customers",
               "/admin/customers", "/admin/customers/{id}", "/admin/audit", "/admin/audit", "/admin/audit.csv",
               "/admin/staff"]
ADMIN_ACTIONS = ["codes-on", "codes-off", "unlock", "end-sessions", "revoke-device", "revoke-devices", "disable",
                 "enable", "resend-confirmation", "bypass"]


def fill(draw: Callable[..., Any], fz: Fuzz, template: str, ctx: Ctx) -> str:
    path = template
    if "{token}" in path:
        path = path.replace("{token}", token_param(draw, ctx.tokens))
    if "{id}" in path:
        path = path.replace("{id}", id_param(draw, fz.victims + ctx.ids))
    if "{action}" in path:
        path = path.replace("{action}", encode_path(draw, draw(st.sampled_from(ADMIN_ACTIONS) | text())))
    if template in QUERY_KEYS and draw(st.booleans()):
        path += query(draw, template)
    return path


def sign_in_request(draw: Callable[..., Any], fz: Fuzz) -> Spec:
    ctx = fz.context(draw(st.sampled_from(["anon", "anon", "registering", "registering", "login_code", "reset"])))
    if draw(st.integers(0, 6)) == 0:
        return get_request(draw, fz, PUBLIC_PAGES, ctx)
    template = draw(st.sampled_from(sorted(SIGN_IN_FORMS)))
    return form_request(draw, fz, f"POST {template}", fill(draw, fz, template, ctx), SIGN_IN_FORMS[template], ctx)


def factor_request(draw: Callable[..., Any], fz: Fuzz) -> Spec:
    ctx = fz.context(draw(st.sampled_from(["factor", "factor", "factor", "login_code", "anon", "anon"])))
    if draw(st.integers(0, 9)) == 0:
        return get_request(draw, fz, ["/verify", "/verify/delivery", "/login", "/password/new"], ctx)
    if draw(st.booleans()):
        template = draw(st.sampled_from(sorted(FACTOR_FORMS)))
        return form_request(draw, fz, f"POST {template}", template, FACTOR_FORMS[template], ctx)
    template = draw(st.sampled_from(sorted(FACTOR_JSON)))
    return json_request(draw, fz, f"POST {template}", template, ctx, FACTOR_JSON[template])


def account_request(draw: Callable[..., Any], fz: Fuzz) -> Spec:
    ctx = fz.context(draw(st.sampled_from(["signed_in", "signed_in", "signed_in_app", "anon"])))
    pick = draw(st.integers(0, 9))
    if pick == 0:
        return get_request(draw, fz, ACCOUNT_PAGES, ctx)
    if pick == 1:
        template = draw(st.sampled_from(sorted(ACCOUNT_JSON)))
        return json_request(draw, fz, f"POST {template}", template, ctx, ACCOUNT_JSON[template])
    template = draw(st.sampled_from(sorted(ACCOUNT_FORMS)))
    return form_request(draw, fz, f"POST {template}", fill(draw, fz, template, ctx), ACCOUNT_FORMS[template], ctx)


def console_request(draw: Callable[..., Any], fz: Fuzz) -> Spec:
    ctx = fz.context(draw(st.sampled_from(["admin", "admin", "admin", "viewer", "staff_anon", "staff_pending",
                                           "setup"])))
    if draw(st.integers(0, 3)) == 0:
        return get_request(draw, fz, ADMIN_PAGES + fz.extra_admin_pages, ctx)
    template = draw(st.sampled_from(sorted(ADMIN_FORMS)))
    return form_request(draw, fz, f"POST {template}", fill(draw, fz, template, ctx), ADMIN_FORMS[template], ctx)


METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "PROPFIND", "get", "FOO"]


def anything_request(draw: Callable[..., Any], fz: Fuzz) -> Spec:
    """Any method on any path (known ones with garbage in their parameters, trailing slashes,
    dot segments, unicode), with any headers and a body of any kind."""
    ctx = fz.context(draw(st.sampled_from(["anon", "signed_in", "admin"])))
    templates = (sorted(SIGN_IN_FORMS) + PUBLIC_PAGES + sorted(FACTOR_FORMS) + sorted(FACTOR_JSON) + sorted(ACCOUNT_FORMS)
                 + sorted(ACCOUNT_JSON) + ACCOUNT_PAGES + sorted(ADMIN_FORMS) + ADMIN_PAGES + fz.extra_admin_pages)
    template = draw(st.sampled_from(templates))
    path = fill(draw, fz, template, ctx)
    how = draw(st.sampled_from(["as is"] * 4 + ["trailing slash", "double slash", "dot segment", "unicode", "random",
                                                "case"]))
    if how == "trailing slash":
        path = path.split("?")[0] + "/" + draw(st.sampled_from(["", "/", "?a=b", "?next=//evil.example"]))
    elif how == "double slash":
        path = "/" + path
    elif how == "dot segment":
        path = path + draw(st.sampled_from(["/.", "/..", "/%2e%2e/admin", "/./x", "%2f..%2f"]))
    elif how == "unicode":
        path = path + quote(draw(text())[:2000], safe="")
    elif how == "random":
        path = "/" + "/".join(quote(draw(text())[:1000], safe="") for _ in range(draw(st.integers(1, 4))))
    else:
        path = path.upper()
    method = draw(st.sampled_from(METHODS))
    body = b""
    hdrs = headers(draw, ctx)
    if method not in ("GET", "HEAD") and draw(st.booleans()):
        body = draw(st.binary(max_size=200) | st.sampled_from([b"a=b", b"{}", b"x" * 70_000]))
        hdrs.append((b"content-type", draw(st.sampled_from(ODD_CONTENT_TYPES + [FORM_CT])).encode("latin-1")))
    json_endpoint = template in FACTOR_JSON or template in ACCOUNT_JSON
    return Spec(f"{method} {template} ({how})", method, path, hdrs, body, json_endpoint, ctx)


# --- fixtures and tests -------------------------------------------------------------------------


@pytest.fixture
def fuzz(settings: Settings, clock: FixedClock, smtp: Capture, backend: str) -> Iterator[Fuzz]:
    """The app running in an event loop of the test's own, with per-address limits out of the way
    (429 is a fine answer, but most requests should reach their handler)."""
    settings = with_(settings, rate_limit="1000000/minute", login_account_rate_limit="1000000/minute")
    loop = asyncio.new_event_loop()
    stack = contextlib.AsyncExitStack()
    server = loop.run_until_complete(stack.enter_async_context(running(settings, clock)))
    root = logging.getLogger()
    level = root.level
    fz = Fuzz(server, loop, smtp, clock, backend)
    fz.victims = loop.run_until_complete(fz._victims())
    mounted = {getattr(r, "path", "") for r in server.app.routes}
    fz.extra_admin_pages = [p for p in ("/admin/funnel", "/admin/funnel.csv", "/admin/abuse") if p in mounted]
    root.setLevel(logging.WARNING)  # 10,000 requests' INFO lines would cost more than the requests
    root.addHandler(fz.errors)
    try:
        yield fz
    finally:
        root.removeHandler(fz.errors)
        root.setLevel(level)
        loop.run_until_complete(fz.client.aclose())
        loop.run_until_complete(stack.aclose())
        loop.close()


def finish(fz: Fuzz, name: str, examples: int) -> None:
    summary = fz.report(name)
    print("\n" + summary)
    assert fz.sent >= 0.99 * budget(examples, fz.backend), summary
    assert not fz.problems, summary


SIGN_IN = 3000
FACTORS = 1800
ACCOUNT = 2200
CONSOLE = 2200
ANYTHING = 1500  # 10,700 examples in all, each one request or two


def test_fuzz_sign_in_register_reset_and_code_forms(fuzz: Fuzz) -> None:
    fuzz.explore(SIGN_IN, sign_in_request)
    finish(fuzz, "sign-in, registration, reset, code step", SIGN_IN)


def test_fuzz_second_step_answers_and_passkey_json(fuzz: Fuzz) -> None:
    fuzz.explore(FACTORS, factor_request)
    finish(fuzz, "factor answers and passkey JSON", FACTORS)


def test_fuzz_account_and_security_forms(fuzz: Fuzz) -> None:
    fuzz.explore(ACCOUNT, account_request)
    finish(fuzz, "account and ways to sign in", ACCOUNT)


def test_fuzz_staff_console(fuzz: Fuzz) -> None:
    fuzz.explore(CONSOLE, console_request)
    finish(fuzz, "staff console", CONSOLE)


def test_fuzz_any_method_any_path_any_header(fuzz: Fuzz) -> None:
    fuzz.explore(ANYTHING, anything_request)
    finish(fuzz, "methods, paths and headers", ANYTHING)


# --- what the fuzzing found, pinned: each fails until the app is fixed -------------------------


async def _factor_step(client: httpx.AsyncClient, smtp: Capture, clock: FixedClock) -> None:
    """A customer with an authenticator app, signed out, then half-way in: the factor step."""
    await registered(client, smtp)
    await enrol_app(client, clock)
    await sign_out(client)
    r = await login(client)
    assert r.headers.get("location") == "/verify", r.text


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/passkey/verify", "/verify/passkey", "/account/security/passkeys"])
async def test_found_form_encoded_body_on_a_passkey_json_endpoint_is_not_a_500(
        server: Running, smtp: Capture, clock: FixedClock, path: str) -> None:
    # FOUND: 500, RuntimeError("Stream consumed"), for a form-encoded POST (with its CSRF token)
    # to a passkey endpoint that reads JSON: json_guarded's CSRF check reads the body with
    # request.form() (csrf._token_matches), then the endpoint's request.json() finds the stream
    # consumed: app/auth/factor_routes.py:163 (_json_body, for /passkey/verify and
    # /verify/passkey) and app/account/security_routes.py:188 (passkey_add, for
    # /account/security/passkeys). Only ValueError is caught there.
    async with server.client() as c:
        page = "/login"
        if path == "/verify/passkey":
            await _factor_step(c, smtp, clock)
            page = "/verify"
        elif path == "/account/security/passkeys":
            await registered(c, smtp)
            page = "/account/security"
        csrf = await get_csrf(c, page)
        r = await c.post(path, content=f"response=x&csrf_token={csrf}",
                         headers={"content-type": FORM_CT, "origin": ORIGIN})
        assert r.status_code < 500, (r.status_code, r.text[:300])


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/passkey/verify", "/verify/passkey", "/account/security/passkeys"])
async def test_found_deeply_nested_json_on_a_passkey_endpoint_is_not_a_500(
        server: Running, smtp: Capture, clock: FixedClock, path: str) -> None:
    # FOUND: 500, RecursionError: maximum recursion depth exceeded while decoding a JSON array,
    # for a JSON body nested a few thousand deep (b"[" * 5000 + b"]" * 5000, 10 KB) with its
    # CSRF header: app/auth/factor_routes.py:163 (_json_body) and
    # app/account/security_routes.py:188 (passkey_add) catch ValueError only, and json.loads
    # raises RecursionError.
    async with server.client() as c:
        page = "/login"
        if path == "/verify/passkey":
            await _factor_step(c, smtp, clock)
            page = "/verify"
        elif path == "/account/security/passkeys":
            await registered(c, smtp)
            page = "/account/security"
        csrf = await get_csrf(c, page)
        r = await c.post(path, content=b"[" * 5000 + b"]" * 5000,
                         headers={"content-type": "application/json", "x-csrf-token": csrf, "origin": ORIGIN})
        assert r.status_code < 500, (r.status_code, r.text[:300])


@pytest.mark.anyio
async def test_found_htmx_request_for_the_home_page_is_not_a_500(server: Running) -> None:
    # FOUND: 500, jinja2_fragments.BlockNotFoundError: Block 'title' not found in template
    # 'home.html', for GET / with HX-Request: true (signed out; no HX-Boosted): app/templating.py:108
    # renders the fragment's <title> from the page's own "title" block, and home.html has none
    # (it inherits base.html's).
    async with server.client() as c:
        r = await c.get("/", headers={"hx-request": "true"})
        assert r.status_code == 200, (r.status_code, r.text[:300])


@pytest.mark.anyio
@pytest.mark.parametrize("method,path,data", [
    ("POST", "/admin/customers/²/unlock", {}),
    ("POST", "/admin/customers/{victim}/bypass", {"hours": "²", "reason": "ID checked"}),
    ("POST", "/admin/customers/{victim}/revoke-device", {"device": "⑤", "confirm": "yes"}),
    ("GET", "/admin/customers/²", None),
    ("GET", "/admin/customers?page=²", None),
    ("GET", "/admin/customers?q=²", None),
    ("GET", "/admin/audit?customer=²", None),
    ("GET", "/admin/audit?staff=³", None),
    ("GET", "/admin/audit.csv?customer=²", None),
])
async def test_found_superscript_digits_in_console_numbers_are_not_a_500(
        server: Running, smtp: Capture, method: str, path: str, data: dict[str, str] | None) -> None:
    # FOUND: 500, ValueError: invalid literal for int() with base 10: '²', at
    # app/staff/console_routes.py:38 (_int): "²".isdigit() is True (so are "³", "¹²³", "⑤"),
    # int("²") raises. Every number the console reads goes through _int: the customer id in
    # the path, ?page=, the audit filters ?customer= and ?staff=, the form's hours and device.
    # The search box has the same bug of its own: ?q=² at app/staff/customers.py:90 (search:
    # q.isdigit(), then int(q)).
    from tests.staff_support import staff_cookies, staff_form

    async with server.client() as c:
        await registered(c, smtp)
    victim = int(await server.services.db.fetch_val(sa.select(sa.func.max(customers.c.id))))
    cookies, _ = await staff_cookies(server)
    async with server.client(cookies=cookies) as admin:
        url = path.replace("{victim}", str(victim))
        if method == "POST":
            form = await staff_form(admin)
            r = await admin.post(url, data={**form, **(data or {})}, headers={"origin": ORIGIN})
        else:
            r = await admin.get(url)
        assert r.status_code < 500, (r.status_code, r.text[:300])


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/account/security/devices/²/revoke", "/account/security/passkeys/³/remove"])
async def test_found_superscript_digits_in_security_row_ids_are_not_a_500(
        server: Running, smtp: Capture, path: str) -> None:
    # FOUND: 500, ValueError from int("²"), at app/account/security_routes.py:123 (_row_id): the same
    # isdigit()-then-int() as the console's _int, for a signed-in customer's device and passkey ids.
    async with server.client() as c:
        await registered(c, smtp)
        csrf = await get_csrf(c, "/account/security")
        r = await c.post(path, data={"csrf_token": csrf}, headers={"origin": ORIGIN})
        assert r.status_code < 500, (r.status_code, r.text[:300])


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_found_home_page_of_a_signed_in_customer_is_not_a_500(server: Running, smtp: Capture,
                                                                    method: str) -> None:
    # FOUND: 500, jinja2.exceptions.UndefinedError: bool object has no element 1, for GET / (or
    # HEAD /) by any signed-in customer, no fuzzing needed: app/main.py:78 (home) renders
    # home.html with {"signed_in": signed is not None}, a bool that replaces render()'s
    # signed_in (the (session, customer) pair), and templates/base.html:24 reads signed_in[1].
    async with server.client() as c:
        await registered(c, smtp)
        r = await c.request(method, "/")
        assert r.status_code == 200, (r.status_code, r.text[:300])


@pytest.mark.anyio
async def test_found_static_files_refuse_like_every_other_path(server: Running) -> None:
    # FOUND (not a 500): /static answers outside the app's error pages. A method it does not
    # take is a 405 without the Allow header the README promises (app/web/errors.allowed_methods
    # looks at Route objects only, and /static is a Mount); an empty Range header is a 400
    # "Malformed range header." in text/plain, from Starlette's FileResponse.
    async with server.client() as c:
        r = await c.put("/static/app.css")
        assert r.status_code == 405 and "allow" in r.headers, (r.status_code, dict(r.headers))
        r = await c.get("/static/app.css", headers={"range": ""})
        assert r.status_code < 400 or r.headers.get("content-type", "").startswith("text/html"), (
            r.status_code, r.headers.get("content-type"), r.text[:100])

"""Passwords, keyed hashes, CSRF and the security headers every response carries."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import os
import secrets
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.settings import Network

T = TypeVar("T")

# OWASP's Argon2id minimum: m=19 MiB, t=2, p=1.
ARGON2 = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, hash_len=32, salt_len=16)
_DUMMY_HASH = ARGON2.hash(secrets.token_urlsafe(16))


# --- passwords ---------------------------------------------------------------------------


def _verify_werkzeug(stored: str, password: str) -> bool:
    """Werkzeug's `pbkdf2:sha256:N$salt$hex` and `scrypt:N:r:p$salt$hex` formats."""
    try:
        method, salt, expected = stored.split("$", 2)
    except ValueError:
        return False
    parts = method.split(":")
    pw, salt_b = password.encode(), salt.encode()
    if parts[0] == "pbkdf2" and len(parts) in (2, 3):
        iterations = int(parts[2]) if len(parts) == 3 else 600000
        actual = hashlib.pbkdf2_hmac(parts[1], pw, salt_b, iterations).hex()
    elif parts[0] == "scrypt" and len(parts) in (1, 4):
        n, r, p = (int(x) for x in parts[1:]) if len(parts) == 4 else (2**15, 8, 1)
        actual = hashlib.scrypt(pw, salt=salt_b, n=n, r=r, p=p, maxmem=132 * n * r * p).hex()
    else:
        return False
    return hmac.compare_digest(actual, expected)


def _check_password(stored: str | None, password: str) -> tuple[bool, bool]:
    """(matches, needs rehash). With no stored hash, a dummy one costs the same time."""
    if stored is None:
        with contextlib.suppress(VerificationError):
            ARGON2.verify(_DUMMY_HASH, password)
        return False, False
    if stored.startswith("$argon2"):
        try:
            ARGON2.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False, False
        return True, ARGON2.check_needs_rehash(stored)
    if not stored.startswith(("pbkdf2:", "scrypt:")):
        # A format we do not know (bcrypt, md5, ...): no match, at the cost of a real check.
        return _check_password(None, password)
    try:
        # Werkzeug's pbkdf2/scrypt are slow by design; a match is re-hashed to Argon2id by the caller.
        ok = _verify_werkzeug(stored, password)
    except (ValueError, TypeError, MemoryError, OverflowError):
        return _check_password(None, password)  # a damaged stored hash: refuse, never a 500
    return ok, ok


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_hash_slots = 0


def hash_slots(configured: int = 0, *, workers: int | None = None) -> int:
    """How many Argon2 runs this process allows at once: HASH_CONCURRENCY, or else one per
    core divided among the workers (by default the WEB_CONCURRENCY uvicorn starts), at least one."""
    if configured > 0:
        return configured
    try:
        cores = len(os.sched_getaffinity(0))  # the CPUs this process may run on (containers, taskset)
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if workers is None:
        try:
            workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
        except ValueError:
            workers = 1
    return max(1, cores // max(1, workers))


def configure_hashing(configured: int) -> None:
    """Set the slots (create_app does, from HASH_CONCURRENCY). A pool made before is retired:
    what it was already given still runs, so for a moment both pools may hash."""
    global _pool, _hash_slots
    with _pool_lock:
        _hash_slots = hash_slots(configured)
        old, _pool = _pool, None
    if old is not None:
        old.shutdown(wait=False)


# The niceness of the threads that hash (Linux: threads are tasks). At 19 a hash takes only
# what the event loops, the database and everything else at 0 leave: a sign-in waits a little
# longer for its hash, while every other request of every customer stops waiting on hashes.
HASH_THREAD_NICE = 19
# The name such a thread shows to the OS (`top -H`, /proc/<pid>/task/<tid>/comm; the bench
# reads the hashing threads' CPU by it).
HASH_THREAD_NAME = "argon2-hash"


def _hashing_thread_started() -> None:
    """Lower this thread's scheduling priority to HASH_THREAD_NICE, and name it for the OS."""
    tid = threading.get_native_id()
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, HASH_THREAD_NICE)
    with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm", "w") as comm:
        comm.write(HASH_THREAD_NAME)


def _hashing_pool() -> ThreadPoolExecutor:
    """Threads of their own that only ever hash: as many as the slots (each Argon2 run takes
    19 MiB and a core: more at once than the cores of all workers only adds memory, cache
    misses and event-loop stalls), and nothing else runs on them, so what they use is what
    Argon2 costs (the bench reads it per thread)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_hash_slots or hash_slots(), thread_name_prefix=HASH_THREAD_NAME,
                                       initializer=_hashing_thread_started)
        return _pool


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_hashing_pool(), fn, *args)


async def check_password(stored: str | None, password: str) -> tuple[bool, bool]:
    """Verify off the event loop. Returns (matches, needs rehash to Argon2id)."""
    return await _off_loop(_check_password, stored, password)


async def hash_password(password: str) -> str:
    """Argon2id hash, computed off the event loop."""
    return await _off_loop(ARGON2.hash, password)


# --- keys and tokens ---------------------------------------------------------------------


@lru_cache(maxsize=16)
def derive_key(secret_key: str, purpose: str) -> bytes:
    """A separate key per use, derived from SECRET_KEY."""
    return hmac.new(secret_key.encode(), b"computer-shop:" + purpose.encode(), hashlib.sha256).digest()


def keyed_hash(key: bytes, *parts: object) -> str:
    """HMAC-SHA256 over the parts, hex."""
    msg = b"\x1f".join(str(p).encode() for p in parts)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def token() -> str:
    """A random URL-safe token (256 bits)."""
    return secrets.token_urlsafe(32)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# --- client address ----------------------------------------------------------------------


def client_ip(request: Request, trusted: Iterable[Network]) -> str:
    """The client address; X-Forwarded-For is believed only when it comes from a trusted proxy."""
    peer = request.client.host if request.client else ""
    trusted = tuple(trusted)
    if not trusted:
        return peer
    try:
        chain = [ipaddress.ip_address(peer)]
    except ValueError:
        return peer
    forwarded = request.headers.get("x-forwarded-for", "")
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    # Walk from the nearest hop outwards; the first address not ours is the client.
    for hop in reversed(hops):
        if not any(chain[-1] in net for net in trusted):
            break
        try:
            chain.append(ipaddress.ip_address(hop))
        except ValueError:
            break
    return str(chain[-1])


# --- CSRF --------------------------------------------------------------------------------

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use."""
    value = request.session.get("csrf")
    if not value:
        value = token()
        request.session["csrf"] = value
    return str(value)


def same_origin(request: Request, trusted: Iterable[Network] = ()) -> bool:
    """Origin / Sec-Fetch-Site check: refuse what a browser says came from elsewhere.

    The host we compare with is the request's Host, or, from a trusted proxy that rewrites
    Host, the X-Forwarded-Host it passes on."""
    site = request.headers.get("sec-fetch-site")
    if site and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    hosts = {request.headers.get("host", "")}
    peer = request.client.host if request.client else ""
    forwarded = request.headers.get("x-forwarded-host")
    if forwarded and _is_trusted(peer, trusted):
        hosts.add(forwarded.split(",")[0].strip())
    return origin.split("://", 1)[-1] in hosts


def _is_trusted(peer: str, trusted: Iterable[Network]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in trusted)


async def csrf_ok(request: Request, trusted: Iterable[Network] = ()) -> bool:
    """True when the request carries the session's token and comes from this site."""
    if not same_origin(request, trusted):
        return False
    expected = request.session.get("csrf")
    if not expected:
        return False
    # The form field first: the step just swapped in carries the current token, while the
    # hx-headers copy on <body> dates from the last full page load (tokens rotate at sign-in).
    sent: list[str] = []
    if request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(CSRF_FIELD)
        if isinstance(value, str):
            sent.append(value)
    if header := request.headers.get(CSRF_HEADER):
        sent.append(header)
    return any(hmac.compare_digest(v.encode(), str(expected).encode()) for v in sent)


# --- headers -----------------------------------------------------------------------------

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=(), interest-cohort=()"),
)
_PAGE_HEADERS = (("Cache-Control", "no-store"),)
_HSTS = (("Strict-Transport-Security", "max-age=63072000; includeSubDomains"),)


def _raw(headers: Iterable[tuple[str, str]]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers)


class SecurityHeadersMiddleware:
    """Adds the security headers to every response, errors and fragments included. A header
    the response set itself is kept. Every response passes here: the raw header list is
    scanned once, not once per header."""

    def __init__(self, app: ASGIApp, *, production: bool) -> None:
        self.app = app
        self.production = production
        hsts = _HSTS if production else ()
        self.for_static = _raw(_HEADERS + hsts)
        self.for_pages = _raw(_HEADERS + _PAGE_HEADERS + hsts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")
        wanted = self.for_static if static else self.for_pages

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {bytes(k).lower() for k, _ in headers}
                headers.extend(pair for pair in wanted if pair[0] not in present)
                if not static:
                    _add_vary(headers, b"HX-Request")
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _add_vary(headers: list[tuple[bytes, bytes]], name: bytes) -> None:
    """`name` added to the response's Vary (all its Vary headers merged into one), once."""
    values: list[bytes] = []
    kept = []
    for key, value in headers:
        if bytes(key).lower() == b"vary":
            values += [v.strip() for v in bytes(value).split(b",") if v.strip()]
        else:
            kept.append((key, value))
    if name.lower() not in {v.lower() for v in values}:
        values.append(name)
    headers[:] = [*kept, (b"vary", b", ".join(values))]

"""Passwords: Argon2id on a thread pool of its own, and the legacy Werkzeug formats. No HTTP here."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

T = TypeVar("T")

# OWASP's Argon2id minimum: m=19 MiB, t=2, p=1.
ARGON2 = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, hash_len=32, salt_len=16)
_DUMMY_HASH = ARGON2.hash(secrets.token_urlsafe(16))


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
    elif parts[0] == "scrypt" and len(parts) == 4:
        n, r, p = (int(x) for x in parts[1:])
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

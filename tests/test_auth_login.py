"""Sign-in: password step, code step, OTP off, legacy hashes, answers that tell nothing."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest
import sqlalchemy as sa

from app.clock import FixedClock
from app.security.passwords import _DUMMY_HASH, ARGON2, _check_password
from app.settings import Settings
from app.tables import customers
from tests.conftest import (
    PASSWORD,
    Capture,
    Running,
    code_in,
    login,
    registered,
    submit_code,
    text_of,
    wait_mail,
)

pytestmark = pytest.mark.anyio


async def signed_up(server: Running, smtp: Capture, clock: FixedClock, **kw: str) -> str:
    async with server.client() as c:
        email = await registered(c, smtp, **kw)
    clock.advance(61)  # past the resend cooldown, as a real customer would be
    return email


@pytest.mark.parametrize("who", ["jane", "jane@example.com", "JANE@EXAMPLE.COM"])
async def test_sign_in_by_username_or_email_mails_login_code_and_reaches_dashboard(
    server: Running, smtp: Capture, clock: FixedClock, who: str
) -> None:
    await signed_up(server, smtp, clock)
    async with server.client() as c:
        r = await login(c, who)
        assert r.status_code == 303 and r.headers["location"] == "/verify"
        mail = (await wait_mail(smtp, "jane@example.com", 2))[-1]
        assert "sign-in code" in mail["Subject"] and "10 minutes" in text_of(mail)
        r = await submit_code(c, code_in(mail))
        assert r.headers["location"] == "/dashboard"
        assert (await c.get("/dashboard")).status_code == 200


async def test_sign_in_with_htmx_swaps_code_step_in_place(server: Running, smtp: Capture, clock: FixedClock) -> None:
    await signed_up(server, smtp, clock)
    async with server.client() as c:
        r = await login(c, htmx=True)
        assert r.status_code == 200 and r.headers["HX-Push-Url"] == "/verify"
        assert "Enter your sign-in code" in r.text and "<html" not in r.text


async def test_customer_with_otp_off_goes_straight_in(server: Running, smtp: Capture, clock: FixedClock) -> None:
    await signed_up(server, smtp, clock)
    await server.services.db.execute(customers.update().values(otp_enabled=False))
    async with server.client() as c:
        r = await login(c)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard"
        assert (await c.get("/dashboard")).status_code == 200
    async with server.client() as c:
        r = await login(c, htmx=True)
        assert r.status_code == 200 and "/dashboard" in r.headers["HX-Location"]
    assert len(smtp.to("jane@example.com")) == 1  # only the registration code


async def test_password_only_state_never_reaches_signed_in_pages(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    await signed_up(server, smtp, clock)
    async with server.client() as c:
        await login(c)
        r = await c.get("/dashboard")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        r = await c.get("/dashboard", headers={"HX-Request": "true"})
        assert r.status_code == 200 and "/login" in r.headers["HX-Location"]


async def test_unknown_user_answers_like_wrong_password(server: Running, smtp: Capture, clock: FixedClock) -> None:
    await signed_up(server, smtp, clock)
    async with server.client() as c:
        wrong = await login(c, "jane", "Wrong-Password-123")
    async with server.client() as c:
        unknown = await login(c, "nobody", "Wrong-Password-123")
    assert wrong.status_code == unknown.status_code == 422
    strip = lambda t: t.replace('value="jane"', "").replace('value="nobody"', "")  # noqa: E731
    import re

    csrf = re.compile(r"[A-Za-z0-9_-]{43}")
    assert csrf.sub("", strip(wrong.text)) == csrf.sub("", strip(unknown.text))


async def test_locked_account_and_wrong_password_answer_alike(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    await signed_up(server, smtp, clock)
    await server.services.db.execute(
        customers.update().values(otp_locked_until=clock.now().replace(year=2030), otp_lockouts=1)
    )
    async with server.client() as c:
        locked = await login(c, "jane", "Wrong-Password-123")
    await server.services.db.execute(customers.update().values(otp_locked_until=None))
    async with server.client() as c:
        unlocked = await login(c, "jane", "Wrong-Password-123")
    assert locked.status_code == unlocked.status_code == 422
    assert "do not match an account" in locked.text and "locked" not in locked.text.lower()


async def test_unknown_user_still_costs_one_argon2_hash(
    server: Running, smtp: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SECURITY.md 15: an unknown user is checked against a dummy hash with the app's own
    parameters, as long as a real verification (an unknown user costs what a wrong password
    does), and the sign-in really asks for it."""
    import time

    from app.security import passwords

    assert _DUMMY_HASH.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert not ARGON2.check_needs_rehash(_DUMMY_HASH)
    real_hash = ARGON2.hash(PASSWORD)

    def cost(stored: str | None) -> float:
        runs = []
        for _ in range(5):
            start = time.process_time()
            assert _check_password(stored, "Not-The-Password-7") == (False, False)
            runs.append(time.process_time() - start)
        return sorted(runs)[2]

    assert cost(None) >= 0.5 * cost(real_hash), "the dummy check must cost about one verification"
    seen: list[str | None] = []
    real = passwords._check_password

    def counted(stored: str | None, password: str) -> tuple[bool, bool]:
        seen.append(stored)
        return real(stored, password)

    monkeypatch.setattr(passwords, "_check_password", counted)
    async with server.client() as c:
        assert (await login(c, "nobody@example.com", "Whatever-123")).status_code == 422
    assert seen == [None], "an unknown user is checked against the dummy hash"


async def test_argon2_parameters_meet_owasp_minimum() -> None:
    params = ARGON2.hash("x").split("$")[3]
    assert params == "m=19456,t=2,p=1"


@pytest.mark.parametrize("method", ["pbkdf2:sha256:600000", "scrypt"])
async def test_werkzeug_hashes_verify_and_are_rehashed_to_argon2id(
    server: Running, smtp: Capture, clock: FixedClock, method: str
) -> None:
    from werkzeug.security import generate_password_hash

    legacy = generate_password_hash(PASSWORD, method=method)
    await server.services.db.execute(
        customers.insert().values(email="old@example.com", username="oldie", password_hash=legacy,
                                  email_verified_at=clock.now(), otp_enabled=False)
    )
    async with server.client() as c:
        r = await login(c, "old@example.com")
        assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    stored = await server.services.db.fetch_val(sa.select(customers.c.password_hash))
    assert stored.startswith("$argon2id$")
    async with server.client() as c:
        assert (await login(c, "oldie")).headers["location"] == "/dashboard"
    async with server.client() as c:
        assert (await login(c, "oldie", "not-the-password")).status_code == 422


async def test_werkzeug_wrong_password_is_refused() -> None:
    from werkzeug.security import generate_password_hash

    assert _check_password(generate_password_hash("right-one-123", method="pbkdf2:sha256:1000"), "wrong") == (False, False)
    assert _check_password("pbkdf2:sha256:1000$salt$" + hashlib.sha256(b"x").hexdigest(), "x")[0] is False


async def test_unverified_customer_signing_in_gets_a_registration_code_again(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    from tests.conftest import register

    async with server.client() as c:
        await register(c)
    await wait_mail(smtp, "jane@example.com")
    clock.advance(61)
    async with server.client() as c:
        r = await login(c)
        assert r.headers["location"] == "/verify"
        page = await c.get("/verify")
        assert "Confirm your email" in page.text
        mail = (await wait_mail(smtp, "jane@example.com", 2))[-1]
        assert "verification code" in mail["Subject"]
        await submit_code(c, code_in(mail))
    assert await server.services.db.fetch_val(sa.select(customers.c.email_verified_at)) is not None


async def test_sign_in_again_inside_cooldown_reuses_open_code(server: Running, smtp: Capture,
                                                              clock: FixedClock) -> None:
    await signed_up(server, smtp, clock)
    async with server.client() as first:
        await login(first)
    code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
    clock.advance(5)
    async with server.client() as second:
        await login(second)  # inside the cooldown: no new mail, the open code moves to this session
        assert len(smtp.to("jane@example.com")) == 2
        r = await submit_code(second, code)
        assert r.headers["location"] == "/dashboard"


async def test_bad_login_input_gets_messages_not_500(client: httpx.AsyncClient) -> None:
    from tests.conftest import get_csrf

    token = await get_csrf(client, "/login")
    r = await client.post("/login", data={"csrf_token": token, "login": "", "password": ""})
    assert r.status_code == 422 and "Enter your username or email address." in r.text
    r = await client.post("/login", data={"csrf_token": token, "login": "x" * 300, "password": "p" * 1000})
    assert r.status_code == 422


@pytest.mark.parametrize("stored", ["pbkdf2:sha256:abc$salt$00", "pbkdf2:nosuchdigest:1000$s$00",
                                    "scrypt:99999999999:8:1$s$00", "$2b$12$abcdefghijklmnopqrstuv", "md5$x$y", ""])
async def test_damaged_or_foreign_hashes_are_refused_not_500(stored: str) -> None:
    assert _check_password(stored, PASSWORD) == (False, False)


async def test_mixed_case_legacy_email_signs_in_and_blocks_duplicates(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    from tests.conftest import register

    hashed = ARGON2.hash(PASSWORD)
    await server.services.db.execute(
        customers.insert().values(email="Alice@Example.COM", username="Alice", password_hash=hashed,
                                  email_verified_at=clock.now(), otp_enabled=False)
    )
    async with server.client() as c:
        assert (await login(c, "alice@example.com")).headers["location"] == "/dashboard"
    async with server.client() as c:
        assert (await login(c, "ALICE")).headers["location"] == "/dashboard"
    async with server.client() as c:
        r = await register(c, username="alice2", email="alice@example.com")
        assert r.status_code == 303
    (notice,) = await wait_mail(smtp, "Alice@Example.COM")
    assert "already" in notice["Subject"]
    assert await server.services.db.fetch_val(sa.select(sa.func.count()).select_from(customers)) == 1


async def test_password_hashing_runs_at_most_hash_concurrency_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Argon2 run takes 19 MiB and a core: a process never runs more than its share."""
    import threading

    import anyio

    from app.security import passwords as security

    running = peak = 0
    lock = threading.Lock()
    real = security._check_password

    def counted(stored: str | None, password: str) -> tuple[bool, bool]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return real(stored, password)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(security, "_check_password", counted)
    try:
        for slots in (1, 2):
            security.configure_hashing(slots)
            running = peak = 0
            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(security.check_password, None, PASSWORD)
            assert peak == slots
    finally:
        security.configure_hashing(0)


async def test_hash_concurrency_setting_reaches_the_hashing(settings: Settings) -> None:
    from dataclasses import replace

    from app.main import create_app
    from app.security import passwords as security

    try:
        create_app(replace(settings, hash_concurrency=3))
        assert security._hashing_pool()._max_workers == 3
    finally:
        security.configure_hashing(0)


def test_hash_concurrency_defaults_to_the_cores_shared_among_web_concurrency_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    from app.security import passwords as security
    from app.settings import Settings, SettingsError

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    assert security.hash_slots(0) == 8
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    assert security.hash_slots(0) == 2
    monkeypatch.setenv("WEB_CONCURRENCY", "16")
    assert security.hash_slots(0) == 1
    monkeypatch.setenv("WEB_CONCURRENCY", "many")
    assert security.hash_slots(0) == 8
    assert security.hash_slots(3) == 3
    assert security.hash_slots(0, workers=2) == 4  # the bench's --workers, whatever WEB_CONCURRENCY says
    with pytest.raises(SettingsError, match="HASH_CONCURRENCY"):
        Settings(hash_concurrency=-1)


async def test_hashing_threads_are_named_for_the_os() -> None:
    """`top -H` (and the bench, reading /proc) tells the Argon2 threads from the rest."""
    from pathlib import Path

    from app.security import passwords as security

    await security.check_password(None, PASSWORD)
    names = {p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")}
    assert security.HASH_THREAD_NAME in names


async def test_hashing_threads_run_nothing_but_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench counts what these threads use as Argon2's cost: other blocking work
    (anyio's and Starlette's thread pool: static files, sync endpoints) runs elsewhere."""
    import threading
    from pathlib import Path

    import anyio

    from app.security import passwords as security

    def os_name() -> str:
        return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    where: list[str] = []
    real = security._check_password

    def noted(stored: str | None, password: str) -> tuple[bool, bool]:
        where.append(os_name())
        return real(stored, password)

    monkeypatch.setattr(security, "_check_password", noted)
    await security.check_password(None, PASSWORD)
    others = [await anyio.to_thread.run_sync(os_name) for _ in range(3)]
    assert where == [security.HASH_THREAD_NAME]
    assert security.HASH_THREAD_NAME not in others


# --- review fixes (issue 14) -------------------------------------------------------------


async def test_username_and_email_share_one_account_budget(settings: Settings, clock: FixedClock,
                                                           smtp: Capture) -> None:
    """The per-account limit counts the customer, whatever name was typed: "jane" and
    "jane@example.com" are one budget, and it frees up as the app's clock moves on."""
    from tests.conftest import registered, running, with_

    limited = with_(settings, login_account_rate_limit="3/minute")
    async with running(limited, clock) as server:
        async with server.client() as c:
            await registered(c, smtp)
        for who in ("jane", "jane@example.com", "JANE"):
            async with server.client() as c:
                assert (await login(c, who, "Wrong-Password-11")).status_code == 422
        async with server.client() as c:
            r = await login(c, "Jane@Example.com")  # the right password, but the budget is spent
            assert r.status_code == 422 and "do not match" in r.text
        clock.advance(61)
        async with server.client() as c:
            assert (await login(c, "jane@example.com")).status_code == 303


async def test_password_rehash_holds_no_pooled_connection_while_argon2_runs(
    clock: FixedClock, smtp: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one pooled connection (MariaDB: SQLite has no pool to hold), a legacy sign-in
    waiting for its re-hash must leave the pool free: another request gets the connection."""
    import os
    import secrets
    import threading

    from werkzeug.security import generate_password_hash

    from app.database import migrate
    from app.security import passwords
    from tests.conftest import create_mysql_database, drop_mysql_database, mysql_url, running

    if not os.environ.get("TEST_MYSQL_URL"):
        pytest.skip("needs MariaDB: set TEST_MYSQL_URL (CI always does)")
    name = create_mysql_database("shop_pool")
    migrate(mysql_url(name))
    settings = Settings(app_env="test", database_url=mysql_url(name), secret_key=secrets.token_urlsafe(48),
                        smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_security="none", db_pool_size=1,
                        hash_concurrency=1, rate_limit="10000/minute", login_account_rate_limit="10000/minute")
    release, started = threading.Event(), threading.Event()
    real = passwords._check_password

    def blocker() -> None:
        started.set()
        release.wait(10)

    def check_then_hold_the_hashing_thread(stored: str | None, password: str) -> tuple[bool, bool]:
        result = real(stored, password)
        passwords._hashing_pool().submit(blocker)  # the re-hash queues behind it
        return result

    monkeypatch.setattr(passwords, "_check_password", check_then_hold_the_hashing_thread)
    try:
        async with running(settings, clock) as server:
            await server.services.db.execute(customers.insert().values(
                email="old@example.com", username="old", email_verified_at=clock.now(), otp_enabled=False,
                password_hash=generate_password_hash(PASSWORD, method="pbkdf2:sha256:1000")))
            async with server.client() as c:
                signing_in = asyncio.ensure_future(login(c, "old@example.com"))
                while not started.is_set():
                    await asyncio.sleep(0.01)
                async with server.client() as other:
                    health = await asyncio.wait_for(other.get("/healthz"), 3)  # needs the only connection
                assert health.status_code == 200
                release.set()
                assert (await signing_in).headers["location"] == "/dashboard"
    finally:
        release.set()
        drop_mysql_database(name)

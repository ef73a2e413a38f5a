"""The code engine held to SECURITY.md 1-12, on both backends."""

from __future__ import annotations

import asyncio
import inspect
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa

import app.otp.engine as engine
from app.clock import FixedClock
from app.otp import Purpose
from app.tables import auth_sessions, customers, mail_outbox, otp_codes, otp_ledgers, otp_stats, otp_verification
from tests.conftest import (
    Capture,
    Running,
    code_in,
    get_csrf,
    login,
    register,
    registered,
    resend,
    submit_code,
    wait_mail,
    with_,
)

# A registration form's step counts its failures on the address's ledger (nobody proved a
# secret to start it): clearing it lets a test reach the per-step cap alone.
UNLOCK_LEDGER = otp_ledgers.update().values(failures=0, lockouts=0, locked_until=None)
pytestmark = pytest.mark.anyio


# --- 1, 2, 5: generation and storage -----------------------------------------------------


def test_ten_thousand_codes_are_all_six_digits() -> None:
    codes = [engine.generate_code() for _ in range(10_000)]
    assert all(len(c) == 6 and c.isdigit() for c in codes)
    assert any(c.startswith("0") for c in codes)  # zero-padded, not dropped
    assert len(set(codes)) > 9000


def test_codes_come_from_secrets_not_random() -> None:
    source = inspect.getsource(engine)
    assert "secrets.randbelow" in inspect.getsource(engine.generate_code)
    assert not re.search(r"^\s*(import random|from random)", source, re.M)


async def test_code_comparison_is_constant_time(server: Running, smtp: Capture, clock: FixedClock,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """SECURITY.md 5: verify() decides with hmac.compare_digest over the keyed hashes of the
    step's codes: with a comparator that never matches, the right code is refused, so nothing
    else (an ==, a SQL comparison) makes that decision. The fast path compares in SQL; it leaks
    nothing usable: it compares HMAC(key, id:code) with the stored HMAC, so how far two hashes
    agree says nothing about the code to anyone without SECRET_KEY (tests/README.md)."""
    import hmac

    svc = server.services
    async with server.client() as c:
        await registered(c, smtp)
    customer_id = await svc.db.fetch_val(sa.select(customers.c.id))
    clock.advance(61)
    issued = await engine.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=customer_id,
                                purpose=Purpose.LOGIN, nonce="n", sent_to="x")
    step = await engine.load_challenge(svc.db, keys=svc.keys, challenge_id=issued.challenge_id, nonce="n")
    assert step is not None
    compared: list[tuple[object, object]] = []

    def never(a: object, b: object) -> bool:
        compared.append((a, b))
        return False

    monkeypatch.setattr(hmac, "compare_digest", never)
    verdict = await engine.verify(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), challenge=step,
                                  code=issued.code)
    assert verdict.status == "wrong" and compared, "the right code was matched by something else"
    monkeypatch.undo()
    step = await engine.load_challenge(svc.db, keys=svc.keys, challenge_id=issued.challenge_id, nonce="n")
    assert step is not None
    verdict = await engine.verify(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), challenge=step,
                                  code=issued.code)
    assert verdict.status == "verified"


async def test_stored_hash_is_hmac_under_a_key_derived_from_secret_key(server: Running, smtp: Capture) -> None:
    """SECURITY.md 2: HMAC-SHA256(key derived from SECRET_KEY, challenge id + code); an unkeyed
    SHA-256 of the same input, or a hash under another key, is not what is stored."""
    import hashlib
    import hmac

    from app.security.crypto import derive_key

    svc = server.services
    async with server.client() as c:
        await register(c)
        code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
    row = await svc.db.fetch_one(sa.select(otp_codes.c.challenge_id.label("id"), otp_codes.c.code_hash))
    message = f"{row.id}\x1f{code}".encode()
    key = derive_key(svc.settings.secret_key, "otp-code")
    assert row.code_hash == hmac.new(key, message, hashlib.sha256).hexdigest()
    assert row.code_hash != hashlib.sha256(message).hexdigest()
    assert row.code_hash != hmac.new(derive_key("another-key-" + "x" * 40, "otp-code"), message,
                                     hashlib.sha256).hexdigest()


async def test_no_stored_row_contains_the_code(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await register(c)
        reg_code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        await submit_code(c, reg_code)
    clock.advance(61)
    async with server.client() as c:
        await login(c)
        login_code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
    db = server.services.db
    for table in (customers, otp_verification, otp_codes, mail_outbox, auth_sessions):
        for row in await db.fetch_all(sa.select(table)):
            for value in row._mapping.values():
                assert reg_code not in str(value) and login_code not in str(value), (table.name, value)
    stored = await db.fetch_val(sa.select(otp_verification.c.code_hash).order_by(otp_verification.c.created_at.desc()))
    assert re.fullmatch(r"[0-9a-f]{64}", stored)


# --- 3, 4: expiry and binding ------------------------------------------------------------


@pytest.mark.parametrize(("purpose", "ttl"), [("registration", 900), ("login", 600)])
async def test_frozen_clock_past_expiry_refuses_the_right_code(
    server: Running, smtp: Capture, clock: FixedClock, purpose: str, ttl: int
) -> None:
    if purpose == "login":
        async with server.client() as first:
            await registered(first, smtp)
    async with server.client() as c:
        if purpose == "registration":
            await register(c)
        else:
            await login(c)
        code = code_in((await wait_mail(smtp, "jane@example.com", 1 if purpose == "registration" else 2))[-1])
        clock.advance(ttl - 1)
        page = await c.get("/verify")
        assert "expired" not in page.text
        clock.advance(2)
        r = await submit_code(c, code)
        assert r.status_code == 422 and "expired" in r.text


async def test_code_is_single_use(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await register(c)
        code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        cookies = dict(c.cookies)
        token = await get_csrf(c, "/verify")
        assert (await submit_code(c, code)).headers["location"] == "/dashboard"
    async with server.client(cookies=cookies) as replay:  # the pending cookie from before success
        r = await replay.post("/verify", data={"csrf_token": token, "code": code})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        r = await replay.post("/verify/resend", data={"csrf_token": token})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert (await replay.get("/verify")).headers["location"] == "/login"
    assert len(smtp.to("jane@example.com")) == 1, "the replayed step sent no new code"


async def test_registration_code_fails_at_login(server: Running, smtp: Capture, clock: FixedClock) -> None:
    db, svc = server.services.db, server.services
    async with server.client() as c:
        await register(c)
        reg_code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
    customer_id = await db.fetch_val(sa.select(customers.c.id))
    await db.execute(customers.update().values(email_verified_at=clock.now()))
    clock.advance(61)
    issued = await engine.issue(db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=customer_id,
                                purpose=Purpose.LOGIN, nonce="n1", sent_to="x")
    challenge = await engine.load_challenge(db, keys=svc.keys, challenge_id=issued.challenge_id, nonce="n1")
    assert challenge is not None
    if reg_code != issued.code:
        verdict = await engine.verify(db, keys=svc.keys, policy=svc.policy, now=clock.now(), challenge=challenge,
                                      code=reg_code)
        assert verdict.status == "wrong"


async def test_code_from_another_session_fails(server: Running, smtp: Capture) -> None:
    async with server.client() as owner:
        await register(owner)
        code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
    async with server.client() as stranger:
        await register(stranger, username="mallory", email="mallory@example.com")
        r = await submit_code(stranger, code)
        assert r.status_code == 422
    svc = server.services
    first = await svc.db.fetch_one(sa.select(otp_verification).order_by(otp_verification.c.created_at))
    assert await engine.load_challenge(svc.db, keys=svc.keys, challenge_id=first.id, nonce="forged") is None


# --- 6-9: attempts, lockout, concurrency -------------------------------------------------


async def test_fifty_concurrent_wrong_codes_evaluate_at_most_five(server: Running, smtp: Capture) -> None:
    svc = server.services
    async with server.client() as c:
        await register(c)
        right = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        token = await get_csrf(c, "/verify")
        wrong = "000000" if right != "000000" else "111111"
        results = await asyncio.gather(
            *(c.post("/verify", data={"csrf_token": token, "code": wrong}) for _ in range(50))
        )
    assert all(r.status_code == 422 for r in results)
    # Entries past the fifth are refused unread: "dead", or "paused" once the lock is set.
    judged_wrong = sum("not right" in r.text for r in results)
    attempts = await svc.db.fetch_val(sa.select(otp_verification.c.attempts))
    assert attempts <= 5 and judged_wrong <= 5


async def test_after_five_wrong_entries_the_right_code_is_refused(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        await register(c)
        right = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        wrong = "000000" if right != "000000" else "111111"
        texts = [(await submit_code(c, wrong)).text for _ in range(5)]
        assert "4 attempts left" in texts[0] and "1 attempt left" in texts[3]
        r = await submit_code(c, right)
        assert r.status_code == 422


async def test_failures_from_fresh_cookies_still_add_up(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
    for i in range(5):
        clock.advance(61)
        async with server.client() as fresh:
            await login(fresh)
            r = await submit_code(fresh, "000000" if i % 2 else "999999")
    assert "paused" in r.text or "Too many" in r.text
    row = await server.services.db.fetch_one(sa.select(customers))
    assert row.otp_locked_until is not None and row.otp_lockouts == 1


async def test_resend_never_resets_the_failure_count(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await register(c)
        right = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        wrong = "000000" if right != "000000" else "111111"
        for _ in range(4):
            await submit_code(c, wrong)
        clock.advance(61)
        assert (await resend(c)).status_code == 303
        fresh = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
        wrong = "000000" if fresh != "000000" else "111111"
        r = await submit_code(c, wrong)
        assert r.status_code == 422 and "paused" in r.text
        r = await submit_code(c, fresh)
        assert r.status_code == 422, "locked: even the right code waits"


async def test_lockout_grows_progressively_and_success_resets_it(server: Running, smtp: Capture,
                                                                clock: FixedClock) -> None:
    svc = server.services
    async with server.client() as c:
        await registered(c, smtp)
    customer_id = await svc.db.fetch_val(sa.select(customers.c.id))
    lengths = []
    for round_ in range(4):
        clock.advance(3601)
        issued = await engine.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(),
                                    customer_id=customer_id, purpose=Purpose.LOGIN, nonce=f"n{round_}", sent_to="x")
        for _ in range(5):
            ch = await engine.load_challenge(svc.db, keys=svc.keys, challenge_id=issued.challenge_id,
                                             nonce=f"n{round_}")
            assert ch is not None
            wrong = "000000" if issued.code != "000000" else "111111"
            verdict = await engine.verify(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(),
                                          challenge=ch, code=wrong)
        assert verdict.status == "locked" and verdict.locked_until is not None
        lengths.append(int((verdict.locked_until - clock.now()).total_seconds()))
    assert lengths == [60, 300, 900, 3600]
    clock.advance(3601)
    issued = await engine.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=customer_id,
                                purpose=Purpose.LOGIN, nonce="ok", sent_to="x")
    ch = await engine.load_challenge(svc.db, keys=svc.keys, challenge_id=issued.challenge_id, nonce="ok")
    assert ch is not None
    ok = await engine.verify(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), challenge=ch, code=issued.code)
    assert ok.status == "verified"
    await engine.succeeded(svc.db, customer_id, clock.now())
    row = await svc.db.fetch_one(sa.select(customers))
    assert row.otp_attempts == 0 and row.otp_lockouts == 0 and row.otp_locked_until is None


async def _login_code(server: Running, smtp: Capture, clock: FixedClock, nonce: str) -> tuple[int, engine.Issued]:
    svc = server.services
    async with server.client() as c:
        await registered(c, smtp)
    customer_id = await svc.db.fetch_val(sa.select(customers.c.id))
    clock.advance(61)
    issued = await engine.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=customer_id,
                                purpose=Purpose.LOGIN, nonce=nonce, sent_to="x")
    return customer_id, issued


async def _open(svc: object, challenge_id: int) -> bool:
    row = await svc.db.fetch_one(  # type: ignore[attr-defined]
        sa.select(otp_verification.c.used_at, otp_verification.c.invalidated_at)
        .where(otp_verification.c.id == challenge_id))
    return row.used_at is None and row.invalidated_at is None


@pytest.mark.parametrize("path", ["use_code", "verify"])
async def test_a_right_code_ends_every_other_open_code_of_the_customer_and_only_theirs(
    server: Running, smtp: Capture, clock: FixedClock, path: str
) -> None:
    """MariaDB does this in one multi-table UPDATE, SQLite in two statements: same outcome."""
    from app.auth import queries

    svc = server.services
    customer_id, issued = await _login_code(server, smtp, clock, "n")
    decoy = await engine.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=customer_id,
                                  purpose=Purpose.REGISTRATION, nonce="d", sent_to="x", kind=engine.Kind.DECOY)
    placeholder = await engine.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(),
                                        customer_id=customer_id, purpose=Purpose.LOGIN, nonce="p", sent_to="x",
                                        kind=engine.Kind.PLACEHOLDER)
    other = await queries.create_customer(svc.db, username="otto", email="otto@example.com", full_name="Otto",
                                          password_hash="x", now=clock.now())
    others_code = await engine.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=other,
                                     purpose=Purpose.LOGIN, nonce="o", sent_to="x")
    await svc.db.execute(customers.update().where(customers.c.id == customer_id).values(otp_attempts=3))
    if path == "use_code":
        assert await engine.use_code(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(),
                                     challenge_id=issued.challenge_id, nonce="n", customer_id=customer_id,
                                     purpose=Purpose.LOGIN, code=issued.code) is engine.FastCheck.USED
    else:
        ch = await engine.load_challenge(svc.db, keys=svc.keys, challenge_id=issued.challenge_id, nonce="n")
        assert ch is not None
        verdict = await engine.verify(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), challenge=ch,
                                      code=issued.code)
        assert verdict.status == "verified"
    await engine.succeeded(svc.db, customer_id, clock.now())  # what the caller finishes a right code with
    assert not await _open(svc, decoy) and not await _open(svc, placeholder)
    assert await _open(svc, others_code.challenge_id)
    used = await svc.db.fetch_one(sa.select(otp_verification).where(otp_verification.c.id == issued.challenge_id))
    assert used.used_at is not None and used.invalidated_at is None
    attempts = await svc.db.fetch_val(sa.select(customers.c.otp_attempts).where(customers.c.id == customer_id))
    assert attempts == 0


async def test_sign_out_everywhere_and_a_right_code_at_once_never_deadlock(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """Both lock the customer row and the customer's codes. The failure reset takes them in
    the same order as sign-out everywhere; the right-code UPDATE cannot (it locks its code row,
    then reads the customer row), and when MariaDB aborts its transaction to break a deadlock
    the transaction is run again. Without either, some of these rounds answer a deadlock error
    (a 503)."""
    from app.auth import queries
    from app.database import transact

    svc = server.services
    customer_id, _ = await _login_code(server, smtp, clock, "n")
    for round_ in range(200):
        clock.advance(61)
        issued = await engine.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(),
                                    customer_id=customer_id, purpose=Purpose.LOGIN, nonce=f"r{round_}", sent_to="x")
        # A decoy and a placeholder as well: more open rows for both to lock.
        for kind in (engine.Kind.DECOY, engine.Kind.PLACEHOLDER):
            await engine.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=customer_id,
                                  purpose=Purpose.LOGIN, nonce=f"{kind}{round_}", sent_to="x", kind=kind)

        async def use(issued: engine.Issued = issued, nonce: str = f"r{round_}") -> bool:
            if await engine.use_code(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(),
                                     challenge_id=issued.challenge_id, nonce=nonce, customer_id=customer_id,
                                     purpose=Purpose.LOGIN, code=issued.code) is not engine.FastCheck.USED:
                return False
            await engine.succeeded(svc.db, customer_id, clock.now())
            return True

        right_code = transact(svc.db, use)
        results = await asyncio.gather(right_code, queries.revoke_all(svc.db, customer_id, clock.now()),
                                       return_exceptions=True)
        assert not any(isinstance(r, BaseException) for r in results), results


async def test_a_new_code_ends_the_open_ones_and_a_refused_one_ends_none(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    svc = server.services
    customer_id, first = await _login_code(server, smtp, clock, "n1")
    issue = {"keys": svc.keys, "policy": svc.policy, "customer_id": customer_id, "purpose": Purpose.LOGIN,
             "sent_to": "x"}
    clock.advance(30)
    with pytest.raises(engine.Cooldown):
        await engine.issue(svc.db, now=clock.now(), nonce="n2", **issue)
    assert await _open(svc, first.challenge_id)  # inside the cooldown nothing changed
    clock.advance(31)
    second = await engine.issue(svc.db, now=clock.now(), nonce="n3", **issue)
    assert not await _open(svc, first.challenge_id) and await _open(svc, second.challenge_id)


async def test_sign_in_fast_path_refuses_a_right_code_while_the_customer_is_locked(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    svc = server.services
    customer_id, issued = await _login_code(server, smtp, clock, "n")
    await svc.db.execute(customers.update().values(otp_locked_until=clock.now() + timedelta(seconds=60)))
    use = {"keys": svc.keys, "policy": svc.policy, "challenge_id": issued.challenge_id, "nonce": "n",
           "customer_id": customer_id, "purpose": Purpose.LOGIN, "code": issued.code}
    assert await engine.use_code(svc.db, now=clock.now(), **use) is engine.FastCheck.UNCOUNTED
    row = await svc.db.fetch_one(sa.select(otp_verification).where(otp_verification.c.id == issued.challenge_id))
    assert row.used_at is None and row.attempts == 0  # refused unread: verify() answers LOCKED
    clock.advance(61)
    assert await engine.use_code(svc.db, now=clock.now(), **use) is engine.FastCheck.USED


async def test_sign_in_fast_path_refuses_a_right_code_bound_to_another_pending_session(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    svc = server.services
    customer_id, issued = await _login_code(server, smtp, clock, "mine")
    use = {"keys": svc.keys, "policy": svc.policy, "now": clock.now(), "challenge_id": issued.challenge_id,
           "customer_id": customer_id, "purpose": Purpose.LOGIN, "code": issued.code}
    assert await engine.use_code(svc.db, nonce="someone-else", **use) is engine.FastCheck.UNCOUNTED
    row = await svc.db.fetch_one(sa.select(otp_verification).where(otp_verification.c.id == issued.challenge_id))
    assert row.used_at is None and row.attempts == 0  # another session's entry changes nothing
    wrong = "000000" if issued.code != "000000" else "111111"
    assert await engine.use_code(svc.db, nonce="mine", **{**use, "code": wrong}) is engine.FastCheck.COUNTED
    row = await svc.db.fetch_one(sa.select(otp_verification).where(otp_verification.c.id == issued.challenge_id))
    assert row.used_at is None and row.attempts == 1  # counted, as verify() counts every entry
    assert await engine.use_code(svc.db, nonce="mine", **use) is engine.FastCheck.USED


async def test_twenty_concurrent_correct_submissions_give_exactly_one_session(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        await register(c)
        code = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        token = await get_csrf(c, "/verify")
        cookies = dict(c.cookies)

    async def attempt() -> int:
        async with server.client(cookies=cookies) as each:
            r = await each.post("/verify", data={"csrf_token": token, "code": code})
            return 1 if r.headers.get("location") == "/dashboard" else 0

    wins = await asyncio.gather(*(attempt() for _ in range(20)))
    assert sum(wins) == 1
    assert await server.services.db.fetch_val(sa.select(sa.func.count()).select_from(auth_sessions)) == 1


# --- 11, 12: resend ----------------------------------------------------------------------


async def test_resend_inside_cooldown_sends_nothing_even_with_cleared_cookies_and_on_another_worker(
    server: Running, smtp: Capture, clock: FixedClock, settings: object
) -> None:
    from tests.conftest import running

    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as c:
        await login(c)
        await wait_mail(smtp, "jane@example.com", 2)
        clock.advance(59)
        r = await resend(c)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert "wait 1 seconds" in r.text
    async with server.client() as cleared:  # cookies gone: the password step again, then resend
        await login(cleared)
        r = await resend(cleared)
        assert r.status_code == 429
    async with running(settings, clock) as other_worker, other_worker.client() as c:  # type: ignore[arg-type]
        await login(c)
        r = await resend(c)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert len(smtp.to("jane@example.com")) == 2
    clock.advance(2)  # 61 s after the last code
    async with server.client() as c:
        await login(c)
        await wait_mail(smtp, "jane@example.com", 3)


async def test_resend_at_61_seconds_sends_and_an_earlier_code_of_the_same_step_still_works(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """SECURITY.md 12: a resend mails a new code and the earlier codes of the same step stay
    valid until their own expiry (a late mail never strands the customer)."""
    async with server.client() as c:
        await register(c)
        first = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        clock.advance(61)
        r = await resend(c)
        assert r.status_code == 303
        second = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
        assert second and "still work until they expire" in (await c.get("/verify")).text
        r = await submit_code(c, first)  # the first mail's code, after the second was sent
        assert r.headers["location"] == "/dashboard"


async def test_wrong_entries_spread_over_the_codes_of_a_step_share_one_budget(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """SECURITY.md 12: five wrong entries, whichever code they aim at, kill every code of the
    step; the right entry of any code ends them all; a step's codes never work in another."""
    svc = server.services
    async with server.client() as c:
        await register(c)
        codes = [code_in((await wait_mail(smtp, "jane@example.com"))[0])]
        for n in range(2, 4):
            clock.advance(61)
            await resend(c)
            codes.append(code_in((await wait_mail(smtp, "jane@example.com", n))[-1]))
        for _ in range(5):
            await svc.db.execute(UNLOCK_LEDGER)
            await submit_code(c, "000001" if "000001" not in codes else "999998")
        await svc.db.execute(UNLOCK_LEDGER)
        for code in codes:
            r = await submit_code(c, code)
            assert r.status_code == 422 and "Too many wrong entries" in r.text, "the one budget is spent"
    assert await svc.db.fetch_val(sa.select(otp_verification.c.attempts)) == 5


async def test_a_step_keeps_its_three_newest_codes_and_one_right_entry_ends_them_all(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as c:
        await register(c)
        codes = [code_in((await wait_mail(smtp, "jane@example.com"))[0])]
        for n in range(2, 5):
            clock.advance(61)
            await resend(c)
            codes.append(code_in((await wait_mail(smtp, "jane@example.com", n))[-1]))
        before = dict(c.cookies)
        r = await submit_code(c, codes[0])  # the fourth code pushed the first out
        if codes[0] not in codes[1:]:
            assert r.status_code == 422 and "replaced" in r.text
        assert (await submit_code(c, codes[2])).headers["location"] == "/dashboard"
    async with server.client(cookies=before) as again:
        assert (await again.get("/verify")).headers["location"] == "/login", "the step is over"
    open_codes = await server.services.db.fetch_val(
        sa.select(sa.func.count()).select_from(otp_verification).where(otp_verification.c.used_at.is_(None),
                                                                        otp_verification.c.invalidated_at.is_(None)))
    assert open_codes == 0


@pytest.mark.parametrize("fast_path", [True, False], ids=["after-password", "full-check"])
async def test_a_registration_code_never_completes_a_sign_in_step(
    server: Running, smtp: Capture, clock: FixedClock, fast_path: bool
) -> None:
    """SECURITY.md 4: a code is bound to its purpose. A sign-in step (with or without the
    customer id a password leaves in the cookie) pointed at a registration challenge of the
    same customer and session refuses its right code."""
    import itsdangerous

    from app.web.session import Pending, SessionCookie

    svc = server.services
    async with server.client() as c:
        await registered(c, smtp)
    customer = await svc.db.fetch_one(sa.select(customers.c.id, customers.c.session_version))
    clock.advance(61)
    issued = await engine.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=customer.id,
                                purpose=Purpose.REGISTRATION, nonce="same-session", sent_to="x")
    owner = (customer.id, customer.session_version) if fast_path else (None, None)
    forged = SessionCookie(csrf="t", pending=Pending(issued.challenge_id, "same-session", "login", *owner))
    signer = itsdangerous.TimestampSigner([svc.settings.secret_key], salt="cookie-session")
    async with server.client(cookies={"session": signer.sign(forged.dump()).decode()}) as c:
        r = await c.post("/verify", data={"csrf_token": "t", "code": issued.code})
        assert r.headers.get("location") != "/dashboard", "a registration code signed in"
    assert await svc.db.fetch_val(sa.select(otp_verification.c.used_at).where(
        otp_verification.c.id == issued.challenge_id)) is None


async def test_a_code_takes_at_most_max_attempts_entries_even_when_the_customer_is_not_locked(
    server: Running, smtp: Capture
) -> None:
    """SECURITY.md 6, the per-code cap on its own: the failure count (a registration form's
    step counts on its address's ledger) is cleared after every entry here, so only the code's
    own guarded count can refuse the sixth entry."""
    svc = server.services
    async with server.client() as c:
        await register(c)
        right = code_in((await wait_mail(smtp, "jane@example.com"))[0])
        wrong = "000000" if right != "000000" else "111111"
        for _ in range(6):
            await submit_code(c, wrong)
            await svc.db.execute(UNLOCK_LEDGER)
        r = await submit_code(c, right)
        assert r.status_code == 422 and "Too many wrong entries for this code" in r.text
    assert await svc.db.fetch_val(sa.select(otp_verification.c.attempts)) == 5
    assert await svc.db.fetch_val(sa.select(otp_verification.c.used_at)) is None


async def test_resend_with_htmx_inside_cooldown_answers_429_fragment(server: Running, smtp: Capture) -> None:
    async with server.client() as c:
        await register(c)
        token = await get_csrf(c, "/verify")
        r = await c.post("/verify/resend", data={"csrf_token": token}, headers={"HX-Request": "true"})
        assert r.status_code == 429 and "Retry-After" in r.headers and "<html" not in r.text
        assert 'role="timer"' in r.text


async def test_code_step_reports_true_remaining_cooldown(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await register(c)
        clock.advance(25)
        page = await c.get("/verify")
        assert 'data-countdown="35"' in page.text
        clock.advance(40)
        page = await c.get("/verify")
        assert 'data-countdown="0"' in page.text and 'id="resend" disabled' not in page.text


# --- cleanup -----------------------------------------------------------------------------


async def test_cleanup_deletes_finished_codes_and_keeps_counts(server: Running, smtp: Capture,
                                                               clock: FixedClock) -> None:
    from app.otp.cleanup import cleanup

    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as c:
        await login(c)  # a code left to expire
    clock.advance(3 * 3600)
    deleted = await cleanup(server.services.db, now=clock.now())
    assert deleted == 2
    assert await server.services.db.fetch_val(sa.select(sa.func.count()).select_from(otp_verification)) == 0
    assert await server.services.db.fetch_val(sa.select(sa.func.count()).select_from(otp_codes)) == 0
    stats = {(r.purpose, r.outcome): r.codes for r in await server.services.db.fetch_all(sa.select(otp_stats))}
    assert stats == {("registration", "verified"): 1, ("login", "expired"): 1}
    payloads = await server.services.db.fetch_all(sa.select(mail_outbox.c.payload))
    assert all(p.payload is None for p in payloads)


async def test_cleanup_forgets_sessions_and_settled_mail_after_30_days_not_before(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """The soak found auth_sessions and mail_outbox only growing: ended sessions and settled mail
    go after HISTORY_KEPT (30 days); a live session and mail still queued stay."""
    from app.otp.cleanup import HISTORY_KEPT, cleanup

    db = server.services.db
    async with server.client() as c:
        await registered(c, smtp)  # a session, and a sent code mail
    count = sa.select(sa.func.count())
    assert await db.fetch_val(count.select_from(auth_sessions)) == 1
    assert await db.fetch_val(count.select_from(mail_outbox)) == 1
    clock.advance((HISTORY_KEPT - timedelta(hours=1)).total_seconds())
    async with server.client() as c:
        await registered(c, smtp, username="later", email="later@example.com")  # seen just now
    await cleanup(db, now=clock.now())
    assert await db.fetch_val(count.select_from(auth_sessions)) == 2, "nothing is forgotten before 30 days"
    assert await db.fetch_val(count.select_from(mail_outbox)) == 2
    clock.advance(2 * 3600)
    await cleanup(db, now=clock.now())
    emails = {r.recipient for r in await db.fetch_all(sa.select(mail_outbox.c.recipient))}
    assert emails == {"later@example.com"}
    assert await db.fetch_val(count.select_from(auth_sessions)) == 1
    assert await db.fetch_val(count.select_from(customers)) == 2  # customers are never touched


def test_a_session_cannot_outlive_the_history_the_clean_up_keeps() -> None:
    from app.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="SESSION_ABSOLUTE_TIMEOUT"):
        Settings(secret_key="k" * 32, session_absolute_timeout=31 * 24 * 3600)
    with pytest.raises(SettingsError, match="SESSION_IDLE_TIMEOUT"):
        Settings(secret_key="k" * 32, session_idle_timeout=50000, session_absolute_timeout=43200)
    Settings(secret_key="k" * 32, session_idle_timeout=3600, session_absolute_timeout=30 * 24 * 3600)


async def test_max_attempts_is_a_setting(server: Running, smtp: Capture, settings: object, clock: FixedClock) -> None:
    from tests.conftest import running

    async with running(with_(settings, otp_max_attempts=2), clock) as s2, s2.client() as c:  # type: ignore[arg-type]
        await register(c, username="max2", email="max2@example.com")
        right = code_in((await wait_mail(smtp, "max2@example.com"))[0])
        wrong = "000000" if right != "000000" else "111111"
        assert "1 attempt left" in (await submit_code(c, wrong)).text
        await submit_code(c, wrong)
        assert (await submit_code(c, right)).status_code == 422


async def test_resend_without_javascript_confirms_once(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await register(c)
        clock.advance(61)
        r = await resend(c)
        assert r.status_code == 303 and r.headers["location"] == "/verify"
        assert "A new code is on its way" in (await c.get("/verify")).text
        assert "A new code is on its way" not in (await c.get("/verify")).text

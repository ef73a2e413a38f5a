"""Tests that kill mutants mutmut found surviving in app/otp and app/security (tests/README.md,
"Mutation testing"). Each pins one behaviour the rest of the suite left open; the mutants it
kills are named in its docstring."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from app import otp
from app.clock import FixedClock
from app.otp import Kind, Outcome, OtpPolicy, Purpose
from app.otp.cleanup import BATCH, cleanup
from app.security.passwords import check_password
from app.tables import customers, otp_stats, otp_verification
from tests.conftest import Capture, Running, code_in, register, registered, submit_code, wait_mail

pytestmark = pytest.mark.anyio


def other_than(code: str) -> str:
    return "000000" if code != "000000" else "111111"


async def jane_id(server: Running) -> int:
    return int(await server.services.db.fetch_val(sa.select(customers.c.id).where(customers.c.username == "jane")))


async def login_code(server: Running, smtp: Capture, clock: FixedClock, nonce: str = "tab-1") -> tuple[otp.Issued, int]:
    """A registered customer (jane) and a sign-in code issued to her, bound to `nonce`."""
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)  # past the registration code's resend cooldown
    svc, cid = server.services, await jane_id(server)
    issued = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=cid,
                             purpose=Purpose.LOGIN, nonce=nonce, sent_to="jane@example.com")
    return issued, cid


async def load(server: Running, challenge_id: int, nonce: str = "tab-1") -> otp.Challenge:
    svc = server.services
    challenge = await otp.load_challenge(svc.db, keys=svc.keys, challenge_id=challenge_id, nonce=nonce)
    assert challenge is not None
    return challenge


async def verify(server: Running, challenge: otp.Challenge, code: str, now: datetime) -> otp.Verdict:
    svc = server.services
    return await otp.verify(svc.db, keys=svc.keys, policy=svc.policy, now=now, challenge=challenge, code=code)


# --- app/otp/engine.py -------------------------------------------------------------------


def test_lockout_schedule_uses_the_last_step_past_its_end() -> None:
    """OtpPolicy.lockout: the fifth lockout and every later one last as long as the last step
    (kills `len(schedule) + 1`, which indexes past the end)."""
    policy = OtpPolicy()
    assert [policy.lockout(level) for level in range(6)] == [60, 300, 900, 3600, 3600, 3600]
    assert policy.lockout(50) == 3600


async def test_a_code_entered_at_the_second_it_expires_is_expired(server: Running, smtp: Capture,
                                                                 clock: FixedClock) -> None:
    """verify(): `expires_at <= now` is expired (kills `<`, which verified the right code then)."""
    issued, _ = await login_code(server, smtp, clock)
    challenge = await load(server, issued.challenge_id)
    verdict = await verify(server, challenge, issued.code, issued.expires_at)
    assert verdict.status is Outcome.EXPIRED


async def test_a_lock_says_until_when_and_ends_at_that_second(server: Running, smtp: Capture,
                                                              clock: FixedClock) -> None:
    """The customer's lock after max_attempts wrong codes: an entry before its end is LOCKED with
    the end in the verdict (the code step shows it), and at the end a new code works (kills
    `locked_until >= now`, and LOCKED verdicts without `locked_until`)."""
    issued, _ = await login_code(server, smtp, clock)
    start = clock.now()
    challenge = await load(server, issued.challenge_id)
    wrong = other_than(issued.code)
    verdicts = [await verify(server, challenge, wrong, start) for _ in range(5)]
    assert [v.status for v in verdicts] == [Outcome.WRONG] * 4 + [Outcome.LOCKED]
    lock_end = start + timedelta(seconds=60)
    assert verdicts[-1].locked_until == lock_end

    clock.advance(59)
    again = await verify(server, await load(server, issued.challenge_id), issued.code, clock.now())
    assert again.status is Outcome.LOCKED and again.locked_until == lock_end

    clock.advance(1)
    svc = server.services
    fresh = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=await jane_id(server),
                            purpose=Purpose.LOGIN, nonce="tab-2", sent_to="jane@example.com")
    verdict = await verify(server, await load(server, fresh.challenge_id, "tab-2"), fresh.code, clock.now())
    assert verdict.status is Outcome.VERIFIED


async def test_any_entry_on_a_used_code_is_invalid(server: Running, smtp: Capture, clock: FixedClock) -> None:
    """verify(): a used code answers INVALID to a wrong and a right entry alike (kills
    `used_at is not None and invalidated_at is not None`, which let a wrong entry count)."""
    issued, _ = await login_code(server, smtp, clock)
    assert (await verify(server, await load(server, issued.challenge_id), issued.code, clock.now())).status \
        is Outcome.VERIFIED
    used = await load(server, issued.challenge_id)
    assert used.used_at is not None
    for code in (other_than(issued.code), issued.code):
        assert (await verify(server, used, code, clock.now())).status is Outcome.INVALID


async def test_a_right_code_sent_again_from_a_stale_page_is_invalid_not_dead(server: Running, smtp: Capture,
                                                                             clock: FixedClock) -> None:
    """verify() with a challenge loaded before the code was used (two tabs, a resubmitted form):
    the second right entry is INVALID (used meanwhile), not DEAD (out of tries). Kills the
    mutants of the used/replaced test after the guarded UPDATE lost, and `Verdict(None)`."""
    issued, _ = await login_code(server, smtp, clock)
    stale = await load(server, issued.challenge_id)
    assert (await verify(server, stale, issued.code, clock.now())).status is Outcome.VERIFIED
    assert (await verify(server, stale, issued.code, clock.now())).status is Outcome.INVALID


async def test_a_code_asked_for_inside_the_cooldown_says_how_long_is_left(server: Running, smtp: Capture,
                                                                           clock: FixedClock) -> None:
    """issue() inside the resend cooldown raises Cooldown with the seconds really left, which
    the 429 answer's Retry-After and the countdown show (kills cooldown_left reading no time)."""
    issued, cid = await login_code(server, smtp, clock)
    svc = server.services
    clock.advance(20)
    assert await otp.cooldown_left(svc.db, customer_id=cid, policy=svc.policy, now=clock.now()) == 40
    with pytest.raises(otp.Cooldown) as refused:
        await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=cid,
                        purpose=Purpose.LOGIN, nonce="tab-2", sent_to="jane@example.com")
    assert refused.value.retry_after == 40


async def test_a_form_sent_twice_finds_the_step_bound_to_its_own_session_only(server: Running, smtp: Capture,
                                                                              clock: FixedClock) -> None:
    """open_bound(): the open code bound to this nonce, for this purpose, until it expires;
    nothing for another session or purpose (kills every mutant of its lookup)."""
    issued, cid = await login_code(server, smtp, clock)
    svc = server.services

    async def bound(nonce: str = "tab-1", purpose: Purpose = Purpose.LOGIN, now: datetime | None = None) -> int | None:
        return await otp.open_bound(svc.db, keys=svc.keys, customer_id=cid, purpose=purpose, nonce=nonce,
                                    now=now or clock.now())

    assert await bound() == issued.challenge_id
    assert await bound(nonce="tab-2") is None
    assert await bound(purpose=Purpose.REGISTRATION) is None
    assert await bound(now=issued.expires_at) is None


async def test_new_details_and_a_new_session_reach_the_open_step(server: Running, smtp: Capture,
                                                                 clock: FixedClock) -> None:
    """set_claim() replaces the details a step applies at its code; rebind_open() hands the open
    code to another session with that session's details (kills their dropped arguments)."""
    issued, cid = await login_code(server, smtp, clock)
    svc = server.services
    await otp.set_claim(svc.db, issued.challenge_id, "sealed-1")
    assert (await load(server, issued.challenge_id)).claim == "sealed-1"
    rebound = await otp.rebind_open(svc.db, keys=svc.keys, customer_id=cid, purpose=Purpose.LOGIN, nonce="tab-2",
                                    now=clock.now(), claim="sealed-2")
    assert rebound == issued.challenge_id
    assert (await load(server, issued.challenge_id, "tab-2")).claim == "sealed-2"
    assert await otp.load_challenge(svc.db, keys=svc.keys, challenge_id=issued.challenge_id, nonce="tab-1") is None


@dataclass(frozen=True)
class Carried:
    failures: int
    lockouts: int
    locked_until: datetime | None


async def test_a_decoy_starts_from_the_ledger_it_carries(server: Running, clock: FixedClock) -> None:
    """stand_in(carry=...): a new decoy for the same address keeps the failures, lockouts and
    lock of the last one, so starting again is no way round a lock (kills each dropped field)."""
    svc, now = server.services, clock.now()

    async def decoy(nonce: str, carry: Carried) -> otp.Challenge:
        challenge_id = await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=None,
                                          purpose=Purpose.REGISTRATION, nonce=nonce, sent_to="taken@example.com",
                                          kind=Kind.DECOY, carry=carry, claim="sealed")
        return await load(server, challenge_id, nonce)

    locked = await decoy("tab-1", Carried(0, 2, now + timedelta(seconds=900)))
    assert locked.claim == "sealed"
    verdict = await verify(server, locked, "123456", now)
    assert verdict.status is Outcome.LOCKED and verdict.locked_until == now + timedelta(seconds=900)

    one_left = await decoy("tab-2", Carried(4, 1, None))
    verdict = await verify(server, one_left, "123456", now)
    # the fifth failure locks it, for the second step of the schedule (one lockout before)
    assert verdict.status is Outcome.LOCKED and verdict.locked_until == now + timedelta(seconds=300)


async def test_the_newest_decoy_of_an_address_is_found_for_as_long_as_a_lock_lasts(server: Running,
                                                                                   clock: FixedClock) -> None:
    """latest_decoy(): the newest decoy for this address and purpose, created within the longest
    lockout plus the login TTL (3600 + 600 s); none for another address or purpose, none older
    (kills every mutant of its window and lookup)."""
    svc, start = server.services, clock.now()
    await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=start, customer_id=None,
                       purpose=Purpose.REGISTRATION, nonce="tab-1", sent_to="taken@example.com", kind=Kind.DECOY,
                       carry=Carried(3, 1, None))

    async def latest(at: float, sent_to: str = "taken@example.com",
                     purpose: Purpose = Purpose.REGISTRATION) -> otp.Ledger | None:
        return await otp.latest_decoy(svc.db, purpose=purpose, sent_to=sent_to, now=start + timedelta(seconds=at),
                                      policy=svc.policy)

    found = await latest(4199)
    assert found is not None and (found.failures, found.lockouts) == (3, 1)
    assert await latest(4200) is None
    assert await latest(10, sent_to="other@example.com") is None
    assert await latest(10, purpose=Purpose.LOGIN) is None


# --- app/otp/cleanup.py ------------------------------------------------------------------


def stats_rows(rows: list[sa.Row]) -> dict[tuple[str, str], tuple[int, int]]:
    return {(r.purpose, r.outcome): (r.codes, r.attempts) for r in rows}


async def test_cleanup_keeps_finished_codes_for_the_grace_hour(server: Running, smtp: Capture,
                                                               clock: FixedClock) -> None:
    """A code is deleted only an hour after it expired (kills `now + GRACE`)."""
    async with server.client() as c:
        await registered(c, smtp)
    db = server.services.db
    clock.advance(900 + 3599)
    assert await cleanup(db, now=clock.now()) == 0
    assert await db.fetch_val(sa.select(sa.func.count()).select_from(otp_verification)) == 1
    clock.advance(1)
    assert await cleanup(db, now=clock.now()) == 1


async def test_cleanup_counts_codes_and_attempts_and_adds_to_earlier_runs(server: Running, smtp: Capture,
                                                                          clock: FixedClock) -> None:
    """otp_stats per day, purpose and outcome: codes and attempts summed over the codes of one
    run, and added to the row an earlier run left. Kills the counting mutants, the ones that
    break the UPDATE of an existing row, and the ones that pad a one-id DELETE wrongly."""
    db = server.services.db
    async with server.client() as c:
        await register(c)
        code = code_in((await wait_mail(smtp, "jane@example.com"))[-1])
        await submit_code(c, other_than(code))
        assert (await submit_code(c, code)).headers.get("location") == "/dashboard"
    async with server.client() as c:
        await registered(c, smtp, username="bob", email="bob@example.com", name="Bob Roe")
    clock.advance(2 * 3600)
    assert await cleanup(db, now=clock.now()) == 2
    assert stats_rows(await db.fetch_all(sa.select(otp_stats))) == {("registration", "verified"): (2, 3)}

    async with server.client() as c:
        await registered(c, smtp, username="carol", email="carol@example.com", name="Carol Poe")
    clock.advance(2 * 3600)  # still the same day
    assert await cleanup(db, now=clock.now()) == 1
    assert stats_rows(await db.fetch_all(sa.select(otp_stats))) == {("registration", "verified"): (3, 4)}


async def test_cleanup_counts_a_code_that_expired_after_a_stand_in(server: Running, smtp: Capture,
                                                                   clock: FixedClock) -> None:
    """Stand-ins are skipped in the counts, not the end of them (kills `continue` -> `break`)."""
    svc = server.services
    await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=None,
                       purpose=Purpose.LOGIN, nonce="tab-0", sent_to="nobody@example.com", kind=Kind.DECOY)
    clock.advance(1)
    async with server.client() as c:
        await registered(c, smtp)  # expires after the decoy (a longer TTL, and later)
    clock.advance(3 * 3600)
    assert await cleanup(svc.db, now=clock.now()) == 2
    assert stats_rows(await svc.db.fetch_all(sa.select(otp_stats))) == {("registration", "verified"): (1, 1)}


async def test_cleanup_goes_on_past_a_full_batch(server: Running, clock: FixedClock) -> None:
    """More finished rows than one batch: all of them go, and the count returned is all of them
    (kills `deleted = n` and `n <= BATCH`, which stopped after a full batch)."""
    svc = server.services
    async with svc.db.transaction():
        for i in range(BATCH + 1):
            await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=None,
                               purpose=Purpose.LOGIN, nonce=f"tab-{i}", sent_to="nobody@example.com",
                               kind=Kind.PLACEHOLDER)
    clock.advance(3 * 3600)
    assert await cleanup(svc.db, now=clock.now()) == BATCH + 1
    assert await svc.db.fetch_val(sa.select(sa.func.count()).select_from(otp_verification)) == 0


# --- app/security/passwords.py -----------------------------------------------------------


async def test_a_werkzeug_hash_without_its_separators_matches_nothing() -> None:
    """A damaged legacy hash (no `$salt$hash`) refuses every password (kills `return True`)."""
    for stored in ("pbkdf2:sha256:1000", "pbkdf2:sha256:1000$onlysalt", "scrypt:32768:8:1"):
        assert await check_password(stored, "anything") == (False, False)


async def test_a_werkzeug_pbkdf2_hash_without_iterations_uses_600000() -> None:
    """`pbkdf2:sha256$salt$hash` (Werkzeug's form without a count) verifies with Werkzeug's
    default of 600000 iterations, and asks for a re-hash (kills `len(parts) in (3, 3)`)."""
    digest = hashlib.pbkdf2_hmac("sha256", b"Blue-Harbor-Lamp-42", b"NaCl", 600000).hex()
    assert await check_password(f"pbkdf2:sha256$NaCl${digest}", "Blue-Harbor-Lamp-42") == (True, True)
    assert await check_password(f"pbkdf2:sha256$NaCl${digest}", "Blue-Harbor-Lamp-43") == (False, False)

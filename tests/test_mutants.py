"""Tests that kill mutants mutmut found surviving in app/otp and app/security (tests/README.md,
"Mutation testing"). Each pins one behaviour the rest of the suite left open; the mutants it
kills are named in its docstring."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from app import otp
from app.clock import FixedClock
from app.otp import Kind, OtpPolicy, Outcome, Purpose
from app.otp.cleanup import BATCH, cleanup
from app.security.crypto import TOKEN_LETTERS, Sealer, Unreadable, letters_token, open_for_token, seal_for_token
from app.security.csrf import HOSTS_KEY
from app.security.passwords import check_password
from app.security.proxies import ProxyMiddleware, client_from_chain, is_trusted
from app.tables import customers, mail_outbox, otp_stats, otp_verification
from tests.conftest import Capture, Running, code_in, get_csrf, register, registered, submit_code, wait_mail

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


async def test_a_code_entered_at_the_second_it_expires_is_expired_and_not_counted(server: Running, smtp: Capture,
                                                                                 clock: FixedClock) -> None:
    """verify(): `expires_at <= now` is expired, answered before the entry is counted: neither
    the step's budget nor the customer's failures move (kills `<`)."""
    issued, cid = await login_code(server, smtp, clock)
    challenge = await load(server, issued.challenge_id)
    verdict = await verify(server, challenge, issued.code, issued.expires_at)
    assert verdict.status is Outcome.EXPIRED
    assert (await load(server, issued.challenge_id)).attempts == 0
    db = server.services.db
    assert await db.fetch_val(sa.select(customers.c.otp_attempts).where(customers.c.id == cid)) == 0


async def test_attempts_left_count_down_on_the_step_itself(server: Running, smtp: Capture,
                                                           clock: FixedClock) -> None:
    """The step's own budget: with the customer's failures cleared after every entry, the
    wrong entries leave 4, 3, 2, 1 attempts and the fifth ends the step (DEAD). Kills the
    mutants of `code_left = max(0, max_attempts - (attempts + 1))`."""
    issued, cid = await login_code(server, smtp, clock)
    db, wrong = server.services.db, other_than(issued.code)
    outcomes = []
    for _ in range(5):
        verdict = await verify(server, await load(server, issued.challenge_id), wrong, clock.now())
        outcomes.append((verdict.status, verdict.attempts_left))
        await db.execute(customers.update().where(customers.c.id == cid).values(otp_attempts=0))
    assert outcomes == [(Outcome.WRONG, 4), (Outcome.WRONG, 3), (Outcome.WRONG, 2), (Outcome.WRONG, 1),
                        (Outcome.DEAD, 0)]


async def test_every_step_has_a_three_character_tag_without_look_alikes(server: Running, smtp: Capture,
                                                                        clock: FixedClock) -> None:
    """The tag beside the code field and in the mail: three characters of TAG_ALPHABET (kills
    the mutants of new_tag())."""
    issued, _ = await login_code(server, smtp, clock)
    assert len(issued.tag) == 3 and set(issued.tag) <= set(otp.engine.TAG_ALPHABET)
    assert (await load(server, issued.challenge_id)).tag == issued.tag


async def test_a_sign_in_paused_past_a_lock_shows_the_pause(server: Running, smtp: Capture,
                                                            clock: FixedClock) -> None:
    """load_challenge(): a sign-in step of a customer both locked (60 s) and paused by "Not
    you?" (15 min) is locked until the later of the two (kills the mutants of _later())."""
    issued, cid = await login_code(server, smtp, clock)
    start, wrong = clock.now(), other_than(issued.code)
    for _ in range(5):
        await verify(server, await load(server, issued.challenge_id), wrong, start)
    assert (await load(server, issued.challenge_id)).locked_until == start + timedelta(seconds=60)
    await otp.pause_sign_in(server.services.db, customer_id=cid, now=start, until=start + timedelta(seconds=900))
    paused = await load(server, issued.challenge_id)
    assert paused.locked_until == start + timedelta(seconds=900)
    assert paused.invalidated_at == start  # "Not you?" ends the pending steps too


async def test_a_decoy_shows_the_state_of_the_mail_it_is_given(server: Running, smtp: Capture,
                                                              clock: FixedClock) -> None:
    """stand_in(mail_id=...): the step shows the delivery state of that earlier mail, as a real
    code's step shows its own (kills `mail_id=None`)."""
    async with server.client() as c:
        await registered(c, smtp)
    svc = server.services
    mail = await svc.db.fetch_one(sa.select(mail_outbox.c.id, mail_outbox.c.status))
    assert mail is not None
    decoy = await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=None,
                               purpose=Purpose.REGISTRATION, nonce="tab-9", sent_to="jane@example.com",
                               kind=Kind.DECOY, mail_id=mail.id)
    assert (await load(server, decoy, "tab-9")).delivery == mail.status


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


async def test_a_right_code_sent_again_from_a_stale_page_is_refused(server: Running, smtp: Capture,
                                                                    clock: FixedClock) -> None:
    """verify() with a step loaded before its code was used (two tabs, a resubmitted form): the
    second right entry is refused, and the step stays used once (tests/README.md: on this
    code it answers DEAD, not INVALID)."""
    issued, _ = await login_code(server, smtp, clock)
    stale = await load(server, issued.challenge_id)
    assert (await verify(server, stale, issued.code, clock.now())).status is Outcome.VERIFIED
    used_at = (await load(server, issued.challenge_id)).used_at
    assert (await verify(server, stale, issued.code, clock.now())).status in (Outcome.INVALID, Outcome.DEAD)
    assert (await load(server, issued.challenge_id)).used_at == used_at


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


async def test_the_resend_countdown_runs_from_the_right_mail(server: Running, smtp: Capture,
                                                           clock: FixedClock) -> None:
    """Challenge.resend_wait(): a placeholder counts from the customer's last code (the real
    cooldown), a decoy from its own answer, whatever the customer's last code was (kills the
    mutants of its condition, and load_challenge() dropping `last_sent_at`)."""
    issued, cid = await login_code(server, smtp, clock)
    svc, sent = server.services, clock.now()
    clock.advance(20)
    ids = {kind: await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=cid,
                                    purpose=Purpose.LOGIN, nonce=f"tab-{kind}", sent_to="jane@example.com", kind=kind)
           for kind in (Kind.PLACEHOLDER, Kind.DECOY)}
    clock.advance(10)
    placeholder = await load(server, ids[Kind.PLACEHOLDER], f"tab-{Kind.PLACEHOLDER}")
    decoy = await load(server, ids[Kind.DECOY], f"tab-{Kind.DECOY}")
    assert placeholder.last_sent_at == decoy.last_sent_at == sent
    assert placeholder.resend_wait(svc.policy, clock.now()) == 30
    assert decoy.resend_wait(svc.policy, clock.now()) == 50


async def test_no_cooldown_is_left_after_a_right_code(server: Running, smtp: Capture, clock: FixedClock) -> None:
    """A right code ends the resend cooldown: cooldown_left() is 0 for a customer with no code
    pending (kills `_left()` answering 1 for "never sent")."""
    async with server.client() as c:
        await registered(c, smtp)
    svc = server.services
    assert await otp.cooldown_left(svc.db, customer_id=await jane_id(server), policy=svc.policy, now=clock.now()) == 0


async def test_an_older_code_of_a_step_expires_on_its_own_and_says_so(server: Running, smtp: Capture,
                                                                      clock: FixedClock) -> None:
    """A resend adds a code to the step (with the resend's details); the first code still
    expires at its own time, and entering it then says EXPIRED, not INVALID (kills
    `EXPIRED if ... and False`, and the resend dropping its claim)."""
    first, cid = await login_code(server, smtp, clock)
    svc = server.services
    clock.advance(61)
    step = await load(server, first.challenge_id)
    second = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=cid,
                             purpose=Purpose.LOGIN, nonce="tab-1", sent_to="jane@example.com", challenge=step,
                             claim="sealed-2")
    assert second.challenge_id == first.challenge_id
    assert (await load(server, first.challenge_id)).claim == "sealed-2"  # the resend's details win
    clock.advance(600 - 61 + 1)  # the first code expired a second ago, the second has 60 s left
    verdict = await verify(server, await load(server, first.challenge_id), first.code, clock.now())
    assert verdict.status is Outcome.EXPIRED


async def test_attempts_left_count_the_customers_failures_across_steps(server: Running, smtp: Capture,
                                                                        clock: FixedClock) -> None:
    """Failures follow the customer, not the step: after 3 wrong entries on one step, a new
    step has 1 attempt left after its first wrong entry (kills `max_attempts + failures`)."""
    first, cid = await login_code(server, smtp, clock)
    svc, wrong = server.services, other_than(first.code)
    for _ in range(3):
        await verify(server, await load(server, first.challenge_id), wrong, clock.now())
    clock.advance(61)
    second = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=cid,
                             purpose=Purpose.LOGIN, nonce="tab-2", sent_to="jane@example.com")
    verdict = await verify(server, await load(server, second.challenge_id, "tab-2"), other_than(second.code),
                           clock.now())
    assert (verdict.status, verdict.attempts_left) == (Outcome.WRONG, 1)


def address_ledger(server: Running, purpose: Purpose, address: str = "jane@example.com") -> str:
    return otp.ledger_key(server.services.keys.address, purpose, address)


async def test_an_unproven_code_goes_out_inside_the_cooldown_and_ends_no_other_step(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """issue(ledger=...) (a step nobody proved a secret for: the caller limits its mail per
    address) neither waits for nor takes the customer's cooldown, and leaves their other steps
    open (kills `if ledger is None or True` and the dropped `else`)."""
    first, cid = await login_code(server, smtp, clock)
    svc = server.services
    clock.advance(5)
    again = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=cid,
                            purpose=Purpose.RESET, nonce="tab-2", sent_to="jane@example.com",
                            ledger=address_ledger(server, Purpose.RESET))
    step = await load(server, again.challenge_id, "tab-2")
    assert step.real and not step.proven
    assert (await load(server, first.challenge_id)).invalidated_at is None


async def test_a_paused_sign_in_leaves_a_password_reset_open(server: Running, smtp: Capture,
                                                             clock: FixedClock) -> None:
    """"Not you?" pauses sign-in codes only: a reset step of the same customer is not locked by
    the pause (kills the pause applying to every purpose)."""
    _, cid = await login_code(server, smtp, clock)
    svc = server.services
    await otp.pause_sign_in(svc.db, customer_id=cid, now=clock.now(), until=clock.now() + timedelta(seconds=900))
    reset = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=cid,
                            purpose=Purpose.RESET, nonce="tab-3", sent_to="jane@example.com",
                            ledger=address_ledger(server, Purpose.RESET))
    step = await load(server, reset.challenge_id, "tab-3")
    assert step.locked_until is None
    assert (await verify(server, step, reset.code, clock.now())).status is Outcome.VERIFIED


async def test_a_step_carries_the_customers_session_version(server: Running, smtp: Capture,
                                                            clock: FixedClock) -> None:
    """load_challenge(): the step has the customer's current session version, which the session
    its code starts is created with; after a sign-out everywhere (version bumped) that session
    must not be born stale (kills `session_version` dropped or `and 0`)."""
    issued, cid = await login_code(server, smtp, clock)
    db = server.services.db
    await db.execute(customers.update().where(customers.c.id == cid).values(session_version=3))
    assert (await load(server, issued.challenge_id)).session_version == 3


async def test_a_step_keeps_its_three_newest_codes(server: Running, smtp: Capture, clock: FixedClock) -> None:
    """A fourth code for one step pushes out the oldest only: the second code still works
    (kills `older[CODES_KEPT - 2:]`)."""
    first, cid = await login_code(server, smtp, clock)
    svc, codes = server.services, [first]
    for _ in range(3):
        clock.advance(61)
        step = await load(server, first.challenge_id)
        codes.append(await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now(), customer_id=cid,
                                     purpose=Purpose.LOGIN, nonce="tab-1", sent_to="jane@example.com",
                                     challenge=step))
    assert (await verify(server, await load(server, first.challenge_id), codes[0].code, clock.now())).status \
        is Outcome.INVALID
    assert (await verify(server, await load(server, first.challenge_id), codes[1].code, clock.now())).status \
        is Outcome.VERIFIED


async def test_the_mail_links_of_a_code_lead_back_to_it(server: Running, smtp: Capture, clock: FixedClock) -> None:
    """issue(): the mail's link finds the step and opens the code sealed under it; the "Not
    you?" link finds the customer (kills the mutants that drop the link or stop token, their
    hashes, or the sealed code)."""
    issued, cid = await login_code(server, smtp, clock)
    db = server.services.db
    link = await otp.find_link(db, token_value=issued.link_token, now=clock.now())
    assert link is not None and link.works and link.challenge_id == issued.challenge_id and link.tag == issued.tag
    assert open_for_token(issued.link_token, link.sealed) == issued.code
    assert await otp.customer_of_stop_token(db, issued.stop_token) == cid
    assert await otp.find_link(db, token_value=issued.stop_token, now=clock.now()) is None


async def test_every_unproven_step_of_an_address_shares_its_ledger(server: Running, clock: FixedClock) -> None:
    """stand_in(ledger=...): failures on one step of an address count for the next, whichever
    session asks, so starting again is no way round a lock (kills a dropped ledger key, or the
    stand-in counting on its own)."""
    svc, now = server.services, clock.now()
    key = address_ledger(server, Purpose.REGISTRATION, "taken@example.com")

    async def decoy(nonce: str) -> otp.Challenge:
        challenge_id = await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=None,
                                          purpose=Purpose.REGISTRATION, nonce=nonce, sent_to="taken@example.com",
                                          kind=Kind.DECOY, claim="sealed", ledger=key)
        return await load(server, challenge_id, nonce)

    first = await decoy("tab-1")
    assert first.claim == "sealed" and not first.proven and first.ledger_key == key
    for _ in range(4):
        assert (await verify(server, first, "123456", now)).status is Outcome.WRONG
    second = await decoy("tab-2")
    verdict = await verify(server, second, "123456", now)
    assert verdict.status is Outcome.LOCKED and verdict.locked_until == now + timedelta(seconds=60)
    third = await decoy("tab-3")
    assert third.locked_until == now + timedelta(seconds=60)
    assert (await verify(server, third, "123456", now)).status is Outcome.LOCKED


async def test_an_address_ledger_is_one_per_purpose_and_address_however_typed(server: Running) -> None:
    """ledger_key(): case and surrounding spaces do not make another ledger; another purpose
    or address does."""
    key = server.services.keys.address
    base = otp.ledger_key(key, Purpose.RESET, "jane@example.com")
    assert otp.ledger_key(key, Purpose.RESET, " Jane@Example.COM ") == base
    assert otp.ledger_key(key, Purpose.REGISTRATION, "jane@example.com") != base
    assert otp.ledger_key(key, Purpose.RESET, "jan@example.com") != base
    assert len(base) == 64


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
    """A damaged legacy hash (no `$salt$hash`, or a method with the wrong number of fields)
    refuses every password (kills both `return False` -> `return True`)."""
    for stored in ("pbkdf2:sha256:1000", "pbkdf2:sha256:1000$onlysalt", "scrypt:32768:8:1",
                   "pbkdf2:sha256:1000:9$salt$00", "scrypt:32768:8$salt$00"):
        assert await check_password(stored, "anything") == (False, False)


async def test_a_werkzeug_pbkdf2_hash_without_iterations_uses_600000() -> None:
    """`pbkdf2:sha256$salt$hash` (Werkzeug's form without a count) verifies with Werkzeug's
    default of 600000 iterations, and asks for a re-hash (kills `len(parts) in (3, 3)`)."""
    digest = hashlib.pbkdf2_hmac("sha256", b"Blue-Harbor-Lamp-42", b"NaCl", 600000).hex()
    assert await check_password(f"pbkdf2:sha256$NaCl${digest}", "Blue-Harbor-Lamp-42") == (True, True)
    assert await check_password(f"pbkdf2:sha256$NaCl${digest}", "Blue-Harbor-Lamp-43") == (False, False)


async def test_werkzeug_scrypt_hashes_use_their_own_parameters() -> None:
    """`scrypt:n:r:p$salt$hash` verifies with its own n, r and p, not Werkzeug's defaults (kills
    the mutants that pick the defaults for a four-field method)."""
    password = "Blue-Harbor-Lamp-42"
    own = hashlib.scrypt(password.encode(), salt=b"NaCl", n=2**14, r=8, p=1, maxmem=132 * 2**14 * 8).hex()
    assert await check_password(f"scrypt:16384:8:1$NaCl${own}", password) == (True, True)
    assert await check_password(f"scrypt:16384:8:1$NaCl${own}", "Blue-Harbor-Lamp-43") == (False, False)


# --- app/security/crypto.py --------------------------------------------------------------


def test_a_sealed_value_opens_only_as_it_was_sealed() -> None:
    """Sealer.open(): a stray character in the text is Unreadable, not skipped (kills
    `validate=False`); a blob too short for nonce and tag is Unreadable, never a ValueError
    from AES-GCM (kills `len(blob) < 12 - 16`)."""
    sealer = Sealer.for_purpose("k" * 40, [], "mutants")
    sealed = sealer.seal({"email": "jane@example.com"})
    assert sealer.open(sealed) == {"email": "jane@example.com"}
    with pytest.raises(Unreadable):
        sealer.open(sealed[:8] + "*" + sealed[8:])
    with pytest.raises(Unreadable):
        sealer.open(base64.b64encode(b"short").decode())


def test_a_value_sealed_before_a_key_rotation_still_opens() -> None:
    """Sealer: SECRET_KEY moved to SECRET_KEY_FALLBACKS, what the old key sealed opens with the
    new ring (the next key is tried after a failed one: kills `continue` -> `break`)."""
    old = Sealer.for_purpose("old-" + "k" * 40, [], "mutants").seal({"n": 1})
    assert Sealer.for_purpose("new-" + "k" * 40, ["old-" + "k" * 40], "mutants").open(old) == {"n": 1}
    with pytest.raises(Unreadable):
        Sealer.for_purpose("new-" + "k" * 40, [], "mutants").open(old)


def test_a_link_token_is_letters_only_and_opens_only_what_was_sealed_under_it() -> None:
    """letters_token(): 24 characters, letters only (no digit run to mistake for the code);
    seal_for_token()/open_for_token(): the code sealed under one token opens with that token
    only (kills the mutants of the token's length, the key label, the nonce and the AAD)."""
    link = letters_token()
    assert len(link) == 24 and link.isalpha() and set(link) <= set(TOKEN_LETTERS)
    sealed = seal_for_token(link, "042917")
    assert open_for_token(link, sealed) == "042917"
    assert open_for_token(letters_token(), sealed) is None


# --- app/security/proxies.py -------------------------------------------------------------

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def test_the_forwarded_chain_is_walked_hop_by_hop_and_stops_at_the_first_stranger() -> None:
    """client_from_chain(): hops are split on commas (spaces optional); the walk stops at the
    first hop that is not a trusted proxy, or at one that is not an address, and answers the
    last address it trusted its way to (kills the split mutants and `break` -> `return`)."""
    proxies = (*LOOPBACK, ipaddress.ip_network("10.0.0.0/8"))
    assert client_from_chain("127.0.0.1", "203.0.113.7,198.51.100.2", proxies) == "198.51.100.2"
    assert client_from_chain("127.0.0.1", "198.51.100.2, 203.0.113.7", proxies) == "203.0.113.7"
    assert client_from_chain("127.0.0.1", "203.0.113.7, 10.0.0.5", proxies) == "203.0.113.7"
    assert client_from_chain("127.0.0.1", "not-an-address", proxies) == "127.0.0.1"


async def through_proxy_middleware(client: tuple[str, int], headers: dict[str, str], *, require_https: bool = False,
                                   query: bytes | None = b"") -> tuple[dict[str, object], list[dict[str, object]]]:
    """One request through ProxyMiddleware (trusting 127.0.0.0/8): the scope the app saw, and
    what was sent back."""
    seen: dict[str, object] = {}
    sent: list[dict[str, object]] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        seen.update(scope)

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope: dict[str, object] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/login", "raw_path": b"/login", "root_path": "", "client": client, "server": ("127.0.0.1", 8000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    if query is not None:
        scope["query_string"] = query
    middleware = ProxyMiddleware(app, trusted=LOOPBACK, public_origin="https://shop.example",  # type: ignore[arg-type]
                                 require_https=require_https)
    await middleware(scope, receive, send)  # type: ignore[arg-type]
    return seen, sent


async def test_a_peer_that_is_not_an_ip_address_is_never_a_trusted_proxy() -> None:
    """is_trusted(): a peer that is no address (a Unix socket's name) is not trusted, so its
    X-Forwarded-Proto and X-Forwarded-Host are not believed (kills `return True`)."""
    assert not is_trusted("unix:/run/shop.sock", LOOPBACK)
    seen, _ = await through_proxy_middleware(("unix:/run/shop.sock", 0), {
        "host": "shop.example", "x-forwarded-proto": "https", "x-forwarded-host": "evil.example",
        "x-forwarded-for": "203.0.113.7"})
    assert seen["scheme"] == "http" and seen["client"] == ("unix:/run/shop.sock", 0)
    assert "evil.example" not in seen[HOSTS_KEY]  # type: ignore[operator]


async def test_the_https_redirect_of_a_request_without_a_query_string() -> None:
    """A plain-HTTP request in production goes to the same path on PUBLIC_ORIGIN, with no `?`
    when the request had no query (the ASGI `query_string` key is optional: kills the mutants of
    its default)."""
    for query in (None, b""):
        _, sent = await through_proxy_middleware(("203.0.113.7", 5000), {"host": "shop.example"},
                                                 require_https=True, query=query)
        assert sent[0]["status"] == 308
        assert (b"location", b"https://shop.example/login") in sent[0]["headers"]  # type: ignore[operator]
    _, sent = await through_proxy_middleware(("203.0.113.7", 5000), {"host": "shop.example"}, require_https=True,
                                             query=b"next=%2Fdashboard")
    assert (b"location", b"https://shop.example/login?next=%2Fdashboard") in sent[0]["headers"]  # type: ignore[operator]


# --- app/security/csrf.py ----------------------------------------------------------------


async def test_csrf_accepts_what_a_browser_sends_and_refuses_a_malformed_origin(server: Running) -> None:
    """same_origin()/_token_matches(): a typed URL or bookmark (`Sec-Fetch-Site: none`) and a
    multipart form with the token are this site's; an Origin without a scheme is refused, never
    a 500; a POST with no Content-Type is read without crashing (kills the mutants of those
    strings and of the Content-Type default, and `origin == "null" and ...`)."""
    async with server.client() as c:
        token = await get_csrf(c, "/login")
        fields = {"csrf_token": token, "login": "nobody", "password": "Not-The-Password-7"}
        typed = await c.post("/login", data=fields, headers={"sec-fetch-site": "none"})
        assert typed.status_code not in (403, 500)
        multipart = await c.post("/login", data=fields, files={"note": ("note.txt", b"x", "text/plain")})
        assert multipart.request.headers["content-type"].startswith("multipart/form-data")
        assert multipart.status_code not in (403, 500)
        schemeless = await c.post("/login", data=fields, headers={"origin": "testserver"})
        assert schemeless.status_code == 403
        bare = await c.post("/login", headers={"x-csrf-token": token})
        assert "content-type" not in bare.request.headers and bare.status_code not in (403, 500)


# --- app/security/headers.py -------------------------------------------------------------


async def test_static_files_and_development_get_only_their_own_headers(client: object) -> None:
    """SecurityHeadersMiddleware: outside production there is no HSTS (kills `production or
    True`); a static file gets the security headers but not a page's `no-store` and
    `Vary: HX-Request` (kills the mutants of the `/static/` test)."""
    page = await client.get("/login")  # type: ignore[attr-defined]
    assert "strict-transport-security" not in page.headers
    assert page.headers["cache-control"] == "no-store" and "HX-Request" in page.headers["vary"]
    static = await client.get("/static/app.css")  # type: ignore[attr-defined]
    assert static.status_code == 200 and static.headers["x-content-type-options"] == "nosniff"
    assert static.headers.get("cache-control") != "no-store" and "HX-Request" not in static.headers.get("vary", "")

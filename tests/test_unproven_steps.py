"""Steps nobody proved a secret for (a registration form, forgot password) keep to themselves,
and answer alike whatever stands behind the address (SECURITY.md 6, 7, 14, 33): the findings of
the security review of issues 14-16, each test failing on the code before its fix."""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
import pytest
import sqlalchemy as sa

from app import otp
from app.audit import Event
from app.clock import FixedClock
from app.logs import RedactFilter
from app.mail import outbox
from app.mail.outbox import MailStatus
from app.otp import engine
from app.otp.engine import Purpose
from app.security.crypto import Sealer, Unreadable, derive_key, keyed_hash, sha256_hex
from app.settings import Settings
from app.tables import auth_events, customers, mail_outbox, mail_throttle, otp_verification
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
    wait_mail,
    with_,
)

pytestmark = pytest.mark.anyio
SCRUB = re.compile(r'class="tag">\w{3}<|[A-Za-z0-9_-]{43}|datetime="[^"]+"|[a-z0-9.]+@example\.com|'
                   r'data-countdown="\d+"|<span data-seconds>\d+</span>|wait \d+ seconds')


def scrub(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, SCRUB.sub("", r.text)


async def forgot(client: httpx.AsyncClient, email: str) -> httpx.Response:
    token = await get_csrf(client, "/password/forgot")
    return await client.post("/password/forgot", data={"csrf_token": token, "email": email},
                             headers={"HX-Request": "true"})


async def change_address(client: httpx.AsyncClient, email: str) -> httpx.Response:
    token = await get_csrf(client, "/register/email")
    return await client.post("/register/email", data={"csrf_token": token, "email": email})


# --- a stranger cannot lock out, hold up or take over the owner's steps ------------------------


async def test_wrong_registration_codes_for_a_confirmed_address_never_lock_its_owner(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(3600)
    async with server.client() as stranger:
        await register(stranger, username="mallory", email="jane@example.com")
        for _ in range(5):
            await submit_code(stranger, "000001")
    row = await server.services.db.fetch_one(sa.select(customers))
    assert row.otp_attempts == 0 and row.otp_locked_until is None


async def test_a_second_registration_inside_a_minute_takes_no_step_and_answers_alike(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """Browser A registers an address, browser B the same address within a minute: A's step goes
    on working, B gets a step of its own and no mail, and B sees the same whether the address
    is a sign-up nobody confirmed yet or a confirmed account."""
    async with server.client() as c:
        await registered(c, smtp, email="kim@example.com", username="kim")
    clock.advance(3600)
    seen = {}
    for email, sent_before in (("kim@example.com", 1), ("lee@example.com", 0)):
        async with server.client() as a, server.client() as b:
            if email == "lee@example.com":
                await register(a, username="lee", email=email)  # an unconfirmed sign-up
                code = code_in((await wait_mail(smtp, email))[0])
            else:
                await forgot(a, email)  # anything that mails the address inside the minute
                await wait_mail(smtp, email, 2)
            r = await register(b, username=f"other{sent_before}", email=email, htmx=True)
            page = await b.get("/verify")
            assert "did not send another code" not in page.text and "for something else" not in page.text
            seen[email] = (scrub(r), scrub(page))
            if email == "lee@example.com":
                assert (await submit_code(a, code)).headers["location"] == "/dashboard", "A's step still works"
    assert seen["kim@example.com"] == seen["lee@example.com"]
    await asyncio.sleep(0.3)
    assert len(smtp.to("lee@example.com")) == 1 and len(smtp.to("kim@example.com")) == 2


async def test_an_address_change_is_limited_alike_for_every_address(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(3600)
    answers = {}
    for email in ("jane@example.com", "fresh@example.com"):
        async with server.client() as c:
            await register(c, username="probe" + email[0], email=email)
            first = await change_address(c, f"second.{email}")
            second = await change_address(c, f"third.{email}")
            answers[email] = (first.status_code, second.status_code)
    assert answers["jane@example.com"] == answers["fresh@example.com"] == (303, 422)


async def test_failures_of_one_address_look_the_same_whether_or_not_it_has_an_account(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """Five wrong registration codes for an address, then a reset for it: the reset step looks
    the same for a confirmed account and for a fresh sign-up (each purpose has its own ledger)."""
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(3600)
    pages = {}
    for email in ("jane@example.com", "fresh@example.com"):
        async with server.client() as c:
            await register(c, username="probe" + email[0], email=email)
            for _ in range(5):
                await submit_code(c, "000001")
        clock.advance(61)
        async with server.client() as c:
            await forgot(c, email)
            pages[email] = scrub(await c.get("/verify"))
    assert pages["jane@example.com"] == pages["fresh@example.com"]
    assert "codes are paused" not in pages["jane@example.com"][1]


async def test_a_new_address_for_a_signed_in_customer_takes_their_cooldown_either_way(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """A change to an address of another account starts the customer's cooldown as a real one
    does: the next change within the minute shows a placeholder either way."""
    async with server.client() as owner:
        await registered(owner, smtp, email="taken@example.com", username="taken")
    pages = {}
    for who, first in (("jane", "taken@example.com"), ("bob", "free@example.com")):
        clock.advance(61)
        async with server.client() as c:
            await registered(c, smtp, email=f"{who}@example.com", username=who)
            clock.advance(61)
            for target in (first, f"{who}.other@example.com"):
                token = await get_csrf(c, "/account")
                await c.post("/account/email", data={"csrf_token": token, "new_email": target, "password": PASSWORD})
            pages[who] = scrub(await c.get("/verify"))
    assert pages["jane"] == pages["bob"] and "at most one code a minute" in pages["jane"][1]


async def test_a_registration_step_moves_only_the_sign_up_it_made(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """Someone who registers a victim's pending address cannot move the victim's sign-up to an
    address of their own: their change registers their own details there instead."""
    db = server.services.db
    async with server.client() as victim:
        await register(victim, username="victim", email="v@example.com")
        await wait_mail(smtp, "v@example.com")
    clock.advance(61)
    async with server.client() as attacker:
        await register(attacker, username="attacker", email="v@example.com")
        assert (await change_address(attacker, "a@example.com")).headers["location"] == "/verify"
        code = code_in((await wait_mail(smtp, "a@example.com"))[0])
        assert (await submit_code(attacker, code)).headers["location"] == "/dashboard"
    rows = {r.username: r.email for r in await db.fetch_all(sa.select(customers))}
    assert rows == {"victim": "v@example.com", "attacker": "a@example.com"}


async def test_a_claim_never_applies_to_a_confirmed_account(server: Running, smtp: Capture,
                                                            clock: FixedClock) -> None:
    """A registration step that would take over a sign-up signs nobody in once that sign-up
    was confirmed meanwhile (its code is refused; nothing changes)."""
    db = server.services.db
    async with server.client() as owner:
        await register(owner, username="owner", email="o@example.com")
        owner_code = code_in((await wait_mail(smtp, "o@example.com"))[0])
        clock.advance(61)
        async with server.client() as other:
            await register(other, username="other", email="o@example.com")
            other_code = code_in((await wait_mail(smtp, "o@example.com", 2))[-1])
            # Confirmed between the other step's mail and its code, bypassing the step ending
            # every other open step (the race a concurrent confirmation would run).
            await db.execute(customers.update().values(email_verified_at=clock.now()))
            r = await submit_code(other, other_code)
            assert r.headers.get("location") != "/dashboard"
        row = await db.fetch_one(sa.select(customers))
        assert row.username == "owner" and row.email == "o@example.com"
        assert owner_code  # the owner's own code was never at stake here


async def test_a_resend_on_an_ended_step_sends_nothing(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as holder:
        await forgot(holder, "jane@example.com")
        await wait_mail(smtp, "jane@example.com", 2)
        clock.advance(61)
        async with server.client() as owner:  # the owner signs in: every other open step ends
            await login(owner)
            code = code_in((await wait_mail(smtp, "jane@example.com", 3))[-1])
            assert (await submit_code(owner, code)).headers["location"] == "/dashboard"
        clock.advance(61)
        token = await get_csrf(holder, "/password/forgot")
        r = await holder.post("/verify/resend", data={"csrf_token": token})
        assert r.headers.get("location") == "/login", "the step is gone"
    await asyncio.sleep(0.3)
    assert len(smtp.to("jane@example.com")) == 3


async def test_resend_and_answer_again_refuse_an_ended_step(server: Running, smtp: Capture,
                                                           clock: FixedClock) -> None:
    """The engine's own guard: no code (and no answer) for a step used or ended meanwhile."""
    svc = server.services
    async with server.client() as c:
        await registered(c, smtp)
    cid = await svc.db.fetch_val(sa.select(customers.c.id))
    issued = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now() + _minutes(2),
                             customer_id=cid, purpose=Purpose.LOGIN, nonce="n", sent_to="x")
    step = await otp.load_challenge(svc.db, keys=svc.keys, challenge_id=issued.challenge_id, nonce="n")
    assert step is not None
    await otp.end_step(svc.db, issued.challenge_id, clock.now())
    with pytest.raises(otp.StepEnded):
        await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=clock.now() + _minutes(4), customer_id=cid,
                        purpose=Purpose.LOGIN, nonce="n", sent_to="x", challenge=step)
    with pytest.raises(otp.StepEnded):
        await otp.answer_again(svc.db, policy=svc.policy, now=clock.now(), challenge=step, mail_id=None)
    codes = await svc.db.fetch_val(sa.select(sa.func.count()).select_from(engine.otp_codes)
                                   .where(engine.otp_codes.c.challenge_id == issued.challenge_id))
    assert codes == 1


def _minutes(n: int) -> object:
    from datetime import timedelta

    return timedelta(minutes=n)


async def test_a_reset_step_shows_no_delivery_state(server: Running, smtp: Capture, clock: FixedClock) -> None:
    """Only an account gets a reset mail, so its delivery (sending, failed) would tell which
    addresses have one: a reset step shows the same words whatever became of the mail."""
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(3600)
    pages = {}
    for email in ("jane@example.com", "nobody@example.com"):
        async with server.client() as c:
            await forgot(c, email)
            await server.services.mailer.drain()
            await server.services.db.execute(mail_outbox.update().values(status=MailStatus.FAILED.value))
            clock.advance(5)
            pages[email] = scrub(await c.get("/verify"))
    assert pages["jane@example.com"] == pages["nobody@example.com"]
    assert "could not deliver" not in pages["jane@example.com"][1]


# --- counting: every entry before it is compared ------------------------------------------------


async def test_the_fast_path_counts_every_entry_before_comparing(server: Running, smtp: Capture,
                                                                 clock: FixedClock) -> None:
    """SECURITY.md 6 on the password's fast path: five wrong entries spend the step, and the
    right one after them is not compared."""
    svc = server.services
    async with server.client() as c:
        await registered(c, smtp)
    cid = await svc.db.fetch_val(sa.select(customers.c.id))
    now = clock.now() + _minutes(2)
    issued = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=cid,
                             purpose=Purpose.LOGIN, nonce="n", sent_to="x")
    use = {"keys": svc.keys, "policy": svc.policy, "now": now, "challenge_id": issued.challenge_id, "nonce": "n",
           "customer_id": cid, "purpose": Purpose.LOGIN}
    wrong = "000000" if issued.code != "000000" else "111111"
    for _ in range(5):
        assert await otp.use_code(svc.db, code=wrong, **use) is otp.FastCheck.COUNTED
    assert await otp.use_code(svc.db, code=issued.code, **use) is otp.FastCheck.UNCOUNTED
    row = await svc.db.fetch_one(sa.select(otp_verification).where(otp_verification.c.id == issued.challenge_id))
    assert row.attempts == 5 and row.used_at is None


async def test_a_burst_on_the_fast_path_is_counted_and_logged_once_per_entry(
    server: Running, smtp: Capture, clock: FixedClock
) -> None:
    """Twenty concurrent wrong entries after the password: at most five are counted, and only
    those are logged as failed codes."""
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as c:
        await login(c)
        right = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
        wrong = "000000" if right != "000000" else "111111"
        token = await get_csrf(c, "/verify")
        burst = await asyncio.gather(*(c.post("/verify", data={"csrf_token": token, "code": wrong})
                                       for _ in range(20)))
        assert {r.status_code for r in burst} == {422}
        r = await submit_code(c, right)
        assert r.headers.get("location") != "/dashboard"
    db = server.services.db
    step = await db.fetch_one(sa.select(otp_verification).where(otp_verification.c.purpose == "login"))
    assert step.attempts == 5 and step.used_at is None
    failed = await db.fetch_val(sa.select(sa.func.count()).select_from(auth_events)
                                .where(auth_events.c.event == Event.CODE_FAILED.value))
    assert failed == 5


# --- timing, keys, logs, what a deleted account leaves ------------------------------------------


async def test_a_limited_account_still_pays_one_password_hash(settings: Settings, clock: FixedClock, smtp: Capture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """SECURITY.md 10 and 15: past the account's own limit the answer is the same as a wrong
    password's, after the same Argon2 work (a dummy verification)."""
    from app.auth import flows

    async with running(with_(settings, login_account_rate_limit="3/minute"), clock) as server:
        async with server.client() as c:
            await registered(c, smtp)
        await _limited_account_pays(server, monkeypatch, flows)


async def _limited_account_pays(server: Running, monkeypatch: pytest.MonkeyPatch, flows: object) -> None:
    calls: list[str | None] = []
    real = flows.check_password  # type: ignore[attr-defined]

    async def counted(stored: str | None, password: str) -> tuple[bool, bool]:
        calls.append(stored)
        return await real(stored, password)

    monkeypatch.setattr(flows, "check_password", counted)
    answers = []
    for _ in range(5):
        async with server.client() as c:
            before = len(calls)
            r = await login(c, "jane", "wrong-password-1")
            answers.append((r.status_code, "do not match" in r.text))
            assert len(calls) == before + 1, "every answer paid one hash"
    assert calls[-1] is None and calls[0] is not None, "the last ones were past the limit: a dummy hash"
    assert len(set(answers)) == 1, "answered alike"


async def test_registration_details_sealed_under_an_old_key_do_not_open(settings: Settings,
                                                                        clock: FixedClock) -> None:
    """SECURITY.md 34: an old key still opens sessions and queued mail, nothing else."""
    old = "o" * 48
    sealed = Sealer.for_purpose(old, (), "registration-claim").seal({"username": "x"})
    async with running(with_(settings, secret_key_fallbacks=(old,)), clock) as server:
        with pytest.raises(Unreadable):
            server.services.claims.open(sealed)
        assert server.services.sealer.open(Sealer.for_purpose(old, (), "mail-outbox", aad=b"outbox").seal({"a": 1}))


async def test_mail_windows_are_keyed_hashes(server: Running, smtp: Capture, clock: FixedClock) -> None:
    async with server.client() as c:
        await forgot(c, "nobody@example.com")
    keys = {r.key for r in await server.services.db.fetch_all(sa.select(mail_throttle.c.key))}
    key = derive_key(server.services.settings.secret_key, "address")
    assert keys and outbox.throttle_key(key, "unasked", "nobody@example.com") in keys
    assert not any(sha256_hex(f"{kind}\x1fnobody@example.com") in keys for kind in ("notice", "code", "unasked"))
    assert keyed_hash(key, "mail-window", "unasked", "nobody@example.com") in keys


async def test_the_notice_of_a_deleted_account_keeps_only_the_domain(server: Running, smtp: Capture,
                                                                    clock: FixedClock) -> None:
    async with server.client() as c:
        await registered(c, smtp)
        clock.advance(61)
        token = await get_csrf(c, "/account")
        await c.post("/account/delete", data={"csrf_token": token, "password": PASSWORD})
        code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
        await submit_code(c, code)
    await wait_mail(smtp, "jane@example.com", 3)
    await server.services.mailer.drain()
    for _ in range(50):
        rows = await server.services.db.fetch_all(sa.select(mail_outbox.c.recipient, mail_outbox.c.status))
        if rows and all(r.status == "sent" for r in rows):
            break
        await asyncio.sleep(0.05)
    assert [r.recipient for r in rows] == ["@example.com"]


def test_mail_link_tokens_never_reach_a_log_line() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/1.1" %d',
                               ("1.2.3.4", "GET", "/verify/link/AbCdEfGhIjKlMnOpQrStUvWxYz", 200), None)
    RedactFilter().filter(record)
    assert "AbCdEf" not in record.getMessage() and "/verify/link/[redacted]" in record.getMessage()
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "POST /not-you/%s", ("QwErTyUiOp",),
                               None)
    RedactFilter().filter(record)
    assert record.getMessage() == "POST /not-you/[redacted]"


async def test_a_paused_sign_in_says_why(server: Running, smtp: Capture, clock: FixedClock) -> None:
    """"Not you?" paused sign-in codes: a code entered meanwhile is refused with that reason, not
    as too many wrong codes."""
    async with server.client() as c:
        await registered(c, smtp)
    clock.advance(61)
    async with server.client() as c:
        await login(c)
        code = code_in((await wait_mail(smtp, "jane@example.com", 2))[-1])
        cid = await server.services.db.fetch_val(sa.select(customers.c.id))
        await otp.pause_sign_in(server.services.db, customer_id=cid, now=clock.now(), until=clock.now() + _minutes(15))
        clock.advance(61)
        await login(c)
        r = await submit_code(c, code)
        assert "“Not you?”" in r.text and "Too many wrong codes" not in r.text

"""The use cases of registration and sign-in: which code or notice goes out, which challenge a
pending step gets, what a right code starts. No HTTP here: routes parse the request, call one
function, and render what it returns."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from datetime import datetime

from app import audit, otp
from app.audit import Event
from app.auth import forms, queries
from app.auth.queries import Customer
from app.database import INTEGRITY_ERRORS, transact
from app.mail import outbox
from app.mail.outbox import MailKind
from app.otp import Kind, Outcome, Purpose
from app.security.crypto import keyed_hash, sha256_hex, token
from app.security.passwords import check_password, hash_password
from app.services import Client, Services


@dataclass(frozen=True)
class Step:
    """A pending code step, as the session cookie keeps it."""

    challenge_id: int
    nonce: str
    purpose: Purpose
    # After a password only: lets a right code sign in with one guarded UPDATE (otp.use_code).
    # Never after a registration form, where it would tell a new account from an existing address.
    owner: tuple[int, int] | None = None


@dataclass(frozen=True)
class SignedIn:
    """A new signed-in session: the cookie carries the token, the row its SHA-256."""

    token: str
    customer_id: int
    auth_time: int


def minutes(seconds: int) -> int:
    return max(1, math.ceil(seconds / 60))


def _name(customer: Customer) -> str:
    return customer.full_name or customer.username or ""


# --- sessions ----------------------------------------------------------------------------


async def start_session(svc: Services, customer_id: int, session_version: int, client: Client,
                        now: datetime) -> SignedIn:
    """A new server-side session row (call inside the transaction of what signs the customer in)."""
    sid = token()
    await queries.create_session(svc.db, session_hash=sha256_hex(sid), customer_id=customer_id,
                                 version=session_version, ip=client.ip, user_agent=client.user_agent, now=now)
    return SignedIn(sid, customer_id, int(now.timestamp()))


# --- codes and notices -------------------------------------------------------------------


async def _issue_code(svc: Services, customer: Customer, *, purpose: Purpose, nonce: str, now: datetime,
                      claim: str | None = None) -> tuple[otp.Issued, outbox.Queued]:
    """A new code and its mail, queued together (call inside a transaction, then dispatch)."""
    issued = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer.id,
                             purpose=purpose, nonce=nonce, sent_to=forms.mask_email(customer.email), claim=claim)
    queued = await outbox.enqueue(
        svc.db, svc.sealer, now=now, recipient=customer.email, customer_id=customer.id,
        kind=MailKind.REGISTRATION_CODE if purpose is Purpose.REGISTRATION else MailKind.LOGIN_CODE,
        challenge_id=issued.challenge_id, expires_at=issued.expires_at,
        context={"name": _name(customer), "code": issued.code, "minutes": minutes(svc.policy.ttl(purpose))},
        claim_for=svc.mailer.claim_now(),
    )
    return issued, queued


async def _send_code(svc: Services, customer: Customer, *, purpose: Purpose, nonce: str, client: Client,
                     claim: str | None = None) -> int:
    """Issue and queue a code; inside the cooldown, hand over the open one or a placeholder."""
    now = svc.clock.now()
    try:
        issued, queued = await transact(svc.db, lambda: _issue_code(svc, customer, purpose=purpose, nonce=nonce,
                                                                    now=now, claim=claim))
    except otp.Cooldown:
        reused = await otp.rebind_open(svc.db, keys=svc.keys, customer_id=customer.id, purpose=purpose,
                                       nonce=nonce, now=now, claim=claim)
        if reused is not None:
            return reused
        return await otp.stand_in(
            svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer.id, purpose=purpose,
            nonce=nonce, sent_to=forms.mask_email(customer.email), kind=Kind.PLACEHOLDER,
        )
    svc.mailer.dispatch(queued)
    await audit.record(svc.db, Event.CODE_SENT, customer_id=customer.id, ip=client.ip,
                       user_agent=client.user_agent, now=now)
    return issued.challenge_id


async def _decoy(svc: Services, *, email: str, owner: Customer | None, nonce: str, username: str,
                 carry: otp.Challenge | None = None) -> int:
    """The address (or the username) exists already: a challenge that looks like a new account's,
    and instead of a code a notice to the address, at most one per cooldown per address (taken
    atomically, so concurrent registrations send one). Inside that cooldown the step shows the
    delivery state of the notice that did go out, as a real code's step would show its mail."""
    now = svc.clock.now()
    key = outbox.throttle_key("notice", email)

    async def work() -> tuple[int, outbox.Queued | None]:
        took = await outbox.take_throttle(svc.db, key, now=now, window=svc.policy.resend_cooldown)
        earlier = None if took else await outbox.throttled_mail(svc.db, key)
        challenge_id = await otp.stand_in(
            svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=owner.id if owner else None,
            purpose=Purpose.REGISTRATION, nonce=nonce, sent_to=forms.mask_email(email), kind=Kind.DECOY,
            carry=carry, mail_id=earlier,
        )
        if not took:
            return challenge_id, None
        if owner is not None:
            kind, context = MailKind.ACCOUNT_EXISTS, {"name": _name(owner), "username": owner.username or ""}
        else:
            kind, context = MailKind.USERNAME_TAKEN, {"username": username}
        queued = await outbox.enqueue(svc.db, svc.sealer, kind=kind, recipient=owner.email if owner else email, now=now,
                                      customer_id=owner.id if owner else None, challenge_id=challenge_id,
                                      context=context, claim_for=svc.mailer.claim_now())
        await outbox.note_throttled_mail(svc.db, key, queued.id)
        return challenge_id, queued

    challenge_id, queued = await transact(svc.db, work)
    if queued is not None:
        svc.mailer.dispatch(queued)  # the same way, and as soon, as a code mail goes
    return challenge_id


# --- registration ------------------------------------------------------------------------


def registration_nonce(svc: Services, seed: str, email: str) -> str:
    """The binding nonce of a registration step, derived from the submitting session's CSRF
    token and the address: the same form sent twice from one tab (a double click, a retried
    request) lands on the same code step instead of starting a second one."""
    return keyed_hash(svc.keys.binding, "registration", seed, email)


async def register(svc: Services, client: Client, *, full_name: str, username: str, email: str, password: str,
                   seed: str) -> Step:
    """Register: a code to a new address; for an address with an account, the same answer and a
    notice to its owner; a sign-up nobody confirmed can be taken over only through a code to it."""
    password_hash = await hash_password(password)  # paid whatever happens next: no timing difference
    nonce = registration_nonce(svc, seed, email)
    claim = svc.claims.seal({"username": username, "full_name": full_name, "password_hash": password_hash})
    by_email, by_username = await queries.find_conflict(svc.db, email=email, username=username)
    if by_email is None and by_username is None:
        try:
            return await _create(svc, client, full_name=full_name, username=username, email=email,
                                 password_hash=password_hash, nonce=nonce)
        except INTEGRITY_ERRORS:
            # Lost an INSERT race: to this same form sent twice (joined below), or to someone else.
            by_email, by_username = await queries.find_conflict(svc.db, email=email, username=username)
    if by_email is not None:
        joined = await otp.open_bound(svc.db, keys=svc.keys, customer_id=by_email.id, purpose=Purpose.REGISTRATION,
                                      nonce=nonce, now=svc.clock.now())
        if joined is not None:
            if by_email.email_verified_at is None and by_email.source == queries.SIGNUP:
                await otp.set_claim(svc.db, joined, claim)  # the latest details win at the code
            return Step(joined, nonce, Purpose.REGISTRATION)
    if (by_email is not None and by_email.email_verified_at is None and by_email.source == queries.SIGNUP
            and (by_username is None or by_username.id == by_email.id)):
        # A sign-up nobody confirmed: whoever holds the mailbox may take it over with the code,
        # which is when these details replace the old ones. Until then nothing changes.
        challenge_id = await _send_code(svc, by_email, purpose=Purpose.REGISTRATION, nonce=nonce, client=client,
                                        claim=claim)
        return Step(challenge_id, nonce, Purpose.REGISTRATION)
    challenge_id = await _decoy(svc, email=email, owner=by_email, nonce=nonce, username=username)
    return Step(challenge_id, nonce, Purpose.REGISTRATION)


async def _create(svc: Services, client: Client, *, full_name: str, username: str, email: str, password_hash: str,
                  nonce: str) -> Step:
    now = svc.clock.now()

    async def work() -> tuple[int, otp.Issued, outbox.Queued]:
        customer_id = await queries.create_customer(svc.db, username=username, email=email, full_name=full_name,
                                                    password_hash=password_hash, now=now)
        customer = Customer(customer_id, username, email, full_name, password_hash, None, True, 0, queries.SIGNUP)
        issued, queued = await _issue_code(svc, customer, purpose=Purpose.REGISTRATION, nonce=nonce, now=now)
        return customer_id, issued, queued

    customer_id, issued, queued = await transact(svc.db, work)
    svc.mailer.dispatch(queued)
    await audit.record(svc.db, Event.REGISTERED, Event.CODE_SENT, customer_id=customer_id, ip=client.ip,
                       user_agent=client.user_agent, now=now)
    return Step(issued.challenge_id, nonce, Purpose.REGISTRATION)


# --- sign-in -----------------------------------------------------------------------------


def code_needed(customer: Customer) -> Purpose | None:
    """Which code a customer whose password was right must enter, if any.

    A sign-up that never confirmed its address confirms it first. A shop customer (a row from
    the existing table) signs in with the password alone while codes are off for them, as the
    guide says, until `python -m app otp enable`."""
    if customer.source == queries.SIGNUP and customer.email_verified_at is None:
        return Purpose.REGISTRATION
    return Purpose.LOGIN if customer.otp_enabled else None


async def sign_in(svc: Services, client: Client, *, login: str, password: str) -> Step | SignedIn | None:
    """The password step. None: refused (unknown user, wrong password, or the account's own limit
    reached: all answered alike)."""
    db = svc.db
    customer = await queries.find_customer(db, login=login)
    # Per account as well as per address, keyed on the customer whatever name was typed, so
    # "jane" and "jane@example.com" share one budget.
    account = f"customer:{customer.id}" if customer else "login:" + sha256_hex(login.lower())
    if await svc.limiter.hit_account("login-account", account):
        await audit.record(db, Event.PASSWORD_FAILED, customer_id=customer.id if customer else None, ip=client.ip,
                           user_agent=client.user_agent, now=svc.clock.now())
        return None
    ok, rehash = await check_password(customer.password_hash if customer else None, password)
    if not ok or customer is None:
        await audit.record(db, Event.PASSWORD_FAILED, customer_id=customer.id if customer else None, ip=client.ip,
                           user_agent=client.user_agent, now=svc.clock.now())
        return None
    # Hashed before a pooled connection is taken: the pool never waits on Argon2.
    new_hash = await hash_password(password) if rehash else None
    async with db.connection():
        now = svc.clock.now()
        if new_hash is not None:
            await queries.set_password_hash(db, customer.id, new_hash)
        purpose = code_needed(customer)
        if purpose is None:
            async def work() -> SignedIn:
                signed = await start_session(svc, customer.id, customer.session_version, client, now)
                await audit.record(db, Event.SIGNED_IN, customer_id=customer.id, ip=client.ip,
                                   user_agent=client.user_agent, now=now)
                return signed

            return await transact(db, work)
        nonce = secrets.token_urlsafe(24)
        challenge_id = await _send_code(svc, customer, purpose=purpose, nonce=nonce, client=client)
        # A registration code (an address not yet proven) takes the full path, where its claim is applied.
        owner = (customer.id, customer.session_version) if purpose is Purpose.LOGIN else None
        return Step(challenge_id, nonce, purpose, owner)


# --- the code step -----------------------------------------------------------------------


async def load(svc: Services, step: Step) -> otp.Challenge | None:
    return await otp.load_challenge(svc.db, keys=svc.keys, challenge_id=step.challenge_id, nonce=step.nonce,
                                    purpose=step.purpose)


@dataclass(frozen=True)
class CodeResult:
    signed_in: SignedIn | None = None
    challenge: otp.Challenge | None = None  # None (and not signed in): the step is gone
    verdict: otp.Verdict | None = None
    problem: str | None = None  # the entry was not a code at all


async def submit_code(svc: Services, client: Client, step: Step, code: str | None, problem: str | None) -> CodeResult:
    """One entry at the code step. A right code, its session, the address proven and the audit
    happen in one transaction: a failure between them leaves the code unused."""
    db, now = svc.db, svc.clock.now()
    if code is not None and step.owner is not None:
        customer_id, version = step.owner

        async def fast() -> SignedIn | None:
            if not await otp.use_code(db, keys=svc.keys, policy=svc.policy, now=now, challenge_id=step.challenge_id,
                                      nonce=step.nonce, customer_id=customer_id, purpose=step.purpose, code=code):
                return None
            await otp.succeeded(db, customer_id, now)
            signed = await start_session(svc, customer_id, version, client, now)
            await audit.record(db, Event.VERIFIED, Event.SIGNED_IN, customer_id=customer_id, ip=client.ip,
                               user_agent=client.user_agent, now=now)
            return signed

        signed = await transact(db, fast)
        if signed is not None:
            return CodeResult(signed_in=signed)
    # Anything but a right code on the sign-in path: the whole challenge decides.
    challenge = await load(svc, step)
    if challenge is None or challenge.used_at is not None:
        return CodeResult()
    if code is None:
        return CodeResult(challenge=challenge, problem=problem)

    async def full() -> tuple[otp.Verdict, SignedIn | None]:
        verdict = await otp.verify(db, keys=svc.keys, policy=svc.policy, now=now, challenge=challenge, code=code)
        if verdict.status is not Outcome.VERIFIED or verdict.customer_id is None:
            return verdict, None
        if challenge.claim is not None:
            details = svc.claims.open(challenge.claim)
            await queries.apply_claim(db, verdict.customer_id, username=details["username"],
                                      full_name=details["full_name"], password_hash=details["password_hash"])
        await otp.succeeded(db, verdict.customer_id, now)
        signed = await start_session(svc, verdict.customer_id, challenge.session_version, client, now)
        await audit.record(db, Event.VERIFIED, Event.SIGNED_IN, customer_id=verdict.customer_id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
        return verdict, signed

    try:
        verdict, signed = await transact(db, full)
    except INTEGRITY_ERRORS:
        return CodeResult()  # the customer was deleted, or a claimed username taken, meanwhile
    if signed is not None:
        return CodeResult(signed_in=signed)
    if challenge.kind is not Kind.DECOY and challenge.customer_id is not None and verdict.status in (
            Outcome.WRONG, Outcome.LOCKED):
        events = [Event.CODE_FAILED]
        if verdict.status is Outcome.LOCKED and verdict.customer_id is not None:
            events.append(Event.LOCKED)
        await audit.record(db, *events, customer_id=challenge.customer_id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
    return CodeResult(challenge=await load(svc, step) or challenge, verdict=verdict)


@dataclass(frozen=True)
class ResendResult:
    challenge: otp.Challenge | None = None  # None: the step is gone
    new_challenge_id: int | None = None
    wait: int = 0  # inside the cooldown: seconds left
    locked: bool = False


async def resend(svc: Services, client: Client, step: Step) -> ResendResult:
    """A new code for the pending step, after the cooldown (kept in the database)."""
    challenge = await load(svc, step)
    if challenge is None or challenge.used_at is not None:
        return ResendResult()
    now = svc.clock.now()
    if challenge.locked_until and challenge.locked_until > now:
        return ResendResult(challenge, locked=True)
    if challenge.kind is Kind.DECOY:
        wait = challenge.resend_wait(svc.policy, now)
        if wait:
            return ResendResult(challenge, wait=wait)
        owner = await queries.get_customer(svc.db, challenge.customer_id) if challenge.customer_id else None
        if owner is not None:
            new_id = await _decoy(svc, email=owner.email, owner=owner, nonce=step.nonce, username="", carry=challenge)
        else:
            # A taken username only: no owner to tell; the step goes on showing the mail it showed.
            new_id = await otp.stand_in(
                svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=None, purpose=challenge.purpose,
                nonce=step.nonce, sent_to=challenge.sent_to, kind=Kind.DECOY, carry=challenge,
                mail_id=await outbox.shown_by(svc.db, challenge.id),
            )
        return ResendResult(challenge, new_challenge_id=new_id)
    assert challenge.customer_id is not None
    customer = await queries.get_customer(svc.db, challenge.customer_id)
    if customer is None:
        return ResendResult()
    try:
        issued, queued = await transact(svc.db, lambda: _issue_code(svc, customer, purpose=challenge.purpose,
                                                                    nonce=step.nonce, now=now, claim=challenge.claim))
    except otp.Cooldown as exc:
        await audit.record(svc.db, Event.RESEND_REFUSED, customer_id=customer.id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
        return ResendResult(challenge, wait=exc.retry_after)
    svc.mailer.dispatch(queued)
    await audit.record(svc.db, Event.CODE_SENT, customer_id=customer.id, ip=client.ip, user_agent=client.user_agent,
                       now=now)
    return ResendResult(challenge, new_challenge_id=issued.challenge_id)


# --- sign-out ----------------------------------------------------------------------------


async def sign_out(svc: Services, client: Client, *, session_token: str, customer_id: int) -> bool:
    """End one session (one guarded UPDATE); True when a live one was ended."""
    now = svc.clock.now()
    if not await queries.revoke_session(svc.db, sha256_hex(session_token), customer_id, now):
        return False
    await audit.record(svc.db, Event.SIGNED_OUT, customer_id=customer_id, ip=client.ip, user_agent=client.user_agent,
                       now=now)
    return True


async def sign_out_everywhere(svc: Services, client: Client, customer_id: int) -> None:
    now = svc.clock.now()
    await queries.revoke_all(svc.db, customer_id, now)
    await audit.record(svc.db, Event.SESSION_REVOKED, customer_id=customer_id, ip=client.ip,
                       user_agent=client.user_agent, now=now)

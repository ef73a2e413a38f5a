"""The use cases around a code step: registration, sign-in, the code step itself (for every
purpose), resend, sign-out. Which code or notice goes out, which challenge a pending step gets,
what a right code starts. No HTTP here: routes parse the request, call one function, and
render what it returns."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from app import audit, otp
from app.audit import Event
from app.auth import forms, queries
from app.auth.queries import Customer
from app.database import INTEGRITY_ERRORS, transact
from app.mail import describe, outbox
from app.mail.outbox import MailKind
from app.otp import Kind, Outcome, Purpose
from app.security.crypto import keyed_hash, open_for_token, sha256_hex, token
from app.security.passwords import check_password, hash_password
from app.services import Client, Services

CODE_MAIL = {
    Purpose.REGISTRATION: MailKind.REGISTRATION_CODE,
    Purpose.LOGIN: MailKind.LOGIN_CODE,
    Purpose.RESET: MailKind.RESET_CODE,
    Purpose.EMAIL: MailKind.EMAIL_CODE,
    Purpose.DELETE: MailKind.DELETE_CODE,
}
# Where the customer has just typed the address, the step shows it whole (a typo can be seen);
# elsewhere masked.
SHOWN_WHOLE = frozenset({Purpose.REGISTRATION, Purpose.RESET, Purpose.EMAIL})
# What a step is called beside its tag: "Code for sign-in K7Q".
STEP_WORDS = {Purpose.REGISTRATION: "registration", Purpose.LOGIN: "sign-in", Purpose.RESET: "password reset",
              Purpose.EMAIL: "address change", Purpose.DELETE: "account deletion"}


@dataclass(frozen=True)
class Step:
    """A pending code step, as the session cookie keeps it."""

    challenge_id: int
    nonce: str
    purpose: Purpose
    # After a password only: lets a right code sign in with one guarded UPDATE (otp.use_code).
    # Never after a registration form, where it would tell a new account from an existing address.
    owner: tuple[int, int] | None = None
    reused: bool = False  # the cooldown held a new code back: the step uses one sent before


@dataclass(frozen=True)
class SignedIn:
    """A new signed-in session: the cookie carries the token, the row its SHA-256."""

    token: str
    customer_id: int
    auth_time: int


@dataclass(frozen=True)
class Refused:
    """The form is fine but cannot be accepted: `field` says where, `message` what to do."""

    field: str
    message: str


def minutes(seconds: int) -> int:
    return max(1, math.ceil(seconds / 60))


def display_name(customer: Customer) -> str:
    return customer.full_name or customer.username or ""


def shown_address(purpose: Purpose, email: str) -> str:
    return email if purpose in SHOWN_WHOLE else forms.mask_email(email)


def notice_context(customer: Customer | None, client: Client, now: datetime, **extra: Any) -> dict[str, Any]:
    """Who, when and from where, for a notice mail."""
    return {"name": display_name(customer) if customer else "", "when": describe.when(now),
            "browser": describe.browser(client.user_agent), **extra}


# --- sessions ----------------------------------------------------------------------------


async def start_session(svc: Services, customer_id: int, session_version: int, client: Client,
                        now: datetime) -> SignedIn:
    """A new server-side session row (call inside the transaction of what signs the customer in)."""
    sid = token()
    await queries.create_session(svc.db, session_hash=sha256_hex(sid), customer_id=customer_id,
                                 version=session_version, ip=client.ip, user_agent=client.user_agent, now=now)
    return SignedIn(sid, customer_id, int(now.timestamp()))


# --- codes and notices -------------------------------------------------------------------


async def issue_code(svc: Services, customer: Customer, *, purpose: Purpose, nonce: str, now: datetime,
                     client: Client, claim: str | None = None, recipient: str | None = None,
                     cooldown: bool = True, challenge: otp.Challenge | None = None) -> tuple[otp.Issued, outbox.Queued]:
    """A new code and its mail, queued together (call inside a transaction, then dispatch).
    `recipient`: another address than the customer's (a new email to confirm). `challenge`: one
    more code for this open step (a resend: the earlier ones stay valid)."""
    to = recipient or customer.email
    issued = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer.id,
                             purpose=purpose, nonce=nonce, sent_to=shown_address(purpose, to), claim=claim,
                             cooldown=cooldown, challenge=challenge)
    queued = await outbox.enqueue(
        svc.db, svc.sealer, now=now, recipient=to, customer_id=customer.id, kind=CODE_MAIL[purpose],
        challenge_id=issued.challenge_id, expires_at=issued.expires_at,
        context=code_mail_context(svc, customer, issued, purpose=purpose, client=client, now=now),
        claim_for=svc.mailer.claim_now(),
    )
    return issued, queued


def code_mail_context(svc: Services, customer: Customer, issued: otp.Issued, *, purpose: Purpose, client: Client,
                      now: datetime) -> dict[str, Any]:
    """What a code mail says: the code and its step's tag, who asked (when, which browser and
    system, from which address), a link that confirms in the browser that asked, and a "Not you?"
    link. The links hold random tokens, never the code or the address."""
    origin = client.origin or svc.settings.public_origin or ""
    return {
        "name": display_name(customer), "code": issued.code, "minutes": minutes(svc.policy.ttl(purpose)),
        "tag": issued.tag, "step": STEP_WORDS[purpose], "when": describe.when(now),
        "browser": describe.browser(client.user_agent), "ip": client.ip or "an unknown address",
        "link": f"{origin}/verify/link/{issued.link_token}", "stop_link": f"{origin}/not-you/{issued.stop_token}",
    }


async def send_code(svc: Services, customer: Customer, *, purpose: Purpose, nonce: str, client: Client,
                    claim: str | None = None, recipient: str | None = None) -> Step:
    """Issue and queue a code. Inside the cooldown, hand this step the open code of the same
    purpose (said so on the step), or a placeholder that asks to wait."""
    now = svc.clock.now()
    try:
        issued, queued = await transact(svc.db, lambda: issue_code(
            svc, customer, purpose=purpose, nonce=nonce, now=now, client=client, claim=claim, recipient=recipient))
    except otp.Cooldown:
        # A code to another address (a new email) is never handed over: it would confirm that one.
        reused = None if recipient else await otp.rebind_open(
            svc.db, keys=svc.keys, customer_id=customer.id, purpose=purpose, nonce=nonce, now=now, claim=claim)
        if reused is not None:
            return Step(reused, nonce, purpose, reused=True)
        placeholder = await otp.stand_in(
            svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer.id, purpose=purpose,
            nonce=nonce, sent_to=shown_address(purpose, recipient or customer.email), kind=Kind.PLACEHOLDER,
            claim=claim,
        )
        return Step(placeholder, nonce, purpose)
    svc.mailer.dispatch(queued)
    await audit.record(svc.db, Event.CODE_SENT, customer_id=customer.id, ip=client.ip,
                       user_agent=client.user_agent, now=now)
    return Step(issued.challenge_id, nonce, purpose)


@dataclass(frozen=True)
class Notice:
    """The mail a stand-in sends instead of a code, to whom."""

    kind: MailKind
    recipient: str
    context: dict[str, Any]
    customer_id: int | None = None


async def decoy(svc: Services, *, purpose: Purpose, shown_to: str, nonce: str, notice: Notice | None,
                customer_id: int | None = None, carry: otp.Challenge | None = None, claim: str | None = None) -> int:
    """A step that looks like a real code's where none may go (the address belongs to another
    account, or to nobody). Instead of a code, `notice` goes to its address, at most one per
    cooldown per address (taken atomically, so concurrent requests send one); inside that
    cooldown, or with no notice at all, the step shows the state of the notice that did go out,
    as a real code's step shows its mail."""
    now = svc.clock.now()
    key = outbox.throttle_key("notice", notice.recipient) if notice else None
    shown = shown_address(purpose, shown_to)
    ledger: otp.Ledger | None = carry or await otp.latest_decoy(svc.db, purpose=purpose, sent_to=shown, now=now,
                                                                policy=svc.policy)

    async def work() -> tuple[int, outbox.Queued | None]:
        took = key is not None and await outbox.take_throttle(svc.db, key, now=now, window=svc.policy.resend_cooldown)
        earlier = await outbox.throttled_mail(svc.db, key) if key is not None and not took else None
        challenge_id = await otp.stand_in(
            svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer_id, purpose=purpose, nonce=nonce,
            sent_to=shown, kind=Kind.DECOY, carry=ledger, mail_id=earlier, claim=claim,
        )
        if not took or notice is None or key is None:
            return challenge_id, None
        queued = await outbox.enqueue(svc.db, svc.sealer, kind=notice.kind, recipient=notice.recipient, now=now,
                                      customer_id=notice.customer_id, challenge_id=challenge_id,
                                      context=notice.context, claim_for=svc.mailer.claim_now())
        await outbox.note_throttled_mail(svc.db, key, queued.id)
        return challenge_id, queued

    challenge_id, queued = await transact(svc.db, work)
    if queued is not None:
        svc.mailer.dispatch(queued)  # the same way, and as soon, as a code mail goes
    return challenge_id


def account_exists(owner: Customer) -> Notice:
    return Notice(MailKind.ACCOUNT_EXISTS, owner.email, {"name": display_name(owner), "username": owner.username or ""},
                  owner.id)


# --- registration ------------------------------------------------------------------------


def registration_nonce(svc: Services, seed: str, email: str) -> str:
    """The binding nonce of a registration step, derived from the submitting session's CSRF
    token and the address: the same form sent twice from one tab (a double click, a retried
    request) lands on the same code step instead of starting a second one."""
    return keyed_hash(svc.keys.binding, "registration", seed, email)


USERNAME_TAKEN = Refused("username", "That username is taken. Please choose another.")


async def register(svc: Services, client: Client, *, full_name: str, username: str, email: str, password: str,
                   seed: str) -> Step | Refused:
    """Register: a code to a new address; for an address with an account, the same answer and a
    notice to its owner; a sign-up nobody confirmed can be taken over only through a code to it.
    A taken username is said on the form: usernames are public handles, addresses are not."""
    password_hash = await hash_password(password)  # paid whatever happens next: no timing difference
    details = {"username": username, "full_name": full_name, "password_hash": password_hash}
    return await register_details(svc, client, details, email=email, nonce=registration_nonce(svc, seed, email))


async def register_details(svc: Services, client: Client, details: dict[str, str], *, email: str,
                           nonce: str) -> Step | Refused:
    claim = svc.claims.seal(details)
    username = details["username"]
    by_email, by_username = await queries.find_conflict(svc.db, email=email, username=username)
    if by_email is None and by_username is None:
        try:
            return await _create(svc, client, details, email=email, nonce=nonce, claim=claim)
        except INTEGRITY_ERRORS:
            # Lost an INSERT race: to this same form sent twice (joined below), or to someone else.
            by_email, by_username = await queries.find_conflict(svc.db, email=email, username=username)
    if by_email is not None:
        joined = await otp.open_bound(svc.db, keys=svc.keys, customer_id=by_email.id, purpose=Purpose.REGISTRATION,
                                      nonce=nonce, now=svc.clock.now())
        if joined is not None:
            await otp.set_claim(svc.db, joined, claim)  # the latest details win at the code
            return Step(joined, nonce, Purpose.REGISTRATION)
    if by_username is not None and (by_email is None or by_username.id != by_email.id or not _open_signup(by_email)):
        return USERNAME_TAKEN
    if by_email is not None and _open_signup(by_email):
        # A sign-up nobody confirmed: whoever holds the mailbox may take it over with the code,
        # which is when these details replace the old ones. Until then nothing changes.
        return await send_code(svc, by_email, purpose=Purpose.REGISTRATION, nonce=nonce, client=client, claim=claim)
    assert by_email is not None
    challenge_id = await decoy(svc, purpose=Purpose.REGISTRATION, shown_to=email, nonce=nonce,
                               notice=account_exists(by_email), customer_id=by_email.id, claim=claim)
    return Step(challenge_id, nonce, Purpose.REGISTRATION)


def _open_signup(customer: Customer) -> bool:
    return customer.source == queries.SIGNUP and customer.email_verified_at is None


async def _create(svc: Services, client: Client, details: dict[str, str], *, email: str, nonce: str,
                  claim: str) -> Step:
    now = svc.clock.now()

    async def work() -> tuple[int, otp.Issued, outbox.Queued]:
        customer_id = await queries.create_customer(svc.db, username=details["username"], email=email,
                                                    full_name=details["full_name"],
                                                    password_hash=details["password_hash"], now=now)
        customer = Customer(customer_id, details["username"], email, details["full_name"], details["password_hash"],
                            None, True, 0, queries.SIGNUP)
        issued, queued = await issue_code(svc, customer, purpose=Purpose.REGISTRATION, nonce=nonce, now=now,
                                          client=client, claim=claim)
        return customer_id, issued, queued

    customer_id, issued, queued = await transact(svc.db, work)
    svc.mailer.dispatch(queued)
    await audit.record(svc.db, Event.REGISTERED, Event.CODE_SENT, customer_id=customer_id, ip=client.ip,
                       user_agent=client.user_agent, now=now)
    return Step(issued.challenge_id, nonce, Purpose.REGISTRATION)


class _TooSoon(Exception):
    """A limit refused an address change (raised inside its transaction, to undo it)."""


async def change_registration_email(svc: Services, client: Client, step: Step, email: str) -> Step | Refused | None:
    """The customer mistyped the address of a pending registration: the code goes to the new
    one, and the one sent to the old address stops working. None: the step is gone.

    An unconfirmed sign-up moves to the new address (never past the customer's cooldown, but
    never more than one code per cooldown to an address either); a stand-in registers its
    details again with the new address, so both answer alike."""
    challenge = await load(svc, step)
    if challenge is None or challenge.used_at is not None or challenge.claim is None:
        return None
    details = svc.claims.open(challenge.claim)
    row = (await queries.get_customer(svc.db, challenge.customer_id)
           if challenge.customer_id is not None and challenge.kind is not Kind.DECOY else None)
    if row is None or not _open_signup(row):
        return await register_details(svc, client, details, email=email, nonce=step.nonce)
    taken = await queries.find_customer(svc.db, login=email)
    if taken is not None and taken.id != row.id:
        challenge_id = await decoy(svc, purpose=Purpose.REGISTRATION, shown_to=email, nonce=step.nonce,
                                   notice=account_exists(taken), customer_id=taken.id, claim=challenge.claim)
        return Step(challenge_id, step.nonce, Purpose.REGISTRATION)
    now = svc.clock.now()
    # One change per cooldown for this sign-up, and one code per cooldown to the address.
    keys = (outbox.throttle_key("address-change", str(row.id)), outbox.throttle_key("code", email))

    async def work() -> tuple[otp.Issued, outbox.Queued]:
        for key in keys:
            if not await outbox.take_throttle(svc.db, key, now=now, window=svc.policy.resend_cooldown):
                raise _TooSoon  # rolls back what was taken
        await queries.move_signup(svc.db, row.id, email)
        moved = Customer(row.id, row.username, email, row.full_name, row.password_hash, None, row.otp_enabled,
                         row.session_version, row.source)
        return await issue_code(svc, moved, purpose=Purpose.REGISTRATION, nonce=step.nonce, now=now,
                                client=client, claim=challenge.claim, cooldown=False)

    try:
        issued, queued = await transact(svc.db, work)
    except INTEGRITY_ERRORS:  # the address was taken meanwhile
        return Refused("email", "That address cannot be used. Please check it, or use another.")
    except _TooSoon:
        wait = svc.policy.resend_cooldown
        return Refused("email", f"We sent a code less than {wait} seconds ago. Please wait a moment, then try "
                                "again.")
    svc.mailer.dispatch(queued)
    await audit.record(svc.db, Event.CODE_SENT, customer_id=row.id, ip=client.ip, user_agent=client.user_agent,
                       now=now)
    return Step(issued.challenge_id, step.nonce, Purpose.REGISTRATION)


# --- sign-in -----------------------------------------------------------------------------


def code_needed(customer: Customer) -> Purpose | None:
    """Which code a customer whose password was right must enter, if any.

    A sign-up that never confirmed its address confirms it first. A shop customer (a row from
    the existing table) signs in with the password alone while codes are off for them, as the
    guide says, until `python -m app otp enable`."""
    if customer.source == queries.SIGNUP and customer.email_verified_at is None:
        return Purpose.REGISTRATION
    return Purpose.LOGIN if customer.otp_enabled else None


async def check_account_password(svc: Services, client: Client, customer: Customer | None, login: str,
                                 password: str) -> tuple[bool, str | None]:
    """The password check every way in shares: the per-account limit (keyed on the customer,
    whatever name was typed), then Argon2 (a dummy hash for an unknown user). Returns
    (right, a new hash when the stored one should be upgraded)."""
    account = f"customer:{customer.id}" if customer else "login:" + sha256_hex(login.lower())
    if await svc.limiter.hit_account("login-account", account):
        ok, rehash = False, False
    else:
        ok, rehash = await check_password(customer.password_hash if customer else None, password)
    if not ok or customer is None:
        await audit.record(svc.db, Event.PASSWORD_FAILED, customer_id=customer.id if customer else None, ip=client.ip,
                           user_agent=client.user_agent, now=svc.clock.now())
        return False, None
    # Hashed before a pooled connection is taken: the pool never waits on Argon2.
    return True, (await hash_password(password) if rehash else None)


async def sign_in(svc: Services, client: Client, *, login: str, password: str) -> Step | SignedIn | None:
    """The password step. None: refused (unknown user, wrong password, or the account's own limit
    reached: all answered alike)."""
    db = svc.db
    customer = await queries.find_customer(db, login=login)
    ok, new_hash = await check_account_password(svc, client, customer, login, password)
    if not ok or customer is None:
        return None
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
        if purpose is Purpose.LOGIN and customer.signin_paused_until and customer.signin_paused_until > now:
            # "Not you?" paused sign-in codes: none goes out; the step says until when.
            paused = await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer.id,
                                        purpose=purpose, nonce=nonce, sent_to=shown_address(purpose, customer.email),
                                        kind=Kind.PLACEHOLDER)
            return Step(paused, nonce, purpose, (customer.id, customer.session_version))
        step = await send_code(svc, customer, purpose=purpose, nonce=nonce, client=client)
        # A registration code (an address not yet proven) takes the full path, where its claim is applied.
        owner = (customer.id, customer.session_version) if purpose is Purpose.LOGIN else None
        return Step(step.challenge_id, step.nonce, purpose, owner, step.reused)


# --- the code step -----------------------------------------------------------------------


async def load(svc: Services, step: Step) -> otp.Challenge | None:
    return await otp.load_challenge(svc.db, keys=svc.keys, challenge_id=step.challenge_id, nonce=step.nonce,
                                    purpose=step.purpose)


@dataclass(frozen=True)
class CodeResult:
    signed_in: SignedIn | None = None
    reset_ready: bool = False  # a reset code was right: the customer may choose a new password
    email_changed: str | None = None  # the new address, now the account's
    deleted: bool = False
    challenge: otp.Challenge | None = None  # None (and nothing done): the step is gone
    verdict: otp.Verdict | None = None
    problem: str | None = None  # the entry was not a code at all, or the change could not be made


async def submit_code(svc: Services, client: Client, step: Step, code: str | None, problem: str | None,
                      *, signed_in_as: int | None = None) -> CodeResult:
    """One entry at the code step. A right code and everything it starts (a session, a changed
    address, a deleted account) happen in one transaction: a failure between them leaves the code
    unused. `signed_in_as`: the customer of the session this step runs in (a change of address
    or a deletion only completes for the same customer)."""
    db, now = svc.db, svc.clock.now()
    if code is not None and step.owner is not None and step.purpose is Purpose.LOGIN:
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
    # Anything but a right code on the sign-in path: the whole challenge decides. A step that
    # was ended (another sign-in began, "sign out everywhere", "Not you?") is gone.
    challenge = await load(svc, step)
    if challenge is None or challenge.used_at is not None or challenge.invalidated_at is not None:
        return CodeResult()
    if step.purpose in (Purpose.EMAIL, Purpose.DELETE) and challenge.customer_id != signed_in_as:
        return CodeResult()
    if code is None:
        return CodeResult(challenge=challenge, problem=problem)

    async def full() -> CodeResult:
        verdict = await otp.verify(db, keys=svc.keys, policy=svc.policy, now=now, challenge=challenge, code=code)
        if verdict.status is not Outcome.VERIFIED or verdict.customer_id is None:
            return CodeResult(challenge=challenge, verdict=verdict)
        return await _finish(svc, client, challenge, verdict.customer_id, now)

    try:
        result = await transact(db, full)
    except INTEGRITY_ERRORS:
        # The customer was deleted, or a claimed username or address taken, meanwhile: nothing
        # happened (the code is unused); say what to do.
        return CodeResult(challenge=challenge, problem="That could not be completed: the username or address was "
                                                       "taken a moment ago. Please start again.")
    verdict = result.verdict
    if verdict is not None and challenge.kind is not Kind.DECOY and challenge.customer_id is not None and \
            verdict.status in (Outcome.WRONG, Outcome.LOCKED):
        events = [Event.CODE_FAILED]
        if verdict.status is Outcome.LOCKED and verdict.customer_id is not None:
            events.append(Event.LOCKED)
        await audit.record(db, *events, customer_id=challenge.customer_id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
    if result.challenge is not None and verdict is not None:
        return CodeResult(challenge=await load(svc, step) or challenge, verdict=verdict)
    return result


async def _finish(svc: Services, client: Client, challenge: otp.Challenge, customer_id: int,
                  now: datetime) -> CodeResult:
    """What a right code of each purpose does (inside the code's transaction)."""
    db, purpose = svc.db, challenge.purpose
    record = {"customer_id": customer_id, "ip": client.ip, "user_agent": client.user_agent, "now": now}
    if purpose is Purpose.DELETE:
        customer = await queries.get_customer(db, customer_id)
        await queries.delete_account(db, customer_id)
        await audit.record(db, Event.ACCOUNT_DELETED, customer_id=customer_id, ip="", user_agent="", now=now)
        if customer is not None:
            queued = await outbox.enqueue(db, svc.sealer, kind=MailKind.ACCOUNT_DELETED, recipient=customer.email,
                                          now=now, context=notice_context(customer, client, now))
            svc.mailer.dispatch(queued)  # after the commit it is found; a notify before it is harmless
        return CodeResult(deleted=True)
    if purpose is Purpose.EMAIL:
        customer = await queries.get_customer(db, customer_id)
        assert customer is not None and challenge.claim is not None
        new = svc.claims.open(challenge.claim)["email"]
        await queries.set_email(db, customer_id, new, now)
        await otp.succeeded(db, customer_id, now)
        await outbox.enqueue(db, svc.sealer, kind=MailKind.EMAIL_CHANGED, recipient=customer.email, now=now,
                             customer_id=customer_id,
                             context=notice_context(customer, client, now, new_address=forms.mask_email(new)))
        svc.mailer.notify()
        await audit.record(db, Event.VERIFIED, Event.EMAIL_CHANGED, **record)  # type: ignore[arg-type]
        return CodeResult(email_changed=new)
    if purpose is Purpose.RESET:
        # The mailbox is proven; the password is chosen next (recovery.set_new_password).
        await otp.succeeded(db, customer_id, now)
        await audit.record(db, Event.VERIFIED, **record)  # type: ignore[arg-type]
        return CodeResult(reset_ready=True)
    if challenge.claim is not None:
        details = svc.claims.open(challenge.claim)
        await queries.apply_claim(db, customer_id, username=details["username"], full_name=details["full_name"],
                                  password_hash=details["password_hash"])
    await otp.succeeded(db, customer_id, now)
    signed = await start_session(svc, customer_id, challenge.session_version, client, now)
    await audit.record(db, Event.VERIFIED, Event.SIGNED_IN, **record)  # type: ignore[arg-type]
    return CodeResult(signed_in=signed)


@dataclass(frozen=True)
class ResendResult:
    challenge: otp.Challenge | None = None  # None: the step is gone
    new_challenge_id: int | None = None
    wait: int = 0  # inside the cooldown: seconds left
    locked: bool = False


async def resend(svc: Services, client: Client, step: Step, *, signed_in_as: int | None = None) -> ResendResult:
    """One more code for the pending step, after the cooldown (kept in the database). Every code
    sent before for it goes on working until its own expiry (a late mail never strands anyone),
    under the step's one attempt budget."""
    challenge = await load(svc, step)
    if challenge is None or challenge.used_at is not None:
        return ResendResult()
    if step.purpose in (Purpose.EMAIL, Purpose.DELETE) and challenge.customer_id != signed_in_as:
        return ResendResult()
    now = svc.clock.now()
    if challenge.locked_until and challenge.locked_until > now:
        return ResendResult(challenge, locked=True)
    if challenge.kind is Kind.DECOY:
        wait = challenge.resend_wait(svc.policy, now)
        if wait:
            return ResendResult(challenge, wait=wait)
        if challenge.attempts >= svc.policy.max_attempts:
            # Spent, as a real step would be: a new stand-in, with the same ledger, as a real
            # resend starts a new step.
            owner = (await queries.get_customer(svc.db, challenge.customer_id)
                     if challenge.customer_id and step.purpose is Purpose.REGISTRATION else None)
            new_id = await decoy(svc, purpose=step.purpose, shown_to=challenge.sent_to, nonce=step.nonce,
                                 notice=account_exists(owner) if owner else None, customer_id=challenge.customer_id,
                                 carry=challenge, claim=challenge.claim)
            return ResendResult(challenge, new_challenge_id=new_id)
        await _answer_again(svc, challenge, step)
        return ResendResult(challenge, new_challenge_id=challenge.id)
    assert challenge.customer_id is not None
    customer = await queries.get_customer(svc.db, challenge.customer_id)
    if customer is None:
        return ResendResult()
    recipient = svc.claims.open(challenge.claim)["email"] if step.purpose is Purpose.EMAIL and challenge.claim else None
    # A step whose attempts are spent is over: its codes stay dead, and the new code starts a
    # new step for this session (the customer's failure count and lockout carry on, as ever).
    same = challenge if challenge.attempts < svc.policy.max_attempts else None
    try:
        issued, queued = await transact(svc.db, lambda: issue_code(
            svc, customer, purpose=challenge.purpose, nonce=step.nonce, now=now, client=client, claim=challenge.claim,
            recipient=recipient, challenge=same))
    except otp.Cooldown as exc:
        await audit.record(svc.db, Event.RESEND_REFUSED, customer_id=customer.id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
        return ResendResult(challenge, wait=exc.retry_after)
    svc.mailer.dispatch(queued)
    await audit.record(svc.db, Event.CODE_SENT, customer_id=customer.id, ip=client.ip, user_agent=client.user_agent,
                       now=now)
    return ResendResult(challenge, new_challenge_id=issued.challenge_id)


async def _answer_again(svc: Services, challenge: otp.Challenge, step: Step) -> None:
    """A stand-in's resend, answered as a real one would be: a registration's stand-in tells the
    address's owner again (at most once per cooldown), and the step shows that notice; others
    go on showing the mail they showed."""
    now = svc.clock.now()
    owner = (await queries.get_customer(svc.db, challenge.customer_id)
             if challenge.customer_id and step.purpose is Purpose.REGISTRATION else None)
    mail_id = await outbox.shown_by(svc.db, challenge.id)
    queued = None
    if owner is not None:
        notice = account_exists(owner)
        key = outbox.throttle_key("notice", notice.recipient)

        async def work() -> outbox.Queued | None:
            if not await outbox.take_throttle(svc.db, key, now=now, window=svc.policy.resend_cooldown):
                return None
            found = await outbox.enqueue(svc.db, svc.sealer, kind=notice.kind, recipient=notice.recipient, now=now,
                                         customer_id=notice.customer_id, challenge_id=challenge.id,
                                         context=notice.context, claim_for=svc.mailer.claim_now())
            await outbox.note_throttled_mail(svc.db, key, found.id)
            return found

        queued = await transact(svc.db, work)
        if queued is not None:
            mail_id = queued.id
    await otp.answer_again(svc.db, policy=svc.policy, now=now, challenge=challenge, mail_id=mail_id)
    if queued is not None:
        svc.mailer.dispatch(queued)


# --- the mail's links --------------------------------------------------------------------

NOT_ME_PAUSE = 15 * 60  # seconds sign-in codes stay paused after "Not you?"


async def not_me(svc: Services, client: Client, token_value: str) -> bool:
    """"Not you?" from a code mail (a POST: a link scanner's GET changes nothing): every pending
    step of the customer ends and sign-in codes pause for 15 minutes. False: unknown link."""
    customer_id = await otp.customer_of_stop_token(svc.db, token_value)
    if customer_id is None:
        return False
    now = svc.clock.now()
    await transact(svc.db, lambda: otp.pause_sign_in(svc.db, customer_id=customer_id, now=now,
                                                     until=now + timedelta(seconds=NOT_ME_PAUSE)))
    await audit.record(svc.db, Event.NOT_ME, customer_id=customer_id, ip=client.ip, user_agent=client.user_agent,
                       now=now)
    return True


def code_of_link(link: otp.Link, token_value: str) -> str | None:
    """The code a link stands for (sealed under its token: only the mail's holder can see it)."""
    return open_for_token(token_value, link.sealed)


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

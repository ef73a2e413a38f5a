"""The use cases around a code step: registration, sign-in, the code step itself (for every
purpose), resend, sign-out. Which code or notice goes out, which challenge a pending step gets,
what a right code starts. No HTTP here: routes parse the request, call one function, and
render what it returns."""

from __future__ import annotations

import hmac
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
from app.factors import Factors, Method, devices, factors_of
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
    device_token: str | None = None  # "Don't ask again on this device": for the device cookie


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
                        now: datetime, method: Method = Method.CODE, trust_device: bool = False) -> SignedIn:
    """A new server-side session row (call inside the transaction of what signs the customer in),
    recording how it was authenticated; `trust_device`: the second step is not asked again on
    this device for TRUSTED_DEVICE_DAYS (a row the customer can revoke; its token for the cookie)."""
    sid = token()
    await queries.create_session(svc.db, session_hash=sha256_hex(sid), customer_id=customer_id,
                                 version=session_version, ip=client.ip, user_agent=client.user_agent, now=now,
                                 method=method.value)
    device = None
    if trust_device and method is Method.CODE and (await factors_of(svc.db, customer_id)).strong:
        trust_device = False  # an emailed code under staff help: trust comes only from the factor
    if trust_device:
        device = await devices.trust(svc.db, customer_id=customer_id, label=describe.browser(client.user_agent),
                                     ip=client.ip, now=now, days=svc.settings.trusted_device_days)
        await audit.record(svc.db, Event.DEVICE_TRUSTED, customer_id=customer_id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
    return SignedIn(sid, customer_id, int(now.timestamp()), device)


async def trusted_device(svc: Services, customer_id: int, tokens: tuple[str, ...], now: datetime) -> bool:
    """This browser holds a live trusted-device token of this customer (a shared browser may hold
    several customers' tokens; only this customer's counts)."""
    for value in tokens:
        if await devices.recognised(svc.db, customer_id=customer_id, token=value, now=now) is not None:
            return True
    return False


# --- codes and notices -------------------------------------------------------------------


async def issue_code(svc: Services, customer: Customer, *, purpose: Purpose, nonce: str, now: datetime,
                     client: Client, claim: str | None = None, recipient: str | None = None,
                     challenge: otp.Challenge | None = None, ledger: str | None = None,
                     shown: str | None = None) -> tuple[otp.Issued, outbox.Queued]:
    """A new code and its mail, queued together (call inside a transaction, then dispatch).
    `recipient`: another address than the customer's (a new email to confirm). `challenge`: one
    more code for this open step (a resend: the earlier ones stay valid). `ledger`: the step is
    unproven (otp.issue). `shown`: the address as the customer typed it."""
    to = recipient or customer.email
    issued = await otp.issue(svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer.id,
                             purpose=purpose, nonce=nonce, sent_to=shown_address(purpose, shown or to), claim=claim,
                             challenge=challenge, ledger=ledger)
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
    """Issue and queue a code for a proven step (after the password, or inside a signed-in
    session). Inside the customer's cooldown, hand this step the open code of the same purpose
    (whoever asks proved the password again; the step says so), or a placeholder that asks to wait."""
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


def account_exists(owner: Customer) -> Notice:
    return Notice(MailKind.ACCOUNT_EXISTS, owner.email, {"name": display_name(owner), "username": owner.username or ""},
                  owner.id)


def address_in_use(owner: Customer) -> Notice:
    return Notice(MailKind.ADDRESS_IN_USE, owner.email, {}, owner.id)


def mail_window(svc: Services, address: str) -> str:
    """The window that lets at most one mail a cooldown go to an address nobody proved anything
    for (a code or a notice), whoever asks."""
    return outbox.throttle_key(svc.keys.address, "unasked", address)


async def _enqueue_notice(svc: Services, notice: Notice, *, challenge_id: int, window: str,
                          now: datetime) -> outbox.Queued:
    queued = await outbox.enqueue(svc.db, svc.sealer, kind=notice.kind, recipient=notice.recipient, now=now,
                                  customer_id=notice.customer_id, challenge_id=challenge_id, context=notice.context,
                                  claim_for=svc.mailer.claim_now())
    await outbox.note_throttled_mail(svc.db, window, queued.id)
    return queued


async def _unproven(svc: Services, client: Client, *, purpose: Purpose, address: str, nonce: str, now: datetime,
                    customer: Customer | None, notice: Notice | None,
                    claim: str | None) -> tuple[int, outbox.Queued | None, bool]:
    """unproven_step() inside the caller's transaction: (step id, mail to dispatch, a code went)."""
    window = mail_window(svc, address)
    ledger = otp.ledger_key(svc.keys.address, purpose, address)
    took = await outbox.take_throttle(svc.db, window, now=now, window=svc.policy.resend_cooldown)
    earlier = None if took else await outbox.throttled_mail(svc.db, window)
    coded = customer is not None and notice is None
    if coded and took:
        assert customer is not None
        issued, queued = await issue_code(svc, customer, purpose=purpose, nonce=nonce, now=now, client=client,
                                          claim=claim, ledger=ledger, shown=address)
        await outbox.note_throttled_mail(svc.db, window, queued.id)
        return issued.challenge_id, queued, True
    # No code now: a placeholder (it gets one on a resend) for an account that may have one, a
    # decoy otherwise; either shows the mail that went in this window, as a real step shows its own.
    challenge_id = await otp.stand_in(
        svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer.id if customer else None,
        purpose=purpose, nonce=nonce, sent_to=shown_address(purpose, address),
        kind=Kind.PLACEHOLDER if coded else Kind.DECOY, mail_id=earlier, claim=claim, ledger=ledger,
    )
    if not took or notice is None:
        return challenge_id, None, False
    return challenge_id, await _enqueue_notice(svc, notice, challenge_id=challenge_id, window=window, now=now), False


async def unproven_step(svc: Services, client: Client, *, purpose: Purpose, address: str, nonce: str,
                        customer: Customer | None, notice: Notice | None = None, claim: str | None = None) -> Step:
    """The step for a form anyone can send, which proves no secret (registration, forgot
    password): a code to the address's account when it may have one (`customer`, no `notice`),
    a notice to its owner instead (`notice`), or no mail (no account). Whichever, the step looks
    and behaves the same: at most one mail per address per cooldown (inside it, the step shows
    the mail that went and sends none), failures counted on the address's ledger, nothing of the
    customer's touched (their failure count, lockout, cooldown, other steps), and never another
    session's step handed over."""
    now = svc.clock.now()
    challenge_id, queued, coded = await transact(svc.db, lambda: _unproven(
        svc, client, purpose=purpose, address=address, nonce=nonce, now=now, customer=customer, notice=notice,
        claim=claim))
    if queued is not None:
        svc.mailer.dispatch(queued)  # a notice goes the same way, and as soon, as a code
    if coded and customer is not None:
        await audit.record(svc.db, Event.CODE_SENT, customer_id=customer.id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
    return Step(challenge_id, nonce, purpose)


async def _taken_address(svc: Services, *, customer_id: int, address: str, nonce: str, notice: Notice | None,
                         claim: str | None, now: datetime, keep: int = 0,
                         again: otp.Challenge | None = None) -> tuple[int, outbox.Queued | None]:
    """taken_address_step() inside the caller's transaction; with `again`, its resend."""
    await otp.take_cooldown(svc.db, customer_id=customer_id, policy=svc.policy, now=now, keep=keep)
    window = mail_window(svc, address)
    took = await outbox.take_throttle(svc.db, window, now=now, window=svc.policy.resend_cooldown)
    earlier = None if took else await outbox.throttled_mail(svc.db, window)
    if again is not None:
        challenge_id = again.id
    else:
        challenge_id = await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer_id,
                                          purpose=Purpose.EMAIL, nonce=nonce,
                                          sent_to=shown_address(Purpose.EMAIL, address), kind=Kind.DECOY,
                                          mail_id=earlier, claim=claim)
    queued = None
    if took and notice is not None:
        queued = await _enqueue_notice(svc, notice, challenge_id=challenge_id, window=window, now=now)
    if again is not None:
        await otp.answer_again(svc.db, policy=svc.policy, now=now, challenge=again,
                               mail_id=queued.id if queued else earlier)
    return challenge_id, queued


async def taken_address_step(svc: Services, customer: Customer, *, address: str, nonce: str, notice: Notice | None,
                             claim: str) -> Step:
    """A signed-in customer's new address belongs to another account: a step that looks and
    behaves as the real one (the customer's cooldown taken and their other steps ended, failures
    on their own count; inside the cooldown, a placeholder), and a notice to the address's owner
    instead of a code (at most one a cooldown)."""
    now = svc.clock.now()
    try:
        challenge_id, queued = await transact(svc.db, lambda: _taken_address(
            svc, customer_id=customer.id, address=address, nonce=nonce, notice=notice, claim=claim, now=now))
    except otp.Cooldown:
        placeholder = await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer.id,
                                         purpose=Purpose.EMAIL, nonce=nonce,
                                         sent_to=shown_address(Purpose.EMAIL, address), kind=Kind.PLACEHOLDER,
                                         claim=claim)
        return Step(placeholder, nonce, Purpose.EMAIL)
    if queued is not None:
        svc.mailer.dispatch(queued)
    return Step(challenge_id, nonce, Purpose.EMAIL)


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
    assert by_email is not None
    # A sign-up nobody confirmed: whoever holds the mailbox may take it over with the code, which
    # is when these details replace the old ones (until then nothing changes). A confirmed
    # account: its owner is told instead, and the step looks the same.
    return await unproven_step(svc, client, purpose=Purpose.REGISTRATION, address=email, nonce=nonce,
                               customer=by_email, notice=None if _open_signup(by_email) else account_exists(by_email),
                               claim=claim)


def _open_signup(customer: Customer) -> bool:
    return customer.source == queries.SIGNUP and customer.email_verified_at is None


async def _create(svc: Services, client: Client, details: dict[str, str], *, email: str, nonce: str,
                  claim: str) -> Step:
    now = svc.clock.now()

    async def work() -> tuple[int, int, outbox.Queued | None, bool]:
        customer_id = await queries.create_customer(svc.db, username=details["username"], email=email,
                                                    full_name=details["full_name"],
                                                    password_hash=details["password_hash"], now=now)
        customer = Customer(customer_id, details["username"], email, details["full_name"], details["password_hash"],
                            None, True, 0, queries.SIGNUP)
        challenge_id, queued, coded = await _unproven(svc, client, purpose=Purpose.REGISTRATION, address=email,
                                                      nonce=nonce, now=now, customer=customer, notice=None,
                                                      claim=claim)
        return customer_id, challenge_id, queued, coded

    customer_id, challenge_id, queued, coded = await transact(svc.db, work)
    if queued is not None:
        svc.mailer.dispatch(queued)
    events = [Event.REGISTERED, Event.CODE_SENT] if coded else [Event.REGISTERED]
    await audit.record(svc.db, *events, customer_id=customer_id, ip=client.ip, user_agent=client.user_agent, now=now)
    return Step(challenge_id, nonce, Purpose.REGISTRATION)


class _Unmoved(Exception):
    """The sign-up could not move (confirmed, or its details replaced, meanwhile): rolled back."""


async def change_registration_email(svc: Services, client: Client, step: Step, email: str) -> Step | Refused | None:
    """The customer mistyped the address of a pending registration: a step for the new address,
    and the one sent to the old address stops working; at most one change per cooldown for the
    session, whatever the step is. None: the step is gone.

    The sign-up this step made moves to the new address. Any other step (a stand-in, or a
    registration that would take over someone's unconfirmed sign-up) registers its details again
    with the new address: only the mailbox's holder ever moves or takes over a sign-up, and every
    case answers alike."""
    challenge = await load(svc, step)
    if (challenge is None or challenge.used_at is not None or challenge.invalidated_at is not None
            or challenge.claim is None or challenge.purpose is not Purpose.REGISTRATION):
        return None
    now = svc.clock.now()
    limit = outbox.throttle_key(svc.keys.address, "address-change", step.nonce)
    if not await transact(svc.db, lambda: outbox.take_throttle(svc.db, limit, now=now,
                                                               window=svc.policy.resend_cooldown)):
        return Refused("email", f"We sent a code less than {svc.policy.resend_cooldown} seconds ago. Please wait a "
                                "moment, then try again.")
    details = svc.claims.open(challenge.claim)
    row = (await queries.get_customer(svc.db, challenge.customer_id)
           if challenge.customer_id is not None and challenge.kind is not Kind.DECOY else None)
    mine = (row is not None and _open_signup(row)
            and hmac.compare_digest(row.password_hash.encode(), details["password_hash"].encode()))
    taken = await queries.find_customer(svc.db, login=email) if mine else None
    if row is not None and mine and (taken is None or taken.id == row.id):
        moved = Customer(row.id, row.username, email, row.full_name, row.password_hash, None, row.otp_enabled,
                         row.session_version, row.source)

        async def work() -> tuple[int, outbox.Queued | None, bool]:
            if not await queries.move_signup(svc.db, row.id, email, password_hash=row.password_hash):
                raise _Unmoved
            await otp.end_step(svc.db, challenge.id, now)
            return await _unproven(svc, client, purpose=Purpose.REGISTRATION, address=email, nonce=step.nonce,
                                   now=now, customer=moved, notice=None, claim=challenge.claim)

        try:
            challenge_id, queued, coded = await transact(svc.db, work)
        except (_Unmoved, *INTEGRITY_ERRORS):
            pass  # confirmed, or the address taken, meanwhile: as any other step below
        else:
            if queued is not None:
                svc.mailer.dispatch(queued)
            if coded:
                await audit.record(svc.db, Event.CODE_SENT, customer_id=row.id, ip=client.ip,
                                   user_agent=client.user_agent, now=now)
            return Step(challenge_id, step.nonce, Purpose.REGISTRATION)
    await transact(svc.db, lambda: otp.end_step(svc.db, challenge.id, now))
    return await register_details(svc, client, details, email=email, nonce=step.nonce)


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
        # Refused unread, but after the same work as a wrong password: the answer's timing tells
        # neither that the limit was reached nor which names share an account.
        await check_password(None, password)
        ok, rehash = False, False
    else:
        ok, rehash = await check_password(customer.password_hash if customer else None, password)
    if not ok or customer is None:
        await audit.record(svc.db, Event.PASSWORD_FAILED, customer_id=customer.id if customer else None, ip=client.ip,
                           user_agent=client.user_agent, now=svc.clock.now())
        return False, None
    # Hashed before a pooled connection is taken: the pool never waits on Argon2.
    return True, (await hash_password(password) if rehash else None)


DISABLED = Refused("form", "This account is disabled. Please contact the shop's customer service.")


async def sign_in(svc: Services, client: Client, *, login: str, password: str,
                  device_tokens: tuple[str, ...] = ()) -> Step | SignedIn | Refused | None:
    """The password step, then the one second-step policy (second_step). None: refused (unknown
    user, wrong password, or the account's own limit reached: all answered alike)."""
    db = svc.db
    customer = await queries.find_customer(db, login=login)
    ok, new_hash = await check_account_password(svc, client, customer, login, password)
    if not ok or customer is None:
        return None
    if customer.disabled_at is not None:
        return DISABLED  # said only to whoever knows the password
    async with db.connection():
        if new_hash is not None:
            await queries.set_password_hash(db, customer.id, new_hash)
        return await second_step(svc, client, customer, device_tokens=device_tokens)


def factor_needed(customer: Customer, factors: Factors, now: datetime) -> bool:
    """An authenticator app or a passkey: the second step asks for one of them (or a backup code),
    never an emailed code, unless shop staff let this customer in with the emailed code for a
    while after they lost every factor."""
    bypass = customer.factor_bypass_until is not None and customer.factor_bypass_until > now
    return factors.strong and not bypass


async def second_step(svc: Services, client: Client, customer: Customer, *,
                      device_tokens: tuple[str, ...] = ()) -> Step | SignedIn:
    """The one second-step policy, for every way in that proved the password (and, later, any
    other first factor): a sign-up confirms its address first; a customer with an app or a
    passkey answers one of them (or a backup code), never an emailed code; otherwise an emailed
    code when codes are on; a device the customer trusts skips the second step, never the first."""
    db, now = svc.db, svc.clock.now()
    purpose = code_needed(customer)
    if purpose is Purpose.REGISTRATION:
        step = await send_code(svc, customer, purpose=purpose, nonce=secrets.token_urlsafe(24), client=client)
        return Step(step.challenge_id, step.nonce, purpose, None, step.reused)
    strong = factor_needed(customer, await factors_of(db, customer.id), now)
    method = None
    if purpose is None and not strong:
        method = Method.PASSWORD
    elif (device_tokens and not (customer.otp_locked_until and customer.otp_locked_until > now)
          and await trusted_device(svc, customer.id, device_tokens, now)):
        method = Method.DEVICE  # not while locked out: the step below says until when
    if method is not None:
        async def work() -> SignedIn:
            signed = await start_session(svc, customer.id, customer.session_version, client, now, method)
            await audit.record(db, Event.SIGNED_IN, customer_id=customer.id, ip=client.ip,
                               user_agent=client.user_agent, now=now)
            return signed

        return await transact(db, work)
    nonce = secrets.token_urlsafe(24)
    if strong:
        return await factor_step(svc, customer, purpose=Purpose.LOGIN, nonce=nonce)
    if customer.signin_paused_until and customer.signin_paused_until > now:
        # "Not you?" paused sign-in codes: none goes out; the step says until when.
        paused = await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=now, customer_id=customer.id,
                                    purpose=Purpose.LOGIN, nonce=nonce,
                                    sent_to=shown_address(Purpose.LOGIN, customer.email), kind=Kind.PLACEHOLDER)
        return Step(paused, nonce, Purpose.LOGIN, (customer.id, customer.session_version))
    step = await send_code(svc, customer, purpose=Purpose.LOGIN, nonce=nonce, client=client)
    return Step(step.challenge_id, step.nonce, Purpose.LOGIN, (customer.id, customer.session_version), step.reused)


async def factor_step(svc: Services, customer: Customer, *, purpose: Purpose, nonce: str,
                      ledger: str | None = None) -> Step:
    """A second step answered by the customer's app, a passkey or a backup code (Kind.FACTOR):
    bound to the pending session, with the same budget, failure count and lockout as a code, and
    no code: nothing is mailed, and no mailed code completes it. `ledger`: after a reset code,
    the address's ledger (whoever holds only the mailbox locks out that, not the owner's sign-in)."""
    challenge_id = await otp.stand_in(svc.db, keys=svc.keys, policy=svc.policy, now=svc.clock.now(),
                                      customer_id=customer.id, purpose=purpose, nonce=nonce, sent_to="",
                                      kind=Kind.FACTOR, ledger=ledger)
    return Step(challenge_id, nonce, purpose)


# --- the code step -----------------------------------------------------------------------


async def load(svc: Services, step: Step) -> otp.Challenge | None:
    return await otp.load_challenge(svc.db, keys=svc.keys, challenge_id=step.challenge_id, nonce=step.nonce,
                                    purpose=step.purpose)


@dataclass(frozen=True)
class CodeResult:
    signed_in: SignedIn | None = None
    reset_ready: bool = False  # a reset code was right: the customer may choose a new password
    next_step: Step | None = None  # the code was right, and a factor is asked next (a reset)
    email_changed: str | None = None  # the new address, now the account's
    deleted: bool = False
    challenge: otp.Challenge | None = None  # None (and nothing done): the step is gone
    verdict: otp.Verdict | None = None
    problem: str | None = None  # the entry was not a code at all, or the change could not be made


async def submit_code(svc: Services, client: Client, step: Step, code: str | None, problem: str | None,
                      *, signed_in_as: int | None = None, trust_device: bool = False) -> CodeResult:
    """One entry at the code step. A right code and everything it starts (a session, a changed
    address, a deleted account) happen in one transaction: a failure between them leaves the code
    unused. `signed_in_as`: the customer of the session this step runs in (a change of address
    or a deletion only completes for the same customer)."""
    db, now = svc.db, svc.clock.now()
    counted = False
    if code is not None and step.owner is not None and step.purpose is Purpose.LOGIN:
        customer_id, version = step.owner

        async def fast() -> SignedIn | otp.FastCheck:
            check = await otp.use_code(db, keys=svc.keys, policy=svc.policy, now=now, challenge_id=step.challenge_id,
                                       nonce=step.nonce, customer_id=customer_id, purpose=step.purpose, code=code)
            if check is not otp.FastCheck.USED:
                return check
            await otp.succeeded(db, customer_id, now)
            signed = await start_session(svc, customer_id, version, client, now, Method.CODE, trust_device)
            await audit.record(db, Event.VERIFIED, Event.SIGNED_IN, customer_id=customer_id, ip=client.ip,
                               user_agent=client.user_agent, now=now)
            return signed

        checked = await transact(db, fast)
        if isinstance(checked, SignedIn):
            return CodeResult(signed_in=checked)
        counted = checked is otp.FastCheck.COUNTED  # the full check below does not count it again
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
        verdict = await otp.verify(db, keys=svc.keys, policy=svc.policy, now=now, challenge=challenge, code=code,
                                   counted=counted)
        if verdict.status is not Outcome.VERIFIED or verdict.customer_id is None:
            return CodeResult(challenge=challenge, verdict=verdict)
        return await _finish(svc, client, challenge, verdict.customer_id, now, trust_device=trust_device,
                             nonce=step.nonce)

    try:
        result = await transact(db, full)
    except (_ClaimLost, *INTEGRITY_ERRORS):
        # The customer was deleted, or a claimed username or address taken, meanwhile: nothing
        # happened (the code is unused); say what to do.
        return CodeResult(challenge=challenge, problem="That could not be completed: the username or address was "
                                                       "taken a moment ago. Please start again.")
    verdict = result.verdict
    # Only an entry that was counted and compared is a failure (not one refused unread).
    if verdict is not None and verdict.checked and challenge.kind is not Kind.DECOY and \
            challenge.customer_id is not None:
        events = [Event.CODE_FAILED]
        if verdict.status is Outcome.LOCKED and verdict.customer_id is not None:
            events.append(Event.LOCKED)
        await audit.record(db, *events, customer_id=challenge.customer_id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
    if result.challenge is not None and verdict is not None:
        return CodeResult(challenge=await load(svc, step) or challenge, verdict=verdict)
    return result


class _ClaimLost(Exception):
    """The sign-up a registration code would take over was confirmed meanwhile: rolled back."""


async def _finish(svc: Services, client: Client, challenge: otp.Challenge, customer_id: int,
                  now: datetime, *, trust_device: bool = False, nonce: str = "") -> CodeResult:
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
        await otp.proved(db, challenge, now)
        await outbox.enqueue(db, svc.sealer, kind=MailKind.EMAIL_CHANGED, recipient=customer.email, now=now,
                             customer_id=customer_id,
                             context=notice_context(customer, client, now, new_address=forms.mask_email(new)))
        svc.mailer.notify()
        await audit.record(db, Event.VERIFIED, Event.EMAIL_CHANGED, **record)  # type: ignore[arg-type]
        return CodeResult(email_changed=new)
    if purpose is Purpose.RESET:
        # The mailbox is proven; the password is chosen next (recovery.set_new_password). The
        # customer's failure count and lockout stay as they were: a reset lifts neither.
        await otp.proved(db, challenge, now)
        await audit.record(db, Event.VERIFIED, **record)  # type: ignore[arg-type]
        customer = await queries.get_customer(db, customer_id)
        if customer is not None and factor_needed(customer, await factors_of(db, customer_id), now):
            # The mailbox alone is not enough for a customer with an app or a passkey: one of
            # them (or a backup code) next, in this same pending session.
            return CodeResult(next_step=await factor_step(svc, customer, purpose=Purpose.RESET, nonce=nonce,
                                                          ledger=challenge.ledger_key))
        return CodeResult(reset_ready=True)
    if purpose is Purpose.LOGIN:
        customer = await queries.get_customer(db, customer_id)
        if customer is None or factor_needed(customer, await factors_of(db, customer_id), now):
            # An app or a passkey was added (or staff help ended) since this step began: the
            # emailed code no longer completes it. It is used up; signing in again asks the factor.
            return CodeResult()
    if challenge.claim is not None:
        details = svc.claims.open(challenge.claim)
        # Only onto a sign-up still unconfirmed: a confirmed account is never signed into this way.
        if not await queries.apply_claim(db, customer_id, username=details["username"],
                                         full_name=details["full_name"], password_hash=details["password_hash"]):
            raise _ClaimLost
    await otp.proved(db, challenge, now)
    signed = await start_session(svc, customer_id, challenge.session_version, client, now, Method.CODE, trust_device)
    await audit.record(db, Event.VERIFIED, Event.SIGNED_IN, **record)  # type: ignore[arg-type]
    return CodeResult(signed_in=signed)


@dataclass(frozen=True)
class ResendResult:
    challenge: otp.Challenge | None = None  # None: the step is gone
    new_challenge_id: int | None = None
    wait: int = 0  # inside the cooldown: seconds left
    locked: bool = False
    factor: bool = False  # a factor step: no code is ever mailed for it


async def resend(svc: Services, client: Client, step: Step, *, signed_in_as: int | None = None) -> ResendResult:
    """One more code for the pending step, after the cooldown (kept in the database). Every code
    sent before for it goes on working until its own expiry (a late mail never strands anyone),
    under the step's one attempt budget."""
    challenge = await load(svc, step)
    if challenge is None or challenge.used_at is not None or challenge.invalidated_at is not None:
        return ResendResult()
    if step.purpose in (Purpose.EMAIL, Purpose.DELETE) and challenge.customer_id != signed_in_as:
        return ResendResult()
    now = svc.clock.now()
    if challenge.locked_until and challenge.locked_until > now:
        return ResendResult(challenge, locked=True)
    if challenge.kind is Kind.FACTOR:
        return ResendResult(challenge, factor=True)  # nothing to mail: it is answered by a factor
    try:
        if not challenge.proven:
            return await _resend_unproven(svc, client, step, challenge, now)
        if challenge.kind is Kind.DECOY:
            return await _resend_taken_address(svc, client, step, challenge, now)
        return await _resend_code(svc, client, step, challenge, now)
    except otp.StepEnded:  # used or ended meanwhile: nothing went out
        return ResendResult()


async def _resend_code(svc: Services, client: Client, step: Step, challenge: otp.Challenge,
                       now: datetime) -> ResendResult:
    """A proven step's resend, after the customer's cooldown."""
    assert challenge.customer_id is not None
    customer = await queries.get_customer(svc.db, challenge.customer_id)
    if customer is None:
        return ResendResult()
    if step.purpose is Purpose.LOGIN and factor_needed(customer, await factors_of(svc.db, customer.id), now):
        await transact(svc.db, lambda: otp.end_step(svc.db, challenge.id, now))
        return ResendResult()  # the customer's app or passkey is asked now: start again
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


async def _resend_unproven(svc: Services, client: Client, step: Step, challenge: otp.Challenge,
                           now: datetime) -> ResendResult:
    """A resend of a step nobody proved a secret for, answered alike whatever stands behind it:
    after the step's own timer, a new code when the address's account may have one (a new step
    when this one's tries are spent), the notice again for a registration of a confirmed address,
    no mail for no account; inside the address's mail window no mail at all, the step showing
    the one that went."""
    wait = challenge.resend_wait(svc.policy, now)
    if wait:
        return ResendResult(challenge, wait=wait)
    customer = await queries.get_customer(svc.db, challenge.customer_id) if challenge.customer_id else None
    notice = None
    if customer is not None and challenge.purpose is Purpose.REGISTRATION and not _open_signup(customer):
        notice = account_exists(customer)
    coded = customer is not None and notice is None and challenge.kind is not Kind.DECOY
    address = challenge.sent_to  # whole: registration and reset steps show the address as typed
    window = mail_window(svc, address)

    async def work() -> tuple[int, outbox.Queued | None, bool]:
        if challenge.attempts >= svc.policy.max_attempts:  # spent: a new step, as for a real one
            return await _unproven(svc, client, purpose=challenge.purpose, address=address, nonce=step.nonce,
                                   now=now, customer=customer, notice=notice, claim=challenge.claim)
        took = await outbox.take_throttle(svc.db, window, now=now, window=svc.policy.resend_cooldown)
        if took and coded:
            assert customer is not None
            issued, queued = await issue_code(svc, customer, purpose=challenge.purpose, nonce=step.nonce, now=now,
                                              client=client, claim=challenge.claim, challenge=challenge,
                                              ledger=challenge.ledger_key, shown=address)
            await outbox.note_throttled_mail(svc.db, window, queued.id)
            return issued.challenge_id, queued, True
        notified = None
        if took and notice is not None:
            notified = await _enqueue_notice(svc, notice, challenge_id=challenge.id, window=window, now=now)
        shown = notified.id if notified else None if took else await outbox.throttled_mail(svc.db, window)
        await otp.answer_again(svc.db, policy=svc.policy, now=now, challenge=challenge, mail_id=shown)
        return challenge.id, notified, False

    challenge_id, queued, coded_now = await transact(svc.db, work)
    if queued is not None:
        svc.mailer.dispatch(queued)
    if coded_now and customer is not None:
        await audit.record(svc.db, Event.CODE_SENT, customer_id=customer.id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
    return ResendResult(challenge, new_challenge_id=challenge_id)


async def _resend_taken_address(svc: Services, client: Client, step: Step, challenge: otp.Challenge,
                                now: datetime) -> ResendResult:
    """The resend of a signed-in customer's step for an address that belongs to another
    account, as a real one: the customer's cooldown, a new step when the tries are spent, and
    the notice again to the address's owner (at most one a cooldown)."""
    assert challenge.customer_id is not None and challenge.claim is not None
    address = svc.claims.open(challenge.claim)["email"]
    owner = await queries.find_customer(svc.db, login=address)
    notice = address_in_use(owner) if owner is not None and owner.id != challenge.customer_id else None
    spent = challenge.attempts >= svc.policy.max_attempts
    try:
        challenge_id, queued = await transact(svc.db, lambda: _taken_address(
            svc, customer_id=challenge.customer_id or 0, address=address, nonce=step.nonce, notice=notice,
            claim=challenge.claim, now=now, keep=0 if spent else challenge.id, again=None if spent else challenge))
    except otp.Cooldown as exc:
        await audit.record(svc.db, Event.RESEND_REFUSED, customer_id=challenge.customer_id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
        return ResendResult(challenge, wait=exc.retry_after)
    if queued is not None:
        svc.mailer.dispatch(queued)
    return ResendResult(challenge, new_challenge_id=challenge_id)


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

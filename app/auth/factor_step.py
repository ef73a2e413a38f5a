"""The second step answered by a factor (an authenticator app, a passkey, a backup code), and
signing in with a passkey alone. Every answer goes through otp.verify_factor: the step's one
attempt budget, the customer's failure count and lockout, exactly as an emailed code. No HTTP
here: routes parse the request and call one function."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from app import audit, otp
from app.audit import Event
from app.auth import queries
from app.auth.flows import CodeResult, SignedIn, Step, load, notice_context, start_session
from app.database import transact
from app.factors import Factors, Method, backup_codes, factors_of, passkeys, totp
from app.mail import outbox
from app.mail.outbox import MailKind
from app.otp import Kind, Outcome, Purpose
from app.security.crypto import Unreadable, keyed_hash
from app.services import Client, Services

log = logging.getLogger("app.factors")


@dataclass(frozen=True)
class Pending:
    """A factor step as its page shows it."""

    challenge: otp.Challenge
    factors: Factors


async def pending(svc: Services, step: Step) -> Pending | None:
    """The open factor step of this pending session, with what the customer can answer it with."""
    challenge = await load(svc, step)
    if (challenge is None or challenge.kind is not Kind.FACTOR or challenge.used_at is not None
            or challenge.invalidated_at is not None or challenge.customer_id is None):
        return None
    return Pending(challenge, await factors_of(svc.db, challenge.customer_id))


def binding(svc: Services, nonce: str) -> str:
    """What ties a WebAuthn challenge to this pending (or signed-out) session."""
    return keyed_hash(svc.keys.binding, "webauthn", nonce)


async def answer(svc: Services, client: Client, step: Step, *, method: Method, entry: str | None = None,
                 passkey: passkeys.Verified | None = None, trust_device: bool = False) -> CodeResult:
    """One answer at a factor step: an app code, a backup code, or a passkey assertion already
    verified (`passkey`; None with method PASSKEY: it was refused, a failure like a wrong code)."""
    db, now = svc.db, svc.clock.now()
    found = await pending(svc, step)
    if found is None:
        return CodeResult()
    challenge = found.challenge
    customer_id = challenge.customer_id
    assert customer_id is not None
    left: list[int] = []

    async def check() -> bool:
        if method is Method.APP:
            try:
                return entry is not None and await totp.check(db, svc.factors, customer_id=customer_id, code=entry,
                                                              now=now)
            except Unreadable:  # SECRET_KEY rotated without `python -m app factors reseal`
                log.error("authenticator app of customer %s: the current SECRET_KEY does not open its secret; "
                          "run python -m app factors reseal with the old key in SECRET_KEY_FALLBACKS", customer_id)
                return False
        if method is Method.BACKUP:
            remaining = None if entry is None else await backup_codes.use(db, svc.factors, customer_id=customer_id,
                                                                           entry=entry, now=now)
            if remaining is not None:
                left.append(remaining)
            return remaining is not None
        return passkey is not None and passkey.customer_id == customer_id

    async def work() -> CodeResult:
        verdict = await otp.verify_factor(db, policy=svc.policy, now=now, challenge=challenge, check=check)
        if verdict.status is not Outcome.VERIFIED:
            return CodeResult(challenge=challenge, verdict=verdict)
        if challenge.purpose is Purpose.RESET:
            await audit.record(db, Event.VERIFIED, customer_id=customer_id, ip=client.ip,
                               user_agent=client.user_agent, now=now)
            return CodeResult(reset_ready=True)
        await otp.succeeded(db, customer_id, now)  # failures reset, other pending steps ended
        signed = await start_session(svc, customer_id, challenge.session_version, client, now, method, trust_device)
        await audit.record(db, Event.VERIFIED, Event.SIGNED_IN, customer_id=customer_id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
        return CodeResult(signed_in=signed)

    result = await transact(db, work)
    verdict = result.verdict
    if verdict is not None and verdict.checked:
        events = [Event.FACTOR_FAILED]
        if verdict.status is Outcome.LOCKED:
            events.append(Event.LOCKED)
        await audit.record(db, *events, customer_id=customer_id, ip=client.ip, user_agent=client.user_agent, now=now)
        return CodeResult(challenge=await load(svc, step) or challenge, verdict=verdict)
    if left:
        await backup_code_used(svc, client, customer_id, left[0], now)
    return result


async def backup_code_used(svc: Services, client: Client, customer_id: int, left: int, now: datetime) -> None:
    """A backup code was spent: an audit event, and a mail saying how many are left."""
    await audit.record(svc.db, Event.BACKUP_CODE_USED, customer_id=customer_id, ip=client.ip,
                       user_agent=client.user_agent, now=now)
    customer = await queries.get_customer(svc.db, customer_id)
    if customer is None:
        return
    queued = await outbox.enqueue(svc.db, svc.sealer, kind=MailKind.BACKUP_CODE_USED, recipient=customer.email,
                                  now=now, customer_id=customer_id,
                                  context=notice_context(customer, client, now, left=left,
                                                         warn=left <= backup_codes.WARN_AT,
                                                         origin=client.origin or svc.settings.public_origin or ""))
    svc.mailer.dispatch(queued)


async def second_options(svc: Services, rp: passkeys.RelyingParty, step: Step) -> str | None:
    """WebAuthn options for answering this factor step with one of the customer's passkeys."""
    found = await pending(svc, step)
    if found is None or not found.factors.passkeys:
        return None
    assert found.challenge.customer_id is not None
    try:
        return await passkeys.authentication_options(svc.db, rp, purpose=passkeys.Purpose.SECOND,
                                                     customer_id=found.challenge.customer_id,
                                                     binding=binding(svc, step.nonce), now=svc.clock.now())
    except passkeys.PasskeyRefused:
        return None  # the last passkey was removed meanwhile


async def answer_with_passkey(svc: Services, client: Client, rp: passkeys.RelyingParty, step: Step, *,
                              response_json: str, trust_device: bool = False) -> tuple[CodeResult, str | None]:
    """The assertion for this factor step: checked (its own single-use challenge), then counted as
    any answer. Returns the result and, when the passkey was refused, why (for the page)."""
    found = await pending(svc, step)
    if found is None:
        return CodeResult(), None
    refused = None
    try:
        verified: passkeys.Verified | None = await passkeys.authenticate(
            svc.db, rp, purpose=passkeys.Purpose.SECOND, customer_id=found.challenge.customer_id,
            binding=binding(svc, step.nonce), response_json=response_json, now=svc.clock.now())
    except passkeys.PasskeyRefused as exc:
        verified, refused = None, exc.message
    return await answer(svc, client, step, method=Method.PASSKEY, passkey=verified,
                        trust_device=trust_device), refused


async def alone_options(svc: Services, rp: passkeys.RelyingParty, nonce: str) -> str:
    """WebAuthn options for signing in with a passkey alone (any discoverable credential)."""
    return await passkeys.authentication_options(svc.db, rp, purpose=passkeys.Purpose.ALONE, customer_id=None,
                                                 binding=binding(svc, nonce), now=svc.clock.now())


class PasskeySignInRefused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def sign_in_with_passkey(svc: Services, client: Client, rp: passkeys.RelyingParty, *, nonce: str,
                               response_json: str) -> SignedIn:
    """A passkey alone, with user verification: something the customer has and is (or knows, the
    device PIN), which is both steps of the policy at once. A customer locked out after wrong
    codes stays locked out; a sign-up whose address is unconfirmed has no passkey to use."""
    now = svc.clock.now()
    try:
        verified = await passkeys.authenticate(svc.db, rp, purpose=passkeys.Purpose.ALONE, customer_id=None,
                                               binding=binding(svc, nonce), response_json=response_json, now=now)
    except passkeys.PasskeyRefused as exc:
        await audit.record(svc.db, Event.FACTOR_FAILED, customer_id=None, ip=client.ip, user_agent=client.user_agent,
                           now=now)
        raise PasskeySignInRefused(exc.message) from exc
    customer = await queries.get_customer(svc.db, verified.customer_id)
    if customer is None:
        raise PasskeySignInRefused("That passkey no longer belongs to an account here.")
    if customer.disabled_at is not None:
        raise PasskeySignInRefused("This account is disabled. Please contact the shop's customer service.")
    if customer.otp_locked_until is not None and customer.otp_locked_until > now:
        raise PasskeySignInRefused("Sign-in is paused after too many wrong codes. Please try again later.")

    async def work() -> SignedIn:
        signed = await start_session(svc, customer.id, customer.session_version, client, now, Method.PASSKEY)
        await audit.record(svc.db, Event.SIGNED_IN, customer_id=customer.id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
        return signed

    return await transact(svc.db, work)

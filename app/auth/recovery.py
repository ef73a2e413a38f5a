"""Forgot password: a code to the address (the same answer whether or not it has an account),
then a new password. No HTTP here."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from app import audit, otp
from app.audit import Event
from app.auth import queries
from app.auth.flows import (
    SignedIn,
    Step,
    code_needed,
    factor_needed,
    load,
    notice_context,
    start_session,
    unproven_step,
)
from app.auth.queries import Customer
from app.database import transact
from app.factors import Method, devices, factors_of
from app.mail import outbox
from app.mail.outbox import MailKind
from app.otp import Kind, Purpose
from app.security.passwords import hash_password
from app.services import Client, Services


async def request_reset(svc: Services, client: Client, *, email: str) -> Step:
    """A reset code to the address when it has an account; otherwise a step that looks and
    behaves the same and mails nothing. Anyone can ask, so the step proves nothing: its failures
    count on the address's own ledger, and it never touches the customer's failure count,
    lockout, cooldown or pending sign-in (flows.unproven_step)."""
    customer = await queries.find_customer(svc.db, login=email)
    await audit.record(svc.db, Event.RESET_REQUESTED, customer_id=customer.id if customer else None, ip=client.ip,
                       user_agent=client.user_agent, now=svc.clock.now())
    return await unproven_step(svc, client, purpose=Purpose.RESET, address=email, nonce=secrets.token_urlsafe(24),
                               customer=customer)


async def reset_customer(svc: Services, step: Step) -> Customer | None:
    """The customer whose reset code this step entered (within the code's lifetime), if its new
    password is still to be chosen."""
    if step.purpose is not Purpose.RESET:
        return None
    challenge = await load(svc, step)
    now = svc.clock.now()
    if (challenge is None or challenge.used_at is None or challenge.invalidated_at is not None
            or (now - challenge.used_at).total_seconds() > svc.policy.ttl(Purpose.RESET)):
        return None
    customer = await queries.get_customer(svc.db, challenge.customer_id)
    # A customer with an app or a passkey proved one of them too (the step is the factor's, which
    # only follows a right reset code): the mailbox alone never resets such an account.
    if (customer is not None and challenge.kind is not Kind.FACTOR
            and factor_needed(customer, await factors_of(svc.db, customer.id), now)):
        return None
    return customer


@dataclass(frozen=True)
class StillLocked:
    """The password changed, but the customer's codes are paused after too many wrong ones: a
    reset lifts no lockout, so no session starts until it ends."""

    until: datetime


async def set_new_password(svc: Services, client: Client, step: Step, *,
                           password: str) -> SignedIn | StillLocked | None:
    """The new password, once: Argon2id stored, every session ended, a fresh one for this
    browser (unless the customer's codes are locked out), a notice to the address. None: the
    step is gone (used, or too old)."""
    customer = await reset_customer(svc, step)
    if customer is None:
        return None
    new_hash = await hash_password(password)
    now = svc.clock.now()

    async def work() -> SignedIn | StillLocked | None:
        if not await otp.consume(svc.db, challenge_id=step.challenge_id, now=now,
                                 within=svc.policy.ttl(Purpose.RESET)):
            return None  # used already (another tab), or too old
        await queries.set_password_hash(svc.db, customer.id, new_hash)
        await queries.revoke_all_now(svc.db, customer.id, now)
        await devices.revoke_all(svc.db, customer_id=customer.id, now=now)  # a new password trusts no device
        version = await queries.session_version(svc.db, customer.id)
        assert version is not None
        locked = customer.otp_locked_until
        signed: SignedIn | StillLocked
        if locked is not None and locked > now and code_needed(customer) is not None:
            signed = StillLocked(locked)
        else:
            signed = await start_session(svc, customer.id, version, client, now, Method.RESET)
        await outbox.enqueue(svc.db, svc.sealer, kind=MailKind.PASSWORD_CHANGED, recipient=customer.email, now=now,
                             customer_id=customer.id,
                             context=notice_context(customer, client, now, reset=True,
                                                    origin=svc.settings.public_origin or ""))
        events = [Event.PASSWORD_RESET, Event.SESSION_REVOKED]
        if isinstance(signed, SignedIn):
            events.append(Event.SIGNED_IN)
        await audit.record(svc.db, *events, customer_id=customer.id, ip=client.ip, user_agent=client.user_agent,
                           now=now)
        return signed

    signed = await transact(svc.db, work)
    if signed is not None:
        svc.mailer.notify()
    return signed

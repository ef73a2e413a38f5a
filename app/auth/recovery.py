"""Forgot password: a code to the address (the same answer whether or not it has an account),
then a new password. No HTTP here."""

from __future__ import annotations

import secrets

from app import audit, otp
from app.audit import Event
from app.auth import queries
from app.auth.flows import SignedIn, Step, decoy, load, notice_context, send_code, start_session
from app.auth.queries import Customer
from app.database import transact
from app.mail import outbox
from app.mail.outbox import MailKind
from app.otp import Purpose
from app.security.passwords import hash_password
from app.services import Client, Services


async def request_reset(svc: Services, client: Client, *, email: str) -> Step:
    """A reset code to the address when it has an account; otherwise a step that looks the same
    and mails nothing. The cooldown, the attempt cap and the lockout are those of every code: a
    locked customer stays locked."""
    nonce = secrets.token_urlsafe(24)
    customer = await queries.find_customer(svc.db, login=email)
    if customer is None:
        return Step(await decoy(svc, purpose=Purpose.RESET, shown_to=email, nonce=nonce, notice=None), nonce,
                    Purpose.RESET)
    await audit.record(svc.db, Event.RESET_REQUESTED, customer_id=customer.id, ip=client.ip,
                       user_agent=client.user_agent, now=svc.clock.now())
    # The step shows the address as typed, whatever case the account's has.
    return await send_code(svc, customer, purpose=Purpose.RESET, nonce=nonce, client=client)


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
    return await queries.get_customer(svc.db, challenge.customer_id)


async def set_new_password(svc: Services, client: Client, step: Step, *, password: str) -> SignedIn | None:
    """The new password, once: Argon2id stored, every session ended, a fresh one for this
    browser, a notice to the address. None: the step is gone (used, or too old)."""
    customer = await reset_customer(svc, step)
    if customer is None:
        return None
    new_hash = await hash_password(password)
    now = svc.clock.now()

    async def work() -> SignedIn | None:
        if not await otp.consume(svc.db, challenge_id=step.challenge_id, now=now,
                                 within=svc.policy.ttl(Purpose.RESET)):
            return None  # used already (another tab), or too old
        await queries.set_password_hash(svc.db, customer.id, new_hash)
        await queries.revoke_all_now(svc.db, customer.id, now)
        version = await queries.session_version(svc.db, customer.id)
        assert version is not None
        signed = await start_session(svc, customer.id, version, client, now)
        await outbox.enqueue(svc.db, svc.sealer, kind=MailKind.PASSWORD_CHANGED, recipient=customer.email, now=now,
                             customer_id=customer.id,
                             context=notice_context(customer, client, now, reset=True,
                                                    origin=svc.settings.public_origin or ""))
        await audit.record(svc.db, Event.PASSWORD_RESET, Event.SESSION_REVOKED, Event.SIGNED_IN,
                           customer_id=customer.id, ip=client.ip, user_agent=client.user_agent, now=now)
        return signed

    signed = await transact(svc.db, work)
    if signed is not None:
        svc.mailer.notify()
    return signed

"""Account settings: change the password, change the address (a code to the new one), delete
the account (password plus a code). No HTTP here."""

from __future__ import annotations

import secrets

from app import audit
from app.audit import Event
from app.auth import queries
from app.auth.flows import (
    Refused,
    SignedIn,
    Step,
    address_in_use,
    check_account_password,
    notice_context,
    send_code,
    start_session,
    taken_address_step,
)
from app.auth.queries import Customer
from app.database import transact
from app.factors import Method, devices
from app.mail import outbox
from app.mail.outbox import MailKind
from app.otp import Purpose
from app.security.passwords import hash_password
from app.services import Client, Services

WRONG_PASSWORD = "That is not your current password."


async def change_password(svc: Services, client: Client, customer: Customer, *, current: str,
                          new: str, method: Method = Method.PASSWORD) -> SignedIn | Refused:
    """Needs the current password. Every other session ends; this browser gets a fresh one; the
    address is told."""
    full = await queries.find_customer(svc.db, login=customer.email)  # with its password hash
    ok, _ = await check_account_password(svc, client, full, customer.email, current)
    if not ok or full is None:
        return Refused("current_password", WRONG_PASSWORD)
    new_hash = await hash_password(new)
    now = svc.clock.now()

    async def work() -> SignedIn:
        await queries.set_password_hash(svc.db, customer.id, new_hash)
        await queries.revoke_all_now(svc.db, customer.id, now)
        await devices.revoke_all(svc.db, customer_id=customer.id, now=now)  # a new password trusts no device
        version = await queries.session_version(svc.db, customer.id)
        assert version is not None
        signed = await start_session(svc, customer.id, version, client, now, method)
        await outbox.enqueue(svc.db, svc.sealer, kind=MailKind.PASSWORD_CHANGED, recipient=customer.email, now=now,
                             customer_id=customer.id,
                             context=notice_context(customer, client, now, reset=False,
                                                    origin=svc.settings.public_origin or ""))
        await audit.record(svc.db, Event.PASSWORD_CHANGED, Event.SESSION_REVOKED, Event.SIGNED_IN,
                           customer_id=customer.id, ip=client.ip, user_agent=client.user_agent, now=now)
        return signed

    signed = await transact(svc.db, work)
    svc.mailer.notify()
    return signed


async def start_email_change(svc: Services, client: Client, customer: Customer, *, new_email: str,
                             password: str) -> Step | Refused:
    """Needs the password; then a code to the new address, and the change only once it is
    entered. An address that belongs to another account gets a notice instead, and the step
    looks the same (no way to learn who has an account here)."""
    full = await queries.find_customer(svc.db, login=customer.email)
    ok, _ = await check_account_password(svc, client, full, customer.email, password)
    if not ok:
        return Refused("password", WRONG_PASSWORD)
    nonce = secrets.token_urlsafe(24)
    claim = svc.claims.seal({"email": new_email})
    taken = await queries.find_customer(svc.db, login=new_email)
    if taken is not None and taken.id != customer.id:
        return await taken_address_step(svc, customer, address=new_email, nonce=nonce, notice=address_in_use(taken),
                                        claim=claim)
    return await send_code(svc, customer, purpose=Purpose.EMAIL, nonce=nonce, client=client, claim=claim,
                           recipient=new_email)


async def start_deletion(svc: Services, client: Client, customer: Customer, *, password: str) -> Step | Refused:
    """Needs the password, then a code to the address: whoever deletes the account holds both."""
    full = await queries.find_customer(svc.db, login=customer.email)
    ok, _ = await check_account_password(svc, client, full, customer.email, password)
    if not ok:
        return Refused("password", WRONG_PASSWORD)
    return await send_code(svc, customer, purpose=Purpose.DELETE, nonce=secrets.token_urlsafe(24), client=client)

"""Ways to sign in, from the account: an authenticator app, passkeys, backup codes, trusted
devices, and the re-authentication every change needs. Each change revokes the customer's
trusted devices (what they trusted was the old set), is an audit event, and is mailed to the
customer. No HTTP here."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from app import audit
from app.audit import Event
from app.auth import queries
from app.auth.flows import check_account_password, notice_context
from app.auth.queries import Customer, SessionRow
from app.database import transact
from app.factors import Factors, backup_codes, devices, factors_of, passkeys, totp
from app.mail import outbox
from app.mail.outbox import MailKind
from app.security.crypto import keyed_hash
from app.services import Client, Services

WRONG_PASSWORD = "That is not your password."


def recent(svc: Services, session: SessionRow, now: datetime) -> bool:
    """The customer proved the password (or a factor) in this session within REAUTH_MINUTES."""
    proved = session.authenticated_at or session.created_at
    return now - proved <= timedelta(minutes=svc.settings.reauth_minutes)


async def reauthenticate(svc: Services, client: Client, customer: Customer, session: SessionRow, *,
                         password: str) -> bool:
    """The password again, for a change of the ways to sign in (the same limit and timing as
    any password check)."""
    full = await queries.find_customer(svc.db, login=customer.email)
    ok, _ = await check_account_password(svc, client, full, customer.email, password)
    if not ok:
        return False
    now = svc.clock.now()
    await queries.reauthenticated(svc.db, session.id, now)
    await audit.record(svc.db, Event.REAUTHENTICATED, customer_id=customer.id, ip=client.ip,
                       user_agent=client.user_agent, now=now)
    return True


async def _changed(svc: Services, client: Client, customer: Customer, *, event: Event, kind: MailKind,
                   now: datetime, **context: Any) -> None:
    """After any change (inside its transaction): devices revoked, the event, the mail."""
    await devices.revoke_all(svc.db, customer_id=customer.id, now=now)
    await queries.end_open_steps(svc.db, customer.id, now)  # begun under the old set of factors
    await audit.record(svc.db, event, customer_id=customer.id, ip=client.ip, user_agent=client.user_agent, now=now)
    await outbox.enqueue(svc.db, svc.sealer, kind=kind, recipient=customer.email, now=now, customer_id=customer.id,
                         context=notice_context(customer, client, now, origin=client.origin, **context))


async def _finish(svc: Services, work: Any) -> Any:
    result = await transact(svc.db, work)
    svc.mailer.notify()
    return result


# --- authenticator app ---------------------------------------------------------------------


async def app_setup(svc: Services, customer: Customer) -> str | None:
    """The secret being enrolled (a new one the first time); None when an app is set up already."""
    now = svc.clock.now()
    secret = await totp.pending_secret(svc.db, svc.factors, customer.id)
    if secret is not None:
        return secret
    try:
        return await totp.start(svc.db, svc.factors, customer_id=customer.id, now=now)
    except totp.AlreadyEnrolled:
        return None


async def confirm_app(svc: Services, client: Client, customer: Customer, *, code: str) -> list[str] | None:
    """The app's first code: it counts from now on. Returns the first backup codes when this is
    the customer's first strong factor (shown once), [] otherwise; None when the code is wrong."""
    now = svc.clock.now()
    before = await factors_of(svc.db, customer.id)

    async def work() -> list[str] | None:
        if not await totp.confirm(svc.db, svc.factors, customer_id=customer.id, code=code, now=now):
            return None
        await _changed(svc, client, customer, event=Event.FACTOR_ADDED, kind=MailKind.FACTOR_ADDED, now=now,
                       factor="An authenticator app")
        return await _first_backup_codes(svc, client, customer, before, now)

    return await _finish(svc, work)


async def remove_app(svc: Services, client: Client, customer: Customer) -> bool:
    now = svc.clock.now()

    async def work() -> bool:
        if not await totp.remove(svc.db, customer.id):
            return False
        await _after_removal(svc, client, customer, now, factor="Your authenticator app")
        return True

    return bool(await _finish(svc, work))


# --- passkeys ----------------------------------------------------------------------------


def passkey_binding(svc: Services, session: SessionRow) -> str:
    return keyed_hash(svc.keys.binding, "webauthn-register", session.id)


async def passkey_options(svc: Services, rp: passkeys.RelyingParty, customer: Customer, session: SessionRow) -> str:
    return await passkeys.registration_options(svc.db, rp, customer_id=customer.id,
                                               username=customer.username or customer.email,
                                               display_name=customer.full_name or customer.email,
                                               binding=passkey_binding(svc, session), now=svc.clock.now())


async def add_passkey(svc: Services, client: Client, rp: passkeys.RelyingParty, customer: Customer,
                      session: SessionRow, *, response_json: str, label: str) -> bool:
    """Register the passkey (passkeys.PasskeyRefused when it cannot be). True when it is the
    customer's first strong factor: the first backup codes are to be shown next."""
    now = svc.clock.now()
    before = await factors_of(svc.db, customer.id)
    await passkeys.register(svc.db, rp, customer_id=customer.id, binding=passkey_binding(svc, session),
                            response_json=response_json, label=label, now=now)

    async def work() -> None:
        await _changed(svc, client, customer, event=Event.FACTOR_ADDED, kind=MailKind.FACTOR_ADDED, now=now,
                       factor=f"A passkey ({passkeys.clean_label(label)})")

    await _finish(svc, work)
    return not before.strong and not before.backup_made


async def remove_passkey(svc: Services, client: Client, customer: Customer, authenticator_id: int) -> bool:
    now = svc.clock.now()

    async def work() -> bool:
        if not await passkeys.remove(svc.db, customer.id, authenticator_id):
            return False
        await _after_removal(svc, client, customer, now, factor="A passkey")
        return True

    return bool(await _finish(svc, work))


async def _after_removal(svc: Services, client: Client, customer: Customer, now: datetime, *, factor: str) -> None:
    if not (await factors_of(svc.db, customer.id)).strong:
        await backup_codes.drop(svc.db, customer.id)  # they stand in for a factor that is gone
    await _changed(svc, client, customer, event=Event.FACTOR_REMOVED, kind=MailKind.FACTOR_REMOVED, now=now,
                   factor=factor)


# --- backup codes ------------------------------------------------------------------------


async def _first_backup_codes(svc: Services, client: Client, customer: Customer, before: Factors,
                              now: datetime) -> list[str]:
    if before.strong or before.backup_made:
        return []
    codes = await backup_codes.replace(svc.db, svc.factors, customer_id=customer.id, now=now)
    await audit.record(svc.db, Event.BACKUP_CODES_CREATED, customer_id=customer.id, ip=client.ip,
                       user_agent=client.user_agent, now=now)
    return codes


async def first_backup_codes(svc: Services, client: Client, customer: Customer) -> list[str] | None:
    """After the first passkey: the first set, once (None when a set exists already)."""
    now = svc.clock.now()
    factors = await factors_of(svc.db, customer.id)
    if not factors.strong or factors.backup_made:
        return None
    return list(await _finish(svc, lambda: _first_backup_codes(svc, client, customer, Factors(), now)))


async def new_backup_codes(svc: Services, client: Client, customer: Customer) -> list[str] | None:
    """A new set in place of the old one (every old code stops working); None without a strong
    factor (backup codes stand in for one)."""
    now = svc.clock.now()
    if not (await factors_of(svc.db, customer.id)).strong:
        return None

    async def work() -> list[str]:
        codes = await backup_codes.replace(svc.db, svc.factors, customer_id=customer.id, now=now)
        await _changed(svc, client, customer, event=Event.BACKUP_CODES_CREATED, kind=MailKind.BACKUP_CODES_CREATED,
                       now=now)
        return codes

    return list(await _finish(svc, work))


def backup_codes_file(customer: Customer, codes: list[str], now: datetime) -> str:
    """The .txt a customer downloads: the codes, grouped, with what they are for."""
    lines = ["Computer Shop backup codes", f"Account: {customer.email}", f"Made: {now:%Y-%m-%d %H:%M} UTC", "",
             "Each code works once, instead of your authenticator app or passkey.", ""]
    lines += [f"  {backup_codes.grouped(c)}" for c in codes]
    return "\n".join(lines) + "\n"


# --- trusted devices ---------------------------------------------------------------------


async def revoke_device(svc: Services, client: Client, customer: Customer, device_id: int) -> bool:
    now = svc.clock.now()
    if not await devices.revoke(svc.db, customer_id=customer.id, device_id=device_id, now=now):
        return False
    await audit.record(svc.db, Event.DEVICE_REVOKED, customer_id=customer.id, ip=client.ip,
                       user_agent=client.user_agent, now=now)
    return True


async def revoke_all_devices(svc: Services, client: Client, customer: Customer) -> int:
    now = svc.clock.now()
    count = await devices.revoke_all(svc.db, customer_id=customer.id, now=now)
    if count:
        await audit.record(svc.db, Event.DEVICE_REVOKED, customer_id=customer.id, ip=client.ip,
                           user_agent=client.user_agent, now=now)
    return count

"""Passkeys (WebAuthn) with py_webauthn: the options for the browser, the checks of what it
answers, and the rows they leave. No HTTP here: the routes hand over the response JSON and an
opaque `binding` they derive from the session.

Every ceremony has a challenge row (webauthn_challenges, keyed by the SHA-256 of the challenge)
that lives 5 minutes, belongs to one session, one purpose and one customer (none for a passkey
sign-in), and is taken by one guarded UPDATE before anything else is looked at: of any number
of answers to one challenge, one is checked. A passkey is an `authenticators` row of type
"passkey" found by `lookup`, the SHA-256 of its credential id (unique).
"""

from __future__ import annotations

import binascii
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from databases import Database
from webauthn import (
    base64url_to_bytes,
    generate_authentication_options,
    generate_registration_options,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import (
    bytes_to_base64url,
    options_to_json_dict,
    parse_authentication_credential_json,
    parse_authenticator_data,
    parse_registration_credential_json,
)
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticationCredential,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    RegistrationCredential,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from app import sql
from app.database import INTEGRITY_ERRORS
from app.factors import Type
from app.tables import authenticators, webauthn_challenges

log = logging.getLogger("app.factors")

CHALLENGE_TTL = 300  # seconds a ceremony may take, from the options to the answer
LABEL_MAX = 100  # authenticators.label
DEFAULT_LABEL = "Passkey"
# A browser's answer is a few kilobytes (an attestation with certificates, at most ~10 kB);
# anything far larger is not one, and is refused before it is parsed.
RESPONSE_MAX = 64 * 1024
CREDENTIAL_ID_MAX = 1023  # WebAuthn level 3, registration step "credentialId ≤ 1023 bytes"


@dataclass(frozen=True)
class RelyingParty:
    """This site as WebAuthn sees it."""

    id: str  # the RP ID, a registrable domain: "localhost", "shop.example"
    name: str  # shown by the authenticator: "Computer Shop"
    origin: str  # where the ceremonies run: "https://shop.example" (clientDataJSON.origin)


class Purpose(StrEnum):
    """webauthn_challenges.purpose"""

    REGISTER = "register"  # adding a passkey from the dashboard
    ALONE = "alone"  # signing in with a passkey alone (a discoverable credential, no username)
    SECOND = "second"  # the second step after the password


class Reason(StrEnum):
    """Why a ceremony was refused."""

    EXPIRED_CHALLENGE = "expired_challenge"  # unknown, or older than CHALLENGE_TTL
    USED_CHALLENGE = "used_challenge"  # answered already (a replay, a second tab)
    WRONG_CHALLENGE = "wrong_challenge"  # made for another session, purpose or customer
    UNKNOWN_CREDENTIAL = "unknown_credential"  # no such passkey (removed, or never registered here)
    NOT_YOURS = "not_yours"  # a passkey of another customer at this customer's second step
    NO_USER_VERIFICATION = "no_user_verification"  # signing in alone without a PIN or biometric
    SECOND_ONLY = "second_only"  # registered without user verification or not discoverable
    CLONED = "cloned"  # the sign counter did not go up: possibly a copied authenticator
    INVALID = "invalid"  # anything py_webauthn refuses: signature, origin, RP ID, malformed input
    ALREADY_REGISTERED = "already_registered"  # this credential is registered already
    NO_PASSKEY = "no_passkey"  # a second step asked of a customer without passkeys


# Unknown and someone else's passkey read alike: the answer does not tell whether a credential
# id is registered to another account.
_UNKNOWN = "We don't recognise this passkey for this account. Try another passkey, or sign in another way."
MESSAGES = {
    Reason.EXPIRED_CHALLENGE: "The passkey request timed out. Please try again.",
    Reason.USED_CHALLENGE: "This passkey request was already used. Please try again.",
    Reason.WRONG_CHALLENGE: "This passkey request was started elsewhere. Please try again from this page.",
    Reason.UNKNOWN_CREDENTIAL: _UNKNOWN,
    Reason.NOT_YOURS: _UNKNOWN,
    Reason.NO_USER_VERIFICATION: "Your device did not confirm it was you (with a PIN, fingerprint or face). "
                                 "Try again and unlock it when asked, or sign in with your password.",
    Reason.SECOND_ONLY: "This passkey can only be used after your password. Sign in with your password first.",
    Reason.CLONED: "For your safety this passkey was not accepted. Sign in another way, and contact us if this "
                   "keeps happening.",
    Reason.INVALID: "The passkey could not be checked. Please try again, or sign in another way.",
    Reason.ALREADY_REGISTERED: "This passkey is already registered. There is no need to add it again.",
    Reason.NO_PASSKEY: "There is no passkey on this account. Choose another way to sign in.",
}


class PasskeyRefused(Exception):
    """A ceremony that did not succeed; `message` is for the customer."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason = reason

    @property
    def message(self) -> str:
        return MESSAGES[self.reason]


@dataclass(frozen=True)
class Passkey:
    id: int
    label: str
    created_at: datetime
    last_used_at: datetime | None
    alone: bool  # may sign in without the password
    backed_up: bool  # synced by its provider (it survives the loss of a device)


@dataclass(frozen=True)
class Verified:
    customer_id: int  # from the passkey's row, never from the request
    authenticator_id: int
    user_verified: bool


def user_handle(customer_id: int) -> bytes:
    """The WebAuthn user.id of a customer: the same for all their passkeys (an authenticator
    keeps one passkey per site and user.id, and a sign-in alone names its account by it).
    Derived, not random, as there is no column to keep one; it holds no name or address."""
    return hashlib.sha256(f"computer-shop customer {customer_id}".encode()).digest()


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def clean_label(label: str) -> str:
    """Printable, single-spaced, at most LABEL_MAX characters; DEFAULT_LABEL when nothing is left."""
    text = " ".join("".join(ch for ch in label if ch.isprintable()).split())
    return text[:LABEL_MAX].rstrip() or DEFAULT_LABEL


# --- SQL -------------------------------------------------------------------------------------

ch = webauthn_challenges
a = authenticators

_NEW_CHALLENGE = sql.Query(
    ch.insert(), columns=("id", "customer_id", "purpose", "binding", "challenge", "created_at", "expires_at")
)
# The answer takes its challenge, once: still open, of this session, purpose and customer (NULL
# for a sign-in alone). Of concurrent answers to one challenge exactly one changes the row.
_TAKE = sql.Query(
    ch.update()
    .where(
        ch.c.id == sa.bindparam("chid"),
        ch.c.used_at.is_(None),
        ch.c.expires_at > sa.bindparam("now"),
        ch.c.binding == sa.bindparam("binding"),
        ch.c.purpose == sa.bindparam("purpose"),
        ch.c.customer_id.is_not_distinct_from(sa.bindparam("uid", type_=sa.Integer)),
    )
    .values(used_at=sa.bindparam("now"))
)
_CHALLENGE = sql.Query(
    sa.select(ch.c.used_at, ch.c.expires_at).where(ch.c.id == sa.bindparam("chid"))
)
_FORGET = sql.Query(
    ch.delete().where(sa.or_(ch.c.expires_at <= sa.bindparam("now"), ch.c.used_at.is_not(None)))
)

_is_passkey = a.c.type == Type.PASSKEY.value
_OF_CUSTOMER = sql.Query(
    sa.select(a.c.id, a.c.label, a.c.data, a.c.created_at, a.c.last_used_at)
    .where(a.c.customer_id == sa.bindparam("uid"), _is_passkey)
    .order_by(a.c.created_at, a.c.id)
)
_BY_LOOKUP = sql.Query(
    sa.select(a.c.id, a.c.customer_id, a.c.data).where(a.c.lookup == sa.bindparam("lookup"), _is_passkey)
)
_BY_ID = sql.Query(sa.select(a.c.id, a.c.customer_id, a.c.data).where(a.c.id == sa.bindparam("aid")))
_ADD = sql.Query(
    a.insert().values(type=Type.PASSKEY.value),
    columns=("customer_id", "data", "label", "lookup", "created_at", "confirmed_at", "last_used_at"),
)
# A use moves the sign counter on only from the data it was checked against (compare and swap):
# two sign-ins with one passkey at once cannot both move it from the same value.
_USED = sql.Query(
    a.update()
    .where(a.c.id == sa.bindparam("aid"), a.c.data == sa.bindparam("seen"))
    .values(data=sa.bindparam("new_data"), last_used_at=sa.bindparam("now"))
)
_REMOVE = sql.Query(a.delete().where(a.c.id == sa.bindparam("aid"), a.c.customer_id == sa.bindparam("uid"),
                                     _is_passkey))


# --- ceremonies ------------------------------------------------------------------------------


_TRANSPORTS = frozenset(t.value for t in AuthenticatorTransport)


def _descriptors(rows: list[Any]) -> list[PublicKeyCredentialDescriptor]:
    found = []
    for row in rows:
        data = json.loads(row.data)
        transports = [AuthenticatorTransport(t) for t in data.get("transports", []) if t in _TRANSPORTS]
        found.append(PublicKeyCredentialDescriptor(id=base64url_to_bytes(data["credential_id"]),
                                                   transports=transports or None))
    return found


async def _new_challenge(db: Database, challenge: bytes, *, purpose: Purpose, customer_id: int | None,
                         binding: str, now: datetime) -> None:
    await sql.execute(db, _NEW_CHALLENGE, id=_sha256_hex(challenge), customer_id=customer_id,
                      purpose=purpose.value, binding=binding, challenge=bytes_to_base64url(challenge),
                      created_at=now, expires_at=now + timedelta(seconds=CHALLENGE_TTL))


async def registration_options(db: Database, rp: RelyingParty, *, customer_id: int, username: str,
                               display_name: str, binding: str, now: datetime) -> str:
    """Options for navigator.credentials.create(), as JSON; the challenge is stored."""
    existing = await sql.fetch_all(db, _OF_CUSTOMER, uid=customer_id)
    options = generate_registration_options(
        rp_id=rp.id,
        rp_name=rp.name,
        user_id=user_handle(customer_id),
        user_name=username or display_name,
        user_display_name=display_name or username,
        timeout=CHALLENGE_TTL * 1000,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.PREFERRED,
            user_verification=UserVerificationRequirement.PREFERRED,
        ),
        exclude_credentials=_descriptors(existing),
    )
    await _new_challenge(db, options.challenge, purpose=Purpose.REGISTER, customer_id=customer_id,
                         binding=binding, now=now)
    as_json = options_to_json_dict(options)
    # py_webauthn has no extensions parameter: credProps tells whether the passkey is
    # discoverable (residentKey "preferred" leaves it to the authenticator).
    as_json["extensions"] = {"credProps": True}
    return json.dumps(as_json)


async def authentication_options(db: Database, rp: RelyingParty, *, purpose: Purpose, customer_id: int | None,
                                 binding: str, now: datetime) -> str:
    """Options for navigator.credentials.get(), as JSON; the challenge is stored. ALONE: any
    discoverable passkey (no customer yet), user verification required. SECOND: the customer's
    passkeys only (PasskeyRefused NO_PASSKEY when there is none)."""
    if purpose is Purpose.ALONE:
        if customer_id is not None:
            raise ValueError("a passkey sign-in alone has no customer yet")
        allowed: list[PublicKeyCredentialDescriptor] = []
        verification = UserVerificationRequirement.REQUIRED
    elif purpose is Purpose.SECOND:
        if customer_id is None:
            raise ValueError("a second step belongs to a customer")
        allowed = _descriptors(await sql.fetch_all(db, _OF_CUSTOMER, uid=customer_id))
        if not allowed:
            # An empty list would let the browser offer any passkey for this site.
            raise PasskeyRefused(Reason.NO_PASSKEY)
        verification = UserVerificationRequirement.PREFERRED
    else:
        raise ValueError(f"{purpose} is not a sign-in")
    options = generate_authentication_options(rp_id=rp.id, timeout=CHALLENGE_TTL * 1000,
                                              allow_credentials=allowed, user_verification=verification)
    await _new_challenge(db, options.challenge, purpose=purpose, customer_id=customer_id, binding=binding, now=now)
    return json.dumps(options_to_json_dict(options))


def _parse_answer(response_json: str) -> tuple[dict[str, Any], bytes]:
    """The answer as a dict and the challenge its clientDataJSON signs; INVALID if either is not there."""
    try:
        if len(response_json) > RESPONSE_MAX:
            raise ValueError("too large")
        answer = json.loads(response_json)
        client_data = json.loads(base64url_to_bytes(answer["response"]["clientDataJSON"]))
        challenge = base64url_to_bytes(client_data["challenge"])
    # JSON and UTF-8 errors are ValueErrors; a deeply nested document is a RecursionError.
    except (ValueError, TypeError, KeyError, RecursionError, binascii.Error) as exc:
        raise PasskeyRefused(Reason.INVALID) from exc
    if not isinstance(answer, dict) or not challenge:
        raise PasskeyRefused(Reason.INVALID)
    return answer, challenge


async def _take(db: Database, challenge: bytes, *, purpose: Purpose, customer_id: int | None, binding: str,
                now: datetime) -> None:
    """Use the challenge up (one guarded UPDATE), or say why it cannot be."""
    chid = _sha256_hex(challenge)
    if await sql.execute(db, _TAKE, chid=chid, now=now, binding=binding, purpose=purpose.value, uid=customer_id):
        return
    row = await sql.fetch_one(db, _CHALLENGE, chid=chid)
    if row is None:
        raise PasskeyRefused(Reason.EXPIRED_CHALLENGE)  # never made, or forgotten by the clean-up
    if row.used_at is not None:
        raise PasskeyRefused(Reason.USED_CHALLENGE)
    if row.expires_at <= now:
        raise PasskeyRefused(Reason.EXPIRED_CHALLENGE)
    raise PasskeyRefused(Reason.WRONG_CHALLENGE)


def _parsed_registration(answer: dict[str, Any]) -> RegistrationCredential:
    try:
        return parse_registration_credential_json(answer)
    except Exception as exc:  # py_webauthn's parser lets decoder errors of bad input through
        raise PasskeyRefused(Reason.INVALID) from exc


def _parsed_authentication(answer: dict[str, Any]) -> AuthenticationCredential:
    try:
        return parse_authentication_credential_json(answer)
    except Exception as exc:
        raise PasskeyRefused(Reason.INVALID) from exc


def _resident_key(answer: dict[str, Any]) -> bool | None:
    """credProps.rk as the browser reported it (None: not reported)."""
    results = answer.get("clientExtensionResults")
    props = results.get("credProps") if isinstance(results, dict) else None
    rk = props.get("rk") if isinstance(props, dict) else None
    return rk if isinstance(rk, bool) else None


async def register(db: Database, rp: RelyingParty, *, customer_id: int, binding: str, response_json: str,
                   label: str, now: datetime) -> int:
    """Check the browser's answer to registration_options and keep the passkey; its id."""
    answer, challenge = _parse_answer(response_json)
    await _take(db, challenge, purpose=Purpose.REGISTER, customer_id=customer_id, binding=binding, now=now)
    credential = _parsed_registration(answer)
    try:
        verified = verify_registration_response(credential=credential, expected_challenge=challenge,
                                                expected_rp_id=rp.id, expected_origin=rp.origin)
    except Exception as exc:  # InvalidRegistrationResponse, and decoder errors of a malformed attestation
        raise PasskeyRefused(Reason.INVALID) from exc
    if verified.credential_id != credential.raw_id or len(verified.credential_id) > CREDENTIAL_ID_MAX:
        raise PasskeyRefused(Reason.INVALID)
    # It may sign in alone only if the authenticator verified the customer (PIN, biometric) and
    # can find it without a username; a browser that does not report credProps is taken at its
    # word for a verified, "preferred" resident key.
    alone = verified.user_verified and _resident_key(answer) is not False
    transports = [t.value for t in credential.response.transports or []]
    data = {
        "credential_id": bytes_to_base64url(verified.credential_id),
        "public_key": bytes_to_base64url(verified.credential_public_key),
        "sign_count": verified.sign_count,
        "transports": transports,
        "alone": alone,
        "backed_up": verified.credential_backed_up,
        "aaguid": verified.aaguid,
    }
    try:
        return await sql.insert(db, _ADD, customer_id=customer_id, data=json.dumps(data), label=clean_label(label),
                                lookup=_sha256_hex(verified.credential_id), created_at=now, confirmed_at=now,
                                last_used_at=None)
    except INTEGRITY_ERRORS as exc:  # the unique lookup: registered already, here or on another account
        raise PasskeyRefused(Reason.ALREADY_REGISTERED) from exc


def _without_user_verification(credential: AuthenticationCredential) -> bool:
    """Authenticator data that parses and has the UV flag off."""
    try:
        return not parse_authenticator_data(credential.response.authenticator_data).flags.uv
    except Exception:
        return False  # not authenticator data at all: INVALID


def _counter_moved_on(stored: int, new: int) -> bool:
    """WebAuthn's rule: both zero (an authenticator without a counter, as synced passkeys are),
    or the new count above the stored one."""
    return new > stored or (new == 0 and stored == 0)


async def authenticate(db: Database, rp: RelyingParty, *, purpose: Purpose, customer_id: int | None, binding: str,
                       response_json: str, now: datetime) -> Verified:
    """Check the browser's answer to authentication_options; whose passkey it was."""
    if purpose is Purpose.REGISTER or (purpose is Purpose.ALONE) != (customer_id is None):
        raise ValueError("ALONE has no customer, SECOND has one")
    answer, challenge = _parse_answer(response_json)
    await _take(db, challenge, purpose=purpose, customer_id=customer_id, binding=binding, now=now)
    credential = _parsed_authentication(answer)
    row = await sql.fetch_one(db, _BY_LOOKUP, lookup=_sha256_hex(credential.raw_id))
    if row is None:
        raise PasskeyRefused(Reason.UNKNOWN_CREDENTIAL)
    if purpose is Purpose.SECOND and row.customer_id != customer_id:
        raise PasskeyRefused(Reason.NOT_YOURS)
    data = json.loads(row.data)
    if purpose is Purpose.ALONE and not data.get("alone"):
        raise PasskeyRefused(Reason.SECOND_ONLY)
    # The account the authenticator names must own the passkey; alone, it must name one.
    handle = credential.response.user_handle
    if (handle is None and purpose is Purpose.ALONE) or (handle is not None and handle != user_handle(row.customer_id)):
        raise PasskeyRefused(Reason.INVALID)
    try:
        # The counter is compared below, after the signature is known to be good, so that only
        # a real assertion is ever reported as a possible clone.
        verified = verify_authentication_response(
            credential=credential, expected_challenge=challenge, expected_rp_id=rp.id, expected_origin=rp.origin,
            credential_public_key=base64url_to_bytes(data["public_key"]), credential_current_sign_count=0,
            require_user_verification=purpose is Purpose.ALONE,
        )
    except Exception as exc:  # InvalidAuthenticationResponse, and decoder errors of malformed input
        if purpose is Purpose.ALONE and _without_user_verification(credential):
            raise PasskeyRefused(Reason.NO_USER_VERIFICATION) from exc
        raise PasskeyRefused(Reason.INVALID) from exc
    seen = row.data
    for _ in range(3):  # a concurrent use of this passkey moved the counter: compare with its value
        if not _counter_moved_on(int(data.get("sign_count", 0)), verified.new_sign_count):
            log.warning("passkey %s of customer %s: sign counter %s is not above %s; possibly a cloned "
                        "authenticator, refused", row.id, row.customer_id, verified.new_sign_count,
                        data.get("sign_count", 0))
            raise PasskeyRefused(Reason.CLONED)
        new_data = json.dumps({**data, "sign_count": verified.new_sign_count,
                               "backed_up": verified.credential_backed_up})
        if await sql.execute(db, _USED, aid=row.id, seen=seen, new_data=new_data, now=now):
            return Verified(customer_id=row.customer_id, authenticator_id=row.id,
                            user_verified=verified.user_verified)
        fresh = await sql.fetch_one(db, _BY_ID, aid=row.id)
        if fresh is None:
            raise PasskeyRefused(Reason.UNKNOWN_CREDENTIAL)  # removed meanwhile
        seen, data = fresh.data, json.loads(fresh.data)
    raise PasskeyRefused(Reason.INVALID)  # pragma: no cover - three concurrent uses of one passkey won over it


# --- the dashboard and the clean-up ------------------------------------------------------------


async def list_passkeys(db: Database, customer_id: int) -> list[Passkey]:
    """The customer's passkeys, oldest first."""
    found = []
    for row in await sql.fetch_all(db, _OF_CUSTOMER, uid=customer_id):
        data = json.loads(row.data)
        found.append(Passkey(id=row.id, label=row.label, created_at=row.created_at, last_used_at=row.last_used_at,
                             alone=bool(data.get("alone")), backed_up=bool(data.get("backed_up"))))
    return found


async def remove(db: Database, customer_id: int, authenticator_id: int) -> bool:
    """Remove one of the customer's own passkeys; False if there is no such passkey of theirs."""
    return bool(await sql.execute(db, _REMOVE, aid=authenticator_id, uid=customer_id))


async def forget_challenges(db: Database, now: datetime) -> int:
    """Delete the challenges that can no longer be used (expired or used); how many."""
    return await sql.execute(db, _FORGET, now=now)


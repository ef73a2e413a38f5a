"""Passkeys (app.factors.passkeys) held to SECURITY.md 36 with a software authenticator, on both
backends: challenges single use, bound to the session, purpose and customer, 5 minutes; origin
and RP ID checked; user verification for a sign-in alone; a stale sign counter refused."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from databases import Database

from app.auth.queries import create_customer
from app.clock import FixedClock
from app.factors import passkeys
from app.factors.passkeys import PasskeyRefused, Purpose, Reason, RelyingParty
from app.tables import authenticators, webauthn_challenges
from tests.conftest import ROOT, Running
from tests.webauthn_soft import Excluded, SoftAuthenticator, b64url, unb64url

pytestmark = pytest.mark.anyio

RP = RelyingParty(id="localhost", name="Computer Shop", origin="http://localhost:8000")
SESSION = hashlib.sha256(b"session one").hexdigest()  # what the routes derive from a session
OTHER_SESSION = hashlib.sha256(b"session two").hexdigest()


async def customer(db: Database, clock: FixedClock, name: str = "jane") -> int:
    return await create_customer(db, username=name, email=f"{name}@example.com", full_name=name.title(),
                                 password_hash="x", now=clock.now())


async def enrol(db: Database, clock: FixedClock, customer_id: int, key: SoftAuthenticator | None = None,
                label: str = "Laptop", **answer: Any) -> tuple[SoftAuthenticator, int]:
    """Register a passkey the way the dashboard does: options, the authenticator, register()."""
    key = key or SoftAuthenticator()
    options = await passkeys.registration_options(db, RP, customer_id=customer_id, username="jane",
                                                  display_name="Jane", binding=SESSION, now=clock.now())
    response = key.registration(options, origin=RP.origin, **answer)
    return key, await passkeys.register(db, RP, customer_id=customer_id, binding=SESSION, response_json=response,
                                        label=label, now=clock.now())


async def options_for(db: Database, clock: FixedClock, purpose: Purpose, customer_id: int | None = None,
                      binding: str = SESSION) -> str:
    return await passkeys.authentication_options(db, RP, purpose=purpose, customer_id=customer_id, binding=binding,
                                                 now=clock.now())


async def sign_in(db: Database, clock: FixedClock, purpose: Purpose, response: str, customer_id: int | None = None,
                  binding: str = SESSION) -> passkeys.Verified:
    return await passkeys.authenticate(db, RP, purpose=purpose, customer_id=customer_id, binding=binding,
                                      response_json=response, now=clock.now())


async def refused(call: Any) -> Reason:
    with pytest.raises(PasskeyRefused) as caught:
        await call
    return caught.value.reason


async def stored(db: Database, authenticator_id: int) -> Any:
    return await db.fetch_one(sa.select(authenticators).where(authenticators.c.id == authenticator_id))


# --- the round trip ------------------------------------------------------------------------


async def test_register_then_sign_in_alone_and_as_second_step(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    key, aid = await enrol(db, clock, jane, label="  Jane's   laptop \n")
    row = await stored(db, aid)
    data = json.loads(row.data)
    assert row.type == "passkey" and row.customer_id == jane and row.label == "Jane's laptop"
    assert row.lookup == hashlib.sha256(key.credential_id).hexdigest()
    assert row.confirmed_at == clock.now() and row.created_at == clock.now() and row.last_used_at is None
    assert unb64url(data["credential_id"]) == key.credential_id
    assert data["sign_count"] == 0 and data["transports"] == ["internal", "hybrid"]
    assert data["alone"] is True and data["backed_up"] is False
    assert data["aaguid"] == "00000000-0000-0000-0000-000000000000" and data["public_key"]

    clock.advance(10)
    verified = await sign_in(db, clock, Purpose.ALONE, key.assertion(await options_for(db, clock, Purpose.ALONE),
                                                                     origin=RP.origin))
    assert verified == passkeys.Verified(customer_id=jane, authenticator_id=aid, user_verified=True)
    assert (await stored(db, aid)).last_used_at == clock.now()

    options = await options_for(db, clock, Purpose.SECOND, jane)
    verified = await sign_in(db, clock, Purpose.SECOND, key.assertion(options, origin=RP.origin), jane)
    assert verified.customer_id == jane and verified.authenticator_id == aid

    [listed] = await passkeys.list_passkeys(db, jane)
    assert listed == passkeys.Passkey(id=aid, label="Jane's laptop", created_at=row.created_at,
                                      last_used_at=clock.now(), alone=True, backed_up=False)


async def test_registration_options_ask_for_a_discoverable_verified_passkey_without_attestation(
    server: Running, clock: FixedClock
) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    options = json.loads(await passkeys.registration_options(db, RP, customer_id=jane, username="jane",
                                                             display_name="Jane Doe", binding=SESSION,
                                                             now=clock.now()))
    assert options["rp"] == {"id": "localhost", "name": "Computer Shop"}
    assert options["user"] == {"id": b64url(passkeys.user_handle(jane)), "name": "jane", "displayName": "Jane Doe"}
    assert options["authenticatorSelection"]["residentKey"] == "preferred"
    assert options["authenticatorSelection"]["userVerification"] == "preferred"
    assert options["attestation"] == "none" and options["extensions"] == {"credProps": True}
    assert options["excludeCredentials"] == []
    assert {"type": "public-key", "alg": -7} in options["pubKeyCredParams"]


async def test_packed_self_attestation_and_a_synced_passkey_register(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    _, aid = await enrol(db, clock, jane, fmt="packed", backup_eligible=True, backed_up=True)
    [listed] = await passkeys.list_passkeys(db, jane)
    assert listed.id == aid and listed.backed_up is True


async def test_challenge_is_stored_hashed_bound_and_lives_five_minutes(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    await enrol(db, clock, jane)
    alone = json.loads(await options_for(db, clock, Purpose.ALONE))
    second = json.loads(await options_for(db, clock, Purpose.SECOND, jane))
    for options, purpose, owner in ((alone, "alone", None), (second, "second", jane)):
        challenge = unb64url(options["challenge"])
        assert len(challenge) >= 16
        row = await db.fetch_one(sa.select(webauthn_challenges).where(
            webauthn_challenges.c.id == hashlib.sha256(challenge).hexdigest()))
        assert row is not None and row.purpose == purpose and row.customer_id == owner and row.binding == SESSION
        assert row.expires_at == clock.now() + timedelta(seconds=300) and row.used_at is None
    assert alone["challenge"] != second["challenge"]


# --- challenges: single use, bound, 5 minutes ------------------------------------------------


async def test_challenge_single_use_replay_refused(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    key, _ = await enrol(db, clock, jane)
    answer = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin)
    await sign_in(db, clock, Purpose.ALONE, answer)
    assert await refused(sign_in(db, clock, Purpose.ALONE, answer)) is Reason.USED_CHALLENGE


async def test_registration_challenge_single_use(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    options = await passkeys.registration_options(db, RP, customer_id=jane, username="jane", display_name="Jane",
                                                  binding=SESSION, now=clock.now())
    first, second = SoftAuthenticator(), SoftAuthenticator()
    await passkeys.register(db, RP, customer_id=jane, binding=SESSION, label="",
                            response_json=first.registration(options, origin=RP.origin), now=clock.now())
    reason = await refused(passkeys.register(db, RP, customer_id=jane, binding=SESSION, label="", now=clock.now(),
                                             response_json=second.registration(options, origin=RP.origin)))
    assert reason is Reason.USED_CHALLENGE
    assert len(await passkeys.list_passkeys(db, jane)) == 1


async def test_concurrent_use_of_one_challenge_one_wins(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    key, _ = await enrol(db, clock, jane)
    # Counter 0 (a synced passkey): the counter lets every copy through, only the challenge can stop them.
    answer = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin)

    async def attempt() -> Reason | None:
        try:
            await sign_in(db, clock, Purpose.ALONE, answer)
        except PasskeyRefused as refusal:
            return refusal.reason
        return None

    outcomes = await asyncio.gather(*(attempt() for _ in range(10)))
    assert outcomes.count(None) == 1
    assert set(outcomes) - {None} == {Reason.USED_CHALLENGE}


async def test_challenge_expired_after_five_minutes(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    key, _ = await enrol(db, clock, jane)
    in_time = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin)
    too_late = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin)
    clock.advance(299)
    await sign_in(db, clock, Purpose.ALONE, in_time)
    clock.advance(1)
    assert await refused(sign_in(db, clock, Purpose.ALONE, too_late)) is Reason.EXPIRED_CHALLENGE


async def test_other_binding_refused(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    key, _ = await enrol(db, clock, jane)
    answer = key.assertion(await options_for(db, clock, Purpose.ALONE, binding=SESSION), origin=RP.origin)
    reason = await refused(sign_in(db, clock, Purpose.ALONE, answer, binding=OTHER_SESSION))
    assert reason is Reason.WRONG_CHALLENGE
    # Another session's attempt does not use the challenge up: its own session still can.
    assert (await sign_in(db, clock, Purpose.ALONE, answer, binding=SESSION)).customer_id == jane


async def test_registration_from_other_binding_refused(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    options = await passkeys.registration_options(db, RP, customer_id=jane, username="jane", display_name="Jane",
                                                  binding=SESSION, now=clock.now())
    reason = await refused(passkeys.register(
        db, RP, customer_id=jane, binding=OTHER_SESSION, label="", now=clock.now(),
        response_json=SoftAuthenticator().registration(options, origin=RP.origin)))
    assert reason is Reason.WRONG_CHALLENGE
    assert await passkeys.list_passkeys(db, jane) == []


async def test_purpose_mismatch_refused(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane, john = await customer(db, clock), await customer(db, clock, "john")
    key, _ = await enrol(db, clock, jane)
    await enrol(db, clock, john)
    # A second step's challenge answered as a sign-in alone, and the other way round.
    second = key.assertion(await options_for(db, clock, Purpose.SECOND, jane), origin=RP.origin)
    assert await refused(sign_in(db, clock, Purpose.ALONE, second)) is Reason.WRONG_CHALLENGE
    alone = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin)
    assert await refused(sign_in(db, clock, Purpose.SECOND, alone, jane)) is Reason.WRONG_CHALLENGE
    # One customer's second step answered at another's.
    johns = key.assertion(await options_for(db, clock, Purpose.SECOND, john), origin=RP.origin)
    assert await refused(sign_in(db, clock, Purpose.SECOND, johns, jane)) is Reason.WRONG_CHALLENGE
    # A registration answering a sign-in's challenge, and a sign-in answering a registration's.
    signin_options = await options_for(db, clock, Purpose.ALONE)
    as_registration = json.loads(signin_options) | {"rp": {"id": RP.id, "name": RP.name},
                                                   "user": {"id": b64url(b"x"), "name": "j", "displayName": "j"}}
    reason = await refused(passkeys.register(
        db, RP, customer_id=jane, binding=SESSION, label="", now=clock.now(),
        response_json=SoftAuthenticator().registration(json.dumps(as_registration), origin=RP.origin)))
    assert reason is Reason.WRONG_CHALLENGE
    registration_options = json.loads(await passkeys.registration_options(
        db, RP, customer_id=jane, username="jane", display_name="Jane", binding=SESSION, now=clock.now()))
    answer = key.assertion(json.dumps(registration_options | {"rpId": RP.id}), origin=RP.origin)
    assert await refused(sign_in(db, clock, Purpose.SECOND, answer, jane)) is Reason.WRONG_CHALLENGE


async def test_forget_challenges(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    key, _ = await enrol(db, clock, jane)  # its registration challenge: used
    expired = await options_for(db, clock, Purpose.ALONE)
    clock.advance(301)
    open_one = await options_for(db, clock, Purpose.ALONE)
    assert await passkeys.forget_challenges(db, clock.now()) == 2
    assert await db.fetch_val(sa.select(sa.func.count()).select_from(webauthn_challenges)) == 1
    assert await refused(sign_in(db, clock, Purpose.ALONE, key.assertion(expired, origin=RP.origin))) \
        is Reason.EXPIRED_CHALLENGE
    await sign_in(db, clock, Purpose.ALONE, key.assertion(open_one, origin=RP.origin))
    assert await passkeys.forget_challenges(db, clock.now()) == 1


# --- the sign counter ------------------------------------------------------------------------


async def test_counter_zero_then_zero_accepted(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    key, aid = await enrol(db, clock, jane)
    for _ in range(3):
        await sign_in(db, clock, Purpose.ALONE, key.assertion(await options_for(db, clock, Purpose.ALONE),
                                                              origin=RP.origin, sign_count=0))
    assert json.loads((await stored(db, aid)).data)["sign_count"] == 0


async def test_counter_not_increasing_refused_and_logged(server: Running, clock: FixedClock,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="app.factors")
    db = server.services.db
    jane = await customer(db, clock)
    key, aid = await enrol(db, clock, jane)
    await sign_in(db, clock, Purpose.ALONE, key.assertion(await options_for(db, clock, Purpose.ALONE),
                                                          origin=RP.origin, sign_count=5))
    for stale in (5, 3, 0):
        answer = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin, sign_count=stale)
        assert await refused(sign_in(db, clock, Purpose.ALONE, answer)) is Reason.CLONED
    warnings = [r for r in caplog.records if r.name == "app.factors" and r.levelno == logging.WARNING]
    assert len(warnings) == 3
    text = " ".join(r.getMessage() for r in warnings)
    assert "clone" in text and str(aid) in text
    row = await stored(db, aid)
    data = json.loads(row.data)
    assert data["sign_count"] == 5
    assert data["credential_id"] not in text and data["public_key"] not in text
    await sign_in(db, clock, Purpose.ALONE, key.assertion(await options_for(db, clock, Purpose.ALONE),
                                                          origin=RP.origin, sign_count=6))
    assert json.loads((await stored(db, aid)).data)["sign_count"] == 6


async def test_counter_moves_on_only_once_under_concurrent_uses(server: Running, clock: FixedClock) -> None:
    """Two sign-ins with one passkey at the same counter, each with its own challenge: the
    guarded UPDATE of the counter lets only one through."""
    db = server.services.db
    jane = await customer(db, clock)
    key, aid = await enrol(db, clock, jane)
    answers = [key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin, sign_count=7)
               for _ in range(6)]

    async def attempt(answer: str) -> Reason | None:
        try:
            await sign_in(db, clock, Purpose.ALONE, answer)
        except PasskeyRefused as refusal:
            return refusal.reason
        return None

    outcomes = await asyncio.gather(*(attempt(a) for a in answers))
    assert outcomes.count(None) == 1 and set(outcomes) - {None} == {Reason.CLONED}
    assert json.loads((await stored(db, aid)).data)["sign_count"] == 7


# --- user verification and who may sign in alone ----------------------------------------------


async def test_uv_required_for_alone(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    key, _ = await enrol(db, clock, jane)
    options = json.loads(await options_for(db, clock, Purpose.ALONE))
    assert options["userVerification"] == "required" and options["allowCredentials"] == []
    answer = key.assertion(json.dumps(options), origin=RP.origin, uv=False)
    assert await refused(sign_in(db, clock, Purpose.ALONE, answer)) is Reason.NO_USER_VERIFICATION
    # After the password, presence is enough.
    answer = key.assertion(await options_for(db, clock, Purpose.SECOND, jane), origin=RP.origin, uv=False)
    assert (await sign_in(db, clock, Purpose.SECOND, answer, jane)).user_verified is False


@pytest.mark.parametrize(("uv", "rk", "alone"), [
    (True, True, True), (True, None, True), (True, False, False), (False, True, False), (False, None, False),
])
async def test_alone_needs_user_verification_and_a_discoverable_credential(
    server: Running, clock: FixedClock, uv: bool, rk: bool | None, alone: bool
) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    await enrol(db, clock, jane, uv=uv, cred_props=rk)
    [listed] = await passkeys.list_passkeys(db, jane)
    assert listed.alone is alone


async def test_second_only_key_refused_alone(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    key, aid = await enrol(db, clock, jane, uv=False)  # a security key without a PIN
    answer = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin, uv=True)
    assert await refused(sign_in(db, clock, Purpose.ALONE, answer)) is Reason.SECOND_ONLY
    answer = key.assertion(await options_for(db, clock, Purpose.SECOND, jane), origin=RP.origin)
    assert (await sign_in(db, clock, Purpose.SECOND, answer, jane)).authenticator_id == aid


async def test_user_handle_must_name_the_passkeys_owner(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane, john = await customer(db, clock), await customer(db, clock, "john")
    key, _ = await enrol(db, clock, jane)
    answer = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin,
                           user_handle=passkeys.user_handle(john))
    assert await refused(sign_in(db, clock, Purpose.ALONE, answer)) is Reason.INVALID
    answer = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin, omit_user_handle=True)
    assert await refused(sign_in(db, clock, Purpose.ALONE, answer)) is Reason.INVALID


# --- whose passkey ---------------------------------------------------------------------------


async def test_not_yours_for_another_customers_key_at_second(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane, john = await customer(db, clock), await customer(db, clock, "john")
    await enrol(db, clock, jane)
    johns_key, _ = await enrol(db, clock, john)
    answer = johns_key.assertion(await options_for(db, clock, Purpose.SECOND, jane), origin=RP.origin)
    with pytest.raises(PasskeyRefused) as not_yours:
        await sign_in(db, clock, Purpose.SECOND, answer, jane)
    assert not_yours.value.reason is Reason.NOT_YOURS
    stranger = SoftAuthenticator(user_handle=passkeys.user_handle(jane))
    answer = stranger.assertion(await options_for(db, clock, Purpose.SECOND, jane), origin=RP.origin)
    with pytest.raises(PasskeyRefused) as unknown:
        await sign_in(db, clock, Purpose.SECOND, answer, jane)
    assert unknown.value.reason is Reason.UNKNOWN_CREDENTIAL
    # The customer cannot tell a stranger's passkey from one that exists on another account.
    assert not_yours.value.message == unknown.value.message


async def test_second_step_offers_only_the_customers_passkeys(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane, john, anne = [await customer(db, clock, n) for n in ("jane", "john", "anne")]
    jane_keys = [(await enrol(db, clock, jane))[0] for _ in range(2)]
    await enrol(db, clock, john)
    options = json.loads(await options_for(db, clock, Purpose.SECOND, jane))
    assert [unb64url(c["id"]) for c in options["allowCredentials"]] == [k.credential_id for k in jane_keys]
    assert options["userVerification"] == "preferred"
    assert await refused(options_for(db, clock, Purpose.SECOND, anne)) is Reason.NO_PASSKEY


async def test_exclude_credentials_lists_existing(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane, john = await customer(db, clock), await customer(db, clock, "john")
    first, _ = await enrol(db, clock, jane)
    second, _ = await enrol(db, clock, jane, transports=("usb",))
    await enrol(db, clock, john)
    options = json.loads(await passkeys.registration_options(db, RP, customer_id=jane, username="jane",
                                                             display_name="Jane", binding=SESSION, now=clock.now()))
    assert options["excludeCredentials"] == [
        {"id": b64url(first.credential_id), "type": "public-key", "transports": ["internal", "hybrid"]},
        {"id": b64url(second.credential_id), "type": "public-key", "transports": ["usb"]},
    ]
    with pytest.raises(Excluded):  # what the browser does with it
        first.registration(json.dumps(options), origin=RP.origin)


async def test_duplicate_registration_refused(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane, john = await customer(db, clock), await customer(db, clock, "john")
    key, _ = await enrol(db, clock, jane)
    for who in (jane, john):  # a client that ignores excludeCredentials, and another account
        with pytest.raises(PasskeyRefused) as again:
            await enrol(db, clock, who, key=key, mind_exclude=False)
        assert again.value.reason is Reason.ALREADY_REGISTERED
    assert await db.fetch_val(sa.select(sa.func.count()).select_from(authenticators)) == 1


async def test_remove_only_own(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane, john = await customer(db, clock), await customer(db, clock, "john")
    key, aid = await enrol(db, clock, jane)
    assert await passkeys.remove(db, john, aid) is False
    assert len(await passkeys.list_passkeys(db, jane)) == 1
    assert await passkeys.remove(db, jane, aid) is True
    assert await passkeys.remove(db, jane, aid) is False
    assert await passkeys.list_passkeys(db, jane) == []
    answer = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin)
    assert await refused(sign_in(db, clock, Purpose.ALONE, answer)) is Reason.UNKNOWN_CREDENTIAL


# --- what the browser may send ---------------------------------------------------------------


async def test_wrong_origin_or_rp_id_refused(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    options = await passkeys.registration_options(db, RP, customer_id=jane, username="jane", display_name="Jane",
                                                  binding=SESSION, now=clock.now())
    reason = await refused(passkeys.register(
        db, RP, customer_id=jane, binding=SESSION, label="", now=clock.now(),
        response_json=SoftAuthenticator().registration(options, origin="https://evil.example")))
    assert reason is Reason.INVALID
    key, _ = await enrol(db, clock, jane)
    for origin, rp_id, client_type in (("http://localhost:8001", None, "webauthn.get"),
                                       (RP.origin, "evil.example", "webauthn.get"),
                                       (RP.origin, None, "webauthn.create")):
        answer = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=origin, rp_id=rp_id,
                               client_type=client_type)
        assert await refused(sign_in(db, clock, Purpose.ALONE, answer)) is Reason.INVALID


async def test_forged_signature_refused(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    key, _ = await enrol(db, clock, jane)
    impostor = SoftAuthenticator(credential_id=key.credential_id, user_handle=key.user_handle)  # another private key
    answer = impostor.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin)
    assert await refused(sign_in(db, clock, Purpose.ALONE, answer)) is Reason.INVALID


def _garbage(answer: str) -> list[str]:
    """Broken versions of a real answer, each still naming its challenge where it can."""
    real = json.loads(answer)

    def changed(**response: Any) -> str:
        return json.dumps(real | {"response": real["response"] | response})

    return [
        "", "null", "[]", "{}", "not json", '{"response": {}}', '{"response": {"clientDataJSON": 5}}',
        '{"response": {"clientDataJSON": "%%%"}}', json.dumps({"response": {"clientDataJSON": b64url(b"[1]")}}),
        json.dumps({"response": {"clientDataJSON": b64url(b'{"challenge": ""}')}}),
        json.dumps({"response": {"clientDataJSON": b64url(b"\xff\xfe")}}),
        "{" * 100_000, "[" * 60_000, '{"a":' * 12_000,
        json.dumps(real | {"rawId": 5}), json.dumps(real | {"type": "password"}), json.dumps(real | {"id": "x"}),
        changed(attestationObject=b64url(b"\xa1\x00")), changed(attestationObject="%%"),
        changed(authenticatorData=b64url(b"short")), changed(signature=b64url(b"\x30\x02\x00\x00")),
        changed(userHandle=12),
    ]


async def test_garbage_json_refused_not_raised(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    key, _ = await enrol(db, clock, jane)
    registration = SoftAuthenticator().registration(
        await passkeys.registration_options(db, RP, customer_id=jane, username="jane", display_name="Jane",
                                            binding=SESSION, now=clock.now()), origin=RP.origin)
    assertion = key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin)
    for bad in _garbage(registration):
        with pytest.raises(PasskeyRefused):
            await passkeys.register(db, RP, customer_id=jane, binding=SESSION, response_json=bad, label="",
                                    now=clock.now())
    for bad in _garbage(assertion):
        with pytest.raises(PasskeyRefused):
            await sign_in(db, clock, Purpose.ALONE, bad)


async def test_malformed_answer_to_an_open_challenge_is_invalid(server: Running, clock: FixedClock) -> None:
    """With the challenge still open, what py_webauthn rejects comes out as INVALID (each uses its challenge up)."""
    db = server.services.db
    jane = await customer(db, clock)
    key, _ = await enrol(db, clock, jane)

    async def registration(**answer: Any) -> Reason:
        options = await passkeys.registration_options(db, RP, customer_id=jane, username="jane", display_name="Jane",
                                                      binding=SESSION, now=clock.now())
        real = json.loads(SoftAuthenticator().registration(options, origin=RP.origin, **answer.pop("make", {})))
        broken = real | {"response": real["response"] | answer} if answer else real
        return await refused(passkeys.register(db, RP, customer_id=jane, binding=SESSION, label="",
                                               response_json=json.dumps(broken), now=clock.now()))

    assert await registration(attestationObject=b64url(b"\xa1\x00")) is Reason.INVALID
    assert await registration(attestationObject="AAAA") is Reason.INVALID
    assert await registration(make={"backed_up": True}) is Reason.INVALID  # BS without BE
    assert await registration(make={"up": False}) is Reason.INVALID

    for broken in ({"authenticatorData": b64url(b"short")}, {"signature": b64url(b"\x30\x02\x00\x00")},
                   {"signature": ""}):
        real = json.loads(key.assertion(await options_for(db, clock, Purpose.ALONE), origin=RP.origin))
        answer = json.dumps(real | {"response": real["response"] | broken})
        assert await refused(sign_in(db, clock, Purpose.ALONE, answer)) is Reason.INVALID


async def test_label_trimmed_capped_and_defaulted(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane = await customer(db, clock)
    await enrol(db, clock, jane, label="   ")
    await enrol(db, clock, jane, label="x" * 150)
    await enrol(db, clock, jane, label="Work\x00 key\r\n")
    assert [p.label for p in await passkeys.list_passkeys(db, jane)] == ["Passkey", "x" * 100, "Work key"]


def test_every_refusal_has_a_plain_message() -> None:
    for reason in Reason:
        message = PasskeyRefused(reason).message
        assert message.endswith(".") and len(message) < 200
        for internal in ("challenge", "counter", "credential", "webauthn", "signature", "origin", "rp"):
            assert internal not in message.lower().split(), (reason, internal)


def test_passkeys_module_loads_no_web_framework() -> None:
    probe = ("import sys, app.factors.passkeys\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'jinja2_fragments', 'uvicorn')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout

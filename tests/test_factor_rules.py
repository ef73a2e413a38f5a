"""The rules of the factors without HTTP (app.factors.totp, backup_codes, devices), on both
backends: SECURITY.md 35 (TOTP) and 37 (backup codes, trusted devices)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import subprocess
import sys
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pyotp
import pytest
import sqlalchemy as sa

from app.auth.queries import create_customer
from app.clock import FixedClock
from app.factors import FactorKeys, Type, backup_codes, devices, factors_of, totp
from app.security.crypto import Unreadable, keyed_hash, sha256_hex
from app.settings import Settings
from app.tables import authenticators, trusted_devices
from tests.conftest import ROOT, Running

pytestmark = pytest.mark.anyio

FIXED_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


async def customer(server: Running, clock: FixedClock, name: str = "jane") -> int:
    return await create_customer(server.services.db, username=name, email=f"{name}@example.com",
                                 full_name=name.title(), password_hash="x", now=clock.now())


def code_at(secret: str, clock: FixedClock, seconds: float = 0) -> str:
    return pyotp.TOTP(secret).at(clock.now() + timedelta(seconds=seconds))


async def enrolled(server: Running, clock: FixedClock, cid: int) -> str:
    """A confirmed app; the clock then moves on 2 minutes, past the confirming code's steps."""
    svc = server.services
    secret = await totp.start(svc.db, svc.factors, customer_id=cid, now=clock.now())
    assert await totp.confirm(svc.db, svc.factors, customer_id=cid, code=code_at(secret, clock), now=clock.now())
    clock.advance(120)
    return secret


async def check(server: Running, clock: FixedClock, cid: int, code: str) -> bool:
    svc = server.services
    return await totp.check(svc.db, svc.factors, customer_id=cid, code=code, now=clock.now())


async def totp_rows(server: Running, cid: int) -> list[Any]:
    rows = await server.services.db.fetch_all(
        sa.select(authenticators).where(authenticators.c.customer_id == cid, authenticators.c.type == Type.TOTP))
    return [SimpleNamespace(**r._mapping) for r in rows]


# --- TOTP: pure parts ----------------------------------------------------------------------


def test_new_secret_is_160_bits_of_base32() -> None:
    secret = totp.new_secret()
    assert len(secret) == 32 and re.fullmatch(r"[A-Z2-7]{32}", secret)
    assert totp.new_secret() != secret


def test_grouped_secret_reads_in_fours() -> None:
    assert totp.grouped(FIXED_SECRET) == "JBSW Y3DP EHPK 3PXP JBSW Y3DP EHPK 3PXP"
    assert "".join(totp.grouped(FIXED_SECRET).split()) == FIXED_SECRET


def test_provisioning_uri_names_issuer_and_account() -> None:
    uri = totp.provisioning_uri(FIXED_SECRET, account="jane@example.com")
    assert uri.startswith("otpauth://totp/Computer%20Shop:jane%40example.com?")
    assert "issuer=Computer%20Shop" in uri and f"secret={FIXED_SECRET}" in uri
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP) and parsed.secret == FIXED_SECRET and parsed.interval == 30


def test_qr_svg_is_inline_svg_without_external_references() -> None:
    svg = totp.qr_svg(totp.provisioning_uri(totp.new_secret(), account="jane@example.com"))
    assert svg.startswith("<svg ") and svg.rstrip().endswith("</svg>") and "<?xml" not in svg
    assert "<title>" in svg
    assert set(re.findall(r"https?:[^\"'\s>]*", svg)) <= {"http://www.w3.org/2000/svg"}  # the xmlns at most
    assert "style" not in svg and "<script" not in svg and "href" not in svg  # CSP-safe: attributes only
    width = int(re.search(r'width="(\d+)"', svg).group(1))  # type: ignore[union-attr]
    assert 150 <= width <= 260


def test_drift_of_one_step_accepted_and_two_refused() -> None:
    clock = FixedClock()
    now = clock.now()
    step = int(now.timestamp()) // 30
    for steps in (-1, 0, 1):
        assert totp.matching_step(FIXED_SECRET, code_at(FIXED_SECRET, clock, 30 * steps), now) == step + steps
    for steps in (-2, 2):
        assert totp.matching_step(FIXED_SECRET, code_at(FIXED_SECRET, clock, 30 * steps), now) is None


def test_code_entry_normalised_and_non_six_digits_refused() -> None:
    clock = FixedClock()
    code = code_at(FIXED_SECRET, clock)
    now = clock.now()
    assert totp.matching_step(FIXED_SECRET, f" {code[:3]} {code[3:]} ", now) is not None
    for bad in ("", code[:5], code + "0", "abcdef", "１２３４５６", f"{code[:3]}-{code[3:]}"):
        assert totp.matching_step(FIXED_SECRET, bad, now) is None, bad


def test_totp_compares_every_candidate_step_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """matching_step decides with hmac.compare_digest over all 2*DRIFT+1 steps, matching or not."""
    clock = FixedClock()
    real = hmac.compare_digest
    calls: list[object] = []

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert totp.matching_step(FIXED_SECRET, code_at(FIXED_SECRET, clock, -30), clock.now()) is not None
    assert len(calls) == 2 * totp.DRIFT + 1
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    assert totp.matching_step(FIXED_SECRET, code_at(FIXED_SECRET, clock), clock.now()) is None


# --- TOTP: enrolment -----------------------------------------------------------------------


async def test_unconfirmed_app_does_not_count_and_cannot_be_used(server: Running, clock: FixedClock) -> None:
    svc = server.services
    cid = await customer(server, clock)
    secret = await totp.start(svc.db, svc.factors, customer_id=cid, now=clock.now())
    assert await totp.pending_secret(svc.db, svc.factors, cid) == secret
    assert not (await factors_of(svc.db, cid)).app
    assert not await check(server, clock, cid, code_at(secret, clock))
    assert await totp.confirm(svc.db, svc.factors, customer_id=cid, code=code_at(secret, clock), now=clock.now())
    assert (await factors_of(svc.db, cid)).app
    assert await totp.pending_secret(svc.db, svc.factors, cid) is None
    [row] = await totp_rows(server, cid)
    assert row.label == "Authenticator app" and row.confirmed_at == clock.now()


async def test_confirm_with_wrong_code_fails(server: Running, clock: FixedClock) -> None:
    svc = server.services
    cid = await customer(server, clock)
    secret = await totp.start(svc.db, svc.factors, customer_id=cid, now=clock.now())
    right = code_at(secret, clock)
    for wrong in (code_at(secret, clock, 300), f"{(int(right) + 1) % 1_000_000:06d}", "12345", ""):
        assert not await totp.confirm(svc.db, svc.factors, customer_id=cid, code=wrong, now=clock.now())
    assert not (await factors_of(svc.db, cid)).app
    assert await totp.pending_secret(svc.db, svc.factors, cid) == secret  # still enrolling


async def test_confirming_code_cannot_be_replayed_at_sign_in(server: Running, clock: FixedClock) -> None:
    svc = server.services
    cid = await customer(server, clock)
    secret = await totp.start(svc.db, svc.factors, customer_id=cid, now=clock.now())
    code = code_at(secret, clock)
    assert await totp.confirm(svc.db, svc.factors, customer_id=cid, code=code, now=clock.now())
    clock.advance(20)
    assert not await check(server, clock, cid, code)


async def test_starting_again_replaces_the_pending_secret_and_refuses_once_confirmed(
        server: Running, clock: FixedClock) -> None:
    svc = server.services
    cid = await customer(server, clock)
    first = await totp.start(svc.db, svc.factors, customer_id=cid, now=clock.now())
    second = await totp.start(svc.db, svc.factors, customer_id=cid, now=clock.now())
    assert first != second and len(await totp_rows(server, cid)) == 1
    assert await totp.pending_secret(svc.db, svc.factors, cid) == second
    assert not await totp.confirm(svc.db, svc.factors, customer_id=cid, code=code_at(first, clock), now=clock.now())
    assert await totp.confirm(svc.db, svc.factors, customer_id=cid, code=code_at(second, clock), now=clock.now())
    before = await totp_rows(server, cid)
    with pytest.raises(totp.AlreadyEnrolled):
        await totp.start(svc.db, svc.factors, customer_id=cid, now=clock.now())
    assert await totp_rows(server, cid) == before


async def test_concurrent_starts_leave_one_app_row(server: Running, clock: FixedClock) -> None:
    svc = server.services
    cid = await customer(server, clock)
    secrets_ = await asyncio.gather(
        *(totp.start(svc.db, svc.factors, customer_id=cid, now=clock.now()) for _ in range(8)))
    assert len(await totp_rows(server, cid)) == 1
    assert await totp.pending_secret(svc.db, svc.factors, cid) in secrets_


async def test_stored_data_does_not_contain_the_secret_in_clear(server: Running, clock: FixedClock) -> None:
    cid = await customer(server, clock)
    secret = await enrolled(server, clock, cid)
    [row] = await totp_rows(server, cid)
    for form in (secret, secret.lower(), totp.grouped(secret)):
        assert form not in row.data
    data = json.loads(row.data)
    assert set(data) == {"secret", "last_step"} and isinstance(data["last_step"], int)
    assert server.services.factors.at_rest.open(data["secret"]) == {"s": secret}


async def test_secret_never_in_logs_or_exceptions(server: Running, clock: FixedClock, settings: Settings,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cid = await customer(server, clock)
    secret = await enrolled(server, clock, cid)
    assert await check(server, clock, cid, code_at(secret, clock))
    other = FactorKeys.from_secret(secrets.token_urlsafe(48))
    with pytest.raises(Unreadable) as raised:
        await totp.check(server.services.db, other, customer_id=cid, code=code_at(secret, clock, 30),
                         now=clock.now())
    assert await totp.reseal(server.services.db, other) == 0  # unreadable: left alone, logged by id
    assert secret not in str(raised.value) and secret not in repr(raised.value)
    assert "authenticator" in caplog.text and secret not in caplog.text


# --- TOTP: checking ------------------------------------------------------------------------


async def test_totp_drift_of_one_step_accepted_and_two_refused(server: Running, clock: FixedClock) -> None:
    cid = await customer(server, clock)
    secret = await enrolled(server, clock, cid)
    assert not await check(server, clock, cid, code_at(secret, clock, -60))
    assert not await check(server, clock, cid, code_at(secret, clock, 60))
    assert await check(server, clock, cid, code_at(secret, clock, -30))
    assert await check(server, clock, cid, code_at(secret, clock, 30))


async def test_replay_of_the_same_code_refused(server: Running, clock: FixedClock) -> None:
    cid = await customer(server, clock)
    secret = await enrolled(server, clock, cid)
    code = code_at(secret, clock)
    assert await check(server, clock, cid, code)
    assert not await check(server, clock, cid, code)
    clock.advance(30)  # the next step: the code is still within the drift, and still used
    assert not await check(server, clock, cid, code)
    assert await check(server, clock, cid, code_at(secret, clock))


async def test_older_step_refused_after_a_newer_one(server: Running, clock: FixedClock) -> None:
    cid = await customer(server, clock)
    secret = await enrolled(server, clock, cid)
    assert await check(server, clock, cid, code_at(secret, clock, 30))
    assert not await check(server, clock, cid, code_at(secret, clock))
    assert not await check(server, clock, cid, code_at(secret, clock, -30))


async def test_two_concurrent_checks_of_one_code_one_true(server: Running, clock: FixedClock) -> None:
    cid = await customer(server, clock)
    secret = await enrolled(server, clock, cid)
    code = code_at(secret, clock)
    results = await asyncio.gather(*(check(server, clock, cid, code) for _ in range(2)))
    assert sorted(results) == [False, True]
    clock.advance(30)
    code = code_at(secret, clock)
    results = await asyncio.gather(*(check(server, clock, cid, code) for _ in range(12)))
    assert results.count(True) == 1


async def test_check_notes_the_last_use(server: Running, clock: FixedClock) -> None:
    cid = await customer(server, clock)
    secret = await enrolled(server, clock, cid)
    [row] = await totp_rows(server, cid)
    assert row.last_used_at is None
    assert await check(server, clock, cid, code_at(secret, clock))
    [row] = await totp_rows(server, cid)
    assert row.last_used_at == clock.now() and json.loads(row.data)["last_step"] == int(clock.now().timestamp()) // 30


async def test_reseal_moves_secrets_to_the_new_key(server: Running, clock: FixedClock, settings: Settings) -> None:
    svc = server.services
    cid = await customer(server, clock)
    secret = await enrolled(server, clock, cid)
    used = code_at(secret, clock)
    assert await check(server, clock, cid, used)
    pending = await customer(server, clock, "bob")
    pending_secret = await totp.start(svc.db, svc.factors, customer_id=pending, now=clock.now())
    new_key = secrets.token_urlsafe(48)
    rotated = FactorKeys.from_secret(new_key, (settings.secret_key,))
    assert await totp.reseal(svc.db, rotated) == 2
    only_new = FactorKeys.from_secret(new_key)
    assert await totp.pending_secret(svc.db, only_new, pending) == pending_secret
    assert not await totp.check(svc.db, only_new, customer_id=cid, code=used, now=clock.now())  # step kept
    with pytest.raises(Unreadable):  # the old key alone no longer opens it
        await totp.check(svc.db, svc.factors, customer_id=cid, code=code_at(secret, clock, 30), now=clock.now())
    assert await totp.check(svc.db, only_new, customer_id=cid, code=code_at(secret, clock, 30), now=clock.now())


async def test_remove_app(server: Running, clock: FixedClock) -> None:
    svc = server.services
    cid = await customer(server, clock)
    secret = await enrolled(server, clock, cid)
    assert await totp.remove(svc.db, cid)
    assert not (await factors_of(svc.db, cid)).app
    assert not await check(server, clock, cid, code_at(secret, clock))
    assert not await totp.remove(svc.db, cid)
    await totp.start(svc.db, svc.factors, customer_id=cid, now=clock.now())  # may enrol again


async def test_forget_unconfirmed_after_an_hour(server: Running, clock: FixedClock) -> None:
    svc = server.services
    jane, bob = await customer(server, clock), await customer(server, clock, "bob")
    await enrolled(server, clock, jane)
    await totp.start(svc.db, svc.factors, customer_id=bob, now=clock.now())
    clock.advance(59 * 60)
    assert await totp.forget_unconfirmed(svc.db, clock.now()) == 0
    clock.advance(2 * 60)
    assert await totp.forget_unconfirmed(svc.db, clock.now()) == 1
    assert await totp.pending_secret(svc.db, svc.factors, bob) is None
    assert (await factors_of(svc.db, jane)).app


# --- backup codes --------------------------------------------------------------------------


async def new_codes(server: Running, clock: FixedClock, cid: int) -> list[str]:
    svc = server.services
    return await backup_codes.replace(svc.db, svc.factors, customer_id=cid, now=clock.now())


async def use(server: Running, clock: FixedClock, cid: int, entry: str) -> int | None:
    svc = server.services
    return await backup_codes.use(svc.db, svc.factors, customer_id=cid, entry=entry, now=clock.now())


def test_backup_alphabet_has_nothing_ambiguous() -> None:
    assert not set("0O1IL") & set(backup_codes.ALPHABET)
    assert len(set(backup_codes.ALPHABET)) == len(backup_codes.ALPHABET) == 31


def test_backup_grouped_normalized_round_trip_accepts_lower_case_and_hyphens() -> None:
    code = backup_codes.new_code()
    shown = backup_codes.grouped(code)
    assert re.fullmatch(r"[^-]{5}-[^-]{5}", shown)
    for typed in (shown, shown.lower(), f" {shown[:3]} {shown[3:]} ", code.lower(), f"{code[:2]}-{code[2:]}"):
        assert backup_codes.normalized(typed) == code, typed
    assert backup_codes.grouped("ABCDEFGHJK") == "ABCDE-FGHJK"


def test_backup_normalized_refuses_wrong_length_and_ambiguous_letters() -> None:
    for bad in ("", "ABCDE-FGHJ", "ABCDE-FGHJKM", "ABCDE-FGHJ0", "ABCDE-FGHJO", "ABCDE-FGHJI", "ABCDE-FGHJL",
                "ABCDE_FGHJK", "A" * 1000):
        assert backup_codes.normalized(bad) is None, bad


async def test_ten_backup_codes_of_ten_characters_from_the_alphabet(server: Running, clock: FixedClock) -> None:
    codes = await new_codes(server, clock, await customer(server, clock))
    assert len(codes) == backup_codes.COUNT == 10 and len(set(codes)) == 10
    assert all(len(c) == backup_codes.LENGTH == 10 and set(c) <= set(backup_codes.ALPHABET) for c in codes)


async def test_backup_code_single_use(server: Running, clock: FixedClock) -> None:
    cid = await customer(server, clock)
    codes = await new_codes(server, clock, cid)
    assert await use(server, clock, cid, backup_codes.grouped(codes[3]).lower()) == 9
    assert await use(server, clock, cid, codes[3]) is None
    assert await use(server, clock, cid, codes[0]) == 8
    assert await use(server, clock, cid, "23456-789AB") is None  # well formed, not one of them
    assert await backup_codes.left(server.services.db, cid) == 8


async def test_backup_codes_bound_to_their_customer(server: Running, clock: FixedClock) -> None:
    jane, bob = await customer(server, clock), await customer(server, clock, "bob")
    codes = await new_codes(server, clock, jane)
    await new_codes(server, clock, bob)
    assert await use(server, clock, bob, codes[0]) is None
    assert await use(server, clock, jane, codes[0]) == 9


async def test_concurrent_use_of_one_backup_code_one_success(server: Running, clock: FixedClock) -> None:
    cid = await customer(server, clock)
    codes = await new_codes(server, clock, cid)
    results = await asyncio.gather(*(use(server, clock, cid, codes[0]) for _ in range(12)))
    assert results.count(9) == 1 and results.count(None) == 11
    # Different codes at once: each used once, none lost to another's swap.
    results = await asyncio.gather(*(use(server, clock, cid, c) for c in codes[1:6]))
    assert sorted(r for r in results if r is not None) == [4, 5, 6, 7, 8]
    assert await backup_codes.left(server.services.db, cid) == 4


async def test_backup_use_compares_every_code_in_constant_time(server: Running, clock: FixedClock,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cid = await customer(server, clock)
    codes = await new_codes(server, clock, cid)
    real = hmac.compare_digest
    calls: list[object] = []

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert await use(server, clock, cid, codes[0]) == 9
    assert len(calls) == backup_codes.COUNT  # the match was the first: the other nine still compared
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    assert await use(server, clock, cid, codes[1]) is None  # nothing but compare_digest decides


async def test_regenerating_backup_codes_invalidates_the_old_set(server: Running, clock: FixedClock) -> None:
    svc = server.services
    cid = await customer(server, clock)
    old = await new_codes(server, clock, cid)
    assert await use(server, clock, cid, old[0]) == 9
    new = await new_codes(server, clock, cid)
    assert not set(old) & set(new)
    assert [await use(server, clock, cid, c) for c in old[1:]] == [None] * 9
    assert await backup_codes.left(svc.db, cid) == 10
    assert await use(server, clock, cid, new[0]) == 9
    rows = await svc.db.fetch_all(sa.select(authenticators.c.id).where(authenticators.c.type == Type.BACKUP_CODES))
    assert len(rows) == 1


async def test_concurrent_regenerations_leave_one_set(server: Running, clock: FixedClock) -> None:
    cid = await customer(server, clock)
    sets = await asyncio.gather(*(new_codes(server, clock, cid) for _ in range(6)))
    assert await backup_codes.left(server.services.db, cid) == 10
    assert (await factors_of(server.services.db, cid)).backup_left == 10
    working = [s for s in sets if await use(server, clock, cid, s[0]) is not None]
    assert len(working) == 1


async def test_backup_hash_not_plain_in_db(server: Running, clock: FixedClock) -> None:
    svc = server.services
    cid = await customer(server, clock)
    codes = await new_codes(server, clock, cid)
    data = await svc.db.fetch_val(sa.select(authenticators.c.data).where(authenticators.c.customer_id == cid))
    for code in codes:
        assert code not in data and backup_codes.grouped(code) not in data and code.lower() not in data
    whole = json.loads(data)
    stored = whole["codes"]
    set_key = bytes.fromhex(svc.factors.at_rest.open(whole["key"])["k"])  # the set's own key, sealed
    assert set_key.hex() not in data
    assert [c["hash"] for c in stored] == [keyed_hash(set_key, cid, c) for c in codes]
    assert all(c["used_at"] is None for c in stored)


async def test_factors_of_counts_backup_codes_left(server: Running, clock: FixedClock) -> None:
    svc = server.services
    cid = await customer(server, clock)
    assert (await factors_of(svc.db, cid)).backup_made is False
    codes = await new_codes(server, clock, cid)
    f = await factors_of(svc.db, cid)
    assert f.backup_left == 10 and f.backup_made and not f.strong
    for code in codes[:8]:
        await use(server, clock, cid, code)
    f = await factors_of(svc.db, cid)
    assert f.backup_left == backup_codes.WARN_AT == 2 and f.backup_made
    assert await backup_codes.drop(svc.db, cid)
    f = await factors_of(svc.db, cid)
    assert f.backup_left == 0 and not f.backup_made
    assert not await backup_codes.drop(svc.db, cid)
    assert await use(server, clock, cid, codes[9]) is None


# --- trusted devices -----------------------------------------------------------------------


async def trust(server: Running, clock: FixedClock, cid: int, days: int = 30, label: str = "Chrome on Linux",
                ip: str = "203.0.113.7") -> str:
    return await devices.trust(server.services.db, customer_id=cid, label=label, ip=ip, now=clock.now(), days=days)


async def recognised(server: Running, clock: FixedClock, cid: int, token: str | None) -> int | None:
    return await devices.recognised(server.services.db, customer_id=cid, token=token, now=clock.now())


async def test_device_recognised_for_its_own_customer_only(server: Running, clock: FixedClock) -> None:
    jane, bob = await customer(server, clock), await customer(server, clock, "bob")
    token = await trust(server, clock, jane)
    device_id = await recognised(server, clock, jane, token)
    assert device_id is not None
    assert await recognised(server, clock, bob, token) is None
    for other in (None, "", "x" * 2000, token[:-1] + ("A" if token[-1] != "A" else "B")):
        assert await recognised(server, clock, jane, other) is None
    clock.advance(3600)
    assert await recognised(server, clock, jane, token) == device_id
    [device] = await devices.list_devices(server.services.db, jane, clock.now())
    assert device.last_used_at == clock.now()


async def test_device_token_stored_hashed(server: Running, clock: FixedClock) -> None:
    cid = await customer(server, clock)
    token = await trust(server, clock, cid)
    row = await server.services.db.fetch_one(sa.select(trusted_devices))
    assert row is not None and row.token_hash == sha256_hex(token)
    assert token not in " ".join(str(v) for v in row)


async def test_expired_device_refused(server: Running, clock: FixedClock) -> None:
    cid = await customer(server, clock)
    token = await trust(server, clock, cid, days=30)
    clock.advance(30 * 86400 - 1)
    assert await recognised(server, clock, cid, token) is not None
    clock.advance(1)
    assert await recognised(server, clock, cid, token) is None
    assert await devices.list_devices(server.services.db, cid, clock.now()) == []


async def test_revoke_one_device_only_own(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane, bob = await customer(server, clock), await customer(server, clock, "bob")
    first, second = await trust(server, clock, jane), await trust(server, clock, jane)
    first_id = await recognised(server, clock, jane, first)
    assert first_id is not None
    assert not await devices.revoke(db, customer_id=bob, device_id=first_id, now=clock.now())
    assert await recognised(server, clock, jane, first) == first_id
    assert await devices.revoke(db, customer_id=jane, device_id=first_id, now=clock.now())
    assert not await devices.revoke(db, customer_id=jane, device_id=first_id, now=clock.now())
    assert await recognised(server, clock, jane, first) is None
    assert await recognised(server, clock, jane, second) is not None


async def test_revoke_all_devices(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane, bob = await customer(server, clock), await customer(server, clock, "bob")
    tokens = [await trust(server, clock, jane) for _ in range(3)]
    bobs = await trust(server, clock, bob)
    assert await devices.revoke_all(db, customer_id=jane, now=clock.now()) == 3
    assert [await recognised(server, clock, jane, t) for t in tokens] == [None] * 3
    assert await devices.list_devices(db, jane, clock.now()) == []
    assert await recognised(server, clock, bob, bobs) is not None
    assert await devices.revoke_all(db, customer_id=jane, now=clock.now()) == 0


async def test_list_devices_live_newest_first(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    jane, bob = await customer(server, clock), await customer(server, clock, "bob")
    await trust(server, clock, jane, days=1, label="Old phone")
    clock.advance(60)
    await trust(server, clock, jane, label="Firefox on Windows", ip="2001:db8::1")
    clock.advance(60)
    await trust(server, clock, jane, label="Safari on iOS")
    await trust(server, clock, bob, label="Bob's")
    clock.advance(86400)  # "Old phone" expired
    listed = await devices.list_devices(db, jane, clock.now())
    assert [d.label for d in listed] == ["Safari on iOS", "Firefox on Windows"]
    assert listed[1].ip == "2001:db8::1"
    assert listed[1].expires_at == listed[1].created_at + timedelta(days=30)
    assert await devices.revoke(db, customer_id=jane, device_id=listed[0].id, now=clock.now())
    assert [d.label for d in await devices.list_devices(db, jane, clock.now())] == ["Firefox on Windows"]


async def test_forget_expired_devices(server: Running, clock: FixedClock) -> None:
    db = server.services.db
    cid = await customer(server, clock)
    labels: dict[str, str] = {}

    async def add(name: str, days: int) -> int:
        labels[name] = await trust(server, clock, cid, days=days, label=name)
        found = await recognised(server, clock, cid, labels[name])
        assert found is not None
        return found

    await add("live", 30)
    await add("expired long ago", 1)
    revoked_long_ago = await add("revoked long ago", 30)
    await devices.revoke(db, customer_id=cid, device_id=revoked_long_ago, now=clock.now())
    clock.advance(40 * 3600)
    await add("expired lately", 1)  # expires 64 h from the start
    revoked_lately = await add("revoked lately", 30)
    clock.advance(20 * 3600)
    await devices.revoke(db, customer_id=cid, device_id=revoked_lately, now=clock.now())
    clock.advance(10 * 3600)  # 70 h from the start
    assert await devices.forget_expired(db, clock.now()) == 2
    left = await db.fetch_all(sa.select(trusted_devices.c.label).order_by(trusted_devices.c.id))
    assert [r.label for r in left] == ["live", "expired lately", "revoked lately"]


# --- layering ------------------------------------------------------------------------------


def test_factor_modules_load_no_web_framework() -> None:
    probe = ("import sys, app.factors.totp, app.factors.backup_codes, app.factors.devices\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'jinja2_fragments', 'uvicorn')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


async def test_backup_codes_survive_a_key_rotation_through_reseal(server: Running, clock: FixedClock,
                                                                  settings: Settings) -> None:
    """The running app opens factor data with the current key only (SECURITY.md 34); `factors
    reseal`, given the old key as a fallback, seals each set's own key again, and the codes work."""
    svc = server.services
    cid = await customer(server, clock)
    codes = await backup_codes.replace(svc.db, svc.factors, customer_id=cid, now=clock.now())
    new_key = secrets.token_urlsafe(48)
    only_new = FactorKeys.from_secret(new_key)
    assert await backup_codes.use(svc.db, only_new, customer_id=cid, entry=codes[0], now=clock.now()) is None
    assert await backup_codes.reseal(svc.db, FactorKeys.from_secret(new_key, (settings.secret_key,))) == 1
    assert await backup_codes.use(svc.db, only_new, customer_id=cid, entry=codes[0], now=clock.now()) == 9
    assert await backup_codes.use(svc.db, svc.factors, customer_id=cid, entry=codes[1], now=clock.now()) is None

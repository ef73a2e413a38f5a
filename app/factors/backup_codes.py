"""Backup codes: a set of ten single-use codes, shown once, kept as keyed hashes each with the
time it was used. One `authenticators` row of type "backup_codes" per customer, data
{"key": sealed, "codes": [{"hash": ..., "used_at": null | iso time}, ...]}; making a new set
replaces it. Each set hashes with a random key of its own, sealed like an app's secret (AES-GCM
under a key derived from SECRET_KEY): the database alone allows no offline guessing, and after a
SECRET_KEY rotation `python -m app factors reseal` seals the set's key again (a hash cannot be
redone), so the codes keep working.

Using a code is a compare-and-swap on the whole `data` text, as in totp: of concurrent entries
of one code, one succeeds.
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from databases import Database

from app import sql
from app.database import INTEGRITY_ERRORS
from app.factors import FactorKeys, Type
from app.security.crypto import Unreadable, equal, keyed_hash, sha256_hex
from app.tables import authenticators as a

log = logging.getLogger("app.factors")

# No 0/O, 1/I/L: read off paper or a screen, every character is what it looks like. 31
# characters, 10 of them: about 49.5 bits a code.
ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
COUNT = 10
LENGTH = 10
WARN_AT = 2  # this many left (or fewer): the customer is told to make a new set
CAS_TRIES = 10  # re-reads after losing a compare-and-swap: each loss is another entry's win
_SEPARATORS = str.maketrans("", "", " \t\r\n-")


def grouped(code: str) -> str:
    """"ABCDE-FGHJK": two halves, easier to read and type."""
    half = len(code) // 2
    return f"{code[:half]}-{code[half:]}"


def normalized(entry: str) -> str | None:
    """The code as stored: upper case, without spaces or hyphens. None unless LENGTH
    characters of ALPHABET (nothing is mapped: an O is not taken for a 0)."""
    if len(entry) > 4 * LENGTH:
        return None
    code = entry.upper().translate(_SEPARATORS)
    if len(code) != LENGTH or not all(ch in ALPHABET for ch in code):
        return None
    return code


def new_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))


def _hash(key: bytes, customer_id: int, code: str) -> str:
    return keyed_hash(key, customer_id, code)


def _set_key(keys: FactorKeys, data: dict[str, Any]) -> bytes:
    """The set's own hashing key (sets made before it had one: the key derived from SECRET_KEY)."""
    sealed = data.get("key")
    return bytes.fromhex(keys.at_rest.open(sealed)["k"]) if sealed else keys.backup


def _unused(data: str) -> int:
    return sum(1 for c in json.loads(data).get("codes", []) if c.get("used_at") is None)


def _slot(customer_id: int) -> str:
    """The row's `lookup`: its unique index keeps one set per customer, whatever races."""
    return sha256_hex(f"{Type.BACKUP_CODES.value}\x1f{customer_id}")


_MINE = sa.and_(a.c.customer_id == sa.bindparam("cid"), a.c.type == Type.BACKUP_CODES.value)
_ROW = sql.Query(sa.select(a.c.id, a.c.data).where(_MINE).order_by(a.c.id.desc()).limit(1))
_REPLACE = sql.Query(
    a.update().where(_MINE).values(data=sa.bindparam("new"), created_at=sa.bindparam("now"), last_used_at=None)
)
_INSERT = sql.Query(
    a.insert(), columns=("customer_id", "type", "data", "label", "lookup", "created_at", "confirmed_at")
)
_USE = sql.Query(
    a.update().where(a.c.id == sa.bindparam("rid"), a.c.data == sa.bindparam("old"))
    .values(data=sa.bindparam("new"), last_used_at=sa.bindparam("now"))
)
_DROP = sql.Query(a.delete().where(_MINE))
# SQLite (WAL): see totp._SQLITE_WRITER.
_SQLITE_WRITER = sql.Query(a.update().where(sa.false()).values(data=a.c.data))


async def replace(db: Database, keys: FactorKeys, *, customer_id: int, now: datetime) -> list[str]:
    """A new set of COUNT codes in place of the old one (every old code stops working); the
    plain codes, to show once."""
    codes = [new_code() for _ in range(COUNT)]
    key = secrets.token_bytes(32)
    data = json.dumps({"key": keys.at_rest.seal({"k": key.hex()}),
                       "codes": [{"hash": _hash(key, customer_id, c), "used_at": None} for c in codes]})
    for _ in range(CAS_TRIES):
        if await sql.execute(db, _REPLACE, cid=customer_id, new=data, now=now):
            return codes
        try:
            await sql.insert(db, _INSERT, customer_id=customer_id, type=Type.BACKUP_CODES.value, data=data,
                             label="Backup codes", lookup=_slot(customer_id), created_at=now, confirmed_at=now)
        except INTEGRITY_ERRORS:
            continue  # another request made the first set meanwhile: replace that one
        return codes
    raise RuntimeError("could not store the backup codes: the row kept changing")


async def use(db: Database, keys: FactorKeys, *, customer_id: int, entry: str, now: datetime) -> int | None:
    """Use one unused code; how many are left then, or None when no unused code matches (of
    concurrent entries of one code, one succeeds). Every code is compared, in constant time."""
    code = normalized(entry)
    if code is None:
        return None
    if sql.dialect(db) == "sqlite":
        await sql.execute(db, _SQLITE_WRITER)
    for _ in range(CAS_TRIES):
        row = await sql.fetch_one(db, _ROW, cid=customer_id)
        if row is None:
            return None
        whole: dict[str, Any] = json.loads(row.data)
        try:
            wanted = _hash(_set_key(keys, whole), customer_id, code)
        except Unreadable:
            log.warning("backup codes %s: no key opens the set's key (run python -m app factors reseal)", row.id)
            return None
        stored: list[dict[str, Any]] = whole.get("codes", [])
        found = None
        for i, c in enumerate(stored):
            if equal(str(c.get("hash", "")), wanted) and found is None:
                found = i
        if found is None or stored[found].get("used_at") is not None:
            return None
        stored[found] = {**stored[found], "used_at": now.isoformat()}
        new = json.dumps({**whole, "codes": stored})
        if await sql.execute(db, _USE, rid=row.id, old=row.data, new=new, now=now):
            return _unused(new)
        # Lost the swap: this code or another was used, or a new set made, meanwhile: look again.
    return None


_ALL = sql.Query(sa.select(a.c.id, a.c.data).where(a.c.type == Type.BACKUP_CODES.value).order_by(a.c.id))
_ONE = sql.Query(sa.select(a.c.id, a.c.data).where(a.c.id == sa.bindparam("rid")))
_RESEAL = sql.Query(a.update().where(a.c.id == sa.bindparam("rid"), a.c.data == sa.bindparam("old"))
                    .values(data=sa.bindparam("new")))


async def reseal(db: Database, keys: FactorKeys) -> int:
    """Seal every set's key again under the current SECRET_KEY (`keys` built with the old one
    as a fallback); how many sets. A set no key opens is left and logged by row id."""
    done = 0
    for row in await sql.fetch_all(db, _ALL):
        for _ in range(CAS_TRIES):
            whole = json.loads(row.data)
            try:
                key = _set_key(keys, whole)
            except Unreadable:
                log.warning("backup codes %s: no current or fallback key opens the set's key", row.id)
                break
            new = json.dumps({**whole, "key": keys.at_rest.seal({"k": key.hex()})})
            if await sql.execute(db, _RESEAL, rid=row.id, old=row.data, new=new):
                done += 1
                break
            fresh = await sql.fetch_one(db, _ONE, rid=row.id)  # a code was used meanwhile: read it again
            if fresh is None:
                break
            row = fresh
    return done


async def left(db: Database, customer_id: int) -> int:
    """Unused codes of the customer's set (0 without one)."""
    row = await sql.fetch_one(db, _ROW, cid=customer_id)
    return 0 if row is None else _unused(row.data)


async def drop(db: Database, customer_id: int) -> bool:
    """Delete the set (when the last app or passkey goes)."""
    return bool(await sql.execute(db, _DROP, cid=customer_id))

"""Backup codes: a set of ten single-use codes, shown once, kept as keyed hashes each with the
time it was used. One `authenticators` row of type "backup_codes" per customer, data
{"codes": [{"hash": ..., "used_at": null | iso time}, ...]}; making a new set replaces it.

Using a code is a compare-and-swap on the whole `data` text, as in totp: of concurrent entries
of one code, one succeeds.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from databases import Database

from app import sql
from app.database import INTEGRITY_ERRORS
from app.factors import FactorKeys, Type
from app.security.crypto import equal, keyed_hash, sha256_hex
from app.tables import authenticators as a

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


def _hash(keys: FactorKeys, customer_id: int, code: str) -> str:
    return keyed_hash(keys.backup, customer_id, code)


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
    data = json.dumps({"codes": [{"hash": _hash(keys, customer_id, c), "used_at": None} for c in codes]})
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
    # Under the current key, or a fallback one (a set made before SECRET_KEY was rotated).
    wanted = [keyed_hash(k, customer_id, code) for k in (keys.backup, *keys.backup_fallbacks)]
    if sql.dialect(db) == "sqlite":
        await sql.execute(db, _SQLITE_WRITER)
    for _ in range(CAS_TRIES):
        row = await sql.fetch_one(db, _ROW, cid=customer_id)
        if row is None:
            return None
        stored: list[dict[str, Any]] = json.loads(row.data).get("codes", [])
        found = None
        for i, c in enumerate(stored):
            # A list, not a generator: every key is compared, matched or not (constant time).
            if any([equal(str(c.get("hash", "")), w) for w in wanted]) and found is None:  # noqa: C419
                found = i
        if found is None or stored[found].get("used_at") is not None:
            return None
        stored[found] = {**stored[found], "used_at": now.isoformat()}
        new = json.dumps({"codes": stored})
        if await sql.execute(db, _USE, rid=row.id, old=row.data, new=new, now=now):
            return _unused(new)
        # Lost the swap: this code or another was used, or a new set made, meanwhile: look again.
    return None


async def left(db: Database, customer_id: int) -> int:
    """Unused codes of the customer's set (0 without one)."""
    row = await sql.fetch_one(db, _ROW, cid=customer_id)
    return 0 if row is None else _unused(row.data)


async def drop(db: Database, customer_id: int) -> bool:
    """Delete the set (when the last app or passkey goes)."""
    return bool(await sql.execute(db, _DROP, cid=customer_id))

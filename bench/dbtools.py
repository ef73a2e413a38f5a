"""The bench's own MariaDB database: create, migrate, seed, bulk-load for scale, drop."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pymysql

from bench import common
from bench.common import PASSWORD, REPO, email, username


def connect(host: str, port: int, user: str, password: str, db: str | None = None, **kw: Any) -> pymysql.Connection:
    return pymysql.connect(host=host, port=port, user=user, password=password, database=db, charset="utf8mb4",
                           autocommit=True, **kw)


def create_database(conn_args: dict[str, Any], name: str) -> None:
    with connect(**conn_args) as c, c.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")


def drop_database(conn_args: dict[str, Any], name: str) -> None:
    if not name.startswith("bench_"):
        raise ValueError("only drops the bench's own databases")
    with connect(**conn_args) as c, c.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def migrate(env: dict[str, str]) -> float:
    """`python -m app migrate`, as an operator runs it. Returns seconds."""
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "app", "migrate"], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - t


def password_hash() -> str:
    """One Argon2id hash with the app's own parameters, for every seeded customer."""
    from app.security.passwords import ARGON2

    return ARGON2.hash(PASSWORD)


def seed_customers(conn_args: dict[str, Any], db: str, first: int, count: int, stored_hash: str) -> float:
    """Customers first..first+count-1 (id = index) with a verified email and OTP on, via
    multi-row INSERTs (pymysql's executemany) in one transaction. Returns seconds."""
    t = time.monotonic()
    now = datetime.now(UTC).replace(tzinfo=None)
    made = now - timedelta(days=30)
    sql = (
        "INSERT INTO customers (id, username, email, full_name, password_hash, created_at, email_verified_at, "
        "otp_enabled, otp_attempts, otp_lockouts, session_version) VALUES (%s,%s,%s,%s,%s,%s,%s,1,0,0,0)"
    )
    with connect(**conn_args, db=db) as c:
        c.autocommit(False)
        with c.cursor() as cur:
            batch = []
            for i in range(first, first + count):
                batch.append((i, username(i), email(i), f"Bench Customer {i}", stored_hash, made, made))
                if len(batch) == 5000:
                    cur.executemany(sql, batch)
                    batch = []
            if batch:
                cur.executemany(sql, batch)
        c.commit()
    return time.monotonic() - t


# --- scale: LOAD DATA LOCAL INFILE ---------------------------------------------------------


def _load(cur: Any, path: Path, sql: str, tries: int = 4) -> int:
    """One LOAD DATA; retried (after a rollback) on a deadlock, a lock wait timeout or a full
    lock table (1206: the app's cleanup can fill it), which the caller's log shows."""
    for attempt in range(tries):
        try:
            cur.execute(sql.format(path=str(path).replace("'", "''")))
            return int(cur.rowcount)
        except pymysql.err.OperationalError as exc:
            if exc.args[0] not in (1205, 1206, 1213) or attempt == tries - 1:
                raise
            cur.connection.rollback()
            RETRIES.append(f"{exc.args[0]} {exc.args[1]}")
            time.sleep(5)
    raise AssertionError("unreachable")


RETRIES: list[str] = []


def load_scale(conn_args: dict[str, Any], db: str, *, customers_total: int, first_new: int, codes: int,
               stored_hash: str, tmp: Path, mail: bool = True, chunk: int = 500_000,
               log: Any = print) -> dict[str, Any]:
    """Bring the database to `customers_total` customers and add `codes` finished code rows
    (and, with `mail`, the sent mail_outbox row of each), via LOAD DATA LOCAL INFILE of small
    id files (the server fills the other columns), in chunks of `chunk` rows, each its own
    transaction. Returns timings."""
    tmp.mkdir(parents=True, exist_ok=True)
    timings: dict[str, Any] = {}
    rng = random.Random(20261125)
    with connect(**conn_args, db=db, local_infile=True) as c, c.cursor() as cur:
        c.autocommit(False)
        cur.execute("SET SESSION foreign_key_checks=0, unique_checks=0")
        cur.execute("SET @h = %s, @now = UTC_TIMESTAMP(6), @ch = SHA2('code', 256), @sb = SHA2('binding', 256)",
                    (stored_hash,))

        t = time.monotonic()
        loaded = 0
        for lo in range(first_new, customers_total + 1, chunk):
            hi = min(lo + chunk, customers_total + 1)
            path = tmp / "customers.tsv"
            path.write_text("".join(f"{i}\n" for i in range(lo, hi)))
            loaded += _load(cur, path, (
                "LOAD DATA LOCAL INFILE '{path}' INTO TABLE customers (@id) SET id=@id, "
                f"username=CONCAT('b{common.TAG}', LPAD(@id, 7, '0')), email=CONCAT('b{common.TAG}', LPAD(@id, 7, '0'), '@bench.example'), "
                "full_name=CONCAT('Bench Customer ', @id), password_hash=@h, "
                "created_at=@now - INTERVAL 30 DAY, email_verified_at=@now - INTERVAL 30 DAY, otp_enabled=1, "
                "otp_attempts=0, otp_lockouts=0, session_version=0"
            ))
            c.commit()
            path.unlink()
        timings["customers_loaded"] = loaded
        timings["retries"] = RETRIES
        timings["customers_s"] = time.monotonic() - t
        log(f"  customers: {loaded} rows in {timings['customers_s']:.1f} s")

        # Codes: random 62-bit ids (like the app's), loaded in id order; 5 per customer on
        # average; all inside the cleanup grace hour, so the app's own cleanup keeps them.
        # The last round per customer: used (4 in 5) or open but expired; the rest replaced.
        t = time.monotonic()
        ids = sorted({rng.getrandbits(62) | 1 for _ in range(codes)})
        while len(ids) < codes:  # (collisions: practically never)
            ids = sorted(set(ids) | {rng.getrandbits(62) | 1 for _ in range(codes - len(ids))})
        gen_s = time.monotonic() - t
        loaded = mail_loaded = 0
        n_customers = customers_total
        rounds = max(1, codes // n_customers)
        for lo in range(0, codes, chunk):
            part = ids[lo : lo + chunk]
            lines = []
            for k, cid in enumerate(part, start=lo):
                customer = k % n_customers + 1
                last = k // n_customers >= rounds - 1
                state = (0 if customer % 5 else 2) if last else 1
                lines.append(f"{cid}\t{customer}\t{rng.randint(700, 3300)}\t{state}\n")
            path = tmp / "codes.tsv"
            path.write_text("".join(lines))
            loaded += _load(cur, path, (
                "LOAD DATA LOCAL INFILE '{path}' IGNORE INTO TABLE customer_otp_verification "
                "(@id, @cid, @age, @st) SET id=@id, customer_id=@cid, purpose='login', "
                "code_hash=@ch, session_binding=@sb, kind='code', "
                "sent_to='b***@bench.example', attempts=IF(@st=0, 1, 0), "
                "created_at=@now - INTERVAL @age SECOND, expires_at=@now - INTERVAL @age SECOND + INTERVAL 600 SECOND, "
                "used_at=IF(@st=0, @now - INTERVAL @age SECOND + INTERVAL 40 SECOND, NULL), "
                "invalidated_at=IF(@st=1, @now - INTERVAL @age SECOND + INTERVAL 61 SECOND, NULL)"
            ))
            # Each step's code (otp_codes since migration 0003): the code step reads it by step id.
            _load(cur, path, (
                "LOAD DATA LOCAL INFILE '{path}' INTO TABLE otp_codes (@id, @cid, @age, @st) SET "
                "challenge_id=@id, code_hash=@ch, created_at=@now - INTERVAL @age SECOND, "
                "expires_at=@now - INTERVAL @age SECOND + INTERVAL 600 SECOND, "
                "invalidated_at=IF(@st=1, @now - INTERVAL @age SECOND + INTERVAL 61 SECOND, NULL)"
            ))
            if mail:
                mail_loaded += _load(cur, path, (
                    "LOAD DATA LOCAL INFILE '{path}' INTO TABLE mail_outbox (@id, @cid, @age, @st) SET "
                    "kind='login_code', customer_id=@cid, challenge_id=@id, "
                    f"recipient=CONCAT('b{common.TAG}', LPAD(@cid, 7, '0'), '@bench.example'), payload=NULL, status='sent', "
                    "tries=1, created_at=@now - INTERVAL @age SECOND, next_attempt_at=@now - INTERVAL @age SECOND, "
                    "sent_at=@now - INTERVAL @age SECOND + INTERVAL 1 SECOND, "
                    "expires_at=@now - INTERVAL @age SECOND + INTERVAL 600 SECOND"
                ))
            c.commit()
            path.unlink()
            log(f"  codes: {loaded} rows, mail_outbox: {mail_loaded} rows ({time.monotonic() - t:.0f} s)")
        timings["codes_loaded"] = loaded
        timings["mail_rows_loaded"] = mail_loaded
        timings["codes_s"] = time.monotonic() - t
        timings["codes_id_generation_s"] = gen_s
        t = time.monotonic()
        cur.execute("ANALYZE TABLE customers, customer_otp_verification, otp_codes, mail_outbox")
        cur.fetchall()
        timings["analyze_s"] = time.monotonic() - t
    return timings


def table_sizes(conn_args: dict[str, Any], db: str) -> dict[str, Any]:
    with connect(**conn_args, db=db) as c, c.cursor() as cur:
        out = {}
        for table in ("customers", "customer_otp_verification", "otp_codes", "mail_outbox", "auth_sessions",
                      "auth_events"):
            cur.execute(f"SELECT COUNT(*) FROM `{table}`")
            out[table] = cur.fetchone()[0]
        cur.execute(
            "SELECT table_name, ROUND((data_length + index_length) / 1048576) FROM information_schema.tables "
            "WHERE table_schema = %s", (db,))
        out["size_mb"] = {name: int(mb or 0) for name, mb in cur.fetchall()}
        return out


def mysqld_pid() -> int | None:
    from bench.common import pid_of_command

    return pid_of_command("mariadbd") or pid_of_command("mysqld")


def env_for(base: dict[str, str], **values: str) -> dict[str, str]:
    env = dict(base)
    env.update(values)
    return env


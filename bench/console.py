"""The console step (`python -m bench --console`): the staff console at scale (issue 18).

With the server stopped: the database is brought to 1 M customers (the scale step's loader),
then 90 days of sign-in steps with their codes and code mails, and 5 M auth events, are bulk
loaded (LOAD DATA LOCAL INFILE of generated files; the server fills the other columns). The
app's own `roll_up` folds the steps into auth_daily, as the clean-up does every 300 s, and is
timed. Then a fresh server (production settings) serves every console page to a viewer's
session, one request at a time, N times each: p95 per page, target under 300 ms. Last, the
statements the pages send are recorded in this process and EXPLAINed on the loaded database.

Steps (default 900 k, 10 000 a day): purposes login 75 %, registration 12 %, reset 10 %, email
2 %, delete 1 %; recipients at the big providers (gmail.com 35 %, outlook.com, hotmail.com, ...)
and 25 % at other domains; outcomes verified 80 % (5 s to 10 min), not delivered 5 % (one of
three SMTP replies), locked out 2 % (with its `locked` event), wrong code 5 %, never entered
8 %; 10 % asked for a second code (a second code and mail). Events (default 5 M) over the 90
days: sign-ins, codes sent, failures and lockouts for random customers and addresses, with a
few customers and addresses failing far more (the abuse view has something to rank).
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import common, dbtools
from bench.common import summary

STEP_ID0 = 1 << 50  # step ids of the load (the app's own are random 62-bit)
DAY = 86400
PURPOSES = (("login", 75), ("registration", 12), ("reset", 10), ("email", 2), ("delete", 1))
DOMAINS = (("gmail.com", 35), ("outlook.com", 10), ("hotmail.com", 6), ("yahoo.com", 6), ("icloud.com", 5),
           ("gmx.de", 4), ("web.de", 3), ("t-online.de", 2), ("aol.com", 2), ("proton.me", 2))
OTHER_DOMAINS = 5000  # corp00000.example ... (the other 25 %)
REPLIES = ("550 5.1.1 <user>: Recipient address rejected: User unknown", "552 5.2.2 Mailbox full",
           "554 5.7.1 Message rejected as spam")
EVENTS = (("signed_in", 35), ("code_sent", 25), ("verified", 20), ("signed_out", 8), ("code_failed", 6),
          ("password_failed", 4), ("resend_refused", 1), ("locked", 1))
TARGET_MS = 300.0


def _weighted(rng: random.Random, table: tuple[tuple[str, int], ...], n: int) -> list[str]:
    names, weights = zip(*table, strict=True)
    return rng.choices(names, weights, k=n)


def load(conn: dict[str, Any], db: str, *, customers_total: int, first_new: int, steps: int, events: int,
         stored_hash: str, tmp: Path, log: Any = print, chunk: int = 250_000) -> dict[str, Any]:
    """Customers (up to customers_total), then `steps` steps over 90 days (verification rows,
    codes, code mails) and `events` auth events. Returns timings."""
    out: dict[str, Any] = {}
    with dbtools.connect(**conn, db=db) as c, c.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM customers")
        have = int(cur.fetchone()[0])
        # The scale step's 5 M codes all expired within the last hour (5 M sign-ins an hour): no
        # shop sees that, and the funnel would fold them all on every page. Start from a shop's
        # steady state instead: the clean-up keeps about an hour of steps.
        cur.execute("TRUNCATE TABLE otp_codes")
        cur.execute("TRUNCATE TABLE customer_otp_verification")
    if have < customers_total:
        out["customers"] = dbtools.load_scale(conn, db, customers_total=customers_total, first_new=max(first_new, have + 1),
                                              codes=0, stored_hash=stored_hash, tmp=tmp, log=log)
    rng = random.Random(20261128)
    t = time.monotonic()
    loaded = resent_loaded = 0
    with dbtools.connect(**conn, db=db, local_infile=True) as c, c.cursor() as cur:
        c.autocommit(False)
        cur.execute("SET SESSION foreign_key_checks=0, unique_checks=0")
        cur.execute("SET @now = UTC_TIMESTAMP(6), @ch = SHA2('code', 256), @sb = SHA2('binding', 256)")
        for lo in range(0, steps, chunk):
            n = min(chunk, steps - lo)
            purposes = _weighted(rng, PURPOSES, n)
            lines, second, locks = [], [], []
            for i in range(n):
                sid = STEP_ID0 + lo + i
                cid = rng.randint(1, customers_total)
                age = rng.randint(0, 90 * DAY - 1)
                roll = rng.random()
                outcome = 0 if roll < 0.80 else 1 if roll < 0.85 else 2 if roll < 0.87 else 3 if roll < 0.92 else 4
                ttv = int(rng.lognormvariate(3.5, 0.9)) + 5 if outcome == 0 else 0
                attempts = {0: 1, 1: 0, 2: 5, 3: rng.randint(1, 4), 4: 0}[outcome]
                latency = int(rng.lognormvariate(6.5, 1.0)) + 50  # ms
                domain = (_weighted(rng, DOMAINS, 1)[0] if rng.random() < 0.75
                          else f"corp{rng.randrange(OTHER_DOMAINS):05d}.example")
                codes = 2 if rng.random() < 0.10 and outcome != 1 else 1
                reply = REPLIES[sid % len(REPLIES)]
                lines.append(f"{sid}\t{cid}\t{purposes[i]}\t{age}\t{outcome}\t{ttv}\t{latency}\t{domain}\t{attempts}\t"
                             f"{codes}\t{reply}\n")
                if codes == 2:
                    second.append(f"{sid}\t{cid}\t{purposes[i]}\t{age}\t{latency}\t{domain}\n")
                if outcome == 2:
                    locks.append(f"{cid}\tlocked\t{max(0, age - 120)}\t198.18.{rng.randrange(256)}.{rng.randrange(256)}\n")
            path = tmp / "steps.tsv"
            path.write_text("".join(lines))
            loaded += dbtools._load(cur, path, (
                "LOAD DATA LOCAL INFILE '{path}' INTO TABLE customer_otp_verification "
                "(@id, @cid, @p, @age, @oc, @ttv, @lat, @dom, @att, @codes, @err) SET id=@id, customer_id=@cid, "
                "purpose=@p, code_hash=@ch, session_binding=@sb, kind='code', sent_to='b***@bench.example', "
                "attempts=@att, created_at=@now - INTERVAL @age SECOND, "
                "expires_at=@now - INTERVAL @age SECOND + INTERVAL (600 + 61 * (@codes - 1)) SECOND, "
                "last_code_at=@now - INTERVAL @age SECOND + INTERVAL (61 * (@codes - 1)) SECOND, "
                "used_at=IF(@oc = 0, @now - INTERVAL @age SECOND + INTERVAL @ttv SECOND, NULL), proven=1"
            ))
            dbtools._load(cur, path, (
                "LOAD DATA LOCAL INFILE '{path}' INTO TABLE otp_codes "
                "(@id, @cid, @p, @age, @oc, @ttv, @lat, @dom, @att, @codes, @err) SET challenge_id=@id, code_hash=@ch, "
                "created_at=@now - INTERVAL @age SECOND, expires_at=@now - INTERVAL @age SECOND + INTERVAL 600 SECOND"
            ))
            dbtools._load(cur, path, (
                "LOAD DATA LOCAL INFILE '{path}' INTO TABLE mail_outbox "
                "(@id, @cid, @p, @age, @oc, @ttv, @lat, @dom, @att, @codes, @err) SET kind=CONCAT(@p, '_code'), "
                "customer_id=@cid, challenge_id=@id, recipient=CONCAT('c', @cid, '@', @dom), payload=NULL, "
                "status=IF(@oc = 1, 'failed', 'sent'), tries=IF(@oc = 1, 3, 1), last_error=IF(@oc = 1, @err, NULL), "
                "created_at=@now - INTERVAL @age SECOND, "
                "next_attempt_at=@now - INTERVAL @age SECOND + INTERVAL IF(@oc = 1, 300, 0) SECOND, "
                "sent_at=IF(@oc = 1, NULL, @now - INTERVAL @age SECOND + INTERVAL (@lat * 1000) MICROSECOND), "
                "expires_at=@now - INTERVAL @age SECOND + INTERVAL 600 SECOND"
            ))
            if second:
                path.write_text("".join(second))
                resent_loaded += dbtools._load(cur, path, (
                    "LOAD DATA LOCAL INFILE '{path}' INTO TABLE otp_codes (@id, @cid, @p, @age, @lat, @dom) SET "
                    "challenge_id=@id, code_hash=@ch, created_at=@now - INTERVAL @age SECOND + INTERVAL 61 SECOND, "
                    "expires_at=@now - INTERVAL @age SECOND + INTERVAL 661 SECOND"
                ))
                dbtools._load(cur, path, (
                    "LOAD DATA LOCAL INFILE '{path}' INTO TABLE mail_outbox (@id, @cid, @p, @age, @lat, @dom) SET "
                    "kind=CONCAT(@p, '_code'), customer_id=@cid, challenge_id=@id, "
                    "recipient=CONCAT('c', @cid, '@', @dom), payload=NULL, status='sent', tries=1, "
                    "created_at=@now - INTERVAL @age SECOND + INTERVAL 61 SECOND, "
                    "next_attempt_at=@now - INTERVAL @age SECOND + INTERVAL 61 SECOND, "
                    "sent_at=@now - INTERVAL @age SECOND + INTERVAL 61 SECOND + INTERVAL (@lat * 1000) MICROSECOND, "
                    "expires_at=@now - INTERVAL @age SECOND + INTERVAL 661 SECOND"
                ))
            if locks:
                path.write_text("".join(locks))
                _load_events(cur, path)
            c.commit()
            path.unlink()
            log(f"  console steps: {loaded} (+{resent_loaded} second codes) ({time.monotonic() - t:.0f} s)")
        out["steps_loaded"], out["second_codes"], out["steps_s"] = loaded, resent_loaded, time.monotonic() - t

        t = time.monotonic()
        n_loaded = 0
        # A few customers and addresses fail far more than the rest (what the abuse view ranks).
        noisy_customers = [rng.randint(1, customers_total) for _ in range(20)]
        noisy_ips = [f"203.0.113.{i}" for i in range(1, 21)]
        span = 90 * DAY
        for lo in range(0, events, chunk * 2):
            n = min(chunk * 2, events - lo)
            kinds = _weighted(rng, EVENTS, n)
            # Oldest first, as the app appends them: ids follow time, so the newest events of a
            # kind sit together at the end of the table (what the abuse view reads).
            top, bottom = span - span * lo // events, span - span * (lo + n) // events
            ages = sorted((rng.randint(bottom, max(bottom, top - 1)) for _ in range(n)), reverse=True)
            lines = []
            for kind, age in zip(kinds, ages, strict=True):
                failing = kind in ("code_failed", "password_failed", "locked")
                if failing and rng.random() < 0.05:
                    cid: Any = rng.choice(noisy_customers)
                    ip = rng.choice(noisy_ips)
                else:
                    cid = rng.randint(1, customers_total) if kind != "password_failed" or rng.random() < 0.8 else "\\N"
                    ip = common.client_address(rng.randrange(1 << 17))
                lines.append(f"{cid}\t{kind}\t{age}\t{ip}\n")
            path = tmp / "events.tsv"
            path.write_text("".join(lines))
            n_loaded += _load_events(cur, path)
            c.commit()
            path.unlink()
            log(f"  auth events: {n_loaded} ({time.monotonic() - t:.0f} s)")
        out["events_loaded"], out["events_s"] = n_loaded, time.monotonic() - t
        t = time.monotonic()
        cur.execute("ANALYZE TABLE customer_otp_verification, otp_codes, mail_outbox, auth_events")
        cur.fetchall()
        out["analyze_s"] = time.monotonic() - t
    return out


def _load_events(cur: Any, path: Path) -> int:
    return dbtools._load(cur, path, (
        "LOAD DATA LOCAL INFILE '{path}' INTO TABLE auth_events (@cid, @ev, @age, @ip) SET customer_id=@cid, "
        "event=@ev, ip=@ip, user_agent='bench', created_at=@now - INTERVAL @age SECOND"
    ))


def settings_of(bench: Any) -> Any:
    """The app's settings as the bench's server runs with them (what the in-process parts need)."""
    from app.settings import Settings

    return Settings(app_env="production", database_url=bench.database_url, secret_key=bench.secret,
                    smtp_host="127.0.0.1", public_origin="https://shop.bench")


async def _roll_up(settings: Any) -> dict[str, Any]:
    """The app's own roll-up, as the clean-up runs it (one worker), over the whole backlog."""
    from app.database import make_database
    from app.staff import analytics

    db = make_database(settings)
    await db.connect()
    try:
        t = time.monotonic()
        done = await analytics.roll_up(db, now=datetime.now(UTC))
        first_s = time.monotonic() - t
        t = time.monotonic()
        again = await analytics.roll_up(db, now=datetime.now(UTC))  # what each later clean-up pays
        return {"steps": done.steps, "slices": done.slices, "seconds": first_s,
                "steps_per_s": done.steps / first_s if first_s else None, "again_s": time.monotonic() - t,
                "again_steps": again.steps, "watermark": done.watermark.isoformat()}
    finally:
        await db.disconnect()


async def _staff_session(settings: Any) -> str:
    """A viewer and a live console session; its token."""
    from app import sql
    from app.database import make_database
    from app.staff import sessions
    from app.tables import staff

    db = make_database(settings)
    await db.connect()
    try:
        now = datetime.now(UTC)
        insert = sql.Query(staff.insert(), columns=("email", "role", "created_at"))
        staff_id = await sql.insert(db, insert, email=f"viewer-{common.TAG}@bench.example", role="viewer",
                                    created_at=now)
        return await sessions.create(db, staff_id=staff_id, ip="127.0.0.1", user_agent="bench", now=now)
    finally:
        await db.disconnect()


def pages(tag: str) -> list[str]:
    """Every console GET page, as staff use them."""
    out = [f"/admin/funnel?range={r}" for r in ("24h", "7d", "30d", "90d")]
    out += ["/admin/funnel?range=90d&purpose=login&domain=gmail.com", "/admin/funnel.csv?chart=daily&range=90d"]
    out += [f"/admin/abuse?range={r}" for r in ("24h", "7d", "30d", "90d")]
    out += [f"/admin/customers?q=b{tag}00421", "/admin/customers?q=Bench+Customer+77", "/admin/customers",
            "/admin/audit", "/admin/audit?event=code_failed", "/admin"]
    return out


def time_pages(base_url: str, cookie: str, paths: list[str], requests: int, warmup: int = 3) -> dict[str, Any]:
    """Each page `requests` times, one request at a time (after `warmup` unmeasured): latency
    summary per page; pages that answer 404 (not built yet) are reported as skipped."""
    import httpx

    headers = {"Cookie": cookie, "X-Forwarded-Proto": "https", "X-Forwarded-For": "198.18.0.1",
               "User-Agent": "Mozilla/5.0 (bench console)"}
    out: dict[str, Any] = {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        for path in paths:
            first = client.get(path)
            if first.status_code == 404:
                out[path] = {"skipped": "404"}
                continue
            if first.status_code != 200:
                out[path] = {"error": f"HTTP {first.status_code}", "location": first.headers.get("location")}
                continue
            for _ in range(warmup - 1):
                client.get(path)
            ms, size = [], len(first.content)
            for _ in range(requests):
                t = time.perf_counter()
                r = client.get(path)
                ms.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    out[path] = {"error": f"HTTP {r.status_code}"}
                    break
            else:
                out[path] = {**summary(ms), "bytes": size}
    return out


async def _explain_statements(settings: Any) -> list[dict[str, Any]]:
    """The statements the funnel and abuse pages send (recorded at the driver, in this process)."""
    from app.database import make_database
    from app.staff import analytics
    from bench.explain import Recorder

    rec = Recorder()
    restore = rec.install()
    db = make_database(settings)
    await db.connect()
    try:
        now = datetime.now(UTC)
        for days in (2, 90):
            rec.phase = f"funnel {days} days"
            await analytics.funnel(db, now=now, days=days)
            await analytics.funnel(db, now=now, days=days, purpose="login", domain="gmail.com")
        rec.phase = "abuse, mail failures"
        await analytics.abuse(db, now=now, days=90)
        await analytics.mail_failures(db, now=now, days=90)
        rec.phase = "roll-up (clean-up)"
        await analytics.roll_up(db, now=now)
    finally:
        await db.disconnect()
        restore()
    return rec.statements


def explain(conn: dict[str, Any], db: str, statements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import pymysql

    seen: dict[str, dict[str, Any]] = {}
    for st in statements:
        sql = " ".join(st["sql"].split())
        if sql.upper().startswith(("SELECT", "UPDATE", "DELETE")) and " FROM " in sql.upper() or \
                sql.upper().startswith("UPDATE"):
            seen.setdefault(sql, {"sql": sql, "args": st["args"], "function": st["function"], "phase": st["phase"]})
    out = []
    with dbtools.connect(**conn, db=db) as c, c.cursor(pymysql.cursors.DictCursor) as cur:
        for item in seen.values():
            entry = {k: item[k] for k in ("function", "phase", "sql")}
            try:
                cur.execute("EXPLAIN " + item["sql"], item["args"])
                rows = cur.fetchall()
            except Exception as exc:
                entry["plan"], entry["verdict"] = [], f"EXPLAIN failed: {exc}"
                out.append(entry)
                continue
            entry["plan"] = [{k: r.get(k) for k in ("table", "type", "key", "rows", "Extra")} for r in rows]
            scans = [r for r in rows if r.get("table") and (r.get("type") in ("ALL", "index") or not r.get("key"))
                     and not str(r.get("table", "")).startswith("<")]
            keys = [f"{r['table']}.{r['key']} ({r['type']})" for r in rows if r.get("key")]
            entry["verdict"] = ("FULL SCAN of " + ", ".join(str(r["table"]) for r in scans) if scans else
                                "index: " + ", ".join(keys) if keys else
                                "; ".join(str(r.get("Extra")) for r in rows))  # e.g. MIN() read from the index
            out.append(entry)
    return out


def run_step(bench: Any, stored_hash: str, out: dict[str, Any], log: Any = print) -> None:
    """The whole console step (see the module's docstring); the server is stopped on entry and on exit."""
    from bench.server import Uvicorn, app_env

    a = bench.args
    out.update({"customers": a.console_customers, "steps": a.console_steps, "events": a.console_events,
                "requests": a.console_requests, "target_ms": TARGET_MS})
    log(f"console: loading {a.console_customers} customers, {a.console_steps} steps over 90 days, "
        f"{a.console_events} auth events")
    t = time.monotonic()
    out["load"] = load(bench.conn, bench.db, customers_total=a.console_customers, first_new=bench.seeded + 1,
                       steps=a.console_steps, events=a.console_events, stored_hash=stored_hash, tmp=bench.tmp, log=log)
    out["load"]["total_s"] = time.monotonic() - t
    out["db"] = dbtools.table_sizes(bench.conn, bench.db)
    log(f"  loaded in {out['load']['total_s']:.0f} s: {out['db']}")
    log("console: roll-up of the backlog into auth_daily (app.staff.analytics.roll_up)")
    settings = settings_of(bench)
    out["roll_up"] = asyncio.run(_roll_up(settings))
    log(f"  {out['roll_up']['steps']} steps in {out['roll_up']['seconds']:.0f} s "
        f"({out['roll_up']['slices']} slices); again: {out['roll_up']['again_s'] * 1000:.0f} ms")
    with dbtools.connect(**bench.conn, db=bench.db) as c, c.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM auth_daily")
        out["auth_daily_rows"] = int(cur.fetchone()[0])
    token = asyncio.run(_staff_session(settings))
    from app.staff.web import AdminCookie, cookie_value, name_for

    cookie = f"{name_for(settings)}={cookie_value(settings, AdminCookie(token=token, csrf='bench'))}"
    server = Uvicorn(app_env(bench.settings_env()), bench.port, a.workers, bench.tmp, tag="console")
    server.start()
    bench.server = server
    try:
        log(f"console: {a.console_requests} requests per page, one at a time")
        out["pages"] = time_pages(f"http://127.0.0.1:{bench.port}", cookie, pages(common.TAG), a.console_requests)
        for path, s in out["pages"].items():
            log(f"  {path}: " + (f"p50 {s['p50']:.0f} / p95 {s['p95']:.0f} / max {s['max']:.0f} ms"
                                 if "p95" in s else str(s)))
    finally:
        bench.keep_server_logs()
        server.stop()
    log("console: EXPLAIN of the funnel's and abuse view's statements")
    out["explain"] = explain(bench.conn, bench.db, asyncio.run(_explain_statements(settings)))


def targets(console: dict[str, Any]) -> list[dict[str, Any]]:
    timed = {p: s for p, s in (console.get("pages") or {}).items() if "p95" in s}
    if not timed:
        return [{"target": f"Every console page p95 < {TARGET_MS:g} ms", "measured": console.get("error", "not run"),
                 "holds": None, "note": ""}]
    worst = max(timed, key=lambda p: timed[p]["p95"])
    failed = [p for p, s in (console.get("pages") or {}).items() if "error" in s]
    return [{"target": f"Every console page p95 < {TARGET_MS:g} ms ({console['customers']:,} customers, "
                       f"{console['events']:,} events, {console['steps']:,} steps)",
             "measured": f"worst {worst}: p95 {timed[worst]['p95']:.0f} ms; {len(timed)} pages timed"
                         + (f"; failed: {', '.join(failed)}" if failed else ""),
             "holds": all(s["p95"] < TARGET_MS for s in timed.values()) and not failed, "note": ""}]


def markdown(console: dict[str, Any]) -> list[str]:
    L = ["", "## Console (staff pages at scale)", ""]
    if console.get("error"):
        return [*L, f"The console step failed: `{console['error']}`", ""]
    load, roll = console.get("load") or {}, console.get("roll_up") or {}
    L += [f"{console['customers']:,} customers, {load.get('steps_loaded', 0):,} steps over 90 days "
          f"(+{load.get('second_codes', 0):,} second codes), {load.get('events_loaded', 0):,} auth events; loaded in "
          f"{load.get('total_s', 0):.0f} s. Roll-up of the whole backlog: {roll.get('steps', 0):,} steps in "
          f"{roll.get('seconds', 0):.1f} s ({roll.get('slices', 0)} slices), then {roll.get('again_s', 0) * 1000:.0f} ms "
          f"for a clean-up with nothing new; auth_daily holds {console.get('auth_daily_rows', 0):,} rows.", "",
          f"Console p95 per page ({console['requests']} requests each, one at a time, after 3 unmeasured):", "",
          "| page | p50 ms | p95 ms | max ms | bytes |", "|---|---:|---:|---:|---:|"]
    for path, s in (console.get("pages") or {}).items():
        if "p95" in s:
            L.append(f"| `{path}` | {s['p50']:.0f} | {s['p95']:.0f} | {s['max']:.0f} | {s['bytes']:,} |")
        else:
            L.append(f"| `{path}` | {s.get('skipped') and 'skipped (404)' or s.get('error')} | | | |")
    rows = console.get("explain") or []
    if rows:
        L += ["", "EXPLAIN of the funnel's, abuse view's and roll-up's statements:", "",
              "| phase | function | verdict |", "|---|---|---|"]
        for e in rows:
            L.append(f"| {e['phase']} | `{e['function']}` | {e['verdict']} |")
    return [*L, ""]

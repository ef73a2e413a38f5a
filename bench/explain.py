"""EXPLAIN of every query on the sign-in path, as the app really sends it.

Rather than copying SQL out of app/auth/queries.py, app/otp/engine.py and app/mail/outbox.py
by hand, this runs one complete sign-in through the app in this process (httpx's ASGI
transport, the app's lifespan, its outbox dispatcher with an in-memory mail transport)
against the loaded database, records every statement sent, together with
its parameters (at the driver's cursor) and the app function that issued it, then EXPLAINs each distinct statement
with those parameters. The periodic cleanup (app/otp/cleanup.py) is recorded the same way.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from typing import Any

from bench.common import PASSWORD, REPO, email, username

APP_DIR = str(REPO / "app")
SKIP_FILES = ("app/database.py", "app/sql.py")


class Recorder:
    def __init__(self) -> None:
        self.statements: list[dict[str, Any]] = []
        self.phase = ""

    def where(self) -> tuple[str, str]:
        """(innermost app function, outermost app function) on the current stack."""
        inner = outer = ""
        f = sys._getframe(2)
        while f is not None:
            fn = f.f_code.co_filename
            if fn.startswith(APP_DIR):
                rel = fn[len(str(REPO)) + 1 :]
                here = f"{rel}:{f.f_code.co_name}"
                if not inner and rel not in SKIP_FILES:
                    inner = here
                outer = here
            f = f.f_back
        return inner, outer

    def install(self) -> Any:
        """Record every statement at the driver: the prepared ones (app/sql.py) and the rest."""
        from aiomysql.cursors import Cursor

        original = Cursor.execute
        recorder = self

        async def execute(cursor: Any, query: str, args: Any = None) -> Any:
            inner, outer = recorder.where()
            phase = "mail dispatcher" if outer.startswith("app/mail/dispatcher.py") else recorder.phase
            recorder.statements.append({"sql": query, "args": args, "function": inner, "caller": outer,
                                        "phase": phase})
            return await original(cursor, query, args)

        Cursor.execute = execute  # type: ignore[method-assign]
        return lambda: setattr(Cursor, "execute", original)


class MemoryTransport:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, message: Any) -> None:
        self.sent.append(message)

    async def close(self) -> None:
        return None


async def _sign_in(app: Any, state: dict[str, Any], transport: MemoryTransport, rec: Recorder, i: int) -> list[int]:
    import httpx

    from bench.capture import CODE_RE

    async def with_state(scope: Any, receive: Any, send: Any) -> None:
        scope["state"] = dict(state)
        await app(scope, receive, send)

    statuses = []
    csrf = re.compile(r'name="csrf_token" value="([^"]+)"')
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=with_state, client=("127.0.0.1", 5000)),
                                 base_url="https://testserver") as client:
        rec.phase = "GET /login"
        r = await client.get("/login")
        statuses.append(r.status_code)
        token = csrf.search(r.text).group(1)  # type: ignore[union-attr]
        rec.phase = "POST /login"
        r = await client.post("/login", data={"csrf_token": token, "login": username(i), "password": PASSWORD})
        statuses.append(r.status_code)
        rec.phase = "mail dispatcher"
        for _ in range(100):
            if transport.sent:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the dispatcher marks it sent
        message = transport.sent[-1]
        code = CODE_RE.search(message.text).group(1)
        assert message.recipient == email(i)
        rec.phase = "GET /verify"
        r = await client.get("/verify")
        statuses.append(r.status_code)
        token = csrf.search(r.text).group(1)  # type: ignore[union-attr]
        rec.phase = "POST /verify"
        r = await client.post("/verify", data={"csrf_token": token, "code": code})
        statuses.append(r.status_code)
        rec.phase = "GET /dashboard"
        r = await client.get("/dashboard")
        statuses.append(r.status_code)
        token = csrf.search(r.text).group(1)  # type: ignore[union-attr]
        rec.phase = "POST /logout"
        r = await client.post("/logout", data={"csrf_token": token})
        statuses.append(r.status_code)
    return statuses


def _insert_probe(conn_args: dict[str, Any], db: str, customer: int) -> dict[str, Any]:
    """While the cleanup runs: how long does a sign-in's code INSERT (as issue() does it) wait?"""
    from bench.dbtools import connect

    time.sleep(1.0)
    with connect(**conn_args, db=db) as c, c.cursor() as cur:
        c.autocommit(False)
        t = time.monotonic()
        try:
            cur.execute(
                "INSERT INTO customer_otp_verification (id, customer_id, purpose, code_hash, session_binding, kind, "
                "sent_to, attempts, created_at, expires_at) VALUES (%s, %s, 'login', SHA2('p', 256), SHA2('p', 256), "
                "'code', 'probe', 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) + INTERVAL 10 MINUTE)",
                (3, customer))  # a low id: a row the cleanup's scan (in id order) has passed by then
            waited = time.monotonic() - t
            error = None
        except Exception as exc:
            waited, error = time.monotonic() - t, str(exc)
        c.rollback()
    return {"insert_wait_s": waited, "error": error, "started_after_s": 1.0}


async def _record(database_url: str, secret_key: str, customer: int, cleanup: bool, conn_args: dict[str, Any],
                  db_name: str) -> tuple[Recorder, dict[str, Any]]:
    from app.main import create_app
    from app.settings import Settings

    rec = Recorder()
    restore = rec.install()
    info: dict[str, Any] = {}
    try:
        settings = Settings(app_env="production", database_url=database_url, secret_key=secret_key,
                            smtp_host="127.0.0.1", rate_limit_storage="memory://", public_origin="https://testserver")
        transport = MemoryTransport()
        app = create_app(settings, transport=transport)
        async with app.router.lifespan_context(app) as state:
            info["statuses"] = await _sign_in(app, state or {}, transport, rec, customer)
            if cleanup:
                from app.otp.cleanup import cleanup as run_cleanup

                rec.phase = "cleanup (every 300 s per worker)"
                probe = asyncio.get_running_loop().run_in_executor(None, _insert_probe, conn_args, db_name, customer)
                t = time.monotonic()
                try:
                    info["cleanup_deleted"] = await run_cleanup(state["db"], now=state["clock"].now())
                except Exception as exc:
                    info["cleanup_error"] = f"{type(exc).__name__}: {exc}"
                info["cleanup_s"] = time.monotonic() - t
                info["insert_during_cleanup"] = await probe
    finally:
        restore()
    return rec, info


def _normal(sql: str) -> str:
    return " ".join(sql.split())


def explain_all(conn_args: dict[str, Any], db: str, database_url: str, secret_key: str, customer: int,
                cleanup: bool = True) -> dict[str, Any]:
    from bench.dbtools import connect

    rec, info = asyncio.run(_record(database_url, secret_key, customer, cleanup, conn_args, db))
    seen: dict[str, dict[str, Any]] = {}
    for st in rec.statements:
        sql = _normal(st["sql"])
        if " FROM " not in sql.upper() and not sql.upper().startswith(("UPDATE", "INSERT", "DELETE")):
            continue  # SELECT ROW_COUNT(), SELECT 1
        key = sql
        if key in seen:
            if st["phase"] not in seen[key]["phases"]:
                seen[key]["phases"].append(st["phase"])
            continue
        seen[key] = {"sql": sql, "args": st["args"], "function": st["function"], "phases": [st["phase"]]}
    out = []
    with connect(**conn_args, db=db) as c, c.cursor(__import__("pymysql").cursors.DictCursor) as cur:
        for item in seen.values():
            entry = {k: item[k] for k in ("function", "phases", "sql")}
            if item["sql"].upper().startswith("INSERT"):
                entry["plan"] = []
                entry["verdict"] = "insert (no lookup)"
                out.append(entry)
                continue
            try:
                cur.execute("EXPLAIN " + item["sql"], item["args"])
                rows = cur.fetchall()
            except Exception as exc:
                entry["plan"], entry["verdict"] = [], f"EXPLAIN failed: {exc}"
                out.append(entry)
                continue
            entry["plan"] = [{k: r.get(k) for k in ("table", "type", "possible_keys", "key", "key_len", "rows", "Extra")}
                             for r in rows]
            scans = [r for r in rows if r.get("type") == "ALL" or (r.get("key") is None and r.get("table"))]
            # type "index" reads the whole of an index: as bad as a table scan on a big table.
            index_scans = [r for r in rows if r.get("type") == "index"]
            if scans:
                entry["verdict"] = "FULL SCAN"
            elif index_scans:
                entry["verdict"] = "FULL SCAN of index " + ", ".join(f"{r['table']}.{r['key']}" for r in index_scans)
            elif any(r.get("key") for r in rows):
                entry["verdict"] = "index: " + ", ".join(f"{r['table']}.{r['key']} ({r['type']})"
                                                         for r in rows if r.get("key"))
            else:  # e.g. "Impossible WHERE noticed after reading const tables": a unique lookup found nothing
                extra = "; ".join(str(r.get("Extra")) for r in rows)
                entry["verdict"] = ("unique key (const): the row it read no longer matches (EXPLAIN runs after the sign-in)"
                                    if "after reading const tables" in extra else extra)
            out.append(entry)
    info["queries"] = out
    counts: dict[str, int] = {}
    for st in rec.statements:
        counts[st["phase"]] = counts.get(st["phase"], 0) + 1
    info["statements_per_phase"] = counts  # executions, including SELECT ROW_COUNT() round trips
    return info

"""The load generator, its own process: `python -m bench.loadgen CONFIG.json OUT.json`.

Closed loop: C tasks, each runs complete sign-ins back to back as a JS-off browser would —
GET /login, POST /login, wait for the code at the capture, GET /verify, POST /verify,
GET /dashboard, POST /logout — with a fresh cookie jar (here: one cookie, kept by hand,
because production's `__Host-session` is Secure and we talk plain http on loopback), a
fresh customer and a fresh X-Forwarded-For address (198.18.0.0/15) per flow.

Bounded in time (warm-up + duration + drain timeout, then everything is cancelled) and in
count (the customer range it is given). Only 127.0.0.1 is ever contacted.

The measurement window is [end of warm-up, end of duration]: throughput counts flows that
complete inside it, latencies count steps that complete inside it, and the app's CPU
(utime+stime of the uvicorn master and workers from /proc) is read at its two edges.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bench.capture import Capture, serve
from bench.common import (
    CLK_TCK,
    PASSWORD,
    STEPS,
    client_address,
    cpu_ticks,
    email,
    hash_thread_ticks,
    machine_busy_ticks,
    machine_steal_ticks,
    status_field,
    summary,
    sys_ticks,
    username,
)
from bench.http11 import Connection, Response

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
COOKIE = "__Host-session"


class FlowError(Exception):
    def __init__(self, step: str, what: str) -> None:
        super().__init__(f"{step}: {what}")
        self.step, self.what = step, what


class NoCustomers(Exception):
    pass


@dataclass
class Browser:
    """One flow's view: its connection, its session cookie, its address."""

    conn: Connection
    origin: str
    ip: str
    cookie: str | None = None

    def headers(self, post: bool = False) -> dict[str, str]:
        # As from the TLS proxy in front of the app: the client's address, and the scheme it used.
        h = {"X-Forwarded-For": self.ip, "X-Forwarded-Proto": "https", "User-Agent": "bench/1.0",
             "Accept": "text/html"}
        if self.cookie:
            h["Cookie"] = f"{COOKIE}={self.cookie}"
        if post:
            h["Origin"] = self.origin
        return h

    def keep(self, response: Response) -> None:
        for value in response.get_list("set-cookie"):
            name, _, rest = value.partition("=")
            if name.strip() != COOKIE:
                continue
            val = rest.split(";", 1)[0].strip()
            deleted = "1970" in rest or val in ("", "null")
            self.cookie = None if deleted else val

    async def get(self, path: str) -> Response:
        r = await self.conn.get(path, self.headers())
        self.keep(r)
        return r

    async def post(self, path: str, data: dict[str, str]) -> Response:
        r = await self.conn.post(path, data, self.headers(post=True))
        self.keep(r)
        return r


def _csrf(step: str, r: Response) -> str:
    if r.status_code != 200:
        raise FlowError(step, f"status {r.status_code}")
    m = CSRF_RE.search(r.text)
    if not m:
        raise FlowError(step, "no csrf_token in page")
    return m.group(1)


def _see_other(step: str, r: Response, where: str) -> None:
    location = r.header("location") or ""
    if r.status_code != 303 or not location.startswith(where):
        raise FlowError(step, f"status {r.status_code} location {location!r}")


@dataclass
class Recorder:
    window: tuple[float, float] = (0.0, 0.0)
    steps: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STEPS})
    flows: list[float] = field(default_factory=list)  # durations, completed inside the window
    rest: list[float] = field(default_factory=list)  # the same less the code wait
    flows_in_window: int = 0
    flows_total: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    errors_total: int = 0

    def inside(self, t: float) -> bool:
        return self.window[0] <= t <= self.window[1]

    def step(self, name: str, started: float, ended: float) -> None:
        if self.inside(ended):
            self.steps[name].append((ended - started) * 1000)

    def error(self, key: str, detail: str) -> None:
        self.errors_total += 1
        self.errors[key] = self.errors.get(key, 0) + 1
        if len(self.error_samples) < 20:
            self.error_samples.append(detail)


class Generator:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.capture = Capture(float(cfg["mail_delay"]))
        self.rec = Recorder()
        c = cfg["customers"]
        self._next_customer = 0
        self._customer_start, self._customer_step, self._customer_count = c["start"], c["step"], c["count"]
        self._next_ip = int(cfg["ip_offset"])
        self.stop = False
        self.origin = cfg["base_url"].rstrip("/")
        self.samples: dict[str, Any] = {"threads_max": {}, "rss_max_kb": {}}
        target = urlsplit(cfg["base_url"])
        self.host, self.port = target.hostname or "127.0.0.1", target.port or 80
        self.timeout = float(cfg.get("http_timeout", 30))

    def customer(self) -> int:
        if self._next_customer >= self._customer_count:
            raise NoCustomers
        i = self._customer_start + self._next_customer * self._customer_step
        self._next_customer += 1
        return i

    async def flow(self) -> None:
        """A fresh browser: its own connection (so the kernel spreads flows over the workers, as
        it would new visitors), kept alive for the flow's seven requests, closed after it."""
        conn = Connection(self.host, self.port, self.timeout)
        try:
            await self._flow(conn)
        finally:
            await conn.close()

    async def _flow(self, conn: Connection) -> None:
        i = self.customer()
        ip = client_address(self._next_ip)
        self._next_ip += 1
        b = Browser(conn, self.origin, ip)
        who, address = username(i), email(i)
        rec, tm = self.rec, time.monotonic
        code_timeout = float(self.cfg["code_timeout"])
        t_flow = t = tm()
        token = _csrf("get_login", await b.get("/login"))
        rec.step("get_login", t, t2 := tm())
        waiter = self.capture.expect(address)
        try:
            t = t2
            r = await b.post("/login", {"csrf_token": token, "login": who, "password": PASSWORD})
            _see_other("post_login", r, "/verify")
            rec.step("post_login", t, t2 := tm())
            t = t2
            try:
                code, arrived = await asyncio.wait_for(waiter, code_timeout)
            except TimeoutError:
                raise FlowError("code_wait", f"no code within {code_timeout:.0f} s") from None
            t2 = max(arrived, t)  # the mail may land before the 303 does
            rec.step("code_wait", t, t2)
            waited = t2 - t
        finally:
            self.capture.forget(address)
        t = tm()
        token = _csrf("get_verify", await b.get("/verify"))
        rec.step("get_verify", t, t2 := tm())
        t = t2
        r = await b.post("/verify", {"csrf_token": token, "code": code})
        _see_other("post_verify", r, "/dashboard")
        rec.step("post_verify", t, t2 := tm())
        t = t2
        token = _csrf("get_dashboard", await b.get("/dashboard"))
        rec.step("get_dashboard", t, t2 := tm())
        t = t2
        r = await b.post("/logout", {"csrf_token": token})
        _see_other("post_logout", r, "/login")
        rec.step("post_logout", t, t2 := tm())
        rec.flows_total += 1
        if rec.inside(t2):
            rec.flows_in_window += 1
            rec.flows.append((t2 - t_flow) * 1000)
            rec.rest.append((t2 - t_flow - waited) * 1000)

    async def client_loop(self) -> None:
        while not self.stop:
            try:
                await self.flow()
            except NoCustomers:
                self.samples["customers_exhausted"] = True
                return
            except FlowError as exc:
                self.rec.error(f"{exc.step}: {exc.what.split(' location')[0]}", str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection errors, timeouts
                self.rec.error(f"exception: {type(exc).__name__}", f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.05)

    def snapshot(self) -> dict[str, Any]:
        pids = self.cfg["app_pids"]
        extra = self.cfg.get("extra_pids", {})
        return {
            "t": time.monotonic(),
            "app": {str(p): cpu_ticks(p) for p in pids},
            "app_sys": sum(sys_ticks(p) or 0 for p in pids),
            "hash_threads": {str(p): hash_thread_ticks(p) for p in pids},
            "extra": {k: cpu_ticks(p) for k, p in extra.items()},
            "self": sum(os.times()[:2]),
            "machine": machine_busy_ticks(),
            "steal": machine_steal_ticks(),
        }

    async def sampler(self) -> None:
        """Threads and RSS of the app processes, twice a second."""
        while True:
            for p in self.cfg["app_pids"]:
                th, rss = status_field(p, "Threads"), status_field(p, "VmRSS")
                k = str(p)
                if th is not None:
                    self.samples["threads_max"][k] = max(self.samples["threads_max"].get(k, 0), th)
                if rss is not None:
                    self.samples["rss_max_kb"][k] = max(self.samples["rss_max_kb"].get(k, 0), rss)
            await asyncio.sleep(0.5)

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        C = int(cfg["concurrency"])
        server = await serve(self.capture, int(cfg["smtp_port"]))
        sampler = asyncio.create_task(self.sampler())
        start = time.monotonic()
        w0 = start + float(cfg["warmup"])
        w1 = w0 + float(cfg["duration"])
        self.rec.window = (w0, w1)
        tasks = [asyncio.create_task(self.client_loop()) for _ in range(C)]
        await asyncio.sleep(max(0.0, w0 - time.monotonic()))
        before = self.snapshot()
        wall0 = time.time()
        await asyncio.sleep(max(0.0, w1 - time.monotonic()))
        after = self.snapshot()
        wall1 = time.time()
        self.stop = True
        _, pending = await asyncio.wait(tasks, timeout=float(cfg["drain_timeout"]))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        drained_at = time.monotonic()
        sampler.cancel()
        server.close()
        await server.wait_closed()
        out = self.result(before, after, len(pending), drained_at - start)
        out["wall_start_utc"], out["wall_end_utc"] = wall0, wall1
        return out

    def result(self, before: dict[str, Any], after: dict[str, Any], cancelled: int, wall: float) -> dict[str, Any]:
        rec = self.rec
        window = after["t"] - before["t"]
        flows = rec.flows_in_window
        app_ticks = {p: (after["app"][p] - before["app"][p]) if None not in (after["app"][p], before["app"][p]) else None
                     for p in before["app"]}
        total_ticks = sum(v for v in app_ticks.values() if v is not None)
        app_cpu_ms = total_ticks * 1000 / CLK_TCK
        extra = {k: (after["extra"][k] - before["extra"][k]) * 1000 / CLK_TCK
                 for k in before["extra"] if after["extra"][k] is not None and before["extra"][k] is not None}
        gen_cpu_ms = (after["self"] - before["self"]) * 1000
        # The hashing threads' own CPU in the window (a thread that ended inside it loses its
        # ticks here, which only makes "outside Argon2" larger).
        hash_ticks = sum(ticks - before["hash_threads"].get(p, {}).get(tid, 0)
                         for p, threads in after["hash_threads"].items() for tid, ticks in threads.items())
        hash_cpu_ms = hash_ticks * 1000 / CLK_TCK
        machine_ms = (after["machine"] - before["machine"]) * 1000 / CLK_TCK
        others_ms = machine_ms - app_cpu_ms - gen_cpu_ms - sum(extra.values())

        def per_flow(v: float) -> float | None:
            return v / flows if flows else None

        return {
            "label": self.cfg.get("label"),
            "concurrency": int(self.cfg["concurrency"]),
            "mail_delay_s": float(self.cfg["mail_delay"]),
            "window_s": window,
            "wall_s": wall,
            "flows": flows,
            "flows_total": rec.flows_total,
            "flows_per_s": flows / window if window > 0 else None,
            "errors": rec.errors_total,
            "errors_by_kind": rec.errors,
            "error_samples": rec.error_samples,
            "cancelled_at_drain": cancelled,
            "customers_used": self._next_customer,
            "customers_exhausted": bool(self.samples.get("customers_exhausted")),
            "steps_ms": {s: summary(rec.steps[s]) for s in STEPS},
            "flow_ms": summary(rec.flows),
            "rest_of_flow_ms": summary(rec.rest),
            "app_cpu_ms": app_cpu_ms,
            "app_cpu_ms_by_pid": {p: (v * 1000 / CLK_TCK if v is not None else None) for p, v in app_ticks.items()},
            "app_cpu_ms_per_flow": per_flow(app_cpu_ms),
            "hash_threads_cpu_ms_per_flow": per_flow(hash_cpu_ms),
            "app_kernel_share": ((after["app_sys"] - before["app_sys"]) / total_ticks) if total_ticks else None,
            "app_cpu_cores": app_cpu_ms / 1000 / window if window > 0 else None,
            "db_cpu_ms_per_flow": per_flow(extra["mysqld"]) if "mysqld" in extra else None,
            "redis_cpu_ms_per_flow": per_flow(extra["redis"]) if "redis" in extra else None,
            "generator_cpu_ms_per_flow": per_flow(gen_cpu_ms),
            "generator_cpu_cores": gen_cpu_ms / 1000 / window if window > 0 else None,
            "machine_busy_cores": machine_ms / 1000 / window if window > 0 else None,
            "other_processes_cores": others_ms / 1000 / window if window > 0 else None,
            "vm_steal_ms": (after["steal"] - before["steal"]) * 1000 / CLK_TCK,
            "worker_threads_max": self.samples["threads_max"],
            "worker_rss_max_kb": self.samples["rss_max_kb"],
            "worker_vmhwm_kb": {str(p): status_field(p, "VmHWM") for p in self.cfg["app_pids"]},
            "capture": self.capture.stats(),
        }


async def amain(cfg: dict[str, Any]) -> dict[str, Any]:
    host = urlsplit(cfg["base_url"]).hostname
    if host != "127.0.0.1":
        raise SystemExit("the load generator only talks to 127.0.0.1")
    return await Generator(cfg).run()


def main(argv: list[str], run: Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]] | None = None) -> int:
    """Read the config (argv[0]), run the generator (`amain`, or `run`) on uvloop when it is
    installed, write the result (argv[1])."""
    with open(argv[0]) as f:
        cfg = json.load(f)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run((run or amain)(cfg))
    with open(argv[1], "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""python -m bench [--quick] [options]: the sign-in benchmark (see bench/README.md)."""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.security.passwords import hash_slots
from bench import dbtools, hashbound, report
from bench.common import REPO, RESULTS, TMP, free_port, pid_of_command, set_tag, status_field
from bench.server import Uvicorn, app_env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="Sign-in flow benchmark of the app")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: few customers, C=1,2, short runs, no scale step, no plot (< 60 s)")
    p.add_argument("--concurrency", default=None, help="comma-separated closed-loop concurrencies (default 1,8,32)")
    p.add_argument("--warmup", type=float, default=None, help="seconds before each measurement window (default 3)")
    p.add_argument("--duration", type=float, default=None, help="seconds of each measurement window (default 20)")
    p.add_argument("--mail-delay", type=float, default=None,
                   help="seconds the capture holds every mail in the second pass (default 2; --quick 1)")
    p.add_argument("--no-slow-mail", action="store_true", help="skip the held-mail pass")
    p.add_argument("--customers", type=int, default=None, help="customers to seed (default: enough for the runs)")
    p.add_argument("--hash-seconds", type=float, default=None, help="length of the Argon2 bound step (default 5)")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers (default 2)")
    p.add_argument("--smtp-pool-size", type=int, default=None,
                   help="SMTP_POOL_SIZE for each worker (default: the app's, 8 kept and up to SMTP_POOL_MAX=32 "
                        "while mail waits)")
    p.add_argument("--db-pool-size", type=int, default=None, help="DB_POOL_SIZE for the app (default: app's)")
    p.add_argument("--rate-limit", default=None, help="RATE_LIMIT for the app (default: app's, 20/minute)")
    p.add_argument("--no-scale", action="store_true", help="skip the 1 M customers / 5 M codes step")
    p.add_argument("--scale-customers", type=int, default=1_000_000)
    p.add_argument("--scale-codes", type=int, default=5_000_000)
    p.add_argument("--scale-no-mail-rows", action="store_true",
                   help="do not load a sent mail_outbox row per code row (loaded by default)")
    p.add_argument("--scale-concurrency", type=int, default=2, help="C of the code-step comparison (default 2)")
    p.add_argument("--scale-duration", type=float, default=None, help="window of each scale run (default: --duration)")
    p.add_argument("--console", action="store_true",
                   help="add the console step: 1 M customers, 5 M auth events and 90 days of steps, rolled up; "
                        "each staff console page timed (bench/console.py)")
    p.add_argument("--console-customers", type=int, default=1_000_000)
    p.add_argument("--console-events", type=int, default=5_000_000)
    p.add_argument("--console-steps", type=int, default=900_000, help="sign-in steps over 90 days (default 900 k)")
    p.add_argument("--console-requests", type=int, default=40, help="timed requests per console page (default 40)")
    p.add_argument("--profile", action="store_true",
                   help="add a run at the highest C with py-spy recording each worker (needs py-spy)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-loop-monitor", action="store_true",
                   help="run the app without LOOP_MONITOR (no stall numbers; shows what the monitor costs)")
    p.add_argument("--mysql-host", default="127.0.0.1")
    p.add_argument("--mysql-port", type=int, default=3306)
    p.add_argument("--mysql-user", default="root")
    p.add_argument("--mysql-password", default="")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    p.add_argument("--allow-errors", action="store_true",
                   help="exit 0 even if some flows failed (still 1 if a run completed no flow at all)")
    p.add_argument("--keep-db", action="store_true", help="do not drop the bench database at the end")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default bench/results; --quick: bench/results/tmp/quick)")
    p.add_argument("--through-nginx", action="store_true",
                   help="instead of the runs above: deploy/stack's 2 instances hit directly vs through its nginx "
                        "(TLS), flows/s and their ratio (bench/nginx.py; default C=32)")
    p.add_argument("--soak", action="store_true",
                   help="instead of the runs above: --clients sign-ins at once through deploy/stack's nginx for "
                        "--minutes; errors, every worker's RSS, every table's rows (bench/soak.py)")
    p.add_argument("--minutes", type=float, default=10.0, help="--soak: how long (default 10)")
    p.add_argument("--clients", type=int, default=64, help="--soak: concurrent clients (default 64)")
    p.add_argument("--accounts", type=int, default=None,
                   help="--soak: customers signed in round and round (default: enough that none comes back within "
                        "100 s at 60 flows/s)")
    p.add_argument("--set", dest="stack_set", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                   metavar="NAME=VALUE", help="--through-nginx/--soak: an app setting for deploy/stack start")
    a = p.parse_args(argv)
    q = a.quick
    a.concurrency_given = a.concurrency is not None
    a.concurrency = [int(x) for x in (a.concurrency or ("1,2" if q else "1,8,32")).split(",")]
    a.warmup = a.warmup if a.warmup is not None else (1.0 if q else 3.0)
    a.duration = a.duration if a.duration is not None else (3.0 if q else 20.0)
    a.mail_delay = a.mail_delay if a.mail_delay is not None else (1.0 if q else 2.0)
    a.hash_seconds = a.hash_seconds if a.hash_seconds is not None else (1.0 if q else 5.0)
    a.scale_duration = a.scale_duration if a.scale_duration is not None else a.duration
    if q:
        a.no_scale, a.no_plot = True, True
    a.out = a.out or (TMP / "quick" if q else RESULTS)
    return a


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.conn = {"host": args.mysql_host, "port": args.mysql_port, "user": args.mysql_user,
                     "password": args.mysql_password}
        self.db = f"bench_{datetime.now(UTC):%Y%m%d_%H%M%S}_{os.getpid()}"
        self.db_created = False
        self.secret = secrets.token_urlsafe(48)
        set_tag(secrets.token_hex(3))  # this run's usernames: see bench.common.set_tag
        self.port, self.smtp_port = free_port(), free_port()
        self.server: Uvicorn | None = None
        self.next_customer = 1
        self.next_ip = secrets.randbelow(1 << 16)
        self.seeded = 0
        self.tmp = TMP / self.db
        self.results: dict[str, Any] = {"runs": []}

    @property
    def database_url(self) -> str:
        pw = self.conn["password"]
        return f"mysql+aiomysql://{self.conn['user']}:{pw}@{self.conn['host']}:{self.conn['port']}/{self.db}"

    def settings_env(self) -> dict[str, str]:
        a = self.args
        s = {
            "APP_ENV": "production", "DATABASE_URL": self.database_url, "SECRET_KEY": self.secret,
            "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.smtp_port), "SMTP_SECURITY": "none",
            "RATE_LIMIT_STORAGE": a.redis_url, "TRUSTED_PROXIES": "127.0.0.1",
            # The load generator stands in for the TLS proxy: X-Forwarded-Proto https from 127.0.0.1.
            "PUBLIC_ORIGIN": "https://shop.bench",
            "LOOP_MONITOR": "0" if a.no_loop_monitor else "1",
            # As the README tells an operator who starts uvicorn with --workers N.
            "HASH_CONCURRENCY": str(hash_slots(workers=a.workers)),
        }
        if a.smtp_pool_size:
            s["SMTP_POOL_SIZE"] = str(a.smtp_pool_size)
        if a.db_pool_size:
            s["DB_POOL_SIZE"] = str(a.db_pool_size)
        if a.rate_limit:
            s["RATE_LIMIT"] = a.rate_limit
        return s

    # --- steps -------------------------------------------------------------------------

    def customers_needed(self, bound: float) -> int:
        a = self.args
        passes = 1 if a.no_slow_mail else 2
        per_run = a.warmup + a.duration + 5
        seconds = passes * len(a.concurrency) * per_run + (a.warmup + a.duration + 5 if a.profile else 0)
        seconds += a.warmup + 3 + 5  # the warm-up pass
        if not a.no_scale:
            seconds += a.warmup + a.scale_duration + 5 + 2 * (a.warmup + 3 + 5)
        return max(100, int(math.ceil(bound * 1.3 * seconds)) + 50)

    def load_run(self, label: str, concurrency: int, delay: float, *, customers: dict[str, int] | None = None,
                 duration: float | None = None) -> dict[str, Any]:
        a = self.args
        assert self.server is not None
        duration = a.duration if duration is None else duration
        if customers is None:
            left = self.seeded - self.next_customer + 1
            customers = {"start": self.next_customer, "step": 1, "count": left}
        code_timeout = max(20.0, 6 * delay + 10)
        cfg = {
            "label": label, "base_url": f"http://127.0.0.1:{self.port}", "smtp_port": self.smtp_port,
            "mail_delay": delay, "concurrency": concurrency, "warmup": a.warmup, "duration": duration,
            "drain_timeout": code_timeout + 10, "code_timeout": code_timeout, "customers": customers,
            "ip_offset": self.next_ip, "app_pids": self.server.pids,
            "extra_pids": {k: v for k, v in (("mysqld", dbtools.mysqld_pid()), ("redis", pid_of_command("redis-server")))
                           if v},
        }
        cfg_path, out_path = self.tmp / f"run-{label}.json", self.tmp / f"result-{label}.json"
        cfg_path.write_text(json.dumps(cfg))
        limit = a.warmup + duration + cfg["drain_timeout"] + 60
        locks0 = self.lock_counters()
        subprocess.run([sys.executable, "-m", "bench.loadgen", str(cfg_path), str(out_path)], cwd=REPO,
                       check=True, timeout=limit)
        result = json.loads(out_path.read_text())
        locks1 = self.lock_counters()
        # Server-wide counters (every database on this server), over the whole run.
        result["innodb"] = {k: locks1[k] - locks0[k] for k in locks0 if k in locks1}
        if customers.get("step", 1) == 1:
            self.next_customer += result["customers_used"]
        self.next_ip += result["customers_used"] + 1
        st = result["steps_ms"]
        log(f"  {label}: {result['flows_per_s'] or 0:.1f} flows/s, errors {result['errors']}, "
            f"app CPU {result['app_cpu_ms_per_flow'] or 0:.1f} ms/flow, p99 POST /login "
            f"{st['post_login']['p99'] or 0:.0f} ms, POST /verify {st['post_verify']['p99'] or 0:.0f} ms, "
            f"code wait p99 {st['code_wait']['p99'] or 0:.0f} ms")
        return result

    def lock_counters(self) -> dict[str, int]:
        try:
            with dbtools.connect(**self.conn) as c, c.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN ('Innodb_deadlocks', 'Innodb_row_lock_waits', "
                            "'Innodb_row_lock_time', 'Innodb_row_lock_current_waits')")
                return {name.lower(): int(v) for name, v in cur.fetchall()}
        except Exception:
            return {}

    def run(self) -> dict[str, Any]:
        a, R = self.args, self.results
        t_all = time.monotonic()
        self.tmp.mkdir(parents=True, exist_ok=True)
        R["meta"] = {
            "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "git": _git_rev(), "app_uncommitted": _dirty_app_files(), "cpus": os.cpu_count(), "quick": a.quick,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "database": self.db, "workers": a.workers,
            "app_settings": {k: v for k, v in self.settings_env().items() if k not in ("SECRET_KEY",)},
        }
        log(f"hashing bound: {os.cpu_count()} processes x {a.hash_seconds:.0f} s of Argon2id verify (idle machine)")
        R["hash_bound"] = hashbound.measure(a.hash_seconds)
        hb = R["hash_bound"]
        log(f"  bound {hb['cpu_bound_per_s']:.1f} verifications/s ({hb['cpu_ms_per_verify']:.2f} CPU ms each); "
            f"measured {hb['verifies_per_s']:.1f}/s with other processes using {hb['other_processes_cores']:.2f} cores")

        dbtools.create_database(self.conn, self.db)
        self.db_created = True
        env = app_env(self.settings_env())
        R["setup"] = {"migrate_s": dbtools.migrate(env)}
        stored = dbtools.password_hash()
        self.seeded = a.customers or self.customers_needed(max(hb["verifies_per_s"], hb["cpu_bound_per_s"]))
        R["setup"]["customers_seeded"] = self.seeded
        R["setup"]["seed_s"] = dbtools.seed_customers(self.conn, self.db, 1, self.seeded, stored)
        log(f"database {self.db}: migrated in {R['setup']['migrate_s']:.1f} s, "
            f"{self.seeded} customers seeded in {R['setup']['seed_s']:.1f} s")

        self.server = Uvicorn(env, self.port, a.workers, self.tmp)
        R["setup"]["uvicorn_start_s"] = self.server.start()
        log(f"uvicorn on 127.0.0.1:{self.port}, master {self.server.master_pid}, workers {self.server.worker_pids}")

        # Warm both workers (templates compiled, pools filled) before anything is measured.
        log("warm-up pass (not measured)")
        R["warmup_run"] = self.load_run("warmup", 4, 0.0, duration=1.0 if a.quick else 3.0)

        delays = [0.0] if a.no_slow_mail else [0.0, a.mail_delay]
        for delay in delays:
            for c in a.concurrency:
                label = f"C{c}-mail{delay:g}s"
                log(f"run {label}")
                R["runs"].append(self.load_run(label, c, delay))

        if a.profile:
            R["profile"] = self.profile_run(max(a.concurrency))

        if not a.no_scale:
            R["scale"] = {}
            try:
                self.scale_step(stored, R["scale"])
            except Exception as exc:  # keep the main runs' results
                log(f"scale step failed: {type(exc).__name__}: {exc}")
                R["scale"]["error"] = f"{type(exc).__name__}: {exc}"

        # One more loop-monitor period so the last run's stalls are written.
        time.sleep(1.5)
        self.keep_server_logs()
        self.server.stop()
        if R.get("scale") and R["scale"].get("load"):
            log("EXPLAIN of the sign-in path against the loaded database")
            from bench.explain import explain_all

            quiet_app_logging()
            try:
                R["scale"]["explain"] = explain_all(self.conn, self.db, self.database_url, self.secret,
                                                    customer=self.args.scale_customers - 3)
            except Exception as exc:  # keep everything measured so far
                log(f"EXPLAIN step failed: {type(exc).__name__}: {exc}")
                R["scale"]["explain_error"] = f"{type(exc).__name__}: {exc}"
        if a.console:
            from bench import console

            R["console"] = {}
            try:
                console.run_step(self, stored, R["console"], log=log)
            except Exception as exc:  # keep everything measured so far
                log(f"console step failed: {type(exc).__name__}: {exc}")
                R["console"]["error"] = f"{type(exc).__name__}: {exc}"
        R["meta"]["total_s"] = time.monotonic() - t_all
        return R

    def keep_server_logs(self) -> None:
        """Before the server is stopped (each start writes new logs): its loop-monitor lines
        (stalls, GC pauses), errors and the workers' peak RSS."""
        assert self.server is not None
        R = self.results
        R.setdefault("stalls", []).extend(self.server.stalls())
        R.setdefault("gc_pauses", []).extend(self.server.gc_pauses())
        R.setdefault("steal", []).extend(self.server.steal())
        R.setdefault("server_errors", []).extend(self.server.errors())
        R.setdefault("worker_vmhwm_kb_final", {}).update(
            {str(p): status_field(p, "VmHWM") for p in self.server.worker_pids})

    def scale_step(self, stored: str, out: dict[str, Any]) -> None:
        """Empty-ish database vs 1 M customers / 5 M codes, same load. The server is stopped for
        the bulk load (its periodic cleanup, 300 s after start, would otherwise scan the table
        being loaded) and started afresh and warmed up before the loaded run."""
        a = self.args
        assert self.server is not None
        out.update({"customers": a.scale_customers, "codes": a.scale_codes, "concurrency": a.scale_concurrency})
        self.keep_server_logs()
        self.server.stop()
        self.restart("scale-empty", out)
        log(f"scale: code step at C={a.scale_concurrency} on the small database")
        out["empty_db"] = dbtools.table_sizes(self.conn, self.db)
        out["empty"] = self.load_run(f"scale-empty-C{a.scale_concurrency}", a.scale_concurrency, 0.0,
                                     duration=a.scale_duration)
        self.keep_server_logs()
        self.server.stop()
        log(f"scale: loading to {a.scale_customers} customers and +{a.scale_codes} code rows (LOAD DATA LOCAL INFILE)")
        t = time.monotonic()
        first_new = self.seeded + 1
        out["load"] = dbtools.load_scale(self.conn, self.db, customers_total=a.scale_customers, first_new=first_new,
                                         codes=a.scale_codes, stored_hash=stored, tmp=self.tmp,
                                         mail=not a.scale_no_mail_rows, log=log)
        out["load"]["total_s"] = time.monotonic() - t
        out["loaded_db"] = dbtools.table_sizes(self.conn, self.db)
        log(f"  loaded in {out['load']['total_s']:.0f} s: {out['loaded_db']}")
        self.restart("scale-loaded", out)
        # Fresh customers spread over the whole loaded range (cold pages, as in production).
        span = a.scale_customers - first_new - 10
        count = max(100, int(self.results["hash_bound"]["cpu_bound_per_s"] * (a.warmup + a.scale_duration + 5) * 1.3))
        step = max(1, span // count)
        customers = {"start": first_new + 3, "step": step, "count": min(count, span // step)}
        out["loaded"] = self.load_run(f"scale-loaded-C{a.scale_concurrency}", a.scale_concurrency, 0.0,
                                      customers=customers, duration=a.scale_duration)

    def restart(self, tag: str, out: dict[str, Any]) -> None:
        """A fresh server (so both scale runs start alike), warmed up before it is measured."""
        self.server = Uvicorn(app_env(self.settings_env()), self.port, self.args.workers, self.tmp, tag=tag)
        self.server.start()
        log(f"uvicorn restarted ({tag}): master {self.server.master_pid}, workers {self.server.worker_pids}; "
            "warm-up pass")
        out[f"warmup_{tag}"] = self.load_run(f"{tag}-warmup", 4, 0.0, duration=3.0)

    def profile_run(self, concurrency: int) -> dict[str, Any]:
        """The same load with py-spy sampling each worker (its overhead makes this run's numbers
        unfit for the table; it only says where the CPU goes)."""
        from bench import profile

        assert self.server is not None
        log(f"profile: C={concurrency} with py-spy on workers {self.server.worker_pids}")
        return profile.record_during(self, concurrency)

    def cleanup(self) -> None:
        if self.server is not None:
            try:
                self.server.stop()
            except Exception as exc:
                log(f"stopping uvicorn: {exc}")
        if self.db_created and not self.args.keep_db:
            try:
                dbtools.drop_database(self.conn, self.db)
                log(f"dropped database {self.db}")
            except Exception as exc:
                log(f"could not drop {self.db}: {exc}")


def quiet_app_logging() -> None:
    """In-process app (EXPLAIN step): keep its INFO lines out of the bench's output."""
    import logging

    h = logging.NullHandler()
    h._computer_shop = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(h)


def _git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip() + (
            "+dirty" if subprocess.run(["git", "status", "--porcelain", "app", "templates", "migrations"], cwd=REPO,
                                       capture_output=True, text=True).stdout.strip() else "")
    except Exception:
        return None


def _dirty_app_files() -> list[str]:
    """Uncommitted changes to what is measured (the app is worked on while benches run)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "app", "templates", "migrations"], cwd=REPO,
                             capture_output=True, text=True).stdout
    except Exception:
        return []
    return [line[3:] for line in out.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """0: every run completed sign-ins without a failed flow; 1: a run failed flows (or
    completed none); 2: the bench itself could not run (setup, database, server)."""
    args = parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    if args.through_nginx or args.soak:  # the deploy/stack modes (bench/nginx.py, bench/soak.py)
        from bench import nginx, soak

        return nginx.main(args) if args.through_nginx else soak.main(args)
    bench = Bench(args)
    failed = False
    try:
        results = bench.run()
    except Exception as exc:
        log(f"bench could not run: {type(exc).__name__}: {exc}")
        import traceback

        traceback.print_exc()
        results, failed = bench.results, True
        results.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
    finally:
        bench.cleanup()
    if failed and not (results.get("runs") and "hash_bound" in results):
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    written = report.write(results, args.out, make_plot=not args.no_plot)
    for path in written:
        log(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    print(report.verdict_line(results), flush=True)
    if failed:
        return 2
    if not all(r["flows"] > 0 for r in results["runs"]):
        return 1
    if any(r["errors"] for r in results["runs"]) and not args.allow_errors:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

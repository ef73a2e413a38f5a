"""`python -m bench --soak [--minutes 10] [--clients 64]`: a long run through deploy/stack's nginx
(see bench/README.md, "Soak").

The stack as bench/nginx.py starts it (2 instances x 2 workers, nginx with TLS, SMTP_PORT pointed
at the load generator's capture). `--accounts` customers (default 6000) are seeded as the bench
seeds them, and signed in round and round by --clients closed-loop clients, each flow the bench's
complete sign-in (password, emailed code, dashboard, sign-out) over HTTPS through nginx from an
address of its own. With 6000 accounts an account comes back after 6000 / (flows/s) seconds
(about 150 s at 40/s), past the app's 60 s resend cooldown and within its 10 sign-ins per account
per 15 minutes as long as the rate stays under 60/s; the shortest reuse gap is reported. No app
setting is changed for this.

While it runs, every ~10 s: the RSS (VmRSS) of every uvicorn worker of both instances (found as
the members of each instance's process group, less the master), of the masters, nginx and the
stack's Redis; every minute, and at minute 2: the row count of every table of the stack's
database. At the end: the counts again, the load generator's failed flows by kind, nginx's
access log by status (every request of a flow answers 200 or 303; anything else is counted), and
the app instances' ERROR lines.

Judged: 0 failed flows and 0 unexpected statuses; every worker's RSS at the end within 10 % of
its minute-2 sample; no table grew from minute 2 to the end except those meant to (MEANT_TO_GROW,
with the reason) or bounded by the accounts used (BOUNDED).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import REPO, status_field
from bench.nginx import Stack, _f, _git_rev, log, run_and_report, run_generator

RSS_TOLERANCE = 0.10
SAMPLE_S = 10.0
EXPECTED_STATUS = {"200", "303"}
MEANT_TO_GROW = {
    "auth_events": "the audit trail: rows for each password check, code sent, code verified and sign-out; "
                   "append-only by design (the console's audit view and the funnel's roll-up read it)",
    "auth_sessions": "one row per sign-in; sign-out revokes it (revoked_at); the clean-up deletes sessions last "
                     "seen 30 days ago (app/otp/cleanup.py HISTORY_KEPT): grows for the first 30 days, then flat",
    "customer_otp_verification": "one step per sign-in, kept until an hour (app/otp/cleanup.py GRACE) after it "
                                 "expires (OTP_LOGIN_TTL 600 s), then rolled up and deleted: grows for the first "
                                 "~70 minutes of steady traffic, then flat",
    "otp_codes": "one code per step, deleted with its step (as above)",
    "mail_outbox": "one row per code mail; its sealed payload is wiped, the row (who, when, delivered) is kept "
                   "30 days (HISTORY_KEPT), then deleted by the clean-up: grows for 30 days, then flat",
}
# One row per key the app has seen, forgotten after a day idle: at most this many per account used.
BOUNDED = {
    "mail_throttle": 2,
    "otp_ledgers": 2,
    "otp_stats": None,  # one row per day x purpose x outcome
    "auth_daily": None,  # one row per day x purpose x domain x ... (the funnel's roll-up)
}
ACCESS_RE = re.compile(r'\[(\S+)\] "(\S+) (\S+) [^"]*" (\d{3}) ')


def rss_kb(pid: int) -> int | None:
    return status_field(pid, "VmRSS")


def run(args: Any) -> dict[str, Any]:
    duration = args.minutes * 60
    warmup = 5.0
    ref_s = min(120.0, duration / 5)  # "minute 2" (a fifth of a short smoke run)
    accounts = args.accounts or 6000
    every = min(SAMPLE_S, max(1.0, duration / 10))
    R: dict[str, Any] = {
        "kind": "soak",
        "meta": {"started_utc": datetime.now(UTC).isoformat(timespec="seconds"), "git": _git_rev(),
                 "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "instances": 2, "workers": args.workers,
                 "clients": args.clients, "minutes": args.minutes, "warmup_s": warmup, "reference_s": ref_s,
                 "accounts": accounts, "sample_every_s": every},
    }
    stack = Stack(args.workers, extra=dict(args.stack_set))
    tmp = REPO / "bench" / "results" / "tmp" / f"soak-{stack.tag}"
    try:
        log(f"deploy/stack start: 2 instances x {args.workers} workers behind nginx (run dir {stack.run_dir})")
        R["meta"]["stack_start_s"] = stack.start()
        R["meta"]["app_settings_added"] = stack.extra
        R["setup"] = stack.seed(accounts)
        workers = stack.app_workers()
        masters = list(workers)
        nginx_pids = stack.nginx_pids()
        redis_pid = stack.pid_of("redis")
        log(f"{accounts} accounts seeded; workers {workers}, nginx {nginx_pids}")
        R["tables_start"] = stack.table_counts()
        proc, out_path = run_generator(
            stack, tmp, "soak", mode="nginx", concurrency=args.clients, warmup=warmup, duration=duration,
            customers={"start": 1, "step": 1, "count": accounts, "cycle": True}, ip_offset=0, popen=True)
        t0 = time.monotonic()
        samples: list[dict[str, Any]] = []
        tables: list[dict[str, Any]] = []
        next_sample, next_count, ref_counted = 0.0, 60.0, False
        end_at = warmup + duration
        while proc.poll() is None:
            t = time.monotonic() - t0
            if t >= next_sample and t <= end_at:
                samples.append({
                    "t": round(t, 1), "loadavg": os.getloadavg(),
                    "workers": {str(w): rss_kb(w) for ws in workers.values() for w in ws},
                    "masters": {str(m): rss_kb(m) for m in masters},
                    "nginx": {str(p): rss_kb(p) for p in nginx_pids}, "redis": rss_kb(redis_pid),
                })
                next_sample += every
            if not ref_counted and t >= warmup + ref_s:
                tables.append({"t": round(t, 1), "at": "reference", "rows": stack.table_counts()})
                ref_counted = True
                log(f"  t={t:.0f} s (reference): rows {tables[-1]['rows']}")
            if t >= next_count and t <= end_at:
                tables.append({"t": round(t, 1), "at": "minute", "rows": stack.table_counts()})
                next_count += 60
                w = samples[-1]["workers"]
                log(f"  t={t:.0f} s: worker RSS MB {[round((v or 0) / 1024, 1) for v in w.values()]}, "
                    f"load {os.getloadavg()[0]:.2f}")
            time.sleep(0.5)
        if proc.returncode != 0:
            raise RuntimeError(f"the load generator exited {proc.returncode}")
        tables.append({"t": round(time.monotonic() - t0, 1), "at": "end", "rows": stack.table_counts()})
        gen = json.loads(out_path.read_text())
        R["generator"] = gen
        R["rss_samples"], R["tables"] = samples, tables
        R["workers_now"] = {str(m): stack.app_workers()[m] for m in masters}  # the same PIDs: none restarted
        R["access_log"] = access_statuses(Path(stack.state["access_log"]))
        R["app_log_errors"] = app_errors(stack)
        R["judgement"] = judge(R, workers, ref_s + warmup)
    finally:
        R["meta"]["loadavg_end"] = os.getloadavg()
        stack.stop(keep=args.keep_db)
    return R


def access_statuses(path: Path) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"error": f"no access log at {path}"}
    for line in lines:
        m = ACCESS_RE.search(line)
        if not m:
            continue
        _, method, target, status = m.groups()
        if target.startswith("/healthz"):
            continue  # deploy/stack's own readiness checks
        statuses[status] += 1
        if status not in EXPECTED_STATUS:
            unexpected[f"{status} {method} {target}"] += 1
    return {"requests": sum(statuses.values()), "by_status": dict(statuses), "unexpected": dict(unexpected)}


def app_errors(stack: Stack) -> list[str]:
    out = []
    for n in range(1, stack.instances + 1):
        try:
            text = (stack.run_dir / "logs" / f"app-{n}.log").read_text(errors="replace")
        except OSError:
            continue
        out += [f"app-{n}: {ln}" for ln in text.splitlines() if " ERROR " in ln or "Traceback" in ln]
    return out[:50]


def judge(R: dict[str, Any], workers: dict[int, list[int]], ref_t: float) -> dict[str, Any]:
    gen, samples = R["generator"], R["rss_samples"]
    ref = min(samples, key=lambda s: abs(s["t"] - ref_t))
    last = samples[-1]
    rss = {}
    for ws in workers.values():
        for w in ws:
            a, b = ref["workers"].get(str(w)), last["workers"].get(str(w))
            change = (b - a) / a if a and b else None
            rss[str(w)] = {"ref_t": ref["t"], "ref_kb": a, "end_t": last["t"], "end_kb": b, "change": change,
                           "holds": change is not None and abs(change) <= RSS_TOLERANCE}
    at_ref = next(t for t in R["tables"] if t["at"] == "reference")["rows"]
    at_end = R["tables"][-1]["rows"]
    accounts = R["meta"]["accounts"]
    growth = {}
    for name in sorted(set(at_ref) | set(at_end)):
        a, b = at_ref.get(name, 0), at_end.get(name, 0)
        if name in MEANT_TO_GROW:
            verdict, why = True, MEANT_TO_GROW[name]
        elif name in BOUNDED:
            k = BOUNDED[name]
            verdict = b <= a or (k is not None and b <= k * accounts) or (k is None and b <= 1000)
            why = (f"one row per key seen, forgotten after a day idle: bounded by {k} x {accounts} accounts"
                   if k else "one row per day and category: bounded by the calendar")
        else:
            verdict, why = b <= a, "must not grow"
        growth[name] = {"reference": a, "end": b, "grew": b - a, "holds": verdict, "why": why}
    acc = R["access_log"]
    errors = gen["errors"]
    unexpected = sum((acc.get("unexpected") or {}).values())
    return {
        "errors": {"failed_flows": errors, "by_kind": gen["errors_by_kind"], "unexpected_statuses": unexpected,
                   "holds": errors == 0 and unexpected == 0 and "error" not in acc},
        "rss": {"workers": rss, "holds": bool(rss) and all(v["holds"] for v in rss.values())},
        "tables": {"tables": growth, "holds": all(v["holds"] for v in growth.values())},
        "restarts": {"holds": all(sorted(R["workers_now"][str(m)]) == sorted(ws) for m, ws in workers.items())},
    }


def markdown(R: dict[str, Any]) -> str:
    m, g, j = R["meta"], R["generator"], R["judgement"]
    L = [f"# Soak — {m['started_utc']} (git {m['git']})", "",
         f"{m['clients']} clients, {m['minutes']:g} min through nginx (TLS) to {m['instances']} instances x "
         f"{m['workers']} workers; {m['accounts']} accounts round and round (shortest reuse of one "
         f"{_f(g.get('min_account_reuse_s'), 0)} s); {m['cpus']} cores; load average at start "
         f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end {', '.join(f'{x:.2f}' for x in m['loadavg_end'])}.",
         "",
         f"**{g['flows_total']} complete sign-ins**, {_f(g['flows_per_s'])} flows/s over the window; flow p50 / p99 "
         f"{_f(g['flow_ms']['p50'], 0)} / {_f(g['flow_ms']['p99'], 0)} ms; app CPU {_f(g['app_cpu_ms_per_flow'])} ms/flow, "
         f"nginx {_f(g.get('nginx_cpu_ms_per_flow'))} ms/flow; other processes {_f(g.get('other_processes_cores'), 2)} cores.",
         "",
         "| check | measured | holds |", "|---|---|---|"]
    e = j["errors"]
    L.append(f"| 0 errors | {e['failed_flows']} failed flows {e['by_kind'] or ''}; {e['unexpected_statuses']} "
             f"unexpected statuses of {R['access_log'].get('requests')} requests at nginx "
             f"{R['access_log'].get('by_status')} | {'yes' if e['holds'] else '**NO**'} |")
    for pid, v in j["rss"]["workers"].items():
        L.append(f"| worker {pid} RSS at the end within 10 % of minute 2 | {_f((v['ref_kb'] or 0) / 1024)} MB at "
                 f"{v['ref_t']:.0f} s → {_f((v['end_kb'] or 0) / 1024)} MB at {v['end_t']:.0f} s "
                 f"({_f((v['change'] or 0) * 100)} %) | {'yes' if v['holds'] else '**NO**'} |")
    L.append(f"| no worker restarted | same PIDs at the end | {'yes' if j['restarts']['holds'] else '**NO**'} |")
    L.append(f"| no table grows but those meant to | see below | {'yes' if j['tables']['holds'] else '**NO**'} |")
    L += ["", "| table | rows at minute 2 | at the end | grew | holds | why |", "|---|---:|---:|---:|---|---|"]
    for name, v in j["tables"]["tables"].items():
        L.append(f"| {name} | {v['reference']} | {v['end']} | {v['grew']} | {'yes' if v['holds'] else '**NO**'} | "
                 f"{v['why']} |")
    if R.get("app_log_errors"):
        L += ["", "App log errors:", "", "```", *R["app_log_errors"], "```"]
    L.append("")
    return "\n".join(L)


def verdict(R: dict[str, Any]) -> str:
    j = R.get("judgement")
    if not j:
        return "bench --soak FAILED: no judgement"
    ok = all(v["holds"] for v in j.values())
    worst = max((abs(v["change"] or 0) for v in j["rss"]["workers"].values()), default=0)
    grew = [n for n, v in j["tables"]["tables"].items() if not v["holds"]]
    return (f"bench --soak {'OK' if ok else 'FAILED'}: {R['generator']['flows_total']} sign-ins in "
            f"{R['meta']['minutes']:g} min, {j['errors']['failed_flows']} failed flows, "
            f"{j['errors']['unexpected_statuses']} unexpected statuses; worst worker RSS change {worst * 100:.1f} %; "
            f"tables growing unexpectedly: {', '.join(grew) or 'none'}")


def main(args: Any) -> int:
    return run_and_report(args, "--soak", "soak", run, markdown, verdict)

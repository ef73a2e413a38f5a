"""Results: JSON, a Markdown table (bench/results/latest.md), a PNG plot; the targets."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import STEPS

STEP_NAMES = {
    "get_login": "GET /login", "post_login": "POST /login", "code_wait": "code wait", "get_verify": "GET /verify",
    "post_verify": "POST /verify", "get_dashboard": "GET /dashboard", "post_logout": "POST /logout",
}
RSS_LIMIT_MB, STALL_LIMIT_MS, SHARE_MIN, SCALE_RATIO, SCALE_SLACK_MS = 150, 20, 0.6, 1.2, 2.0
# The machine's speed drifts (about 15 % between hours), so the millisecond targets are read
# against the same run's idle Argon2 verification: POST /verify p99 at most this many of them.
VERIFY_P99_VERIFICATIONS = 1.2


def _f(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ts(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()


STALL_PERIOD_S = 1  # the app's loop monitor logs the worst stall of every second


def _inside(stamp: str, run: dict[str, Any]) -> bool:
    """Whether the monitor period logged at `stamp` lies inside the run's window (the line's
    time has whole seconds: a period ends within 1 s after it)."""
    a, b, t = run.get("wall_start_utc"), run.get("wall_end_utc"), _ts(stamp)
    return a is not None and b is not None and t - STALL_PERIOD_S >= a and t + 1 <= b


def stall_for(run: dict[str, Any], stalls: list[tuple[str, float]]) -> float | None:
    """Worst LOOP_MONITOR value among the periods lying inside the run's window; when the window
    holds no whole period (very short windows), the periods overlapping it."""
    a, b = run.get("wall_start_utc"), run.get("wall_end_utc")
    if a is None:
        return None
    inside = [ms for stamp, ms in stalls if _inside(stamp, run)]
    if inside:
        return max(inside)
    p = STALL_PERIOD_S
    vals = [ms for stamp, ms in stalls if _ts(stamp) - p - 1 <= b and _ts(stamp) + 1 >= a]
    return max(vals) if vals else None


def _stalls_over(results: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """How many one-second periods inside the runs' windows went over the limit, and in how
    many of those seconds every worker stalled at once (the machine pausing, not one loop)."""
    workers = int((results.get("meta") or {}).get("workers") or 2)
    by_second: dict[str, list[float]] = {}
    for stamp, ms in results.get("stalls", []):
        if any(_inside(stamp, r) for r in runs):
            by_second.setdefault(stamp, []).append(ms)
    bad = {k: v for k, v in by_second.items() if max(v) > STALL_LIMIT_MS}
    if not bad:
        return ""
    together = sum(1 for v in bad.values() if len(v) >= workers and min(v) > STALL_LIMIT_MS)
    stolen: dict[str, float] = {}
    for stamp, ms in results.get("steal", []):
        stolen[stamp] = max(stolen.get(stamp, 0.0), ms)
    text = (f"; {len(bad)} of {len(by_second)} seconds inside the windows went over, {together} of them in "
            f"every worker at once")
    if stolen:
        hit = [f"{stolen[k]:.0f}" for k in sorted(bad) if stolen.get(k, 0) > 0]
        text += (f", {len(hit)} of them in a second when the hypervisor took CPU from the machine"
                 + (f" ({', '.join(hit)} ms of steal)" if hit else ""))
    return text


def bound_of(hb: dict[str, Any]) -> float:
    """The hashing bound used for "÷ bound": all cores' verifications/s from the CPU cost of one."""
    return float(hb.get("cpu_bound_per_s") or hb["verifies_per_s"])


def enrich(results: dict[str, Any]) -> None:
    """Per-run derived numbers: ÷ bound, Argon2 share, stall, peak RSS."""
    hb = results["hash_bound"]
    argon = hb["cpu_ms_per_verify"]
    stalls = results.get("stalls", [])
    gc_pauses = results.get("gc_pauses", [])
    runs = list(results["runs"])
    if results.get("profile", {}).get("run"):
        runs.append(results["profile"]["run"])
    if results.get("scale"):
        runs += [results["scale"][k] for k in ("empty", "loaded") if results["scale"].get(k)]
    for r in runs:
        cpu = r.get("app_cpu_ms_per_flow")
        r["per_bound"] = (r["flows_per_s"] / bound_of(hb)) if r.get("flows_per_s") is not None else None
        # Argon2's CPU as the app's hashing threads used it (/proc/<pid>/task/<tid>: threads that
        # run nothing else), the verdict's count. Under load a verification costs more than on
        # the idle machine (caches and cores shared with the event loops, MariaDB, the load
        # generator), and the idle figure itself moves a few % from run to run: subtracting it
        # (the "idle-cost estimate", kept beside) counts that slowdown and that noise as overhead.
        threads = r.get("hash_threads_cpu_ms_per_flow")
        r["argon2_idle_ms"] = argon
        r["outside_argon2_idle_estimate_ms_per_flow"] = (cpu - argon) if cpu else None
        r["hash_share_idle_estimate"] = (argon / cpu) if cpu else None
        r["argon2_source"] = "hashing threads" if threads else "idle-cost estimate"
        r["argon2_cpu_ms_per_flow"] = threads if threads else argon
        r["argon2_load_factor"] = (threads / argon) if threads and argon else None
        r["hash_share"] = (r["argon2_cpu_ms_per_flow"] / cpu) if cpu else None
        r["outside_argon2_ms_per_flow"] = (cpu - r["argon2_cpu_ms_per_flow"]) if cpu else None
        r["max_stall_ms"] = stall_for(r, stalls)
        r["max_gc_ms"] = stall_for(r, gc_pauses) if gc_pauses else None
        hwm = [v for v in (r.get("worker_vmhwm_kb") or {}).values() if v]
        r["worker_peak_rss_mb"] = {p: round(v / 1024, 1) for p, v in (r.get("worker_vmhwm_kb") or {}).items() if v}
        r["worker_peak_rss_mb_max"] = max(hwm) / 1024 if hwm else None


def _fast_slow(results: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    runs = results["runs"]
    fast = [r for r in runs if r["mail_delay_s"] == 0]
    slow = [r for r in runs if r["mail_delay_s"] > 0]
    top = max((r["concurrency"] for r in runs), default=None)
    f = next((r for r in fast if r["concurrency"] == top), None)
    s = next((r for r in slow if r["concurrency"] == top), None)
    return f, s


def _all_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    runs = list(results["runs"])
    sc = results.get("scale") or {}
    return runs + [sc[k] for k in ("empty", "loaded") if sc.get(k)]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, measured: str, holds: bool | None, note: str = "") -> None:
        out.append({"target": name, "measured": measured, "holds": holds, "note": note})

    fast, slow = _fast_slow(results)
    if fast:
        c = fast["concurrency"]
        o, share = fast["outside_argon2_ms_per_flow"], fast["hash_share"]
        others = ", ".join(f"C={r['concurrency']}: {_f(r['outside_argon2_ms_per_flow'])} ms / {_f(r['hash_share'], 2)}"
                           for r in results["runs"] if r["mail_delay_s"] == 0)
        est = (f"; idle-cost estimate {_f(fast['outside_argon2_idle_estimate_ms_per_flow'])} ms / "
               f"{_f(fast['hash_share_idle_estimate'], 2)}, as Argon2 took {_f(fast['argon2_cpu_ms_per_flow'])} ms "
               f"per sign-in under load against {_f(fast['argon2_idle_ms'], 2)} ms idle "
               f"({_f(fast['argon2_load_factor'], 2)}x)" if fast.get("argon2_load_factor") else "")
        add(f"Hash share >= {SHARE_MIN} of the app's CPU per sign-in, C={c}",
            f"hash share {_f(share, 2)}: {_f(o)} ms outside Argon2 of {_f(fast['app_cpu_ms_per_flow'])} ms "
            f"(Argon2 from the {fast['argon2_source']})",
            None if share is None else share >= SHARE_MIN, f"fast-mail runs: {others}{est}")
        p99 = fast["steps_ms"]["post_verify"]["p99"]
        idle = results["hash_bound"].get("cpu_ms_per_verify")
        limit = VERIFY_P99_VERIFICATIONS * idle if idle else None
        add(f"POST /verify p99 <= {VERIFY_P99_VERIFICATIONS}x one idle verification at C={c}",
            f"{_f(p99)} ms against {_f(limit)} ms ({VERIFY_P99_VERIFICATIONS} x {_f(idle, 2)} ms)",
            None if p99 is None or limit is None else p99 <= limit)
    if fast and slow:
        c, d = slow["concurrency"], slow["mail_delay_s"]
        a, b = slow["steps_ms"]["post_login"]["p99"], fast["steps_ms"]["post_login"]["p99"]
        add(f"Mail held {d:g} s, C={c}: POST /login p99 no higher than with fast mail",
            f"{_f(a)} ms held vs {_f(b)} ms fast", None if None in (a, b) else a <= b)
        w = slow["steps_ms"]["code_wait"]
        add(f"Mail held {d:g} s, C={c}: code arrives within 0.5 s of {d:g} s",
            f"code wait p50 {_f(w['p50'], 0)} / p99 {_f(w['p99'], 0)} / max {_f(w['max'], 0)} ms",
            None if w["p99"] is None else w["p99"] <= (d + 0.5) * 1000, "judged on p99")
        add(f"Mail held {d:g} s, C={c}: no flow fails", f"{slow['errors']} failed flows", slow["errors"] == 0)
        rest = (slow.get("rest_of_flow_ms") or {}).get("mean")
        if rest is not None and slow["flows_per_s"] is not None:
            want = 0.9 * c / (d + rest / 1000)
            add(f"Mail held {d:g} s, C={c}: flows/s >= 90% of C / ({d:g} s + rest of flow)",
                f"{_f(slow['flows_per_s'])} flows/s vs {_f(want)} needed (rest of flow {_f(rest, 0)} ms)",
                slow["flows_per_s"] >= want)
    sc = results.get("scale") or {}
    if sc.get("empty") and sc.get("loaded"):
        parts, ok = [], True
        for step in ("get_verify", "post_verify"):
            e, l_ = sc["empty"]["steps_ms"][step]["p99"], sc["loaded"]["steps_ms"][step]["p99"]
            ratio = (l_ / e) if e and l_ else None
            ok = ok and ratio is not None and (ratio <= SCALE_RATIO or l_ - e <= SCALE_SLACK_MS)
            parts.append(f"{STEP_NAMES[step]} p99 {_f(l_)} vs {_f(e)} ms ({_f(ratio, 2)}x)")
        add(f"{sc['customers']:,} customers, {sc['codes']:,} codes: code-step p99 within {SCALE_RATIO}x "
            f"(or {SCALE_SLACK_MS:g} ms) of empty DB (C={sc['concurrency']})", "; ".join(parts), ok)
    stalls = [ms for _, ms in results.get("stalls", [])]
    measured = [r for r in _all_runs(results) if r.get("max_stall_ms") is not None]
    worst = max(measured, key=lambda r: r["max_stall_ms"]) if measured else None
    per_run = ", ".join(f"{r['label']}: {_f(r['max_stall_ms'], 0)}" for r in measured)
    gcs = [r["max_gc_ms"] for r in measured if r.get("max_gc_ms") is not None]
    gc_note = f"; longest garbage collection inside the runs {_f(max(gcs))} ms" if gcs else ""
    over = _stalls_over(results, measured)
    add(f"No event-loop stall over {STALL_LIMIT_MS} ms",
        f"max {_f(worst['max_stall_ms'] if worst else None)} ms in the monitor periods inside the measured runs "
        f"(worst: {worst['label'] if worst else '–'}); {_f(max(stalls) if stalls else None)} ms over all "
        f"{len(stalls)} periods of the server's life{over}{gc_note}",
        (worst["max_stall_ms"] <= STALL_LIMIT_MS) if worst else None, f"per run: {per_run}")
    hwm = [v for v in (results.get("worker_vmhwm_kb_final") or {}).values() if v]
    add(f"Worker RSS under {RSS_LIMIT_MB} MB", f"peak (VmHWM) {_f(max(hwm) / 1024 if hwm else None)} MB",
        (max(hwm) / 1024 < RSS_LIMIT_MB) if hwm else None)
    if results.get("console") is not None:
        from bench import console

        out += console.targets(results["console"])
    return out


def markdown(results: dict[str, Any]) -> str:
    hb, m = results["hash_bound"], results["meta"]
    m.setdefault("total_s", None)
    L = [f"# Sign-in benchmark — {m['started_utc']}", ""]
    dirty = m.get("app_uncommitted") or []
    L.append(f"git `{m.get('git')}`" + (f" (uncommitted: {', '.join(dirty)})" if dirty else "") + f", {m['cpus']} cores, uvicorn --workers {m['workers']}, APP_ENV=production, "
             f"MariaDB + Redis rate limits, {'quick run' if m['quick'] else 'full run'} "
             f"({_f(m.get('total_s'), 0)} s). Settings: "
             + ", ".join(f"{k}={v}" for k, v in m["app_settings"].items() if k not in ("DATABASE_URL",)) + ".")
    L.append("")
    L.append(f"**Hashing bound** (Argon2id t={hb['params']['time_cost']}, m={hb['params']['memory_cost_kib']} KiB, "
             f"p={hb['params']['parallelism']}; {hb['processes']} processes, idle machine): "
             f"**{_f(bound_of(hb))} verifications/s** ({hb['processes']} x 1000 / {_f(hb['cpu_ms_per_verify'], 2)} "
             f"CPU ms per verification); measured {_f(hb['verifies_per_s'])}/s wall-clock while other processes used "
             f"{_f(hb.get('other_processes_cores'), 2)} cores"
             + ("" if hb.get("machine_was_idle", True) else " — **the machine was not idle**: the measured rate is "
                "low, the CPU-derived bound is used") + ".")
    s = results.get("setup", {})
    L.append(f"Setup: migrate {_f(s.get('migrate_s'))} s, {s.get('customers_seeded')} customers seeded in "
             f"{_f(s.get('seed_s'))} s, uvicorn up in {_f(s.get('uvicorn_start_s'))} s.")
    L.append("")
    sc = results.get("scale") or {}
    runs = _all_runs(results)
    L += ["## Throughput and CPU", "",
          "| run | C | mail held | flows/s | ÷ bound | app CPU ms/flow | Argon2 ms/flow (hashing threads) | "
          "outside Argon2 ms | hash share | Argon2 under load ÷ idle | outside, idle-cost estimate ms | "
          "app kernel share | DB CPU ms/flow | load-gen cores | other procs cores | VM steal ms | errors | max stall ms (longest GC) | "
          "threads/worker | worker peak RSS MB (master / workers) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        rss = " / ".join(_f(v, 0) for v in r.get("worker_peak_rss_mb", {}).values())
        threads = max((r.get("worker_threads_max") or {"x": 0}).values())
        L.append(f"| {r['label']} | {r['concurrency']} | {r['mail_delay_s']:g} s | {_f(r['flows_per_s'])} | "
                 f"{_f(r['per_bound'], 2)} | {_f(r['app_cpu_ms_per_flow'])} | {_f(r.get('hash_threads_cpu_ms_per_flow'))} | "
                 f"{_f(r['outside_argon2_ms_per_flow'])} | {_f(r['hash_share'], 2)} | {_f(r.get('argon2_load_factor'), 2)} | "
                 f"{_f(r.get('outside_argon2_idle_estimate_ms_per_flow'))} | {_f(r.get('app_kernel_share'), 2)} | {_f(r.get('db_cpu_ms_per_flow'))} | "
                 f"{_f(r.get('generator_cpu_cores'), 2)} | {_f(r.get('other_processes_cores'), 2)} | "
                 f"{_f(r.get('vm_steal_ms'), 0)} | {r['errors']} | {_f(r.get('max_stall_ms'))}"
                 + (f" (GC {_f(r['max_gc_ms'])})" if r.get("max_gc_ms") is not None else "")
                 + f" | {threads} | {rss} |")
    L += ["", "## Step latency, ms (p50 / p95 / p99)", "",
          "| run | " + " | ".join(STEP_NAMES[s] for s in STEPS) + " | whole flow |",
          "|---|" + "---|" * (len(STEPS) + 1)]
    for r in runs:
        cells = []
        for s_ in [*STEPS, None]:
            x = r["steps_ms"][s_] if s_ else r["flow_ms"]
            cells.append(f"{_f(x['p50'], 0 if s_ in ('code_wait', None) else 1)} / "
                         f"{_f(x['p95'], 0 if s_ in ('code_wait', None) else 1)} / "
                         f"{_f(x['p99'], 0 if s_ in ('code_wait', None) else 1)}")
        L.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    L += ["", f"Flows counted: those completing inside each {results['meta']['args']['duration']:g} s window "
          f"(after {results['meta']['args']['warmup']:g} s warm-up); every flow uses a fresh customer, cookie and "
          "X-Forwarded-For address. Errors count every failed flow of the run, warm-up and drain included.", ""]
    errs = [(r["label"], r["errors_by_kind"]) for r in runs if r["errors"]]
    if errs:
        L += ["Errors by kind: " + "; ".join(f"{lab}: {kinds}" for lab, kinds in errs), ""]
    if any(r.get("innodb") for r in runs):
        L += ["InnoDB during each run (server-wide counters): " + "; ".join(
            f"{r['label']}: {r['innodb'].get('innodb_deadlocks', 0)} deadlocks, "
            f"{r['innodb'].get('innodb_row_lock_waits', 0)} row-lock waits, "
            f"{r['innodb'].get('innodb_row_lock_time', 0)} ms waited" for r in runs if r.get("innodb")), ""]

    L += ["## Targets", "", "| target | measured | holds |", "|---|---|---|"]
    for t in results["targets"]:
        mark = "–" if t["holds"] is None else ("yes" if t["holds"] else "**NO**")
        note = f" ({t['note']})" if t["note"] else ""
        L.append(f"| {t['target']} | {t['measured']}{note} | {mark} |")
    L.append("")

    if sc.get("error"):
        L += ["## Scale", "", f"The scale step failed: `{sc['error']}`", ""]
    if sc:
        ld = sc.get("load", {})
        L += ["## Scale", "",
              f"Bulk load (LOAD DATA LOCAL INFILE, {ld.get('customers_loaded', 0):,} customers + "
              f"{ld.get('codes_loaded', 0):,} code rows + {ld.get('mail_rows_loaded', 0):,} sent mail_outbox rows): customers {_f(ld.get('customers_s'))} s, codes and mail "
              f"{_f(ld.get('codes_s'))} s (ids generated in {_f(ld.get('codes_id_generation_s'))} s), ANALYZE "
              f"{_f(ld.get('analyze_s'))} s, total **{_f(ld.get('total_s'), 0)} s**"
              + (f" (chunks retried: {ld['retries']})" if ld.get("retries") else "") + ".", "",
              f"Rows before: {sc.get('empty_db')}", "", f"Rows after: {sc.get('loaded_db')}", ""]
        ex = sc.get("explain") or {}
        if ex:
            L += [f"EXPLAIN of every statement of one complete sign-in through the app (statuses "
                  f"{ex.get('statuses')}), recorded as the app compiled it, against the loaded database"
                  + (f"; the periodic cleanup (app/otp/cleanup.py) ran for {_f(ex.get('cleanup_s'), 2)} s and "
                     + (f"failed with **{ex['cleanup_error']}**" if ex.get("cleanup_error")
                        else f"deleted {ex.get('cleanup_deleted')} rows")
                     + f", and a code INSERT (as issue() sends it, id 3) started 1 s into it took "
                     f"{_f((ex.get('insert_during_cleanup') or {}).get('insert_wait_s'), 2)} s"
                     + (f" and failed: {(ex.get('insert_during_cleanup') or {}).get('error')}"
                        if (ex.get("insert_during_cleanup") or {}).get("error") else "")
                     if "cleanup_s" in ex else "") + ":", "",
                  "| app function | during | key used | rows | statement |", "|---|---|---|---:|---|"]
            for q in ex.get("queries", []):
                keys = ", ".join(f"{p['table']}.{p['key']} ({p['type']})" for p in q["plan"] if p.get("key"))
                keys = keys if keys and "FULL SCAN" not in q["verdict"] else (
                    q["verdict"] if "FULL SCAN" not in q["verdict"] else
                    ", ".join(f"{p['table']}.{p['key']} ({p['type']})" for p in q["plan"]) + " — FULL SCAN")
                rows = " / ".join(str(p["rows"]) for p in q["plan"])
                flag = "**" if "FULL SCAN" in q["verdict"] else ""
                sql = q["sql"] if len(q["sql"]) < 160 else q["sql"][:157] + "…"
                L.append(f"| `{q['function']}` | {', '.join(q['phases'])} | {flag}{keys}{flag} | {rows} | "
                         f"`{sql.replace('|', '¦')}` |")
            L += ["", "Statements sent per phase of that sign-in (each a database round trip, `SELECT ROW_COUNT()` "
                  "included; the mail dispatcher's count holds its look-ups every 0.2 s while mail flows, over the "
                  "whole recorded sign-in): " + ", ".join(f"{k}: {v}" for k, v in (ex.get("statements_per_phase") or {}).items()),
                  ""]
    prof = results.get("profile")
    if prof and prof.get("categories"):
        per_flow = (prof.get("run") or {}).get("app_cpu_ms_per_flow")
        L += ["## Where the workers' CPU goes (py-spy, separate run)", "",
              f"C={prof['concurrency']}, fast mail, {prof['samples']} samples of both workers (100 Hz, active "
              f"threads only); app CPU in that run {_f(per_flow)} ms per flow. Each stack counted once, in the first "
              "matching category:", "", "| category | share of samples | ≈ ms per flow |", "|---|---:|---:|"]
        for name, share in prof["categories"]:
            L.append(f"| {name} | {share * 100:.1f}% | {_f(share * per_flow if per_flow else None)} |")
        L.append("")
    if prof and prof.get("top"):
        L += ["Inclusive share by function (top 30):", "",
              f"C={prof['concurrency']}, {prof['samples']} samples from both workers; share of samples whose "
              "stack contains the function (inclusive).", "", "| function | share |", "|---|---:|"]
        for name, share in prof["top"]:
            L.append(f"| `{name}` | {share * 100:.1f}% |")
        L.append("")
    if sc.get("explain_error"):
        L += [f"EXPLAIN step failed: `{sc['explain_error']}`", ""]
    if results.get("console") is not None:
        from bench import console

        L += console.markdown(results["console"])
    if results.get("errors"):
        L += ["## The bench stopped early", "", *[f"- `{e}`" for e in results["errors"]], ""]
    if results.get("server_errors"):
        L += ["## Server log errors (first 20)", "", "```", *results["server_errors"], "```", ""]
    return "\n".join(L)


def plot(results: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = results["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for delay in sorted({r["mail_delay_s"] for r in runs}):
        rs = sorted((r for r in runs if r["mail_delay_s"] == delay), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in rs]
        tag = "fast mail" if delay == 0 else f"mail held {delay:g} s"
        ax1.plot(cs, [r["flows_per_s"] or 0 for r in rs], marker="o", label=tag)
        for step, style in (("post_login", "-"), ("post_verify", "--")):
            ax2.plot(cs, [r["steps_ms"][step]["p99"] or 0 for r in rs], marker="o", linestyle=style,
                     label=f"{STEP_NAMES[step]} p99, {tag}")
        ax2.plot(cs, [r["flow_ms"]["p99"] or 0 for r in rs], marker="s", linestyle=":", label=f"whole flow p99, {tag}")
    bound = bound_of(results["hash_bound"])
    ax1.axhline(bound, color="grey", linestyle=":", label=f"Argon2 bound {bound:.0f}/s")
    ax1.set(xscale="log", xlabel="concurrency C (closed loop)", ylabel="complete sign-ins / s", title="Throughput")
    ax2.set(xscale="log", yscale="log", xlabel="concurrency C (closed loop)", ylabel="p99 latency, ms",
            title="p99 latency")
    for ax in (ax1, ax2):
        ax.set_xticks(sorted({r["concurrency"] for r in runs}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict[str, Any], out: Path, *, make_plot: bool = True) -> list[Path]:
    enrich(results)
    results["targets"] = targets(results)
    stamp = results["meta"]["started_utc"].replace(":", "").replace("-", "")[:15]
    prefix = "quick" if results["meta"]["quick"] else "full"
    written = []
    if not results["meta"]["quick"]:
        js = out / f"{prefix}-{stamp}.json"
        js.write_text(json.dumps(results, indent=1, default=str))
        written.append(js)
    latest_json = out / ("latest-quick.json" if results["meta"]["quick"] else "latest.json")
    latest_json.write_text(json.dumps(results, indent=1, default=str))
    written.append(latest_json)
    md = out / ("latest-quick.md" if results["meta"]["quick"] else "latest.md")
    md.write_text(markdown(results))
    written.append(md)
    if make_plot:
        png = plot(results, out / "latest.png")
        if png:
            written.append(png)
    return written


def verdict_line(results: dict[str, Any]) -> str:
    runs = results["runs"]
    flows = sum(r["flows_total"] for r in runs)
    errors = sum(r["errors"] for r in runs)
    held = sum(1 for t in results["targets"] if t["holds"])
    judged = sum(1 for t in results["targets"] if t["holds"] is not None)
    ok = all(r["flows"] > 0 and r["errors"] == 0 for r in runs)
    kinds: dict[str, int] = {}
    for r in runs:
        for k, n in r["errors_by_kind"].items():
            kinds[k] = kinds.get(k, 0) + n
    detail = f" ({', '.join(f'{k} x{n}' for k, n in kinds.items())})" if kinds else ""
    return (f"bench {'OK' if ok else 'FAILED'}: {len(runs)} runs, {flows} complete sign-ins, {errors} failed "
            f"flows{detail}; targets held {held}/{judged}")

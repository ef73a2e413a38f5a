"""The hashing bound: Argon2id verifications per second on all cores, with the app's own
hasher (app.security.ARGON2), one process per core (argon2 releases the GIL, but separate
processes keep the measurement free of any Python overhead in between)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

from bench.common import CLK_TCK, PASSWORD, machine_busy_ticks


def _worker(stored: str, seconds: float, start_at: float, out: Any) -> None:
    from app.security.passwords import ARGON2

    while time.time() < start_at:
        time.sleep(0.005)
    c0, t0, n = time.process_time(), time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        ARGON2.verify(stored, PASSWORD)
        n += 1
    out.put({"verifies": n, "wall_s": time.monotonic() - t0, "cpu_s": time.process_time() - c0})


def measure(seconds: float, processes: int | None = None, attempts: int = 3) -> dict[str, Any]:
    """The best of up to `attempts` tries (stopping early once the machine was idle: other
    processes under 0.2 cores). `verifies_per_s` is the measured rate; `cpu_bound_per_s` is
    cores x 1000 / CPU ms per verification: what all cores give when nothing else runs, the
    figure the bench divides by (it does not move when other processes steal CPU)."""
    tries = []
    for _ in range(attempts):
        tries.append(_measure_once(seconds, processes))
        if tries[-1]["other_processes_cores"] < 0.2:
            break
    best = dict(max(tries, key=lambda t: t["verifies_per_s"]))
    best["attempts"] = [{k: t[k] for k in ("verifies_per_s", "cpu_ms_per_verify", "other_processes_cores")}
                        for t in tries]
    best["cpu_bound_per_s"] = best["processes"] * 1000 / best["cpu_ms_per_verify"]
    best["machine_was_idle"] = best["other_processes_cores"] < 0.2
    return best


def _measure_once(seconds: float, processes: int | None = None) -> dict[str, Any]:
    from app.security.passwords import ARGON2

    processes = processes or os.cpu_count() or 1
    stored = ARGON2.hash(PASSWORD)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 2.0  # every process imported and ready
    procs = [ctx.Process(target=_worker, args=(stored, seconds, start_at, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    busy0 = machine_busy_ticks()
    try:
        results = [out.get(timeout=seconds + 60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    busy_s = (machine_busy_ticks() - busy0) / CLK_TCK
    verifies = sum(r["verifies"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    wall = max(r["wall_s"] for r in results)
    return {
        "processes": processes,
        "params": {"time_cost": ARGON2.time_cost, "memory_cost_kib": ARGON2.memory_cost,
                   "parallelism": ARGON2.parallelism, "hash_len": ARGON2.hash_len},
        "seconds": wall,
        "verifies": verifies,
        "verifies_per_s": verifies / wall,
        "cpu_ms_per_verify": cpu * 1000 / verifies,
        "wall_ms_per_verify_per_process": wall * 1000 * processes / verifies,
        # Other processes' CPU meanwhile (the machine should be idle: near 0).
        "other_processes_cores": max(0.0, busy_s - cpu) / (wall + 2.0),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(measure(3.0), indent=1))

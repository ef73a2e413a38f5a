"""Bench aid (LOOP_MONITOR=1): the longest event-loop stall of every second, in the log."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time

log = logging.getLogger("app")


def _steal_ticks() -> int | None:
    """CPU time the hypervisor took from this virtual machine, all cores (Linux /proc/stat)."""
    try:
        with open("/proc/stat", "rb") as f:
            return int(f.readline().split()[8])
    except (OSError, IndexError, ValueError):
        return None


async def loop_monitor(interval: float = 0.005, period: float = 1.0) -> None:
    """Bench aid (LOOP_MONITOR=1): logs the longest event-loop stall of every second, so a
    stall can be placed in time (a start-up stall is not one under load), and beside it the
    longest garbage collection of that second (a stall that long was the collector's) and the
    CPU time the hypervisor took from the machine in it (steal: a stall no code caused).

    A plain timer callback re-armed every `interval`: how late each one runs is how long the
    loop was busy. No task or future per tick: an asyncio.sleep loop costs measurably more
    (bench/README.md)."""
    loop = asyncio.get_running_loop()
    # Measured on the real clock: uvloop's loop.time() is the cached start of the iteration.
    since = time.monotonic()
    due, worst = since + interval, 0.0
    gc_started, gc_worst = 0.0, 0.0
    steal, tick_ms = _steal_ticks(), 1000 / os.sysconf("SC_CLK_TCK")
    handle: asyncio.TimerHandle | None = None

    def tick() -> None:
        nonlocal handle, since, due, worst, gc_worst, steal
        now = time.monotonic()
        worst = max(worst, now - due)
        if now - since >= period:
            stolen, steal = steal, _steal_ticks()
            extra = f" steal_ms={(steal - stolen) * tick_ms:.0f}" if steal is not None and stolen is not None else ""
            log.warning("loop-monitor max_stall_ms=%.1f gc_max_ms=%.1f%s", worst * 1000, gc_worst * 1000, extra)
            worst, gc_worst, since = 0.0, 0.0, now
        due = now + interval
        handle = loop.call_later(interval, tick)

    def collected(phase: str, info: dict[str, int]) -> None:
        nonlocal gc_started, gc_worst
        if phase == "start":
            gc_started = time.monotonic()
        else:
            gc_worst = max(gc_worst, time.monotonic() - gc_started)

    handle = loop.call_later(interval, tick)
    gc.callbacks.append(collected)
    try:
        await loop.create_future()  # until cancelled
    finally:
        handle.cancel()
        gc.callbacks.remove(collected)

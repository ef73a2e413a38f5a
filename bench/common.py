"""Small shared helpers: percentiles, /proc readers, free ports, address allocation."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from app.security.passwords import HASH_THREAD_NAME  # the OS name of the threads that hash

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
TMP = RESULTS / "tmp"  # git-ignored: logs, load files, raw profiles

CLK_TCK = os.sysconf("SC_CLK_TCK")
PASSWORD = "bench-Password-7781"
XFF_NET = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range
STEPS = ("get_login", "post_login", "code_wait", "get_verify", "post_verify", "get_dashboard", "post_logout")


# Usernames carry a tag of the run (hex, set by the bench before it seeds): the app counts
# sign-ins per account in Redis for 15 minutes, and a shared Redis must not carry one run's
# counts into the next run's identical usernames (that showed as a burst of 422s).
TAG = os.environ.get("BENCH_TAG", "")


def set_tag(tag: str) -> None:
    """Tag this process's usernames, and those of the processes it starts (the load generator)."""
    global TAG
    if not all(ch in "0123456789abcdef" for ch in tag):
        raise ValueError("the tag is lower-case hex (it goes into SQL of the bulk load)")
    TAG = tag
    os.environ["BENCH_TAG"] = tag


def username(i: int) -> str:
    return f"b{TAG}{i:07d}"


def email(i: int) -> str:
    return f"{username(i)}@bench.example"


def client_address(n: int) -> str:
    """The n-th client address from 198.18.0.0/15 (wraps after 131072)."""
    return str(XFF_NET.network_address + (n % XFF_NET.num_addresses))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float | int | None]:
    """count, mean, p50/p95/p99, max — in the unit given (ms for latencies)."""
    s = sorted(values)
    return {
        "count": len(s),
        "mean": (sum(s) / len(s)) if s else None,
        "p50": percentile(s, 50),
        "p95": percentile(s, 95),
        "p99": percentile(s, 99),
        "max": s[-1] if s else None,
    }


# --- /proc -------------------------------------------------------------------------------


def _stat(path: Path) -> tuple[str, list[str]] | None:
    """(name, the fields after it) of a /proc stat file; None if the process or thread is gone."""
    try:
        data = path.read_text()
    except OSError:
        return None
    return data[data.index("(") + 1 : data.rindex(")")], data[data.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process (all its threads), in clock ticks; None if it is gone."""
    stat = _stat(Path(f"/proc/{pid}/stat"))
    return None if stat is None else int(stat[1][11]) + int(stat[1][12])  # fields 14 and 15 of stat(5)


def hash_thread_ticks(pid: int) -> dict[str, int]:
    """utime + stime of each thread of a process that runs password hashing (recognised by
    the name app.security gives it), by thread id."""
    out: dict[str, int] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        stat = _stat(task / "stat")
        if stat is not None and stat[0] == HASH_THREAD_NAME:
            out[task.name] = int(stat[1][11]) + int(stat[1][12])
    return out


def sys_ticks(pid: int) -> int | None:
    """stime alone (kernel time: syscalls, page faults), in clock ticks."""
    stat = _stat(Path(f"/proc/{pid}/stat"))
    return None if stat is None else int(stat[1][12])


def _cpu_line() -> list[int]:
    with open("/proc/stat") as f:
        return ([int(x) for x in f.readline().split()[1:]] + [0] * 8)[:8]


def machine_busy_ticks() -> int:
    """Busy CPU ticks of the whole machine (all cores) from /proc/stat (steal not included)."""
    user, nice, system, idle, iowait, irq, softirq, steal = _cpu_line()
    return user + nice + system + irq + softirq


def machine_steal_ticks() -> int:
    """Ticks the hypervisor ran something else while this machine's CPUs wanted to run."""
    return _cpu_line()[7]


def status_field(pid: int, name: str) -> int | None:
    """A numeric field of /proc/<pid>/status (VmHWM, VmRSS in kB; Threads)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    """Direct children of a process."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(data[data.rindex(")") + 2 :].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return sorted(out)


def pid_of_command(name: str) -> int | None:
    """The PID of a process by its comm (used read-only, for the database server's CPU)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    return int(entry.name)
            except OSError:
                continue
    return None

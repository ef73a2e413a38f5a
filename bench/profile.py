"""py-spy on the uvicorn workers during one extra run: where the app's CPU goes."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _stacks(raw_files: list[Path]) -> Iterator[tuple[list[str], int]]:
    """(function names of one stack, samples) for each line of py-spy's raw (collapsed) output."""
    for path in raw_files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if count.isdigit():
                yield [_name(frame) for frame in stack.split(";")], int(count)


def summarize(raw_files: list[Path], top: int = 30) -> tuple[int, list[tuple[str, float]]]:
    """(samples, [(function, inclusive share)]) from py-spy's raw (collapsed) output."""
    total = 0
    inclusive: Counter[str] = Counter()
    for names, samples in _stacks(raw_files):
        total += samples
        for name in dict.fromkeys(name for name in names if name):  # each function once per stack
            inclusive[name] += samples
    if not total:
        return 0, []
    return total, [(k, v / total) for k, v in inclusive.most_common(top)]


CATEGORIES = (  # first match wins, tested against the whole stack
    ("Argon2 verify (thread pool)", ("argon2/",)),
    ("SQL: SQLAlchemy compile + databases + aiomysql", ("sqlalchemy/", "databases/", "aiomysql/", "pymysql/")),
    ("rate limit: limits + Redis client", ("limits/", "coredis/", "redis/")),
    ("mail: build MIME + aiosmtplib", ("email/", "aiosmtplib/", "app/mail/messages.py")),
    ("templates: Jinja", ("jinja2/", "jinja2_fragments/")),
    ("forms: python-multipart", ("multipart/", "python_multipart/", "starlette/formparsers.py")),
    ("session cookie: itsdangerous", ("itsdangerous/",)),
    ("loop monitor (LOOP_MONITOR=1)", ("app/main.py:loop_monitor",)),
    ("HTTP: uvicorn + httptools + starlette", ("uvicorn/protocols/", "starlette/")),
)


def categorize(raw_files: list[Path]) -> list[tuple[str, float]]:
    """Share of samples per category (first matching category of each stack)."""
    total = 0
    per: Counter[str] = Counter()
    for names, samples in _stacks(raw_files):
        total += samples
        joined = ";".join(names)
        label = next((label for label, needles in CATEGORIES if any(x in joined for x in needles)),
                     "event loop itself / other")
        per[label] += samples
    return [(k, v / total) for k, v in per.most_common()] if total else []


def _name(frame: str) -> str:
    """'verify (argon2/_password_hasher.py:230)' -> 'argon2/_password_hasher.py:verify'."""
    func, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{func}" if path else func


def record_during(bench: Any, concurrency: int) -> dict[str, Any]:
    spy = shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    a = bench.args
    seconds = int(a.warmup + a.duration)
    outs, procs = [], []
    for pid in bench.server.worker_pids:
        out = bench.tmp / f"py-spy-{pid}.txt"
        outs.append(out)
        procs.append(subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "100", "-f", "raw", "--gil",
                                       "-o", str(out), "--nonblocking"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        run = bench.load_run(f"profile-C{concurrency}", concurrency, 0.0)
    finally:
        for p in procs:
            try:
                p.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    samples, top = summarize(outs)
    return {"concurrency": concurrency, "samples": samples, "top": top, "categories": categorize(outs),
            "raw": [str(p) for p in outs], "run": run}

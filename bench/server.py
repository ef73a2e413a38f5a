"""Start and stop `uvicorn app.main:app --workers 2` the way an operator would, by PID."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, children

# Every setting the app reads: inherited values are dropped so only the bench's apply.
APP_VARS = (
    "APP_ENV", "DATABASE_URL", "SECRET_KEY", "SMTP_HOST", "SMTP_PORT", "SMTP_USERNAME", "SMTP_PASSWORD",
    "SMTP_SECURITY", "SMTP_TIMEOUT", "SMTP_POOL_SIZE", "MAIL_FROM", "OTP_REGISTRATION_TTL", "OTP_LOGIN_TTL",
    "OTP_RESEND_COOLDOWN", "OTP_MAX_ATTEMPTS", "OTP_CLEANUP_INTERVAL", "RATE_LIMIT_STORAGE", "RATE_LIMIT",
    "TRUSTED_PROXIES", "SESSION_IDLE_TIMEOUT", "SESSION_ABSOLUTE_TIMEOUT", "DB_POOL_SIZE", "LOOP_MONITOR",
    "HASH_CONCURRENCY", "WEB_CONCURRENCY", "PUBLIC_ORIGIN", "SECRET_KEY_FALLBACKS", "SMTP_POOL_MAX",
)
STALL_RE = re.compile(r"^(\S+)Z WARNING app loop-monitor max_stall_ms=([\d.]+)")
STEAL_RE = re.compile(r"^(\S+)Z WARNING app loop-monitor .*\bsteal_ms=([\d.]+)")
GC_RE = re.compile(r"^(\S+)Z WARNING app loop-monitor .*\bgc_max_ms=([\d.]+)")


def app_env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in APP_VARS}
    env.update(settings)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Uvicorn:
    def __init__(self, env: dict[str, str], port: int, workers: int, logdir: Path, tag: str = "") -> None:
        self.env, self.port, self.workers = env, port, workers
        suffix = f".{tag}" if tag else ""
        self.stdout_path = logdir / f"uvicorn{suffix}.stdout.log"
        self.stderr_path = logdir / f"uvicorn{suffix}.stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker_pids: list[int] = []

    @property
    def master_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        return [self.master_pid, *self.worker_pids]

    def start(self, timeout: float = 60) -> float:
        t = time.monotonic()
        cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--workers", str(self.workers),
               "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out, stderr=err, start_new_session=True)
        while time.monotonic() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.proc.returncode}; see {self.stderr_path}")
            if self.stderr_path.read_text(errors="replace").count("Application startup complete") >= self.workers:
                kids = [p for p in children(self.master_pid) if _is_worker(p)]
                if len(kids) >= self.workers:
                    self.worker_pids = kids
                    return time.monotonic() - t
            time.sleep(0.2)
        raise RuntimeError(f"uvicorn did not start within {timeout:.0f} s; see {self.stderr_path}")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the master (it stops its workers), then SIGKILL to whatever is left, by PID."""
        if self.proc is None:
            return
        known = list(dict.fromkeys([*self.worker_pids, *children(self.master_pid)]))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in known:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def stalls(self) -> list[tuple[str, float]]:
        """(UTC time, max stall ms) of every LOOP_MONITOR line the workers wrote."""
        return self._monitor(STALL_RE)

    def gc_pauses(self) -> list[tuple[str, float]]:
        """(UTC time, longest garbage collection ms) of the same lines."""
        return self._monitor(GC_RE)

    def steal(self) -> list[tuple[str, float]]:
        """(UTC time, ms the hypervisor took from the machine in that second) of the same lines."""
        return self._monitor(STEAL_RE)

    def _monitor(self, pattern: re.Pattern[str]) -> list[tuple[str, float]]:
        out = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            m = pattern.match(line)
            if m:
                out.append((m.group(1), float(m.group(2))))
        return out

    def errors(self) -> list[str]:
        lines = self.stderr_path.read_text(errors="replace").splitlines()
        return [ln for ln in lines if " ERROR " in ln or "Traceback" in ln][:20]


def _is_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "resource_tracker" not in cmd


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"

"""The app under test, run the way production runs it: `python -m app migrate`, then uvicorn
in a subprocess on a free port, with its own SQLite file and the SMTP capture as mail server."""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from e2e.mail import free_port

# Settings the suite's expectations depend on, pinned so a developer's shell cannot move them.
PINNED = {
    "APP_ENV": "test",
    "SMTP_HOST": "127.0.0.1",
    "SMTP_SECURITY": "none",
    "RATE_LIMIT": "10000/minute",
    "LOGIN_ACCOUNT_RATE_LIMIT": "10000/minute",
    "RATE_LIMIT_STORAGE": "memory://",
    "OTP_REGISTRATION_TTL": "900",
    "OTP_LOGIN_TTL": "600",
    "OTP_RESEND_COOLDOWN": "60",
    "OTP_MAX_ATTEMPTS": "5",
}
UNSET = ("SMTP_USERNAME", "SMTP_PASSWORD", "TRUSTED_PROXIES", "MAIL_FROM", "LOOP_MONITOR", "SESSION_IDLE_TIMEOUT",
         "SESSION_ABSOLUTE_TIMEOUT")


class ServerFailed(RuntimeError):
    """The app did not start; the message carries the end of its log."""


class LocalServer:
    """One uvicorn process for the whole e2e session."""

    def __init__(self, workdir: Path, log_path: Path, *, smtp_port: int) -> None:
        self.workdir = workdir  # also the process's cwd, so no stray .env is read
        self.db_path = workdir / "e2e.db"
        self.log_path = log_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k not in UNSET}
        self.env.update(PINNED)
        self.env.update(
            SECRET_KEY=secrets.token_urlsafe(36),  # 48 characters
            DATABASE_URL=f"sqlite+aiosqlite:///{self.db_path}",
            SMTP_PORT=str(smtp_port),
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 30.0) -> LocalServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        migrate = subprocess.run([sys.executable, "-m", "app", "migrate"], cwd=self.workdir, env=self.env,
                                 stdout=self._log, stderr=subprocess.STDOUT, timeout=120)
        if migrate.returncode != 0:
            self.stop()
            raise ServerFailed(f"`python -m app migrate` exited {migrate.returncode}:\n{self.log_tail()}")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.workdir, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise ServerFailed(f"uvicorn exited {self._process.returncode}:\n{self.log_tail()}")
                try:
                    if client.get("/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise ServerFailed(f"GET /healthz was not 200 within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def set_otp(self, email: str, *, enabled: bool) -> None:
        """Turn sign-in codes on or off for one customer, straight in the database file
        (the CLI only has `otp enable`)."""
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=30)) as db, db:
            changed = db.execute("UPDATE customers SET otp_enabled=? WHERE email=?", (int(enabled), email)).rowcount
        if changed != 1:
            raise AssertionError(f"no customer with the email {email}")

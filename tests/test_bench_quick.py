"""The benchmark never rots: a tiny run (a few customers, a few seconds) in the normal suite.
It asserts that sign-ins complete without failures, never how fast (the bench reports that)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import ROOT


@pytest.mark.slow
def test_quick_bench_completes_sign_ins_without_failures() -> None:
    if not os.environ.get("TEST_MYSQL_URL"):
        pytest.skip("the bench runs on MariaDB: set TEST_MYSQL_URL")
    url = make_url(os.environ["TEST_MYSQL_URL"])
    cmd = [
        sys.executable, "-m", "bench", "--quick",
        "--mysql-host", url.host or "127.0.0.1", "--mysql-port", str(url.port or 3306),
        "--mysql-user", url.username or "root", "--mysql-password", url.password or "",
        "--redis-url", os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379"),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    assert "bench OK:" in run.stdout + run.stderr and "0 failed flows" in run.stdout + run.stderr, tail

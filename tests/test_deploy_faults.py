"""Faults through the real deployment shape (issue 19): deploy/stack's nginx in front of two
instances. kill -9 of one whole instance (its uvicorn and both workers) in the middle of a
customer's sign-in: the customer finishes on the other instance, and nothing is lost — the code
mailed before the kill still works, exactly one code mail went, the session holds."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_deploy import PASSWORD, client, code_in, csrf, missing, nginx_binary, stack_tool, wait_for_mail

pytestmark = pytest.mark.slow


@pytest.fixture
def own_stack() -> Iterator[Any]:
    """A stack of this test's own: the test kills part of it."""
    nginx_binary()
    run_dir = Path(tempfile.mkdtemp(prefix="computer-shop-faults-"))
    try:
        launched = stack_tool.Launched.start(run_dir, "--set", "OTP_RESEND_COOLDOWN=1")
    except stack_tool.Unavailable as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        missing(str(exc))
    yield launched
    launched.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


def kill_instance(stack: Any, name: str) -> list[int]:
    """SIGKILL an app instance's uvicorn and every worker of it, at once (no clean shutdown)."""
    master = next(p["pid"] for p in stack.state["processes"] if p["name"] == name)
    pids = [master, *stack_tool.group_members(master)]
    for pid in set(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(stack_tool.pid_alive(p) for p in pids):
        assert time.monotonic() < deadline, "the killed instance is still running"
        time.sleep(0.05)
    return pids


def test_killing_one_instance_mid_sign_in_loses_nothing(own_stack: Any) -> None:
    stack = own_stack
    tag = uuid.uuid4().hex[:10]
    email, username = f"fault.{tag}@example.com", f"fault_{tag}"
    with client(stack.base_url) as http:
        token = csrf(http.get("/register").text)
        http.post("/register", data={"full_name": "Kim Fault", "username": username, "email": email,
                                     "password": PASSWORD, "confirm_password": PASSWORD, "csrf_token": token})
        code = code_in(wait_for_mail(stack, email, 0))
        http.post("/verify", data={"code": code, "csrf_token": csrf(http.get("/verify").text)})
        dashboard = http.get("/dashboard")
        assert dashboard.status_code == 200
        http.post("/logout", data={"csrf_token": csrf(dashboard.text)})

        time.sleep(1.2)  # the stack's 1 s resend cooldown
        before = len(stack.mail(email))
        r = http.post("/login", data={"login": username, "password": PASSWORD,
                                      "csrf_token": csrf(http.get("/login").text)})
        assert r.headers.get("location") == "/verify", r.text[:300]
        mail = wait_for_mail(stack, email, before)
        step = http.get("/verify")
        assert step.status_code == 200

        killed = kill_instance(stack, "app-1")  # mid-flow: the code is out, not yet entered

        r = http.post("/verify", data={"code": code_in(mail), "csrf_token": csrf(step.text)})
        assert (r.status_code, r.headers.get("location")) == (303, "/dashboard"), r.text[:500]
        for _ in range(6):  # every following request lands on the live instance
            assert http.get("/dashboard").status_code == 200
    time.sleep(1.0)
    assert len(stack.mail(email)) == before + 1, "exactly one sign-in code mail"
    assert killed and "app-2" in {p["name"] for p in stack.state["processes"]}

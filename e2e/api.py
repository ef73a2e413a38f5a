"""Talking to the app without a browser: the test-only clock hook, and customers made over
plain HTTP (the way a browser without JavaScript does it) for journeys that start signed up."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

import httpx

from e2e.mail import Mailbox, count, wait_for_code

PASSWORD = "Blue-Harbor-Lamp-42"  # long enough and not on the common-passwords list
COOLDOWN = 60  # OTP_RESEND_COOLDOWN the suite expects (pinned for the local server)
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass(frozen=True)
class Customer:
    full_name: str
    username: str
    email: str
    password: str = PASSWORD


def new_customer() -> Customer:
    """Unique per call, so tests never share an account."""
    tag = uuid.uuid4().hex[:12]
    return Customer(full_name=f"Ada Tester {tag[:6]}", username=f"e2e_{tag}", email=f"e2e.{tag}@example.com")


def csrf_token(html: str) -> str:
    found = CSRF_FIELD.search(html)
    if not found:
        raise AssertionError(f"no CSRF token in the page:\n{html[:800]}")
    return found.group(1)


class ServerClock:
    """POST/GET /_test/clock: the app's clock, which only exists with APP_ENV=test."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def probe(self) -> str | None:
        """None when the hook answers, otherwise why it cannot be used."""
        try:
            response = httpx.get(f"{self.base_url}/_test/clock", timeout=5.0)
        except httpx.HTTPError as exc:
            return f"GET {self.base_url}/_test/clock failed: {exc!r}"
        if response.status_code != 200:
            return (f"the test-only clock hook is not available (GET {self.base_url}/_test/clock answered "
                    f"{response.status_code}; it exists only with APP_ENV=test)")
        return None

    def now(self) -> datetime:
        response = httpx.get(f"{self.base_url}/_test/clock", timeout=5.0)
        response.raise_for_status()
        return datetime.fromisoformat(response.json()["now"])

    def advance(self, seconds: float) -> datetime:
        """Move the server's clock forward (for every customer: the offset is shared and only grows)."""
        response = httpx.post(f"{self.base_url}/_test/clock", json={"advance": seconds}, timeout=5.0)
        response.raise_for_status()
        return datetime.fromisoformat(response.json()["now"])


class Accounts:
    """Registers customers over HTTP, reading the registration code from the mailbox."""

    def __init__(self, base_url: str, mailbox: Mailbox) -> None:
        self.base_url = base_url
        self.mailbox = mailbox

    def register(self, customer: Customer, *, verify: bool = True) -> None:
        with httpx.Client(base_url=self.base_url, follow_redirects=False, timeout=15.0) as http:
            token = csrf_token(http.get("/register").text)
            before = count(self.mailbox, customer.email)
            form = {"full_name": customer.full_name, "username": customer.username, "email": customer.email,
                    "password": customer.password, "confirm_password": customer.password, "csrf_token": token}
            response = http.post("/register", data=form)
            _expect_redirect(response, "/verify")
            if not verify:
                return
            code = wait_for_code(self.mailbox, customer.email, after=before)
            token = csrf_token(http.get("/verify").text)
            _expect_redirect(http.post("/verify", data={"code": code, "csrf_token": token}), "/dashboard")


def _expect_redirect(response: httpx.Response, location: str) -> None:
    if response.status_code != 303 or response.headers.get("location") != location:
        raise AssertionError(f"{response.request.method} {response.request.url.path}: expected 303 to {location}, got "
                             f"{response.status_code} {response.headers.get('location')}\n{response.text[:800]}")


class ReadyCustomers:
    """Verified customers whose resend cooldown is over, so signing in mails a code at once.

    With the clock hook, the server's clock is moved past the cooldown. Without it (a deployed
    instance), a batch is registered on first use and each one is handed out once its cooldown
    has really passed, so the suite waits about one cooldown in all rather than once per test.
    """

    def __init__(self, accounts: Accounts, clock: ServerClock | None, *, batch: int = 12) -> None:
        self.accounts = accounts
        self.clock = clock
        self.batch = batch
        self._pool: list[tuple[Customer, float]] = []

    def take(self) -> Customer:
        if self.clock is not None:
            customer = new_customer()
            self.accounts.register(customer)
            self.clock.advance(COOLDOWN + 1)
            return customer
        if not self._pool:
            for _ in range(self.batch):
                customer = new_customer()
                self.accounts.register(customer)
                self._pool.append((customer, time.monotonic() + COOLDOWN + 1))
        customer, ready_at = self._pool.pop(0)
        time.sleep(max(0.0, ready_at - time.monotonic()))  # a real wait only without the clock hook
        return customer

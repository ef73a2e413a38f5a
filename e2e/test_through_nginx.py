"""The main journeys in Chromium through the production shape of the shop: `deploy/stack start` (nginx
with TLS and HTTP/2 in front of two app instances, APP_ENV=production, MariaDB, Redis), the browser on
https://localhost:<port> with the self-signed certificate accepted, codes read from the mail files
the stack's SMTP capture writes.

These start their own stack, not the suite's local server: nginx missing skips them with the reason
(CI=true: fails), as do a missing redis-server or an unreachable MariaDB (TEST_MYSQL_URL).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from e2e.api import new_customer
from e2e.mail import Mail, count, wait_for_code
from e2e.pages import DashboardPage, LoginPage, RegisterPage
from tests.test_deploy import missing, stack_tool  # deploy/stack loaded once, as a module

pytestmark = pytest.mark.slow  # each module starts a whole stack (about 10 s)


class StackMailbox:
    """The e2e Mailbox protocol over the stack's mail files."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack

    def messages(self, address: str) -> list[Mail]:
        return [_mail(m) for m in self.stack.mail(address.lower())]


def _mail(message: EmailMessage) -> Mail:
    body = message.get_body(preferencelist=("plain",))
    return Mail(to=tuple(a.strip() for a in str(message["X-Envelope-To"]).split(",")),
                subject=str(message["Subject"]), text=str(body.get_content()) if body else "",
                received=datetime.now(UTC))


@pytest.fixture(scope="module")
def stack() -> Iterator[Any]:
    if not (shutil.which("nginx") or os.access("/usr/sbin/nginx", os.X_OK)):
        missing("nginx is not installed (Debian: apt-get install nginx)")
    run_dir = Path(tempfile.mkdtemp(prefix="computer-shop-e2e-stack-"))
    try:
        # A 1 s resend cooldown: signing in right after signing up mails its code at once.
        launched = stack_tool.Launched.start(run_dir, "--set", "OTP_RESEND_COOLDOWN=1")
    except stack_tool.Unavailable as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        missing(str(exc))
    yield launched
    launched.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser_context_args(stack: Any) -> dict[str, Any]:
    """Every context of this module opens the stack (and accepts its self-signed certificate)."""
    return {"base_url": stack.base_url, "ignore_https_errors": True}


@pytest.fixture(scope="module")
def stack_mailbox(stack: Any) -> StackMailbox:
    return StackMailbox(stack)


def _protocol(page: Page) -> str:
    return str(page.evaluate("() => performance.getEntriesByType('navigation')[0].nextHopProtocol"))


def test_sign_up_sign_in_and_sign_out_through_nginx(page: Page, js: bool, stack: Any,
                                                    stack_mailbox: StackMailbox) -> None:
    customer = new_customer()

    register = RegisterPage(page, js=js).open()
    assert _protocol(page) == "h2"
    assert page.url.startswith(stack.base_url)
    verify = register.register(customer)
    verify.submit_code(wait_for_code(stack_mailbox, customer.email, timeout=20))
    dashboard = DashboardPage(page, js=js).expect_shown(customer)
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["__Host-session"]["secure"], "production sends its session cookie over HTTPS only"
    dashboard.sign_out()

    before = count(stack_mailbox, customer.email)
    page.wait_for_timeout(1_200)  # past the stack's 1 s resend cooldown
    verify = LoginPage(page, js=js).open().sign_in(customer.username, customer.password)
    verify.submit_code(wait_for_code(stack_mailbox, customer.email, after=before, timeout=20))
    dashboard = DashboardPage(page, js=js).expect_shown(customer)
    assert _protocol(page) == "h2"
    dashboard.sign_out()

    page.goto(DashboardPage.path)
    LoginPage(page, js=js).expect_shown()


def test_pages_and_their_static_files_load_over_http2_without_problems(page: Page, stack: Any) -> None:
    responses: list[Any] = []
    page.on("response", lambda response: responses.append(response))
    page.goto("/login")
    page.wait_for_load_state("networkidle")
    expect(page.get_by_role("heading", level=1, name="Sign in")).to_be_visible()
    assert page.evaluate("() => window.htmx && window.htmx.version") == "2.0.11"

    statics = {r.url.removeprefix(stack.base_url): r for r in responses if "/static/" in r.url}
    htmx = statics["/static/vendor/htmx-2.0.11.min.js"]
    assert htmx.status == 200 and "immutable" in htmx.all_headers()["cache-control"]
    assert statics["/static/app.js"].all_headers()["cache-control"] == "no-cache"
    assert "/static/" not in stack.log("app-1") + stack.log("app-2"), "nginx serves static files alone"

"""The staff console in a real browser (issue 18): a staff member set up from the command
line's one-time link, signed in with password and authenticator app; search, a customer's page
and each action (confirmed first), the audit view; on the desktop and on a Pixel 7; axe on
every console page. Runs against the local server (the command line needs its database)."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from typing import Any

import pyotp
import pytest
from playwright.sync_api import Page, expect

from e2e.api import Customer, ServerClock
from e2e.checks import assert_accessible, assert_mobile_friendly
from e2e.mail import Mailbox, count, wait_for_mail
from e2e.pages import expect_step
from e2e.server import LocalServer
from e2e.test_ways_to_sign_in import next_step, server_now

PASSWORD = "Harbor-Lantern-Maple-91"


def create_staff(server: LocalServer, role: str = "admin") -> tuple[str, str]:
    """`python -m app staff create` against the server's database: (email, set-up path)."""
    email = f"staff.{secrets.token_hex(4)}@shop.example"
    done = subprocess.run([sys.executable, "-m", "app", "staff", "create", "--email", email, "--role", role],
                          cwd=server.workdir, env=server.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    link = re.search(r"(/admin/setup/\S+)", done.stdout)
    assert link, done.stdout
    return email, link.group(1)


def set_up_and_sign_in(page: Page, server: LocalServer, clock: ServerClock | None, role: str = "admin") -> str:
    email, path = create_staff(server, role)
    page.goto(path)
    expect_step(page, page.get_by_role("heading", level=1, name="Set up your staff account"))
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Confirm password", exact=True).fill(PASSWORD)
    secret = page.get_by_label("Setup key").inner_text().replace(" ", "")
    page.get_by_label("Code from your authenticator app").fill(pyotp.TOTP(secret).at(server_now(clock)))
    page.get_by_role("button", name="Finish set-up").click()
    expect_step(page, page.get_by_role("heading", level=1, name="Staff sign-in"))
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect_step(page, page.get_by_role("heading", level=1, name="Enter the code from your app"))
    next_step(clock)  # the set-up's code step is used
    page.get_by_label("Code from your authenticator app").fill(pyotp.TOTP(secret).at(server_now(clock)))
    page.get_by_role("button", name="Verify").click()
    expect_step(page, page.get_by_role("heading", level=1, name="Staff console"))
    return email


def open_customer(page: Page, customer: Customer) -> None:
    page.get_by_role("navigation", name="Console").get_by_role("link", name="Customers").click()
    page.get_by_label("Search customers").fill(customer.email[:12])
    page.get_by_role("button", name="Search").click()
    page.get_by_role("link", name=customer.email).click()
    expect_step(page, page.get_by_role("heading", level=1, name=customer.email))


def do(page: Page, button: str) -> None:
    """Press an action, then its confirm button (the same words) in the question that follows."""
    page.get_by_role("button", name=button, exact=True).first.click()
    dialog = page.get_by_role("alertdialog")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name=button, exact=True).click()
    expect(page.get_by_role("status")).to_contain_text("Done")


def console_journey(page: Page, customer: Customer, server: LocalServer, clock: ServerClock | None,
                    mailbox: Mailbox, check: Any = lambda state: None) -> None:
    set_up_and_sign_in(page, server, clock)
    check("console home")
    open_customer(page, customer)
    check("a customer")
    do(page, "Turn codes off")
    expect(page.get_by_text("Sign-in codes").locator("xpath=following-sibling::dd[1]")).to_have_text("off")
    do(page, "Turn codes on")
    do(page, "End all sessions")
    do(page, "Disable account")
    expect(page.get_by_role("button", name="Enable account", exact=True)).to_be_visible()
    check("a customer, disabled")
    do(page, "Enable account")
    page.get_by_role("link", name="Audit of this customer").click()
    expect_step(page, page.get_by_role("heading", level=1, name="Audit"))
    expect(page.get_by_role("cell", name="staff_action")).to_have_count(5)
    check("audit")
    page.get_by_role("navigation", name="Console").get_by_role("link", name="Funnel").click()
    expect_step(page, page.get_by_role("heading", level=1, name="Sign-in funnel"))
    page.get_by_label("Range").select_option("7d")
    expect(page.locator("svg[role=img]").first).to_be_visible()
    expect(page.get_by_role("table").first).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("link", name="Download CSV").first.click()
    assert download.value.suggested_filename.endswith(".csv")
    check("funnel")


def test_console_on_the_desktop(page: Page, ready_customer: Customer, database: LocalServer,
                                optional_clock: ServerClock | None, mailbox: Mailbox) -> None:
    console_journey(page, ready_customer, database, optional_clock, mailbox)


def test_console_on_a_pixel_7(new_context: Any, playwright: Any, ready_customer: Customer, database: LocalServer,
                              optional_clock: ServerClock | None, mailbox: Mailbox, exempt_targets: list[str]) -> None:
    profile = dict(playwright.devices["Pixel 7"])
    profile.pop("default_browser_type", None)
    page = new_context(**profile).new_page()
    console_journey(page, ready_customer, database, optional_clock, mailbox,
                    check=lambda state: assert_mobile_friendly(page, f"Pixel 7, {state}", exempt_targets))


def phone_or_desktop(where: str, page: Page, new_context: Any, playwright: Any) -> Page:
    if where == "desktop":
        return page
    profile = dict(playwright.devices[where])
    profile.pop("default_browser_type", None)
    return new_context(**profile).new_page()


@pytest.mark.parametrize("where", ["desktop", "Pixel 7"])
def test_resend_confirmation_from_the_console(where: str, page: Page, new_context: Any, playwright: Any,
                                              customer: Customer, accounts: Any, database: LocalServer,
                                              optional_clock: ServerClock | None, mailbox: Mailbox) -> None:
    page = phone_or_desktop(where, page, new_context, playwright)
    accounts.register(customer, verify=False)
    before = count(mailbox, customer.email)
    set_up_and_sign_in(page, database, optional_clock)
    open_customer(page, customer)
    do(page, "Resend email confirmation")
    assert wait_for_mail(mailbox, customer.email, after=before).subject == "Confirm your Computer Shop email address"


def test_a_viewer_sees_no_actions(page: Page, ready_customer: Customer, database: LocalServer,
                                  optional_clock: ServerClock | None) -> None:
    set_up_and_sign_in(page, database, optional_clock, role="viewer")
    open_customer(page, ready_customer)
    expect(page.get_by_role("button", name="Disable account")).to_have_count(0)
    expect(page.get_by_role("navigation", name="Console").get_by_role("link", name="Staff")).to_have_count(0)


def test_console_pages_are_accessible(axe_page: Page, ready_customer: Customer, database: LocalServer,
                                      optional_clock: ServerClock | None) -> None:
    page = axe_page
    email, path = create_staff(database)
    page.goto(path)
    assert_accessible(page, "staff set-up")
    page.goto("/admin/login")
    assert_accessible(page, "staff sign-in")
    email, path = create_staff(database)
    page.goto(path)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Confirm password", exact=True).fill(PASSWORD)
    secret = page.get_by_label("Setup key").inner_text().replace(" ", "")
    page.get_by_label("Code from your authenticator app").fill(pyotp.TOTP(secret).at(server_now(optional_clock)))
    page.get_by_role("button", name="Finish set-up").click()
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect_step(page, page.get_by_role("heading", level=1, name="Enter the code from your app"))
    assert_accessible(page, "staff sign-in, the app's code")
    next_step(optional_clock)
    page.get_by_label("Code from your authenticator app").fill(pyotp.TOTP(secret).at(server_now(optional_clock)))
    page.get_by_role("button", name="Verify").click()
    expect_step(page, page.get_by_role("heading", level=1, name="Staff console"))
    assert_accessible(page, "console home")
    for where in ("/admin/customers", "/admin/audit", "/admin/staff", "/admin/funnel", "/admin/abuse"):
        page.goto(where)
        assert_accessible(page, where)
    open_customer(page, ready_customer)
    assert_accessible(page, "a customer")
    page.get_by_role("button", name="Turn codes off", exact=True).first.click()
    expect(page.get_by_role("alertdialog")).to_be_visible()
    assert_accessible(page, "a customer, confirming an action")


@pytest.mark.parametrize("where", ["desktop", "Pixel 7"])
def test_unlock_revoke_devices_and_bypass_from_the_console(where: str, page: Page, new_context: Any, playwright: Any,
                                                            ready_customer: Customer, database: LocalServer,
                                                            optional_clock: ServerClock | None,
                                                            exempt_targets: list[str]) -> None:
    """The actions that need a state the journeys above do not leave: a locked customer with two
    trusted devices and a passkey (made in the server's database directly)."""
    page = phone_or_desktop(where, page, new_context, playwright)
    import sqlite3
    from datetime import UTC, timedelta

    now = server_now(optional_clock).astimezone(UTC).replace(tzinfo=None)
    with sqlite3.connect(database.db_path) as conn:
        cid = conn.execute("SELECT id FROM customers WHERE email = ?", (ready_customer.email,)).fetchone()[0]
        conn.execute("UPDATE customers SET otp_attempts = 3, otp_locked_until = ? WHERE id = ?",
                     (now + timedelta(hours=1), cid))
        for label in ("Firefox on Windows", "Safari on iOS"):
            conn.execute("INSERT INTO trusted_devices (customer_id, token_hash, label, ip, created_at, last_used_at, "
                         "expires_at) VALUES (?, ?, ?, '192.0.2.9', ?, ?, ?)",
                         (cid, secrets.token_hex(32), label, now, now, now + timedelta(days=30)))
        conn.execute("INSERT INTO authenticators (customer_id, type, data, label, created_at, confirmed_at) "
                     "VALUES (?, 'passkey', '{}', 'Old phone', ?, ?)", (cid, now, now))
    set_up_and_sign_in(page, database, optional_clock)
    open_customer(page, ready_customer)
    if where != "desktop":
        assert_mobile_friendly(page, f"{where}, a locked customer", exempt_targets)
    do(page, "Unlock")
    expect(page.get_by_text("Locked").locator("xpath=following-sibling::dd[1]")).to_have_text("no")
    do(page, "Revoke device")  # one of the two
    expect(page.get_by_role("button", name="Revoke device", exact=True)).to_have_count(1)
    do(page, "Revoke all devices")
    expect(page.get_by_role("heading", name="Trusted devices").locator("xpath=following-sibling::p[1]")).to_have_text(
        "None.")
    page.get_by_label("Hours").fill("12")
    page.get_by_label("Reason").fill("Lost phone; ID checked at the counter")
    page.get_by_role("button", name="Grant bypass", exact=True).click()
    page.get_by_role("alertdialog").get_by_role("button", name="Grant bypass", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text("Done")
    expect(page.get_by_text("Second-step bypass").locator("xpath=following-sibling::dd[1]")).to_contain_text("until")

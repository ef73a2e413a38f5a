"""Signing in (username or email, then the emailed code), with codes off, and signing out."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from e2e.api import Accounts, Customer, ServerClock
from e2e.mail import Mailbox, count, wait_for_code, wait_for_mail
from e2e.pages import DashboardPage, LoginPage, VerifyPage
from e2e.server import LocalServer


@pytest.mark.parametrize("login_with", ["username", "email"])
def test_sign_in_with_password_and_emailed_code(
    page: Page, js: bool, ready_customer: Customer, mailbox: Mailbox, login_with: str
) -> None:
    before = count(mailbox, ready_customer.email)
    login = LoginPage(page, js=js).open()
    if js:
        page.evaluate("() => { window.__marker = 1; }")

    verify = login.sign_in(getattr(ready_customer, login_with), ready_customer.password)
    mail = wait_for_mail(mailbox, ready_customer.email, after=before)
    assert re.fullmatch(r"Your Computer Shop sign-in code \([A-Z0-9]{3}\)", mail.subject)
    verify.submit_code(mail.code)

    DashboardPage(page, js=js).expect_shown(ready_customer)
    if js:
        assert page.evaluate("() => window.__marker") == 1, "a step reloaded the page"


def test_sign_in_with_codes_off_goes_straight_to_the_dashboard(
    page: Page, js: bool, customer: Customer, accounts: Accounts, database: LocalServer, mailbox: Mailbox
) -> None:
    accounts.register(customer)
    database.set_otp(customer.email, enabled=False)
    before = count(mailbox, customer.email)

    LoginPage(page, js=js).open().submit(customer.username, customer.password)

    dashboard = DashboardPage(page, js=js).expect_shown(customer)
    expect(page.get_by_role("definition").filter(has_text=re.compile(r"^Off$"))).to_be_visible()
    assert count(mailbox, customer.email) == before, "no code is mailed when codes are off"
    dashboard.sign_out()


def test_wrong_password_is_refused_without_saying_which_part_is_wrong(
    page: Page, js: bool, accounts: Accounts, customer: Customer
) -> None:
    accounts.register(customer)
    login = LoginPage(page, js=js).open()
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/login")) as sent:
        login.submit(customer.username, customer.password + "-wrong")
    assert sent.value.status == 422

    expect(login.alert).to_have_text(LoginPage.WRONG_PASSWORD)
    expect(login.login).to_have_value(customer.username)
    expect(login.password).to_have_value("")

    login.submit("nobody-" + customer.username, customer.password)  # an unknown account: the same words
    expect(login.alert).to_have_text(LoginPage.WRONG_PASSWORD)


def test_sign_out_and_the_old_cookie_no_longer_works(
    page: Page, js: bool, new_context: Any, base_url: str, ready_customer: Customer, mailbox: Mailbox
) -> None:
    before = count(mailbox, ready_customer.email)
    verify = LoginPage(page, js=js).open().sign_in(ready_customer.email, ready_customer.password)
    verify.submit_code(wait_for_code(mailbox, ready_customer.email, after=before))
    dashboard = DashboardPage(page, js=js).expect_shown(ready_customer)
    saved = page.context.cookies()
    assert saved, "a signed-in browser holds a session cookie"

    dashboard.sign_out()
    page.goto(DashboardPage.path)
    LoginPage(page, js=js).expect_shown()

    # Someone who copied the cookie before the sign-out gets nothing with it.
    other = new_context(java_script_enabled=js).new_page()
    other.context.add_cookies(saved)
    other.goto(DashboardPage.path)
    LoginPage(other, js=js).expect_shown()


def test_sign_out_everywhere_ends_the_other_sessions(
    page: Page, new_context: Any, clock: ServerClock, ready_customer: Customer, mailbox: Mailbox
) -> None:
    phone = new_context().new_page()
    for browser_page in (page, phone):
        before = count(mailbox, ready_customer.email)
        verify = LoginPage(browser_page).open().sign_in(ready_customer.username, ready_customer.password)
        verify.submit_code(wait_for_code(mailbox, ready_customer.email, after=before))
        DashboardPage(browser_page).expect_shown(ready_customer)
        clock.advance(61)  # past the resend cooldown, so the next sign-in mails a code at once

    expect(phone.get_by_text("(this device)")).to_be_visible()
    signed_in_browsers = phone.get_by_role("listitem").filter(has_text="signed in").filter(has_text="Chrome")
    expect(signed_in_browsers).to_have_count(2)
    DashboardPage(phone).sign_out_everywhere()

    page.reload()
    LoginPage(page).expect_shown()


def test_code_step_without_a_pending_sign_in_goes_to_sign_in(page: Page, js: bool) -> None:
    page.goto(VerifyPage.path)
    LoginPage(page, js=js).expect_shown()
    page.goto(DashboardPage.path)
    LoginPage(page, js=js).expect_shown()

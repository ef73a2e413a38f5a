"""The journeys on phones (Playwright's 'Pixel 7' and 'iPhone 13' profiles, in Chromium):
nothing scrolls sideways and every control in <main> is at least 44x44 px."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from e2e.api import Customer
from e2e.checks import assert_mobile_friendly
from e2e.mail import Mailbox, count, wait_for_code
from e2e.pages import DashboardPage, LoginPage, RegisterPage

DEVICES = {"Pixel 7": "on Android", "iPhone 13": "Mobile Safari"}  # as the dashboard names them
phones = pytest.mark.parametrize("device_name", list(DEVICES))


@phones
def test_sign_up_fits_a_phone(device_page: Page, device_name: str, customer: Customer, mailbox: Mailbox,
                              exempt_targets: list[str]) -> None:
    page = device_page

    def check(state: str) -> None:
        assert_mobile_friendly(page, f"{device_name}, {state}", exempt_targets)

    page.goto("/")
    check("home")
    register = RegisterPage(page).open()
    check("register")
    register.submit()
    expect(register.alert).to_be_visible()
    check("register with errors")

    verify = register.register(customer)
    check("code step")
    code = wait_for_code(mailbox, customer.email)
    verify.submit_code(f"{(int(code) + 1) % 1_000_000:06d}")
    verify.expect_wrong_code(attempts_left=4)
    check("code step, wrong code")
    verify.submit_code(code)

    dashboard = DashboardPage(page).expect_shown(customer)
    check("dashboard")
    this_device = page.get_by_role("listitem").filter(has_text="(this device)")
    expect(this_device).to_contain_text(DEVICES[device_name])  # the profile really is in use

    login = dashboard.sign_out()
    check("signed out")
    login.submit(customer.username, "not-" + customer.password)
    expect(login.alert).to_have_text(LoginPage.WRONG_PASSWORD)
    check("sign in, wrong password")


@phones
def test_sign_in_fits_a_phone(device_page: Page, device_name: str, ready_customer: Customer, mailbox: Mailbox,
                              exempt_targets: list[str]) -> None:
    page = device_page

    def check(state: str) -> None:
        assert_mobile_friendly(page, f"{device_name}, {state}", exempt_targets)

    before = count(mailbox, ready_customer.email)
    login = LoginPage(page).open()
    check("sign in")
    verify = login.sign_in(ready_customer.email, ready_customer.password)
    check("sign-in code step")
    verify.submit_code(wait_for_code(mailbox, ready_customer.email, after=before))
    DashboardPage(page).expect_shown(ready_customer)
    check("dashboard")

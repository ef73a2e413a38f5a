"""Account settings from the dashboard: change the password, change the address, delete the
account. With and without JavaScript; on a phone."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import Page, expect

from e2e.api import Customer, new_customer
from e2e.checks import assert_mobile_friendly
from e2e.mail import Mailbox, count, wait_for_code, wait_for_mail
from e2e.pages import AccountPage, DashboardPage, LoginPage, VerifyPage

NEW_PASSWORD = "Quiet-Orchard-Lantern-58"


def signed_in(page: Page, customer: Customer, mailbox: Mailbox, *, js: bool = True) -> DashboardPage:
    before = count(mailbox, customer.email)
    verify = LoginPage(page, js=js).open().sign_in(customer.username, customer.password)
    verify.submit_code(wait_for_code(mailbox, customer.email, after=before))
    return DashboardPage(page, js=js).expect_shown(customer)


def test_changing_the_password_signs_out_the_other_devices(
    page: Page, js: bool, ready_customer: Customer, mailbox: Mailbox, new_context: Any
) -> None:
    other = new_context().new_page()
    signed_in(other, ready_customer, mailbox)
    signed_in(page, ready_customer, mailbox, js=js)
    page.get_by_role("link", name="Account settings", exact=True).click()
    account = AccountPage(page, js=js).expect_shown()
    account.change_password("Not-My-Password-1", NEW_PASSWORD)
    expect(account.current_password).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_text("That is not your current password.")).to_be_visible()
    before = count(mailbox, ready_customer.email)
    account.change_password(ready_customer.password, NEW_PASSWORD)
    expect(account.notice).to_have_text("Your password was changed. Every other device was signed out.")
    other.reload()
    LoginPage(other).expect_shown()
    notice = wait_for_mail(mailbox, ready_customer.email, after=before)
    assert notice.subject == "Your Computer Shop password was changed"


def test_changing_the_address_needs_the_code_sent_to_the_new_one(
    page: Page, js: bool, ready_customer: Customer, mailbox: Mailbox
) -> None:
    signed_in(page, ready_customer, mailbox, js=js)
    account = AccountPage(page, js=js).open()
    new_address = new_customer().email
    before_old = count(mailbox, ready_customer.email)
    verify = account.change_email(new_address, ready_customer.password)
    expect(page.get_by_role("main")).to_contain_text(f"We sent a 6-digit code to {new_address}")
    verify.submit_code(wait_for_code(mailbox, new_address))
    account.expect_shown()
    expect(account.notice).to_have_text("Your email address was changed.")
    expect(page.get_by_role("main")).to_contain_text(new_address)
    old = wait_for_mail(mailbox, ready_customer.email, after=before_old)
    assert old.subject == "Your Computer Shop email address was changed"


def test_deleting_the_account_needs_the_password_and_a_code(
    page: Page, js: bool, ready_customer: Customer, mailbox: Mailbox
) -> None:
    signed_in(page, ready_customer, mailbox, js=js)
    account = AccountPage(page, js=js).open()
    before = count(mailbox, ready_customer.email)
    verify = account.delete(ready_customer.password)
    verify.submit_code(wait_for_code(mailbox, ready_customer.email, after=before))
    login = LoginPage(page, js=js).expect_shown()
    expect(login.notice).to_contain_text("Your account has been deleted")
    assert wait_for_mail(mailbox, ready_customer.email, after=before + 1).subject == \
        "Your Computer Shop account was deleted"
    login.submit(ready_customer.username, ready_customer.password)
    expect(login.alert).to_have_text(LoginPage.WRONG_PASSWORD)


def test_cancel_leaves_a_change_of_address_undone(page: Page, ready_customer: Customer, mailbox: Mailbox) -> None:
    signed_in(page, ready_customer, mailbox)
    account = AccountPage(page).open()
    account.change_email(new_customer().email, ready_customer.password)
    page.get_by_role("link", name="Cancel", exact=True).click()
    account.expect_shown()
    expect(page.get_by_role("main")).to_contain_text(ready_customer.email)
    page.goto(VerifyPage.path)
    DashboardPage(page).expect_shown(ready_customer)  # nothing pending any more


@pytest.mark.parametrize("device_name", ["Pixel 7"])
def test_account_settings_fit_a_phone(device_page: Page, device_name: str, ready_customer: Customer,
                                      mailbox: Mailbox, exempt_targets: list[str]) -> None:
    page = device_page
    signed_in(page, ready_customer, mailbox)
    AccountPage(page).open()
    assert_mobile_friendly(page, f"{device_name}, account settings", exempt_targets)
    page.get_by_role("link", name="Delete account", exact=True).click()
    assert_mobile_friendly(page, f"{device_name}, delete account", exempt_targets)

"""Forgot password, as a customer goes through it: from the sign-in page, with and without
JavaScript, on a desktop and on a phone. An unknown address sees the same screens."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from e2e.api import Customer, new_customer
from e2e.checks import assert_mobile_friendly
from e2e.mail import Mailbox, count, wait_for_code, wait_for_mail
from e2e.pages import DashboardPage, ForgotPasswordPage, LoginPage, NewPasswordPage

NEW_PASSWORD = "Quiet-Orchard-Lantern-58"


def test_forgot_password_from_the_sign_in_page_to_the_dashboard(
    page: Page, js: bool, ready_customer: Customer, mailbox: Mailbox, new_context: Any
) -> None:
    elsewhere = new_context().new_page()  # a session that the new password must end
    before = count(mailbox, ready_customer.email)
    verify = LoginPage(elsewhere).open().sign_in(ready_customer.username, ready_customer.password)
    verify.submit_code(wait_for_code(mailbox, ready_customer.email, after=before))
    DashboardPage(elsewhere).expect_shown(ready_customer)

    login = LoginPage(page, js=js).open()
    login.forgot_link.click()
    forgot = ForgotPasswordPage(page, js=js).expect_shown()
    before = count(mailbox, ready_customer.email)
    verify = forgot.ask(ready_customer.email)
    expect(page.get_by_role("main")).to_contain_text(f"If there is an account with {ready_customer.email}")
    mail = wait_for_mail(mailbox, ready_customer.email, after=before)
    assert re.fullmatch(r"Your Computer Shop password reset code \([A-Z0-9]{3}\)", mail.subject)
    verify.submit_code(mail.code)

    new = NewPasswordPage(page, js=js).expect_shown()
    new.set("password")  # too common: said at the field, nothing lost
    expect(new.password).to_have_attribute("aria-invalid", "true")
    new.set(NEW_PASSWORD)
    DashboardPage(page, js=js).expect_shown(ready_customer)
    expect(page.get_by_role("status")).to_contain_text("Your new password is set")

    elsewhere.reload()
    LoginPage(elsewhere).expect_shown()  # every other session ended
    notice = wait_for_mail(mailbox, ready_customer.email, after=before + 1)
    assert notice.subject == "Your Computer Shop password was changed" and "Not you?" in notice.text
    assert "Chrome" in notice.text

    # The new password works; the old one does not.
    elsewhere_login = LoginPage(elsewhere)
    elsewhere_login.submit(ready_customer.username, ready_customer.password)
    expect(elsewhere_login.alert).to_have_text(LoginPage.WRONG_PASSWORD)


def test_an_unknown_address_sees_the_same_screens_and_gets_no_mail(page: Page, js: bool, mailbox: Mailbox,
                                                                   ready_customer: Customer) -> None:
    stranger = new_customer()
    screens = []
    for email in (ready_customer.email, stranger.email):
        page.goto(ForgotPasswordPage.path)
        verify = ForgotPasswordPage(page, js=js).expect_shown().ask(email)
        text = page.get_by_role("main").inner_text()
        screens.append(re.sub(r"password reset [A-Z0-9]{3}", "TAG", re.sub(re.escape(email), "ADDRESS", text)))
        verify.submit_code("000001")
        verify.expect_wrong_code(attempts_left=4)
    assert screens[0] == screens[1]
    assert count(mailbox, stranger.email) == 0


@pytest.mark.parametrize("device_name", ["Pixel 7"])
def test_forgot_password_fits_a_phone(device_page: Page, device_name: str, ready_customer: Customer,
                                      mailbox: Mailbox, exempt_targets: list[str]) -> None:
    page = device_page
    page.goto(LoginPage.path)
    LoginPage(page).forgot_link.click()
    forgot = ForgotPasswordPage(page).expect_shown()
    assert_mobile_friendly(page, f"{device_name}, forgot password", exempt_targets)
    before = count(mailbox, ready_customer.email)
    verify = forgot.ask(ready_customer.email)
    assert_mobile_friendly(page, f"{device_name}, reset code step", exempt_targets)
    verify.submit_code(wait_for_code(mailbox, ready_customer.email, after=before))
    new = NewPasswordPage(page).expect_shown()
    assert_mobile_friendly(page, f"{device_name}, new password", exempt_targets)
    # On a phone the main button takes the whole width.
    button, card = new.set_button.bounding_box(), page.locator("main .card").bounding_box()
    assert button and card and button["width"] > 0.8 * card["width"]
    new.set(NEW_PASSWORD)
    DashboardPage(page).expect_shown(ready_customer)

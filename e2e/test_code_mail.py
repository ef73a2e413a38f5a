"""The code mail's link and "Not you?", as a customer (and a mail scanner) meets them."""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import Page, expect

from e2e.api import Customer
from e2e.mail import Mailbox, count, wait_for_mail
from e2e.pages import DashboardPage, LoginPage, RegisterPage

LINK = re.compile(r"https?://\S+/verify/link/[A-Za-z]+")
STOP = re.compile(r"https?://\S+/not-you/[A-Za-z]+")


def test_the_tag_on_the_step_is_the_one_in_the_mail(page: Page, customer: Customer, mailbox: Mailbox) -> None:
    RegisterPage(page).open().register(customer)
    mail = wait_for_mail(mailbox, customer.email)
    tag = re.search(r"\(([A-Z0-9]{3})\)$", mail.subject).group(1)  # type: ignore[union-attr]
    expect(page.get_by_text(f"Code for registration {tag}")).to_be_visible()


def test_the_link_in_the_browser_that_asked_asks_to_confirm_then_signs_in(
    page: Page, js: bool, ready_customer: Customer, mailbox: Mailbox
) -> None:
    before = count(mailbox, ready_customer.email)
    LoginPage(page, js=js).open().sign_in(ready_customer.username, ready_customer.password)
    link = LINK.search(wait_for_mail(mailbox, ready_customer.email, after=before).text).group()  # type: ignore[union-attr]
    page.goto(link)
    confirm = page.get_by_role("button", name="Confirm sign-in")
    expect(confirm).to_be_visible()
    confirm.click()
    DashboardPage(page, js=js).expect_shown(ready_customer)


def test_the_link_in_another_browser_shows_the_code_and_signs_in_nothing(
    page: Page, new_context: Any, ready_customer: Customer, mailbox: Mailbox
) -> None:
    before = count(mailbox, ready_customer.email)
    verify = LoginPage(page).open().sign_in(ready_customer.username, ready_customer.password)
    mail = wait_for_mail(mailbox, ready_customer.email, after=before)
    other = new_context().new_page()  # the phone the mail was read on
    other.goto(LINK.search(mail.text).group())  # type: ignore[union-attr]
    expect(other.get_by_role("heading", level=1, name="Your code")).to_be_visible()
    expect(other.get_by_role("main")).to_contain_text(mail.code)
    expect(other.get_by_role("button")).to_have_count(0)
    other.goto(DashboardPage.path)
    LoginPage(other).expect_shown()  # nothing signed in there
    verify.submit_code(mail.code)  # typed on the device that asked
    DashboardPage(page).expect_shown(ready_customer)


def test_a_scanner_opening_the_links_changes_nothing(page: Page, ready_customer: Customer, mailbox: Mailbox) -> None:
    before = count(mailbox, ready_customer.email)
    verify = LoginPage(page).open().sign_in(ready_customer.username, ready_customer.password)
    mail = wait_for_mail(mailbox, ready_customer.email, after=before)
    for found in (LINK.search(mail.text), STOP.search(mail.text)):
        assert found is not None
        scanned = page.context.browser.new_context().request.get(found.group())  # type: ignore[union-attr]
        assert scanned.status == 200
    verify.submit_code(mail.code)
    DashboardPage(page).expect_shown(ready_customer)


def test_not_you_stops_the_sign_in_and_points_to_a_new_password(
    page: Page, new_context: Any, ready_customer: Customer, mailbox: Mailbox
) -> None:
    before = count(mailbox, ready_customer.email)
    verify = LoginPage(page).open().sign_in(ready_customer.username, ready_customer.password)
    mail = wait_for_mail(mailbox, ready_customer.email, after=before)
    owner = new_context().new_page()
    owner.goto(STOP.search(mail.text).group())  # type: ignore[union-attr]
    owner.get_by_role("button", name="It was not me: stop it").click()
    expect(owner.get_by_role("heading", level=1, name="We stopped it")).to_be_visible()
    expect(owner.get_by_role("link", name="Choose a new password")).to_be_visible()
    verify.submit_code(mail.code)
    LoginPage(page).expect_shown()  # the pending sign-in was ended


"""The rough edges a new customer hits between the steps (issue 15): the tab's title, Back,
pages of a session that ended, a mistyped address, the password toggle, long addresses on a
small screen, focus that does not shout."""

from __future__ import annotations

import re
from dataclasses import replace

from playwright.sync_api import Page, expect

from e2e.api import Customer, new_customer
from e2e.checks import assert_mobile_friendly
from e2e.mail import Mailbox, count, wait_for_code
from e2e.pages import DashboardPage, LoginPage, RegisterPage, VerifyPage


def signed_in(page: Page, customer: Customer, mailbox: Mailbox, *, js: bool = True) -> DashboardPage:
    before = count(mailbox, customer.email)
    verify = LoginPage(page, js=js).open().sign_in(customer.username, customer.password)
    verify.submit_code(wait_for_code(mailbox, customer.email, after=before))
    return DashboardPage(page, js=js).expect_shown(customer)


def test_the_tab_title_follows_every_step(page: Page, customer: Customer, mailbox: Mailbox) -> None:
    register = RegisterPage(page).open()
    expect(page).to_have_title("Create an account · Computer Shop")
    verify = register.register(customer)
    expect(page).to_have_title("Confirm your email · Computer Shop")
    verify.submit_code(wait_for_code(mailbox, customer.email))
    DashboardPage(page).expect_shown(customer)
    expect(page).to_have_title("Your account · Computer Shop")


def test_signed_in_customers_opening_sign_in_pages_land_on_the_dashboard(
    page: Page, js: bool, ready_customer: Customer, mailbox: Mailbox
) -> None:
    signed_in(page, ready_customer, mailbox, js=js)
    for path in ("/login", "/register", "/password/forgot", "/verify"):
        page.goto(path)
        DashboardPage(page, js=js).expect_shown(ready_customer)


def test_back_after_signing_in_never_shows_an_empty_sign_in_form(
    page: Page, js: bool, ready_customer: Customer, mailbox: Mailbox
) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    signed_in(page, ready_customer, mailbox, js=js)
    page.go_back()
    DashboardPage(page, js=js).expect_shown(ready_customer)
    page.go_back()
    DashboardPage(page, js=js).expect_shown(ready_customer)
    assert dialogs == [], "no 'Confirm form resubmission'"


def test_a_tab_left_open_after_signing_out_says_the_session_ended(
    page: Page, js: bool, ready_customer: Customer, mailbox: Mailbox
) -> None:
    signed_in(page, ready_customer, mailbox, js=js)
    other_tab = page.context.new_page()
    other_tab.goto(DashboardPage.path)
    DashboardPage(other_tab).sign_out()  # signed out in another tab
    # The first tab still shows the dashboard; its buttons now say "you are signed out".
    DashboardPage(page, js=js).sign_out_everywhere_button.click()
    login = LoginPage(page, js=js).expect_shown()
    expect(login.notice).to_have_text("You are signed out.")


def test_a_code_step_left_open_past_its_session_says_so(page: Page, js: bool, customer: Customer,
                                                        mailbox: Mailbox) -> None:
    verify = RegisterPage(page, js=js).open().register(customer)
    code = wait_for_code(mailbox, customer.email)
    page.context.clear_cookies()  # the session is gone (the browser was closed, or it timed out)
    verify.code.fill(code)
    if not js:
        verify.verify_button.click()
    expect(page.get_by_role("heading", level=1, name="Your session has ended")).to_be_visible()
    expect(page.get_by_role("main")).to_contain_text("Your session has ended, please sign in again.")


def test_a_mistyped_address_can_be_changed_on_the_code_step(page: Page, js: bool, customer: Customer,
                                                            mailbox: Mailbox) -> None:
    typo = customer.email.replace("@example.com", "@exmaple.com")
    register = RegisterPage(page, js=js).open()
    register.fill(customer)
    register.email.fill(typo)
    register.submit()
    verify = VerifyPage(page, js=js).expect_shown("registration")
    expect(page.get_by_role("main")).to_contain_text(f"We sent a 6-digit code to {typo}")
    page.get_by_role("link", name="Change email address", exact=True).click()
    email = page.get_by_label("Email", exact=True)
    expect(email).to_have_value(typo)
    email.fill(customer.email)
    page.get_by_role("button", name="Send code", exact=True).click()
    verify.expect_shown("registration")
    expect(page.get_by_role("main")).to_contain_text(f"We sent a 6-digit code to {customer.email}")
    verify.submit_code(wait_for_code(mailbox, customer.email))
    DashboardPage(page, js=js).expect_shown(customer)


def test_start_again_on_the_registration_code_step_goes_back_to_registration(
    page: Page, js: bool, customer: Customer
) -> None:
    verify = RegisterPage(page, js=js).open().register(customer)
    verify.start_again.click()
    expect(RegisterPage(page, js=js).heading).to_be_visible()


def test_a_password_can_be_shown_and_hidden(page: Page) -> None:
    login = LoginPage(page).open()
    toggle = page.get_by_role("button", name="Show password")
    expect(toggle).to_have_attribute("aria-pressed", "false")
    login.password.fill("secret-words")
    toggle.click()
    expect(login.password).to_have_attribute("type", "text")
    expect(page.get_by_role("button", name="Hide password")).to_have_attribute("aria-pressed", "true")
    page.get_by_role("button", name="Hide password").click()
    expect(login.password).to_have_attribute("type", "password")


def test_the_password_toggle_is_not_offered_without_javascript(page: Page, js: bool) -> None:
    if js:
        return
    LoginPage(page, js=False).open()
    expect(page.get_by_role("button", name="Show password")).to_have_count(0)


def test_a_long_address_wraps_on_a_320_px_screen(new_context: object, mailbox: Mailbox,
                                                  exempt_targets: list[str]) -> None:
    page = new_context(viewport={"width": 320, "height": 640}).new_page()  # type: ignore[operator]
    plain = new_customer()
    customer = replace(plain, email="a.very.long.address.that.never.ends." + plain.email.replace("@", ".x@"))
    verify = RegisterPage(page).open().register(customer)
    expect(page.get_by_role("main")).to_contain_text(customer.email)
    assert_mobile_friendly(page, "320 px, code step with a long address", exempt_targets)
    verify.submit_code(wait_for_code(mailbox, customer.email))
    DashboardPage(page).expect_shown(customer)
    assert_mobile_friendly(page, "320 px, dashboard with a long address", exempt_targets)


def test_focus_moved_to_a_heading_draws_no_heavy_box(page: Page, customer: Customer, mailbox: Mailbox) -> None:
    verify = RegisterPage(page).open().register(customer)
    verify.submit_code(wait_for_code(mailbox, customer.email))
    DashboardPage(page).expect_shown(customer)
    focused = page.evaluate("() => { const e = document.activeElement, s = getComputedStyle(e);"
                            " return [e.tagName, s.outlineStyle, s.outlineWidth, s.outlineColor]; }")
    assert focused[0] == "H1", focused
    drawn = focused[1] != "none"
    assert not drawn or (focused[1] == "dashed" and float(re.sub("px", "", focused[2])) <= 2), focused

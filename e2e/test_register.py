"""Creating an account: the form, the emailed registration code, the dashboard."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from e2e.api import Customer
from e2e.mail import Mailbox, count, wait_for_code, wait_for_mail
from e2e.pages import DashboardPage, RegisterPage


def test_register_code_dashboard_with_no_page_reload(page: Page, customer: Customer, mailbox: Mailbox) -> None:
    register = RegisterPage(page).open()
    page.evaluate("() => { window.__marker = 1; }")  # gone if any step reloads the page

    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/register")) as sent:
        verify = register.register(customer)
    assert sent.value.status == 200
    assert sent.value.headers.get("hx-push-url") == "/verify"

    verify.submit_code(wait_for_code(mailbox, customer.email))
    DashboardPage(page).expect_shown(customer)
    assert page.evaluate("() => window.__marker") == 1, "a step reloaded the page"


def test_register_journey(page: Page, js: bool, customer: Customer, mailbox: Mailbox) -> None:
    register = RegisterPage(page, js=js).open()
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/register")) as sent:
        verify = register.register(customer)
    # Without JavaScript the form posts and is redirected; with it, htmx swaps the step in.
    assert sent.value.status == (200 if js else 303)

    # The address just typed is shown whole, so a typo can be seen.
    expect(page.get_by_role("main").get_by_text(f"We sent a 6-digit code to {customer.email}")).to_be_visible()
    mail = wait_for_mail(mailbox, customer.email)
    assert re.fullmatch(r"Your Computer Shop verification code \([A-Z0-9]{3}\)", mail.subject)
    verify.submit_code(mail.code)

    DashboardPage(page, js=js).expect_shown(customer)
    expect(page.get_by_text(customer.username, exact=True)).to_be_visible()
    expect(page.get_by_text(customer.email, exact=True)).to_be_visible()
    # A full load of the pushed URL shows the same step as a whole page.
    page.reload()
    DashboardPage(page, js=js).expect_shown(customer)


def test_register_with_empty_form_explains_every_field(page: Page, js: bool) -> None:
    register = RegisterPage(page, js=js).open()
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/register")) as sent:
        register.submit()
    assert sent.value.status == 422

    expect(register.alert).to_have_text("Please correct the fields marked below.")
    register.expect_field_error(register.full_name, "Enter your full name.")
    register.expect_field_error(register.username, "Choose a username.")
    register.expect_field_error(register.email, "Enter your email address.")
    register.expect_field_error(register.password, "Use at least 8 characters.")
    expect(page).to_have_url(re.compile(r"/register$"))


def test_register_keeps_what_was_typed_and_names_the_problem(page: Page, js: bool, customer: Customer) -> None:
    register = RegisterPage(page, js=js).open()
    register.fill(customer, confirm=customer.password + "x").submit()

    register.expect_field_error(register.confirm_password, "The two passwords do not match.")
    expect(register.full_name).to_have_value(customer.full_name)
    expect(register.username).to_have_value(customer.username)
    expect(register.email).to_have_value(customer.email)
    expect(register.password).to_have_value("")  # passwords are never sent back

    register.password.fill("password123")
    register.confirm_password.fill("password123")
    register.submit()
    register.expect_field_error(register.password, re.compile("too common"))


def test_register_with_a_taken_email_looks_the_same_and_tells_the_owner(
    page: Page, ready_customer: Customer, mailbox: Mailbox
) -> None:
    # A customer whose own code mail is older than a cooldown: an address gets at most one mail
    # nobody asked for a cooldown, so a notice right after that code would wait for the next one.
    customer = ready_customer
    before = count(mailbox, customer.email)
    someone = Customer(full_name="Someone Else", username=customer.username + "x", email=customer.email)

    RegisterPage(page).open().register(someone)  # the same code step as for a new address

    notice = wait_for_mail(mailbox, customer.email, after=before)
    assert notice.subject == "You already have a Computer Shop account"
    assert customer.username in notice.text
    assert not re.search(r"(?m)^\s*\d{6}\s*$", notice.text), "the owner's notice must not carry a code"

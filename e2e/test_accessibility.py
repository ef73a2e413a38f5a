"""axe-core on every state of the journeys: no serious or critical violation.

The pages run in a context that bypasses CSP, only so axe can be injected; the CSP checks
run in every other test's ordinary context.
"""

from __future__ import annotations

from playwright.sync_api import Page, expect

from e2e.api import Customer, ServerClock
from e2e.checks import assert_accessible
from e2e.mail import Mailbox, count, wait_for_code
from e2e.pages import DashboardPage, LoginPage, RegisterPage, VerifyPage


def wrong(code: str, n: int = 1) -> str:
    return f"{(int(code) + n) % 1_000_000:06d}"


def test_sign_up_states(axe_page: Page, customer: Customer, mailbox: Mailbox) -> None:
    page = axe_page
    page.goto("/")
    assert_accessible(page, "home")

    register = RegisterPage(page).open()
    assert_accessible(page, "register, empty")
    register.submit()
    expect(register.alert).to_be_visible()
    assert_accessible(page, "register, with errors")

    verify = register.register(customer)
    assert_accessible(page, "code step (registration)")
    code = wait_for_code(mailbox, customer.email)
    verify.submit_code(wrong(code))
    verify.expect_wrong_code(attempts_left=4)
    assert_accessible(page, "code step, wrong code")
    page.reload()
    verify.expect_shown("registration")
    assert_accessible(page, "code step, full page load")

    verify.submit_code(code)
    dashboard = DashboardPage(page).expect_shown(customer)
    assert_accessible(page, "dashboard")
    dashboard.sign_out()
    assert_accessible(page, "signed out")


def test_sign_in_states(axe_page: Page, ready_customer: Customer, mailbox: Mailbox) -> None:
    page = axe_page
    login = LoginPage(page).open()
    assert_accessible(page, "sign in")
    login.submit(ready_customer.username, "not-" + ready_customer.password)
    expect(login.alert).to_have_text(LoginPage.WRONG_PASSWORD)
    assert_accessible(page, "sign in, wrong password")

    before = count(mailbox, ready_customer.email)
    verify = login.sign_in(ready_customer.username, ready_customer.password)
    assert_accessible(page, "code step (sign-in)")
    code = wait_for_code(mailbox, ready_customer.email, after=before)
    for n, left in enumerate([4, 3, 2, 1], start=1):
        verify.submit_code(wrong(code, n))
        verify.expect_wrong_code(attempts_left=left)
    verify.submit_code(wrong(code, 5))
    expect(verify.alert).to_contain_text("Too many wrong codes.")
    assert_accessible(page, "code step, locked")


def test_expired_and_resent_states(axe_page: Page, customer: Customer, mailbox: Mailbox, clock: ServerClock) -> None:
    page = axe_page
    verify = RegisterPage(page).open().register(customer)
    code = wait_for_code(mailbox, customer.email)
    clock.advance(15 * 60 + 1)
    verify.submit_code(code)
    expect(verify.alert).to_contain_text("This code has expired.")
    assert_accessible(page, "code step, expired")

    verify.resend()
    expect(page.get_by_text("A new code is on its way.")).to_be_visible()
    expect(verify.timer).to_have_text(VerifyPage.TIMER_RUNNING)
    assert_accessible(page, "code step, new code sent")


def test_recovery_and_account_states(axe_page: Page, ready_customer: Customer, mailbox: Mailbox) -> None:
    """The pages issue 15 added: forgot password, the reset step, the new password, account
    settings (with an error), deleting, and the registration's change of address."""
    from e2e.pages import AccountPage, ForgotPasswordPage, NewPasswordPage

    page = axe_page
    page.goto(ForgotPasswordPage.path)
    forgot = ForgotPasswordPage(page).expect_shown()
    assert_accessible(page, "forgot password")
    before = count(mailbox, ready_customer.email)
    verify = forgot.ask(ready_customer.email)
    assert_accessible(page, "code step (reset)")
    verify.submit_code(wait_for_code(mailbox, ready_customer.email, after=before))
    new = NewPasswordPage(page).expect_shown()
    assert_accessible(page, "new password")
    new.set("password")
    expect(new.password).to_have_attribute("aria-invalid", "true")
    assert_accessible(page, "new password, too common")
    new.set(ready_customer.password + "-2")
    DashboardPage(page).expect_shown(ready_customer)
    account = AccountPage(page).open()
    assert_accessible(page, "account settings")
    account.change_password("not-it", "Another-Password-9")
    expect(account.current_password).to_have_attribute("aria-invalid", "true")
    assert_accessible(page, "account settings, wrong current password")
    account.delete_link.click()
    expect(page.get_by_role("heading", level=1, name="Delete your account")).to_be_visible()
    assert_accessible(page, "delete account")


def test_registration_change_of_address_state(axe_page: Page, customer: Customer) -> None:
    page = axe_page
    RegisterPage(page).open().register(customer)
    page.get_by_role("link", name="Change email address", exact=True).click()
    expect(page.get_by_role("heading", level=1, name="Change email address")).to_be_visible()
    assert_accessible(page, "change email address (registration)")

"""Page objects for the sign-up and sign-in steps. They find things the way a person (or a
screen reader) does: by role and accessible name, and by label; never by CSS class or id.

`js` says whether the page runs with JavaScript: with it, htmx swaps each step into
<main> and a 6-digit code submits itself; without it, forms post and redirect.
"""

from __future__ import annotations

import re

from playwright.sync_api import Locator, Page, expect

from e2e.api import Customer

STEP_TITLES = {"registration": "Confirm your email", "login": "Enter your sign-in code", "reset": "Enter your reset code",
               "email": "Confirm your new email address", "delete": "Confirm deleting your account"}
NEW_CODE_NOTICE = "A new code is on its way. The codes we sent before still work until they expire."
ERROR_PAGES = re.compile(r"^(Please start again|Your session has ended|Too many attempts|Something went wrong on our side|"
                         r"We will be back in a moment|Page not found|Not allowed here)$")


def expect_step(page: Page, step: Locator) -> None:
    """Wait for `step` to show; fail at once, with the app's words, if an error page shows instead."""
    error = page.get_by_role("heading", level=1, name=ERROR_PAGES)
    expect(step.or_(error).first).to_be_visible()
    if error.count() and error.first.is_visible():
        raise AssertionError(f"expected {step}, but the app showed: {page.get_by_role('main').inner_text()!r}")


class RegisterPage:
    path = "/register"

    def __init__(self, page: Page, *, js: bool = True) -> None:
        self.page, self.js = page, js
        self.heading = page.get_by_role("heading", level=1, name="Create an account")
        self.full_name = page.get_by_label("Full name", exact=True)
        self.username = page.get_by_label("Username", exact=True)
        self.email = page.get_by_label("Email", exact=True)
        self.password = page.get_by_label("Password", exact=True)
        self.confirm_password = page.get_by_label("Confirm password", exact=True)
        self.submit_button = page.get_by_role("button", name="Create account", exact=True)
        self.alert = page.get_by_role("alert")
        self.sign_in_link = page.get_by_role("link", name="Sign in", exact=True)

    def open(self) -> RegisterPage:
        self.page.goto(self.path)
        expect(self.heading).to_be_visible()
        return self

    def fill(self, customer: Customer, *, confirm: str | None = None) -> RegisterPage:
        self.full_name.fill(customer.full_name)
        self.username.fill(customer.username)
        self.email.fill(customer.email)
        self.password.fill(customer.password)
        self.confirm_password.fill(customer.password if confirm is None else confirm)
        return self

    def submit(self) -> None:
        self.submit_button.click()

    def register(self, customer: Customer) -> VerifyPage:
        """Fill in and send the form; returns the code step once it shows."""
        self.fill(customer).submit()
        return VerifyPage(self.page, js=self.js).expect_shown("registration")

    def expect_field_error(self, field: Locator, message: str | re.Pattern[str]) -> None:
        """The field is marked invalid and its error is part of its accessible description."""
        expect(field).to_have_attribute("aria-invalid", "true")
        expect(field).to_have_accessible_description(message if isinstance(message, re.Pattern)
                                                     else re.compile(re.escape(message)))


class LoginPage:
    path = "/login"
    WRONG_PASSWORD = "That username or email and password do not match an account."

    def __init__(self, page: Page, *, js: bool = True) -> None:
        self.page, self.js = page, js
        self.heading = page.get_by_role("heading", level=1, name="Sign in")
        self.login = page.get_by_label("Username or email", exact=True)
        self.password = page.get_by_label("Password", exact=True)
        self.submit_button = page.get_by_role("button", name="Sign in", exact=True)
        self.alert = page.get_by_role("alert")
        self.notice = page.get_by_role("status")
        self.forgot_link = page.get_by_role("link", name="Forgot password?", exact=True)

    def open(self) -> LoginPage:
        self.page.goto(self.path)
        return self.expect_shown()

    def expect_shown(self) -> LoginPage:
        expect_step(self.page, self.heading)
        expect(self.page).to_have_url(re.compile(r"/login(\?.*)?$"))
        return self

    def submit(self, login: str, password: str) -> None:
        self.login.fill(login)
        self.password.fill(password)
        self.submit_button.click()

    def sign_in(self, login: str, password: str) -> VerifyPage:
        """Password step of a customer with sign-in codes on; returns the code step."""
        self.submit(login, password)
        return VerifyPage(self.page, js=self.js).expect_shown("login")


class VerifyPage:
    path = "/verify"
    TIMER_RUNNING = re.compile(r"^\s*You can ask for a new code in (\d+) s\.\s*$")
    TIMER_DONE = "You can ask for a new code now."

    def __init__(self, page: Page, *, js: bool = True) -> None:
        self.page, self.js = page, js
        self.code = page.get_by_label("Verification code", exact=True)
        self.verify_button = page.get_by_role("button", name="Verify", exact=True)
        self.resend_button = page.get_by_role("button", name="Resend code", exact=True)
        self.timer = page.get_by_role("timer")
        self.alert = page.get_by_role("alert")
        self.start_again = page.get_by_role("link", name="Start again", exact=True)

    def heading(self, purpose: str) -> Locator:
        return self.page.get_by_role("heading", level=1, name=STEP_TITLES[purpose])

    def open(self, purpose: str) -> VerifyPage:
        self.page.goto(self.path)
        return self.expect_shown(purpose)

    def expect_shown(self, purpose: str) -> VerifyPage:
        expect_step(self.page, self.heading(purpose))
        expect(self.page).to_have_url(re.compile(r"/verify$"))
        expect(self.code).to_be_visible()
        return self

    def submit_code(self, code: str) -> None:
        """Enter a code as a person would. With JavaScript the sixth digit sends the form by
        itself (so pressing Verify too would send it twice); without, press Verify."""
        if self.js:
            # app.js marks the field once it listens; filling it earlier would not auto-submit.
            expect(self.code).to_have_attribute("data-wired", "1")
            self.code.fill(code)
        else:
            self.code.fill(code)
            self.verify_button.click()

    def expect_wrong_code(self, attempts_left: int) -> None:
        word = "attempt" if attempts_left == 1 else "attempts"
        message = f"That code is not right. {attempts_left} {word} left."
        expect_step(self.page, self.alert.filter(has_text=message))
        expect(self.alert).to_have_text(message)
        expect(self.code).to_have_accessible_description(re.compile("That code is not right"))

    def seconds_left(self) -> int:
        """The resend countdown as shown (fails when it is not running)."""
        text = self.timer.inner_text().strip()
        found = self.TIMER_RUNNING.match(text)
        if not found:
            raise AssertionError(f"the resend countdown is not running: {text!r}")
        return int(found.group(1))

    def resend(self) -> None:
        """Ask for a new code and wait, as a person would, for the step that says it is coming.
        The mail can land before the browser has swapped that step in; typing the new code
        into the field being replaced loses it."""
        self.resend_button.click()
        expect(self.page.get_by_text(NEW_CODE_NOTICE)).to_be_visible()


class DashboardPage:
    path = "/dashboard"

    def __init__(self, page: Page, *, js: bool = True) -> None:
        self.page, self.js = page, js
        self.sign_out_button = page.get_by_role("button", name="Sign out", exact=True)
        self.sign_out_everywhere_button = page.get_by_role("button", name="Sign out everywhere", exact=True)

    def heading(self, customer: Customer) -> Locator:
        return self.page.get_by_role("heading", level=1, name=f"Hello, {customer.full_name}", exact=True)

    def expect_shown(self, customer: Customer) -> DashboardPage:
        expect_step(self.page, self.heading(customer))
        expect(self.page).to_have_url(re.compile(r"/dashboard$"))
        return self

    def sign_out(self) -> LoginPage:
        self.sign_out_button.click()
        login = LoginPage(self.page, js=self.js).expect_shown()
        expect(login.notice).to_have_text("You are signed out.")
        return login

    def sign_out_everywhere(self) -> LoginPage:
        self.sign_out_everywhere_button.click()
        login = LoginPage(self.page, js=self.js).expect_shown()
        expect(login.notice).to_have_text("You are signed out on every device.")
        return login


class ForgotPasswordPage:
    path = "/password/forgot"

    def __init__(self, page: Page, *, js: bool = True) -> None:
        self.page, self.js = page, js
        self.heading = page.get_by_role("heading", level=1, name="Forgot your password?")
        self.email = page.get_by_label("Email", exact=True)
        self.send_button = page.get_by_role("button", name="Send code", exact=True)

    def expect_shown(self) -> ForgotPasswordPage:
        expect_step(self.page, self.heading)
        return self

    def ask(self, email: str) -> VerifyPage:
        self.email.fill(email)
        self.send_button.click()
        return VerifyPage(self.page, js=self.js).expect_shown("reset")


class NewPasswordPage:
    path = "/password/new"

    def __init__(self, page: Page, *, js: bool = True) -> None:
        self.page, self.js = page, js
        self.heading = page.get_by_role("heading", level=1, name="Choose a new password")
        self.password = page.get_by_label("New password", exact=True)
        self.confirm = page.get_by_label("Confirm new password", exact=True)
        self.set_button = page.get_by_role("button", name="Set password", exact=True)

    def expect_shown(self) -> NewPasswordPage:
        expect_step(self.page, self.heading)
        expect(self.page).to_have_url(re.compile(r"/password/new$"))
        return self

    def set(self, password: str) -> None:
        self.password.fill(password)
        self.confirm.fill(password)
        self.set_button.click()


class AccountPage:
    path = "/account"

    def __init__(self, page: Page, *, js: bool = True) -> None:
        self.page, self.js = page, js
        self.heading = page.get_by_role("heading", level=1, name="Account settings")
        self.current_password = page.get_by_label("Current password", exact=True)
        self.new_password = page.get_by_label("New password", exact=True)
        self.confirm_new_password = page.get_by_label("Confirm new password", exact=True)
        self.change_password_button = page.get_by_role("button", name="Change password", exact=True)
        self.new_email = page.get_by_label("New email", exact=True)
        self.email_password = page.get_by_role("form", name="Change email address").get_by_label("Password", exact=True)
        self.change_email_button = page.get_by_role("button", name="Change email", exact=True)
        self.delete_link = page.get_by_role("link", name="Delete account", exact=True)
        self.notice = page.get_by_role("status")

    def open(self) -> AccountPage:
        self.page.goto(self.path)
        return self.expect_shown()

    def expect_shown(self) -> AccountPage:
        expect_step(self.page, self.heading)
        return self

    def change_password(self, current: str, new: str) -> None:
        self.current_password.fill(current)
        self.new_password.fill(new)
        self.confirm_new_password.fill(new)
        self.change_password_button.click()

    def change_email(self, new_email: str, password: str) -> VerifyPage:
        self.new_email.fill(new_email)
        self.email_password.fill(password)
        self.change_email_button.click()
        return VerifyPage(self.page, js=self.js).expect_shown("email")

    def delete(self, password: str) -> VerifyPage:
        self.delete_link.click()
        expect_step(self.page, self.page.get_by_role("heading", level=1, name="Delete your account"))
        self.page.get_by_label("Password", exact=True).fill(password)
        self.page.get_by_role("button", name="Delete account", exact=True).click()
        return VerifyPage(self.page, js=self.js).expect_shown("delete")

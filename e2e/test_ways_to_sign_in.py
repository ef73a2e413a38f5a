"""Ways to sign in (issue 17) in a real browser: enrol an authenticator app and sign in with
it, a backup code, trust a device and revoke it, a password reset that asks for the app, on the
desktop and on a Pixel 7; passkeys with Chromium's virtual authenticator (CDP WebAuthn domain):
register, sign in through autofill and with the button, a replayed assertion refused, remove;
and the page without JavaScript."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pyotp
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from e2e.api import Customer, ServerClock
from e2e.checks import assert_accessible, assert_mobile_friendly
from e2e.mail import Mailbox, count, wait_for_code, wait_for_mail
from e2e.pages import DashboardPage, LoginPage, expect_step


def server_now(clock: ServerClock | None) -> datetime:
    return clock.now() if clock is not None else datetime.now(UTC)


def next_step(clock: ServerClock | None) -> None:
    """An app code is accepted once per 30-s step: move to the next one."""
    if clock is not None:
        clock.advance(31)
    else:
        import time

        time.sleep(31)


class Security:
    """/account/security, as a customer finds it: by roles, labels and visible text."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.heading = page.get_by_role("heading", level=1, name="Ways to sign in")

    def open(self) -> Security:
        self.page.goto("/dashboard")
        self.page.get_by_role("link", name="Ways to sign in").click()
        expect_step(self.page, self.heading)
        return self

    def enrol_app(self, clock: ServerClock | None) -> tuple[str, list[str]]:
        self.page.get_by_role("link", name="Set up authenticator app").click()
        expect_step(self.page, self.page.get_by_role("heading", level=1, name="Set up authenticator app"))
        expect(self.page.get_by_role("img", name=re.compile("QR code"))).to_be_visible()
        secret = self.page.get_by_label("Setup key").inner_text().replace(" ", "")
        self.page.get_by_label("Code from your authenticator app").fill(pyotp.TOTP(secret).at(server_now(clock)))
        self.page.get_by_role("button", name="Turn on authenticator app").click()
        codes = self.backup_codes()
        self.page.get_by_role("link", name="I saved my codes").click()
        expect_step(self.page, self.heading)
        expect(self.page.get_by_text("Set up. Sign-ins ask for the 6-digit code")).to_be_visible()
        return secret, codes

    def backup_codes(self) -> list[str]:
        expect_step(self.page, self.page.get_by_role("heading", level=1, name="Your backup codes"))
        codes = [c.strip() for c in self.page.get_by_role("list", name="Backup codes").get_by_role("listitem")
                 .all_inner_texts()]
        assert len(codes) == 10 and all(re.fullmatch(r"[A-Z0-9]{5}-[A-Z0-9]{5}", c) for c in codes), codes
        return codes


class FactorPage:
    def __init__(self, page: Page) -> None:
        self.page = page

    def expect_shown(self, heading: str = "Confirm it’s you") -> FactorPage:
        expect_step(self.page, self.page.get_by_role("heading", level=1, name=heading))
        return self

    def app_code(self, code: str, *, trust: bool = False) -> None:
        form = self.page.get_by_role("form", name="Authenticator app")
        form.get_by_label("Code from your authenticator app").fill(code)
        if trust:
            form.get_by_label(re.compile("Don’t ask again on this device")).check()
        form.get_by_role("button", name="Verify").click()

    def backup_code(self, code: str) -> None:
        field = self.page.get_by_label("Backup code")
        if not field.is_visible():
            self.page.get_by_text("Use a backup code", exact=True).click()
        field.fill(code)
        self.page.get_by_role("button", name="Use backup code").click()


def sign_in_with_password(page: Page, customer: Customer) -> None:
    login = LoginPage(page).open()
    login.submit(customer.username, customer.password)


def signed_in_with_code(page: Page, customer: Customer, mailbox: Mailbox) -> None:
    before = count(mailbox, customer.email)
    verify = LoginPage(page).open().sign_in(customer.username, customer.password)
    verify.submit_code(wait_for_code(mailbox, customer.email, after=before))
    DashboardPage(page).expect_shown(customer)


def app_journey(page: Page, customer: Customer, mailbox: Mailbox, clock: ServerClock | None,
                check: Any = lambda state: None) -> None:
    signed_in_with_code(page, customer, mailbox)
    security = Security(page).open()
    check("ways to sign in")
    secret, codes = security.enrol_app(clock)
    added = wait_for_mail(mailbox, customer.email, after=count(mailbox, customer.email) - 1)
    assert added.subject == "A new way to sign in was added to your Computer Shop account"
    page.goto("/dashboard")
    DashboardPage(page).expect_shown(customer).sign_out()

    mails = count(mailbox, customer.email)
    sign_in_with_password(page, customer)
    factor = FactorPage(page).expect_shown()
    check("second step, app")
    next_step(clock)
    factor.app_code(f"{(int(pyotp.TOTP(secret).at(server_now(clock))) + 1) % 1_000_000:06d}")
    expect(page.get_by_role("alert")).to_contain_text("That code from your authenticator app is not right. 4 attempts left.")
    factor.app_code(pyotp.TOTP(secret).at(server_now(clock)))
    DashboardPage(page).expect_shown(customer)
    expect(page.get_by_role("listitem").filter(has_text="(this device)")).to_contain_text("Password and authenticator app")
    assert count(mailbox, customer.email) == mails, "no code mail for a customer with an app"

    DashboardPage(page).sign_out()
    sign_in_with_password(page, customer)
    FactorPage(page).expect_shown().backup_code(codes[0].lower())
    DashboardPage(page).expect_shown(customer)
    expect(page.get_by_text("9 backup codes left")).to_be_visible()
    used = wait_for_mail(mailbox, customer.email, after=mails)
    assert used.subject == "A Computer Shop backup code was used"


def test_app_and_backup_code_on_the_desktop(page: Page, ready_customer: Customer, mailbox: Mailbox,
                                            optional_clock: ServerClock | None) -> None:
    app_journey(page, ready_customer, mailbox, optional_clock)


def test_app_and_backup_code_on_a_pixel_7(new_context: Any, playwright: Any, ready_customer: Customer,
                                         mailbox: Mailbox, optional_clock: ServerClock | None,
                                         exempt_targets: list[str]) -> None:
    profile = dict(playwright.devices["Pixel 7"])
    profile.pop("default_browser_type", None)
    page = new_context(**profile).new_page()
    app_journey(page, ready_customer, mailbox, optional_clock,
                check=lambda state: assert_mobile_friendly(page, f"Pixel 7, {state}", exempt_targets))


def test_trust_a_device_then_revoke_it(page: Page, ready_customer: Customer, mailbox: Mailbox,
                                       optional_clock: ServerClock | None) -> None:
    customer, clock = ready_customer, optional_clock
    signed_in_with_code(page, customer, mailbox)
    secret, _ = Security(page).open().enrol_app(clock)
    page.goto("/dashboard")
    DashboardPage(page).sign_out()
    sign_in_with_password(page, customer)
    next_step(clock)
    FactorPage(page).expect_shown().app_code(pyotp.TOTP(secret).at(server_now(clock)), trust=True)
    DashboardPage(page).expect_shown(customer).sign_out()

    sign_in_with_password(page, customer)  # the password still, the second step no more
    DashboardPage(page).expect_shown(customer)
    expect(page.get_by_role("listitem").filter(has_text="(this device)")).to_contain_text("Password on a trusted device")

    security = Security(page).open()
    page.get_by_role("button", name=re.compile("^Stop trusting (?!all)")).click()
    expect(page.get_by_role("status")).to_have_text("That device will be asked for the second step again.")
    expect(security.page.get_by_text("None. Tick “Don’t ask again on this device”")).to_be_visible()
    page.goto("/dashboard")
    DashboardPage(page).sign_out()
    sign_in_with_password(page, customer)
    FactorPage(page).expect_shown()


def test_reset_of_a_customer_with_an_app_asks_for_it(page: Page, ready_customer: Customer, mailbox: Mailbox,
                                                     optional_clock: ServerClock | None) -> None:
    customer, clock = ready_customer, optional_clock
    signed_in_with_code(page, customer, mailbox)
    secret, _ = Security(page).open().enrol_app(clock)
    page.goto("/dashboard")
    DashboardPage(page).sign_out()
    next_step(clock)
    next_step(clock)  # past the code cooldown too
    before = count(mailbox, customer.email)
    page.goto("/login")
    page.get_by_role("link", name="Forgot password?").click()
    page.get_by_label("Email").fill(customer.email)
    page.get_by_role("button", name="Send code").click()
    page.get_by_label("Verification code").fill(wait_for_code(mailbox, customer.email, after=before))
    page.get_by_role("button", name="Verify").click()
    factor = FactorPage(page).expect_shown("One more step to reset your password")
    factor.app_code(pyotp.TOTP(secret).at(server_now(clock)))
    expect_step(page, page.get_by_role("heading", level=1, name="Choose a new password"))
    new = customer.password + "-reset"
    page.get_by_label("New password", exact=True).fill(new)
    page.get_by_label("Confirm new password", exact=True).fill(new)
    page.get_by_role("button", name="Set password").click()
    DashboardPage(page).expect_shown(customer)


def test_factor_page_is_accessible(axe_page: Page, ready_customer: Customer, mailbox: Mailbox,
                                   optional_clock: ServerClock | None) -> None:
    page = axe_page
    signed_in_with_code(page, ready_customer, mailbox)
    security = Security(page).open()
    assert_accessible(page, "ways to sign in")
    page.get_by_role("link", name="Set up authenticator app").click()
    assert_accessible(page, "set up authenticator app")
    page.goto("/account/security")
    security.enrol_app(optional_clock)
    page.goto("/dashboard")
    DashboardPage(page).sign_out()
    sign_in_with_password(page, ready_customer)
    FactorPage(page).expect_shown()
    assert_accessible(page, "second step with an app")


# --- passkeys, with Chromium's virtual authenticator ---------------------------------------------


@pytest.fixture
def localhost(base_url: str) -> str:
    """WebAuthn needs a host name, not an IP address: the same local server as localhost."""
    if "127.0.0.1" not in base_url and "localhost" not in base_url:
        pytest.skip("the virtual authenticator journeys run against a local server")
    return base_url.replace("127.0.0.1", "localhost")


@pytest.fixture
def browser_context_args(browser_context_args: dict[str, Any], request: pytest.FixtureRequest) -> dict[str, Any]:
    """The passkey journeys' contexts talk to localhost (pytest-playwright passes base_url)."""
    if "localhost" in request.fixturenames:
        return {**browser_context_args, "base_url": request.getfixturevalue("localhost")}
    return browser_context_args


@pytest.fixture
def passkey_context(new_context: Any, localhost: str) -> BrowserContext:
    return new_context()


def virtual_authenticator(page: Page) -> tuple[Any, str]:
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable", {"enableUI": False})
    found = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True, "hasUserVerification": True,
        "isUserVerified": True, "automaticPresenceSimulation": True}})
    return cdp, found["authenticatorId"]


def test_passkeys_register_sign_in_replay_and_remove(passkey_context: BrowserContext, ready_customer: Customer,
                                                     mailbox: Mailbox, new_context: Any) -> None:
    customer = ready_customer
    page = passkey_context.new_page()
    cdp, authenticator = virtual_authenticator(page)
    signed_in_with_code(page, customer, mailbox)
    Security(page).open()
    page.get_by_label("Passkey name").fill("My laptop")
    page.get_by_role("button", name="Add a passkey").click()
    codes = Security(page).backup_codes()  # the first strong factor: its backup codes, once
    page.get_by_role("link", name="I saved my codes").click()
    expect(page.get_by_role("listitem").filter(has_text="My laptop")).to_be_visible()
    creds = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})["credentials"]
    assert len(creds) == 1 and creds[0]["isResidentCredential"]

    # Autofill: the sign-in page asks the browser for a passkey in the username field's
    # suggestions at once; the virtual authenticator answers as a customer picking it would, so
    # signing out lands on the sign-in page, which signs in again through autofill.
    assertions: list[str] = []
    page.on("request", lambda r: assertions.append(r.post_data or "") if r.url.endswith("/passkey/verify") else None)
    page.goto("/dashboard")
    with page.expect_request(lambda r: r.url.endswith("/passkey/verify")):
        page.get_by_role("button", name="Sign out", exact=True).click()
    DashboardPage(page).expect_shown(customer)
    expect(page.get_by_role("listitem").filter(has_text="(this device)")).to_contain_text("Passkey")
    # The visible button, for browsers that do not offer passkeys in autofill.
    page.add_init_script("PublicKeyCredential.isConditionalMediationAvailable = async () => false;")
    page.goto("/dashboard")  # a new document, where the browser offers no autofill
    DashboardPage(page).sign_out()
    page.get_by_role("button", name="Sign in with a passkey").click()
    DashboardPage(page).expect_shown(customer)
    assert len(assertions) == 2

    # The same assertion again (its challenge was used): refused, nothing signed in.
    body = json.loads(assertions[-1])
    other = new_context().new_page()
    other.goto("/login")
    token = other.locator("input[name=csrf_token]").first.get_attribute("value")
    answer = other.request.post("/passkey/verify", data=json.dumps(body),
                                headers={"Content-Type": "application/json", "X-CSRF-Token": token or ""})
    assert "error" in answer.json() and "redirect" not in answer.json(), answer.text()

    # A password sign-in now asks for the passkey (or a backup code); without JavaScript the
    # page says why the passkey cannot be used and offers the backup code.
    nojs = new_context(java_script_enabled=False).new_page()
    sign_in_with_password(nojs, customer)
    FactorPage(nojs).expect_shown()
    expect(nojs.get_by_text(re.compile("Passkeys need JavaScript"))).to_be_visible()
    FactorPage(nojs).backup_code(codes[0])
    DashboardPage(nojs).expect_shown(customer)

    # As the second step after the password, then remove it.
    page.goto("/dashboard")
    DashboardPage(page).sign_out()
    sign_in_with_password(page, customer)
    FactorPage(page).expect_shown()
    page.get_by_role("button", name="Use a passkey").click()
    DashboardPage(page).expect_shown(customer)
    Security(page).open()
    page.get_by_role("button", name="Remove passkey My laptop").click()
    expect(page.get_by_role("status")).to_have_text("The passkey was removed.")
    page.goto("/dashboard")
    DashboardPage(page).sign_out()
    before = count(mailbox, customer.email)
    LoginPage(page).open().sign_in(customer.username, customer.password)  # back to the emailed code
    assert wait_for_code(mailbox, customer.email, after=before)

"""The code step: wrong codes, the lock after five, expiry, and asking for a new code."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta, timezone
from typing import Any

from playwright.sync_api import Page, Response, expect

from e2e.api import COOLDOWN, Customer, ServerClock
from e2e.mail import Mailbox, count, wait_for_code
from e2e.pages import NEW_CODE_NOTICE, DashboardPage, LoginPage, RegisterPage, VerifyPage

# Regular expressions see the text as it is (to_have_text does not squeeze it for them).
# Locked: the time in the same sentence; with JavaScript in the customer's own clock
# ("until 16:40"), without it in words ("for 1 more minute").
# "until 14:05", or with the day when the lock ends on another day in the customer's time zone
# ("until 29 Nov 2026, 00:17"), or "for ..." without JavaScript's clock.
LOCKED = re.compile(r"^\s*Too many wrong codes\.\s+For your safety, codes are paused\s+"
                    r"(until (?:(\d{1,2} [A-Z][a-z]{2} \d{4}), )?(\d{2}:\d{2})|until [^.]+|for [^.]+)\."
                    r"\s+You can enter a code again after that\.\s*$", re.S)
EXPIRED = re.compile(r"^\s*This code has expired\.\s+(Request a new one\.\s+)?Press “Resend code” for a new one\.\s*$")


def wrong(code: str, n: int = 1) -> str:
    """A code that is certainly not `code`."""
    return f"{(int(code) + n) % 1_000_000:06d}"


def posts_to(path: str) -> Callable[[Response], bool]:
    return lambda r: r.request.method == "POST" and r.url.endswith(path)


def test_wrong_code_says_how_many_attempts_are_left(page: Page, js: bool, customer: Customer, mailbox: Mailbox) -> None:
    verify = RegisterPage(page, js=js).open().register(customer)
    code = wait_for_code(mailbox, customer.email)

    with page.expect_response(posts_to("/verify")) as sent:
        verify.submit_code(wrong(code))
    assert sent.value.status == 422
    verify.expect_wrong_code(attempts_left=4)
    expect(verify.code).to_have_attribute("aria-invalid", "true")

    verify.submit_code(code)
    DashboardPage(page, js=js).expect_shown(customer)


def test_five_wrong_codes_lock_the_code_step(page: Page, js: bool, customer: Customer, mailbox: Mailbox) -> None:
    verify = RegisterPage(page, js=js).open().register(customer)
    code = wait_for_code(mailbox, customer.email)

    for n, left in enumerate([4, 3, 2, 1], start=1):
        verify.submit_code(wrong(code, n))
        verify.expect_wrong_code(attempts_left=left)
    verify.submit_code(wrong(code, 5))

    expect(verify.alert).to_have_text(LOCKED)
    # While locked nothing can be entered, and the resend timer does not say otherwise (the
    # server refuses even the right code: tests/test_otp_engine.py).
    expect(verify.code).to_be_disabled()
    expect(verify.verify_button).to_be_disabled()
    expect(verify.resend_button).to_be_disabled()
    expect(page.get_by_text("You can ask for a new code once codes are no longer paused.")).to_be_visible()
    expect(page).to_have_url(re.compile(r"/verify$"))
    del code


def test_lockout_ends_at_the_time_it_states(new_context: Any, customer: Customer, mailbox: Mailbox,
                                            clock: ServerClock) -> None:
    """In the customer's own time zone (here India, UTC+05:30, read as a 24-hour clock)."""
    page = new_context(timezone_id="Asia/Kolkata", locale="en-GB").new_page()
    verify = RegisterPage(page).open().register(customer)
    code = wait_for_code(mailbox, customer.email)
    for n, left in enumerate([4, 3, 2, 1], start=1):
        verify.submit_code(wrong(code, n))
        verify.expect_wrong_code(attempts_left=left)
    before = clock.now()
    verify.submit_code(wrong(code, 5))
    expect(verify.alert).to_have_text(LOCKED)
    after = clock.now()

    shown = LOCKED.match(verify.alert.inner_text())
    assert shown is not None and shown.group(3), verify.alert.inner_text()
    first_lock = timedelta(seconds=60)  # OTP lockout schedule: 60 s, then 5, 15, 60 minutes
    india = timezone(timedelta(hours=5, minutes=30))
    ends = [(t + first_lock).astimezone(india) for t in (before, after)]
    allowed = {t.strftime("%H:%M") for t in ends}
    assert shown.group(3) in allowed, f"locked until {shown.group(3)}, expected one of {allowed} (Indian time)"
    if shown.group(2):  # the day is named only when it is not today there
        days = {f"{t.day} {t.strftime('%b %Y')}" for t in ends}
        assert shown.group(2) in days, shown.group(0)
    expect(verify.code).to_be_disabled()
    expect(verify.verify_button).to_be_disabled()

    clock.advance(61)  # past the lock, and past the resend cooldown
    page.reload()
    expect(verify.resend_button).to_be_enabled()
    sent = count(mailbox, customer.email)
    verify.resend()
    verify.submit_code(wait_for_code(mailbox, customer.email, after=sent))
    DashboardPage(page).expect_shown(customer)


def test_registration_code_expires_after_15_minutes(page: Page, js: bool, customer: Customer, mailbox: Mailbox,
                                                    clock: ServerClock) -> None:
    verify = RegisterPage(page, js=js).open().register(customer)
    code = wait_for_code(mailbox, customer.email)

    clock.advance(15 * 60 + 1)
    verify.submit_code(code)
    expect(verify.alert).to_have_text(EXPIRED)

    before = count(mailbox, customer.email)
    verify.resend()
    verify.submit_code(wait_for_code(mailbox, customer.email, after=before))
    DashboardPage(page, js=js).expect_shown(customer)


def test_sign_in_code_expires_after_10_minutes(page: Page, clock: ServerClock, ready_customer: Customer,
                                               mailbox: Mailbox) -> None:
    before = count(mailbox, ready_customer.email)
    verify = LoginPage(page).open().sign_in(ready_customer.username, ready_customer.password)
    code = wait_for_code(mailbox, ready_customer.email, after=before)

    clock.advance(10 * 60 + 1)
    page.reload()  # a full load says so before anything is typed
    expect(verify.alert).to_have_text(EXPIRED)
    verify.submit_code(code)
    expect(verify.alert).to_have_text(EXPIRED)
    expect(page).to_have_url(re.compile(r"/verify$"))


def test_resend_countdown_is_shown_and_counts_down(page: Page, js: bool, customer: Customer) -> None:
    verify = RegisterPage(page, js=js).open().register(customer)

    expect(verify.timer).to_have_text(VerifyPage.TIMER_RUNNING)
    expect(verify.resend_button).to_be_disabled()
    first = verify.seconds_left()
    assert 0 < first <= COOLDOWN
    if js:
        expect(verify.timer).not_to_have_text(f"You can ask for a new code in {first} s.")
        assert verify.seconds_left() < first
    else:
        # Nothing ticks without JavaScript: a <noscript> paragraph links back to the step (a
        # reload would send the last form again). get_by_text skips <noscript>, hence the role.
        hint = page.get_by_role("paragraph").filter(has_text="When the time is up, check again")
        expect(hint).to_be_visible()
        hint.get_by_role("link", name="check again").click()
        expect(page).to_have_url(re.compile(r"/verify$"))
        assert verify.seconds_left() <= first
    expect(verify.resend_button).to_be_disabled()


def test_resend_after_the_cooldown_sends_a_new_code_and_the_first_mails_code_still_works(
    page: Page, js: bool, customer: Customer, mailbox: Mailbox, clock: ServerClock
) -> None:
    """The late-mail case: the customer gave up waiting, pressed Resend, and then the first mail
    arrived. Its code signs in: every code of the step works until it expires."""
    verify = RegisterPage(page, js=js).open().register(customer)
    first = wait_for_code(mailbox, customer.email)

    clock.advance(COOLDOWN + 1)
    page.reload()
    expect(verify.timer).to_have_text(VerifyPage.TIMER_DONE)
    expect(verify.resend_button).to_be_enabled()

    before = count(mailbox, customer.email)
    with page.expect_response(posts_to("/verify/resend")) as sent:
        verify.resend()
    assert sent.value.status == (200 if js else 303)
    expect(page.get_by_text(NEW_CODE_NOTICE)).to_be_visible()
    expect(page.get_by_role("main")).to_contain_text("Any code we sent you for this registration works until it expires")
    expect(verify.timer).to_have_text(VerifyPage.TIMER_RUNNING)  # the cooldown starts again
    expect(verify.resend_button).to_be_disabled()
    wait_for_code(mailbox, customer.email, after=before)
    assert count(mailbox, customer.email) == before + 1

    verify.submit_code(first)
    DashboardPage(page, js=js).expect_shown(customer)


def test_countdown_in_the_page_enables_resend_when_it_reaches_zero(
    page: Page, customer: Customer, mailbox: Mailbox, clock: ServerClock
) -> None:
    verify = RegisterPage(page).open().register(customer)
    clock.advance(verify.seconds_left() - 3)  # leave about 3 s for the page to count down
    page.reload()
    left = verify.seconds_left()
    assert 0 < left <= 5, f"expected a few seconds left after moving the clock, the page says {left}"
    expect(verify.resend_button).to_be_disabled()

    # No reload from here: the page's own countdown enables the button.
    expect(verify.timer).to_have_text(VerifyPage.TIMER_DONE, timeout=(left + 5) * 1000)
    expect(verify.resend_button).to_be_enabled()

    before = count(mailbox, customer.email)
    verify.resend()  # and the server agrees the time is up
    expect(page.get_by_text(NEW_CODE_NOTICE)).to_be_visible()
    verify.submit_code(wait_for_code(mailbox, customer.email, after=before))
    DashboardPage(page).expect_shown(customer)


def test_forged_early_resend_is_refused_with_retry_after(
    page: Page, customer: Customer, mailbox: Mailbox, optional_clock: ServerClock | None
) -> None:
    verify = RegisterPage(page).open().register(customer)
    wait_for_code(mailbox, customer.email)
    before = count(mailbox, customer.email)
    expect(verify.resend_button).to_be_disabled()
    # What a script would send: the button's own form, CSRF token included, pressed anyway.
    token = verify.resend_button.locator("xpath=ancestor::form").locator("input[name=csrf_token]").input_value()

    plain = page.request.post(VerifyPage.path + "/resend", form={"csrf_token": token}, max_redirects=0)
    assert plain.status == 429
    wait = int(plain.headers["retry-after"])
    assert 0 < wait <= COOLDOWN
    assert f"Please wait {wait} seconds before asking for another code." in plain.text()

    htmx = page.request.post(VerifyPage.path + "/resend", form={"csrf_token": token}, max_redirects=0,
                             headers={"HX-Request": "true", "X-CSRF-Token": token})
    assert htmx.status == 429
    assert 0 < int(htmx.headers["retry-after"]) <= wait
    assert "<html" not in htmx.text(), "htmx gets the fragment, not a whole page"

    if optional_clock is not None:  # and nothing was sent: the next allowed resend is the only new mail
        optional_clock.advance(COOLDOWN + 1)
        page.reload()
        verify.resend()
        wait_for_code(mailbox, customer.email, after=before)
        assert count(mailbox, customer.email) == before + 1

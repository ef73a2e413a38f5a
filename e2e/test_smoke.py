"""The first thing to break when the app cannot start or its scripts do not load."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from e2e.checks import BrowserProblems, is_csp_violation

HTMX_VERSION = "2.0.11"


def test_home_page_renders_with_htmx_and_no_console_errors(page: Page, browser_problems: BrowserProblems) -> None:
    response = page.goto("/")
    assert response is not None and response.status == 200

    expect(page.get_by_role("heading", level=1, name="Welcome to Computer Shop")).to_be_visible()
    expect(page.get_by_role("link", name="Sign in", exact=True)).to_have_attribute("href", "/login")
    expect(page.get_by_role("link", name="Create an account", exact=True)).to_have_attribute("href", "/register")
    assert page.evaluate("() => window.htmx && window.htmx.version") == HTMX_VERSION
    # Everything is loaded now; an error logged from here on would have come with the page.
    page.wait_for_load_state("networkidle")
    assert not browser_problems.console_errors, f"console errors on the home page: {browser_problems.console_errors}"


def test_csp_guard_sees_a_blocked_inline_script(page: Page, browser_problems: BrowserProblems) -> None:
    """The autouse CSP check is only worth something if it notices a violation."""
    page.goto("/")
    with page.expect_console_message(lambda m: is_csp_violation(m.text)), \
            pytest.raises(Exception, match="Content Security Policy"):
        page.add_script_tag(content="window.__injected = 1")
    assert browser_problems.csp_violations, "an inline script was blocked but no CSP violation was recorded"
    assert page.evaluate("() => window.__injected") is None
    browser_problems.forget()

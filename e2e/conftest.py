"""Fixtures for the end-to-end suite.

Locally (no --base-url): one uvicorn subprocess for the session, on a free port, with its own
SQLite file and an in-process SMTP capture; its log is e2e/artifacts/server.log.
QA (--base-url URL): no server is started; codes are read from the Mailpit API at MAILPIT_URL,
and tests that need the test-only clock hook or the database file skip with the reason.

Everything here is the sync Playwright API, which marks an asyncio loop as running in the main
thread between calls: async tests (anyio, in tests/) must not run after it, so the e2e items are
moved to the end of the run.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from e2e.api import Accounts, Customer, ReadyCustomers, ServerClock, new_customer
from e2e.checks import BrowserProblems
from e2e.mail import Mailbox, MailpitBox, SmtpCapture
from e2e.server import LocalServer, ServerFailed

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]

expect.set_options(timeout=10_000)  # 2-core CI machines: generous, and only ever reached on failure


# --- options and ordering -----------------------------------------------------------------


def _given(config: pytest.Config, option: str) -> bool:
    """Whether the option was passed at all (command line, PYTEST_ADDOPTS or ini addopts)."""
    args = [*config.invocation_params.args, *shlex.split(os.environ.get("PYTEST_ADDOPTS", "")),
            *config.getini("addopts")]
    return any(a == option or a.startswith(option + "=") for a in args)


def pytest_configure(config: pytest.Config) -> None:
    # Keep a trace and a screenshot of every failing journey, unless told otherwise.
    if not _given(config, "--tracing"):
        config.option.tracing = "retain-on-failure"
    if not _given(config, "--screenshot"):
        config.option.screenshot = "only-on-failure"
    if not _given(config, "--output"):
        config.option.output = str(ARTIFACTS)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items[:] = sorted(items, key=lambda item: Path(item.path).is_relative_to(HERE))  # stable: e2e last


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _EXEMPT_TARGETS:
        terminalreporter.write_sep("-", "e2e: small links exempted as running text (WCAG 2.5.5 exception)")
        for line in sorted(set(_EXEMPT_TARGETS)):
            terminalreporter.write_line(line)


_EXEMPT_TARGETS: list[str] = []


@pytest.fixture(scope="session")
def exempt_targets() -> list[str]:
    return _EXEMPT_TARGETS


# --- the browser --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium_path(playwright: Any) -> str | None:
    """CHROMIUM_PATH, else Debian's /usr/bin/chromium, else (None) Playwright's own download."""
    wanted = os.environ.get("CHROMIUM_PATH")
    for path in [wanted] if wanted else ["/usr/bin/chromium"]:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    if not wanted and os.path.isfile(playwright.chromium.executable_path):
        return None
    reason = (f"Chromium not found at {wanted or '/usr/bin/chromium'} (set CHROMIUM_PATH, or apt-get install "
              "chromium; `playwright install chromium` where it can download)")
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any], chromium_path: str | None) -> dict[str, Any]:
    found = {"executable_path": chromium_path} if chromium_path else {}
    return {**browser_type_launch_args, **found, "args": CHROMIUM_FLAGS}


@pytest.fixture
def browser_problems() -> BrowserProblems:
    return BrowserProblems()


@pytest.fixture(autouse=True)
def no_csp_violations(browser_problems: BrowserProblems) -> Iterator[None]:
    """Every e2e test: no CSP violation and no uncaught script error in any page it opened."""
    yield
    problems = browser_problems.serious()
    assert not problems, "the browser reported:\n" + "\n".join(problems)


@pytest.fixture
def new_context(new_context: Any, browser_problems: BrowserProblems) -> Any:
    def make(**kwargs: Any) -> BrowserContext:
        context: BrowserContext = new_context(**kwargs)
        context.set_default_timeout(15_000)
        browser_problems.watch(context)
        return context

    return make


@pytest.fixture
def context(new_context: Any, request: pytest.FixtureRequest) -> BrowserContext:
    # Tests that take the `js` parameter run once with JavaScript and once without.
    js = request.getfixturevalue("js") if "js" in request.fixturenames else True
    return new_context(java_script_enabled=js)


@pytest.fixture(params=[pytest.param(True, id="js"), pytest.param(False, id="no-js")])
def js(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def axe_page(new_context: Any) -> Page:
    """A page for axe-core only: CSP bypassed so the script can be injected."""
    return new_context(bypass_csp=True).new_page()


@pytest.fixture
def device_page(new_context: Any, playwright: Any, device_name: str) -> Page:
    """A page in the named Playwright device profile (parametrize `device_name`)."""
    profile = dict(playwright.devices[device_name])
    profile.pop("default_browser_type", None)  # always Chromium here
    return new_context(**profile).new_page()


# --- the app ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def qa_base_url(pytestconfig: pytest.Config) -> str | None:
    value = pytestconfig.getoption("--base-url", default=None)
    return str(value).rstrip("/") if value else None


@pytest.fixture(scope="session")
def smtp_capture(qa_base_url: str | None) -> Iterator[SmtpCapture | None]:
    if qa_base_url:
        yield None
        return
    capture = SmtpCapture().start()
    yield capture
    capture.stop()


@pytest.fixture(scope="session")
def local_server(pytestconfig: pytest.Config, qa_base_url: str | None, smtp_capture: SmtpCapture | None,
                 delete_output_dir: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer | None]:
    # delete_output_dir (pytest-playwright) empties the output folder first: the log comes after.
    if qa_base_url:
        yield None
        return
    assert smtp_capture is not None
    log = Path(pytestconfig.getoption("--output")).resolve() / "server.log"
    server = LocalServer(tmp_path_factory.mktemp("e2e-server"), log, smtp_port=smtp_capture.port)
    try:
        server.start()
    except ServerFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def base_url(qa_base_url: str | None, local_server: LocalServer | None) -> str:
    if qa_base_url:
        return qa_base_url
    assert local_server is not None
    return local_server.base_url


@pytest.fixture(scope="session")
def mailbox(smtp_capture: SmtpCapture | None) -> Iterator[Mailbox]:
    if smtp_capture is not None:
        yield smtp_capture
        return
    url = os.environ.get("MAILPIT_URL")
    if not url:
        pytest.skip("reading codes from a deployed instance needs MAILPIT_URL (a Mailpit-compatible API)")
    box = MailpitBox(url)
    yield box
    box.close()


@pytest.fixture(scope="session")
def _clock_or_reason(base_url: str) -> tuple[ServerClock | None, str]:
    clock = ServerClock(base_url)
    reason = clock.probe()
    return (None, reason) if reason else (clock, "")


@pytest.fixture
def optional_clock(_clock_or_reason: tuple[ServerClock | None, str]) -> ServerClock | None:
    """The server's clock where the hook exists, else None (for tests that only check more with it)."""
    return _clock_or_reason[0]


@pytest.fixture
def clock(_clock_or_reason: tuple[ServerClock | None, str]) -> ServerClock:
    """The server's clock; the test skips where the test-only hook is not mounted."""
    found, reason = _clock_or_reason
    if found is None:
        pytest.skip(reason)
    return found


@pytest.fixture
def database(local_server: LocalServer | None) -> LocalServer:
    if local_server is None:
        pytest.skip("changes the app's database directly: only against the server the suite starts itself")
    return local_server


@pytest.fixture(scope="session")
def accounts(base_url: str, mailbox: Mailbox) -> Accounts:
    return Accounts(base_url, mailbox)


@pytest.fixture(scope="session")
def _ready_customers(accounts: Accounts, _clock_or_reason: tuple[ServerClock | None, str]) -> ReadyCustomers:
    return ReadyCustomers(accounts, _clock_or_reason[0])


@pytest.fixture
def customer() -> Customer:
    """A new, unregistered customer."""
    return new_customer()


@pytest.fixture
def ready_customer(_ready_customers: ReadyCustomers) -> Customer:
    """A registered, verified customer (codes on) who can be mailed a sign-in code right away."""
    return _ready_customers.take()


"""The suite's own instruments, checked against known answers: a check that cannot fail
proves nothing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from playwright.sync_api import Page

from e2e.checks import assert_mobile_friendly, axe_violations, measure_layout
from e2e.mail import MailpitBox, NoCode, count, extract_code, wait_for_code

LOGIN_MAIL = "Hello Ada,\n\nEnter this code to finish signing in to Computer Shop:\n\n{code}\n\nIt works for 10 minutes.\n"


def test_code_is_the_one_six_digit_token_on_a_line_of_its_own() -> None:
    assert extract_code(LOGIN_MAIL.format(code="042917")) == "042917"
    assert extract_code("Order 1234567 of 123456 items\n  908172  \n") == "908172"
    with pytest.raises(NoCode):
        extract_code("Your code is 123456.")  # not on its own line
    with pytest.raises(NoCode):
        extract_code("111111\n222222\n")  # the contract allows only one


# --- a stand-in for Mailpit's API --------------------------------------------------------

MESSAGES = [
    {"ID": "b", "Created": "2026-01-01T12:00:02.123456789Z", "Subject": "Your Computer Shop sign-in code",
     "To": [{"Name": "", "Address": "Ada@Example.com"}], "Text": LOGIN_MAIL.format(code="222222")},
    {"ID": "a", "Created": "2026-01-01T12:00:01Z", "Subject": "Your Computer Shop verification code",
     "To": [{"Name": "Ada", "Address": "ada@example.com"}], "Text": LOGIN_MAIL.format(code="111111")},
    {"ID": "c", "Created": "2026-01-01T12:00:03Z", "Subject": "Your Computer Shop sign-in code",
     "To": [{"Name": "", "Address": "bob@example.com"}], "Text": LOGIN_MAIL.format(code="333333")},
]


class FakeMailpit(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.startswith("/api/v1/messages"):
            body: Any = {"total": len(MESSAGES), "messages": [{k: v for k, v in m.items() if k != "Text"}
                                                               for m in MESSAGES]}
        elif self.path.startswith("/api/v1/message/"):
            found = [m for m in MESSAGES if m["ID"] == self.path.rsplit("/", 1)[-1]]
            if not found:
                self.send_error(404)
                return
            body = {"ID": found[0]["ID"], "Text": found[0]["Text"], "HTML": "<p>ignored</p>"}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def mailpit_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeMailpit)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_mailpit_box_reads_one_address_oldest_first(mailpit_url: str) -> None:
    box = MailpitBox(mailpit_url + "/")
    try:
        mails = box.messages("ada@example.com")
        assert [m.code for m in mails] == ["111111", "222222"]
        assert count(box, "ADA@example.com") == 2
        assert wait_for_code(box, "ada@example.com", after=1, timeout=1) == "222222"
        assert wait_for_code(box, "ada@example.com", after=mails[0].received, timeout=1) == "222222"
        with pytest.raises(AssertionError, match="no new mail"):
            wait_for_code(box, "ada@example.com", after=2, timeout=0.2)
    finally:
        box.close()


# --- the page checks ----------------------------------------------------------------------


def test_layout_check_sees_small_targets_and_sideways_scroll(page: Page) -> None:
    page.goto("/login")
    assert_mobile_friendly(page, "login as served")
    page.evaluate("""() => {
        const main = document.querySelector("main");
        const tiny = document.createElement("button");
        tiny.textContent = "x";
        tiny.style.minHeight = "0"; tiny.style.height = "20px"; tiny.style.padding = "0";
        main.append(tiny);
        const wide = document.createElement("div");
        wide.style.width = "5000px"; wide.style.height = "1px";
        main.append(wide);
    }""")
    layout = measure_layout(page)
    assert layout.scroll_width > layout.inner_width
    assert any(line.startswith('button "x"') for line in layout.too_small), layout.too_small


def test_axe_check_sees_a_critical_violation(axe_page: Page) -> None:
    axe_page.goto("/login")
    assert axe_violations(axe_page) == []
    axe_page.evaluate("""() => {
        const field = document.createElement("input");
        field.type = "text";  // no label at all
        document.querySelector("form").append(field);
    }""")
    assert "label" in {v["id"] for v in axe_violations(axe_page)}

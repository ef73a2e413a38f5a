"""Where the e2e suite reads the codes the app mails: an in-process SMTP capture (aiosmtpd)
for the local server, or a Mailpit-compatible HTTP API for a deployed instance (QA)."""

from __future__ import annotations

import email
import email.policy
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, Protocol

import httpx
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

# The contract: the text part holds the code as a 6-digit token on its own line, and no
# other standalone 6-digit number.
CODE_LINE = re.compile(r"(?m)^\s*(\d{6})\s*$")


class NoCode(AssertionError):
    """A message that should carry exactly one code does not."""


def extract_code(text: str) -> str:
    """The one standalone 6-digit token of a mail's text part."""
    found = CODE_LINE.findall(text)
    if len(found) != 1:
        raise NoCode(f"expected exactly one 6-digit code on a line of its own, found {found!r} in:\n{text}")
    return str(found[0])


@dataclass(frozen=True)
class Mail:
    to: tuple[str, ...]
    subject: str
    text: str
    received: datetime

    @property
    def code(self) -> str:
        return extract_code(self.text)


class Mailbox(Protocol):
    def messages(self, address: str) -> list[Mail]:
        """Every message to `address`, oldest first."""
        ...


def count(box: Mailbox, address: str) -> int:
    """How many messages `address` has had so far (pass it as `after=` to wait for the next)."""
    return len(box.messages(address))


def wait_for_mail(box: Mailbox, address: str, *, after: int | datetime = 0, timeout: float = 10.0) -> Mail:
    """The newest message to `address` beyond the first `after` ones (or received after a time)."""
    deadline = time.monotonic() + timeout
    while True:
        mails = box.messages(address)
        fresh = mails[after:] if isinstance(after, int) else [m for m in mails if m.received > after]
        if fresh:
            return fresh[-1]
        if time.monotonic() >= deadline:
            seen = [(m.subject, m.received.isoformat()) for m in mails]
            raise AssertionError(f"no new mail to {address} within {timeout} s (after={after!r}; it has {seen})")
        time.sleep(0.05)


def wait_for_code(box: Mailbox, address: str, *, after: int | datetime = 0, timeout: float = 10.0) -> str:
    """The code in the newest message to `address` beyond `after`, waiting for it to arrive."""
    return wait_for_mail(box, address, after=after, timeout=timeout).code


def _text_part(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    return str(part.get_content()) if part is not None else ""


# --- local: an SMTP server in a thread of the pytest process ------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    mails: list[Mail] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 (aiosmtpd's name)
        raw = envelope.original_content or envelope.content or b""
        message = email.message_from_bytes(raw if isinstance(raw, bytes) else raw.encode(), policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        mail = Mail(
            to=tuple(a.lower() for a in envelope.rcpt_tos),
            subject=str(message.get("Subject", "")),
            text=_text_part(message),
            received=datetime.now(UTC),
        )
        with self.lock:
            self.mails.append(mail)
        return "250 Message accepted"


class SmtpCapture:
    """Keeps every message the app sends; `messages(address)` is thread-safe."""

    def __init__(self) -> None:
        self.port = free_port()
        self._store = _Store()
        self._controller = Controller(self._store, hostname="127.0.0.1", port=self.port)

    def start(self) -> SmtpCapture:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def messages(self, address: str) -> list[Mail]:
        wanted = address.lower()
        with self._store.lock:
            return [m for m in self._store.mails if wanted in m.to]

    def all(self) -> list[Mail]:
        with self._store.lock:
            return list(self._store.mails)


# --- deployed instance: Mailpit's HTTP API ------------------------------------------------


class MailpitBox:
    """Reads a Mailpit (or compatible) API: GET /api/v1/messages, GET /api/v1/message/{ID}."""

    def __init__(self, base_url: str, *, page_size: int = 200) -> None:
        self.base_url = base_url.rstrip("/")
        self.page_size = page_size
        self._http = httpx.Client(base_url=self.base_url, timeout=10.0)
        self._texts: dict[str, str] = {}  # a message's text never changes: fetch it once

    def close(self) -> None:
        self._http.close()

    def messages(self, address: str) -> list[Mail]:
        wanted = address.lower()
        response = self._http.get("/api/v1/messages", params={"limit": self.page_size})
        response.raise_for_status()
        found = []
        for item in response.json().get("messages") or []:
            to = tuple(str(a.get("Address", "")).lower() for a in item.get("To") or [])
            if wanted not in to:
                continue
            found.append(Mail(to=to, subject=str(item.get("Subject", "")), text=self._text(str(item["ID"])),
                              received=_parse_time(item.get("Created"))))
        return sorted(found, key=lambda m: m.received)

    def _text(self, message_id: str) -> str:
        if message_id not in self._texts:
            response = self._http.get(f"/api/v1/message/{message_id}")
            response.raise_for_status()
            self._texts[message_id] = str(response.json().get("Text", ""))
        return self._texts[message_id]


def _parse_time(value: Any) -> datetime:
    if not value:
        return datetime.now(UTC)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

"""A local SMTP capture (aiosmtpd) that holds every message for a set delay before its 250.

It runs on the load generator's own event loop, so a flow can await its code directly: the
generator registers a waiter for the customer's address before it posts the password, and
the capture resolves it when it answers 250 (the moment a real server would have accepted
the mail). Only loopback; every message is parsed like a mail client would (text/plain part).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import time
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

CODE_RE = re.compile(r"(?m)^\s*(\d{6})\s*$")


def extract(content: bytes) -> tuple[str, str | None]:
    """(lower-cased To: address, the code or None) of a raw message."""
    msg = email.message_from_bytes(content, policy=email.policy.default)
    to = str(msg.get("To", "")).strip().lower()
    if "<" in to:
        to = to[to.index("<") + 1 : to.index(">")]
    body = msg.get_body(preferencelist=("plain",))  # type: ignore[attr-defined]
    text = body.get_content() if body is not None else ""
    m = CODE_RE.search(text)
    return to, m.group(1) if m else None


class Capture:
    """aiosmtpd handler: hold `delay` seconds, hand the code to whoever waits for it, 250."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.waiters: dict[str, asyncio.Future[tuple[str, float]]] = {}
        self.unclaimed: dict[str, tuple[str, float]] = {}
        self.received = 0
        self.without_code = 0
        self.in_flight = 0
        self.max_in_flight = 0  # concurrent messages being held = SMTP connections busy

    def expect(self, address: str) -> asyncio.Future[tuple[str, float]]:
        fut: asyncio.Future[tuple[str, float]] = asyncio.get_running_loop().create_future()
        early = self.unclaimed.pop(address, None)
        if early is not None:
            fut.set_result(early)
        else:
            self.waiters[address] = fut
        return fut

    def forget(self, address: str) -> None:
        self.waiters.pop(address, None)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay > 0:
                await asyncio.sleep(self.delay)
            self.received += 1
            raw = envelope.original_content or envelope.content
            data = raw if isinstance(raw, bytes) else str(raw).encode()
            to, code = extract(data)
            if not to and envelope.rcpt_tos:
                to = envelope.rcpt_tos[0].lower()
            if code is None:
                self.without_code += 1
                return "250 OK"
            item = (code, time.monotonic())
            fut = self.waiters.pop(to, None)
            if fut is not None and not fut.done():
                fut.set_result(item)
            else:
                self.unclaimed[to] = item
            return "250 OK"
        finally:
            self.in_flight -= 1

    def stats(self) -> dict[str, Any]:
        return {
            "delay_s": self.delay,
            "received": self.received,
            "without_code": self.without_code,
            "unclaimed": len(self.unclaimed),
            "max_held_at_once": self.max_in_flight,
        }


async def serve(capture: Capture, port: int) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SMTP(capture, hostname="bench-capture", ident="bench capture", enable_SMTPUTF8=True),
        host="127.0.0.1",
        port=port,
    )

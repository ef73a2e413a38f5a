"""Ways to deliver a built message: a bounded pool of SMTP connections, or the console."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Protocol

import aiosmtplib

from app.mail.messages import Mail

log = logging.getLogger("app.mail")


class TransientError(Exception):
    """Worth retrying later: connection refused, timeout, a 4xx reply. `maybe_sent`: the
    connection was lost or timed out while the message was being handed over, so the server may
    have it (and would deliver a second copy of a retry)."""

    def __init__(self, message: str, *, maybe_sent: bool = False) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent


class PermanentError(Exception):
    """Retrying will not help: a 5xx reply."""


class Transport(Protocol):
    async def send(self, message: Mail) -> None: ...
    async def close(self) -> None: ...


async def prune(transport: Transport) -> None:
    """Let a transport with a pool close what it no longer needs."""
    pruning = getattr(transport, "prune", None)
    if pruning is not None:
        await pruning()


class ConsoleTransport:
    """Development and test only: prints the whole message, code included."""

    def __init__(self, stream: object = None) -> None:
        self.stream = stream

    async def send(self, message: Mail) -> None:
        out = self.stream or sys.stdout
        print(
            f"\n{'=' * 70}\nMAIL (console delivery, development only)\nTo: {message.recipient}\n"
            f"Subject: {message.subject}\n\n{message.text}\n{'=' * 70}",
            file=out,  # type: ignore[arg-type]
            flush=True,
        )

    async def close(self) -> None:
        return None


class SmtpTransport:
    """Sends over reused SMTP connections: up to `size` stay open while mail is quiet, and while
    mail waits the pool grows up to `max_size` at once; connections idle for `idle_close`
    seconds beyond `size` are closed (prune), so a burst does not keep them for good."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        security: str = "starttls",
        timeout: float = 10.0,
        size: int = 8,
        max_size: int | None = None,
        idle_close: float = 30.0,
    ) -> None:
        self.host, self.port = host, port
        self.username, self.password = username, password
        self.security, self.timeout = security, timeout
        self.size, self.max_size = size, max(size, max_size or size)
        self.idle_close = idle_close
        self._slots = asyncio.Semaphore(self.max_size)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []  # (connection, when it was last used)
        self.opened = 0  # connections opened so far (tests and the bench read it)
        self.busy = 0  # sends under way

    @property
    def open_connections(self) -> int:
        return len(self._idle) + self.busy

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            use_tls=self.security == "tls",
            start_tls=self.security == "starttls",
        )
        await client.connect()
        if self.username and self.password:
            await client.login(self.username, self.password)
        self.opened += 1
        return client

    async def send(self, message: Mail) -> None:
        async with self._slots:
            self.busy += 1
            try:
                await self._send(message)
            finally:
                self.busy -= 1

    async def _send(self, message: Mail) -> None:
        client = self._idle.pop()[0] if self._idle else None
        handing_over = False  # connected: from here a lost connection may have delivered it
        try:
            if client is None or not client.is_connected:
                client = await self._connect()
            try:
                handing_over = True
                await _sendmail(client, message)
            except aiosmtplib.SMTPServerDisconnected:
                # A pooled connection the server closed while idle: one fresh try.
                handing_over = False
                client = await self._connect()
                handing_over = True
                await _sendmail(client, message)
        except aiosmtplib.SMTPResponseException as exc:
            # The server answered: a refusal is a refusal, nothing was accepted.
            await _quit(client)
            if 400 <= exc.code < 500:
                raise TransientError(f"SMTP {exc.code}: {exc.message}") from None
            raise PermanentError(f"SMTP {exc.code}: {exc.message}") from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            await _quit(client)
            raise TransientError(f"{type(exc).__name__}: {exc}", maybe_sent=handing_over) from None
        self._idle.append((client, time.monotonic()))

    async def prune(self) -> int:
        """Close connections beyond `size` that have been idle `idle_close` seconds; how many."""
        cutoff = time.monotonic() - self.idle_close
        # The most recently used stay (the end of the list); the oldest beyond `size` go.
        surplus = max(0, len(self._idle) - self.size)
        stale = [pair for pair in self._idle[:surplus] if pair[1] < cutoff]
        for pair in stale:
            self._idle.remove(pair)
            await _quit(pair[0])
        return len(stale)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client, _ in idle:
            await _quit(client)


async def _sendmail(client: aiosmtplib.SMTP, message: Mail) -> None:
    await client.sendmail(message.sender, [message.recipient], message.data,
                          mail_options=["SMTPUTF8"] if message.smtputf8 else None)


async def _quit(client: aiosmtplib.SMTP | None) -> None:
    if client is None or not client.is_connected:
        return
    try:
        await asyncio.wait_for(client.quit(), 2)
    except Exception:
        client.close()

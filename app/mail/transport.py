"""Ways to deliver a built message: a bounded pool of SMTP connections, or the console."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Protocol

import aiosmtplib

from app.mail.messages import Mail

log = logging.getLogger("app.mail")


class TransientError(Exception):
    """Worth retrying later: connection refused, timeout, a 4xx reply."""


class PermanentError(Exception):
    """Retrying will not help: a 5xx reply."""


class Transport(Protocol):
    async def send(self, message: Mail) -> None: ...
    async def close(self) -> None: ...


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
    """Sends over up to `size` reused SMTP connections at once."""

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
    ) -> None:
        self.host, self.port = host, port
        self.username, self.password = username, password
        self.security, self.timeout = security, timeout
        self.size = size
        self._slots = asyncio.Semaphore(size)
        self._idle: list[aiosmtplib.SMTP] = []

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
        return client

    async def send(self, message: Mail) -> None:
        async with self._slots:
            client = self._idle.pop() if self._idle else None
            try:
                if client is None or not client.is_connected:
                    client = await self._connect()
                try:
                    await _sendmail(client, message)
                except aiosmtplib.SMTPServerDisconnected:
                    # A pooled connection the server closed while idle: one fresh try.
                    client = await self._connect()
                    await _sendmail(client, message)
            except aiosmtplib.SMTPResponseException as exc:
                await _quit(client)
                if 400 <= exc.code < 500:
                    raise TransientError(f"SMTP {exc.code}: {exc.message}") from None
                raise PermanentError(f"SMTP {exc.code}: {exc.message}") from None
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                await _quit(client)
                raise TransientError(f"{type(exc).__name__}: {exc}") from None
            self._idle.append(client)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
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

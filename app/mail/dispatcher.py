"""Sends queued mail in the background of each app process: claims, sends concurrently over
the transport's pool, retries transient failures with backoff, never sends an expired code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import timedelta

from databases import Database

from app.clock import Clock
from app.mail import outbox
from app.mail.messages import build
from app.mail.transport import ConsoleTransport, PermanentError, TransientError, Transport

log = logging.getLogger("app.mail")
POLL_SECONDS = 1.0  # idle
BUSY_POLL_SECONDS = 0.2  # for a while after mail went out: another worker may have queued some
BUSY_FOR_SECONDS = 10.0


def backoff(tries: int) -> int:
    """Seconds before try number tries+1: 2, 4, 8, ... at most 5 minutes."""
    return int(min(300, 2**tries))


class Dispatcher:
    def __init__(
        self,
        db: Database,
        transport: Transport,
        sealer: outbox.Sealer,
        clock: Clock,
        *,
        sender: str,
        max_tries: int = 8,
        concurrency: int = 8,
        console_fallback: bool = False,
        keep_sent: bool = False,
        on_event: Callable[[str, outbox.Queued, str | None], None] | None = None,
    ) -> None:
        self.db, self.transport, self.sealer, self.clock = db, transport, sealer, clock
        self.sender, self.max_tries = sender, max_tries
        self.concurrency = concurrency
        self.console = ConsoleTransport() if console_fallback else None
        self.keep_sent = keep_sent  # development keeps sent payloads for /dev/mail until expiry
        self.on_event = on_event
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._backlog = False  # the last look filled every free slot: more may be due
        self._busy_until = 0.0

    def notify(self) -> None:
        """New mail is queued: look now rather than at the next poll."""
        self._wake.set()

    def has_room(self) -> bool:
        """Whether a message queued now can go straight to this process's sending (see hand)."""
        return self._task is not None and not self._stopping and len(self._inflight) < self.concurrency

    def hand(self, message: outbox.Queued) -> None:
        """Send a message this process queued already claimed (outbox.enqueue(claim=True)),
        after its transaction committed: no look-up, no claim round trip."""
        self._start(message)

    def _start(self, message: outbox.Queued) -> None:
        self._busy_until = asyncio.get_running_loop().time() + BUSY_FOR_SECONDS
        task = asyncio.create_task(self._deliver(message))
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mail-dispatcher")

    async def stop(self) -> None:
        """Let the current pass finish (a cancelled query could keep its pooled connection
        and hang the pool's close), then end; cancel only if it does not end in time."""
        self._stopping = True
        self._wake.set()
        if self._task:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=5)
        await self.transport.close()

    async def _run(self) -> None:
        while not self._stopping:
            # Clear before looking: a notify() that lands while we look is then not lost.
            self._wake.clear()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be down: keep going
                log.warning("mail dispatcher: %s", type(exc).__name__)
            # Mail queued by another worker has no way to wake this one: look more often while
            # mail is flowing, so a worker whose slots are full does not hold it up.
            busy = asyncio.get_running_loop().time() < self._busy_until
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), BUSY_POLL_SECONDS if busy else POLL_SECONDS)

    async def run_once(self) -> int:
        """Claim what is due (as many as there are free slots) and start sending it."""
        free = self.concurrency - len(self._inflight)
        if free <= 0:
            return 0
        now = self.clock.now()
        started = 0
        found = await outbox.due(self.db, self.sealer, now=now, limit=free)
        self._backlog = len(found) == free
        for message in found:
            if not await outbox.claim(self.db, message, now=now):
                continue  # another dispatcher took it
            self._start(message)
            started += 1
        return started

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._backlog:
            self._wake.set()  # a slot is free and more may be waiting for one

    async def drain(self) -> None:
        """Send everything due now and wait for it (tests and commands)."""
        while await self.run_once() or self._inflight:
            if self._inflight:
                await asyncio.wait(set(self._inflight))

    async def _deliver(self, message: outbox.Queued) -> None:
        now = self.clock.now()
        if message.expires_at is not None and message.expires_at <= now:
            await outbox.mark(self.db, message.id, outbox.EXPIRED, now=now, error="code expired before delivery")
            self._event("expired", message, None)
            return
        try:
            email = build(message.kind, message.context, recipient=message.recipient, sender=self.sender)
            await self.transport.send(email)
        except TransientError as exc:
            await self._failed(message, str(exc), transient=True)
            return
        except (PermanentError, ValueError) as exc:
            await self._failed(message, str(exc), transient=False)
            return
        await outbox.mark(self.db, message.id, outbox.SENT, now=self.clock.now(), keep_sent=self.keep_sent)
        self._event("sent", message, None)

    async def _failed(self, message: outbox.Queued, error: str, *, transient: bool) -> None:
        now = self.clock.now()
        if self.console is not None:
            # Development: the newcomer without a mail server still gets the code.
            email = build(message.kind, message.context, recipient=message.recipient, sender=self.sender)
            await self.console.send(email)
            await outbox.mark(self.db, message.id, outbox.SENT, now=now, error=f"printed to console after: {error}",
                              keep_sent=self.keep_sent)
            return
        if transient and message.tries < self.max_tries:
            retry_at = now + timedelta(seconds=backoff(message.tries))
            await outbox.mark(self.db, message.id, outbox.QUEUED, now=now, error=error, retry_at=retry_at)
            self._event("retry", message, error)
        else:
            await outbox.mark(self.db, message.id, outbox.FAILED, now=now, error=error)
            self._event("failed", message, error)

    def _event(self, what: str, message: outbox.Queued, error: str | None) -> None:
        log.info("mail %s id=%s kind=%s tries=%s%s", what, message.id, message.kind, message.tries,
                 f" error={error}" if error else "")
        if self.on_event:
            self.on_event(what, message, error)

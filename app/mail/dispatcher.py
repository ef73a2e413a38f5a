"""Sends queued mail in the background of each app process: claims, sends concurrently over
the transport's pool, retries transient failures with backoff, never sends an expired code.

What an operator must see is logged at WARNING or above: a transient SMTP failure, a message
taken over from a process that stopped mid-send, a payload no key opens; ERROR when a message
is given up, or when the fact that it was sent could not be recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from databases import Database

from app.clock import Clock
from app.mail import outbox
from app.mail.messages import Dkim, Mail, build
from app.mail.outbox import MailStatus
from app.mail.transport import ConsoleTransport, PermanentError, TransientError, Transport, prune
from app.security.crypto import Sealer

log = logging.getLogger("app.mail")
POLL_SECONDS = 1.0  # idle
BUSY_POLL_SECONDS = 0.2  # for a while after mail went out: another worker may have queued some
BUSY_FOR_SECONDS = 10.0
CODE_BACKOFF_CAP = 10  # seconds: a customer is waiting for a code mail
MARK_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0)
# A send cut off while the message was being handed over (the server may have it already) is
# tried once more; cut off again, the mail is given up rather than sent every 10 s.
MAYBE_SENT = "maybe delivered: "


def backoff(tries: int, *, code: bool = False) -> int:
    """Seconds before try number tries+1: 2, 4, 8, ... at most 5 minutes, and at most
    CODE_BACKOFF_CAP for a code mail (someone is waiting at the code step)."""
    return int(min(CODE_BACKOFF_CAP if code else 300, 2**tries))


def claim_seconds(smtp_timeout: float) -> float:
    """How long a claim on a message lasts: a send is cut off after 2 x SMTP_TIMEOUT, so three
    cover it; only then may another process take over (this one stopped)."""
    return 3 * smtp_timeout


class Dispatcher:
    def __init__(
        self,
        db: Database,
        transport: Transport,
        sealer: Sealer,
        clock: Clock,
        *,
        sender: str,
        max_tries: int = 20,
        concurrency: int = 8,
        smtp_timeout: float = 10.0,
        code_in_subject: bool = False,
        dkim: Dkim | None = None,
        console_fallback: bool = False,
        keep_sent: bool = False,
        on_event: Callable[[str, outbox.Queued, str | None], None] | None = None,
    ) -> None:
        self.db, self.transport, self.sealer, self.clock = db, transport, sealer, clock
        self.sender, self.max_tries = sender, max_tries
        self.concurrency = concurrency
        self.send_timeout = 2 * smtp_timeout
        self.claim_for = claim_seconds(smtp_timeout)
        self.code_in_subject, self.dkim = code_in_subject, dkim
        self.console = ConsoleTransport() if console_fallback else None
        self.keep_sent = keep_sent  # development keeps sent payloads for /dev/mail until expiry
        self.on_event = on_event
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._backlog = False  # the last look filled every free slot: more may be due
        self._busy_until = 0.0
        self._failing = False  # a send failed transiently: the next success wakes the retries

    def notify(self) -> None:
        """New mail is queued: look now rather than at the next poll."""
        self._wake.set()

    def has_room(self) -> bool:
        """Whether a message queued now can go straight to this process's sending (see hand)."""
        return self._task is not None and not self._stopping and len(self._inflight) < self.concurrency

    def claim_now(self) -> float | None:
        """`claim_for` for outbox.enqueue: this process sends it at once when it has room."""
        return self.claim_for if self.has_room() else None

    def hand(self, message: outbox.Queued) -> None:
        """Send a message this process queued already claimed (outbox.enqueue(claim_for=...)),
        after its transaction committed: no look-up, no claim round trip."""
        self._start(message)

    def dispatch(self, message: outbox.Queued) -> None:
        """After the commit: send a message this process claimed, or wake the dispatcher."""
        if message.tries:
            self.hand(message)
        else:
            self.notify()

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
                await prune(self.transport)
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
        self._backlog = len(found.ready) + len(found.unreadable) + len(found.done_codes) == free
        for message_id, why in found.unreadable:
            log.error("mail %s cannot be opened (%s): a retired key or a damaged row; given up", message_id, why)
            await outbox.mark(self.db, message_id, MailStatus.FAILED, now=now, error=f"payload unreadable: {why}")
        for message_id in found.done_codes:
            await outbox.mark(self.db, message_id, MailStatus.CANCELLED, now=now,
                              error="its code was used or replaced before delivery")
        for message in found.ready:
            if not await outbox.claim(self.db, message, now=now, claim_for=self.claim_for):
                continue  # another dispatcher took it
            if message.id in found.taken_over:
                log.warning("mail %s: the process sending it stopped before it finished; sending it from here",
                            message.id)
            self._start(message)
            started += 1
        return started

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mail delivery task failed: %s", type(task.exception()).__name__)
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
            await self._record(message, MailStatus.EXPIRED, error="code expired before delivery")
            self._event("expired", message, None)
            return
        try:
            email = self._build(message)
            await asyncio.wait_for(self.transport.send(email), self.send_timeout)
        except TransientError as exc:
            await self._failed(message, str(exc), transient=True, maybe_sent=exc.maybe_sent)
            return
        except TimeoutError:  # cut off at send_timeout, wherever it was: maybe handed over
            await self._failed(message, "TimeoutError", transient=True, maybe_sent=True)
            return
        except (PermanentError, ValueError) as exc:
            await self._failed(message, str(exc), transient=False)
            return
        await self._record(message, MailStatus.SENT, keep_sent=self.keep_sent)
        self._event("sent", message, None)
        if self._failing:
            # The mail server answers again: what waits out a backoff goes now, not in minutes.
            self._failing = False
            with contextlib.suppress(Exception):
                if await outbox.wake_retries(self.db, now=self.clock.now()):
                    self.notify()

    async def _record(self, message: outbox.Queued, status: MailStatus, **kwargs: object) -> None:
        """Mark how a send went, trying again while the database is unreachable: a message that
        went out must never be sent again because its mark was lost."""
        delays = iter(MARK_RETRY_SECONDS)
        while True:
            try:
                await outbox.mark(self.db, message.id, status, now=self.clock.now(), **kwargs)  # type: ignore[arg-type]
                return
            except Exception as exc:
                delay = next(delays, MARK_RETRY_SECONDS[-1])
                if self._stopping:
                    log.error("mail %s was %s but that could not be recorded (%s); it may be sent again",
                              message.id, status.value, type(exc).__name__)
                    return
                log.warning("mail %s: recording %s failed (%s); trying again in %.1f s",
                            message.id, status.value, type(exc).__name__, delay)
                await asyncio.sleep(delay)

    async def _failed(self, message: outbox.Queued, error: str, *, transient: bool, maybe_sent: bool = False) -> None:
        now = self.clock.now()
        if self.console is not None:
            # Development: the newcomer without a mail server still gets the code.
            await self.console.send(self._build(message))
            await self._record(message, MailStatus.SENT, error=f"printed to console after: {error}",
                               keep_sent=self.keep_sent)
            return
        retry_at = now + timedelta(seconds=backoff(message.tries, code=message.is_code))
        if maybe_sent:
            error = MAYBE_SENT + error
        if transient and maybe_sent and (message.last_error or "").startswith(MAYBE_SENT):
            # Twice in a row the send was cut off while handing the message over, so the server
            # may hold a copy of each: a relay that accepts but answers late must not get the same
            # code mail every 10 s until it expires.
            await self._record(message, MailStatus.FAILED, error=f"{error}; not sent again")
            self._event("failed", message, error)
        elif transient and message.expires_at is not None:
            # A mail with a code is worth sending for as long as its code works, however many
            # tries that takes (the mail server may be down for minutes while the customer waits);
            # once the code would be dead by the next try, it is never sent.
            if retry_at < message.expires_at:
                await self._retry(message, error, retry_at)
            else:
                await self._record(message, MailStatus.EXPIRED, error=f"code expired before delivery: {error}")
                self._event("expired", message, error)
        elif transient and message.tries < self.max_tries:
            await self._retry(message, error, retry_at)
        else:
            await self._record(message, MailStatus.FAILED, error=error)
            self._event("failed", message, error)

    async def _retry(self, message: outbox.Queued, error: str, retry_at: datetime) -> None:
        self._failing = True
        await self._record(message, MailStatus.QUEUED, error=error, retry_at=retry_at)
        self._event("retry", message, error)

    def _build(self, message: outbox.Queued) -> Mail:
        return build(message.kind, message.context, recipient=message.recipient, sender=self.sender,
                     code_in_subject=self.code_in_subject, dkim=self.dkim)

    def _event(self, what: str, message: outbox.Queued, error: str | None) -> None:
        level = {"retry": logging.WARNING, "failed": logging.ERROR}.get(what, logging.INFO)
        if what == "expired" and error:
            level = logging.WARNING  # a customer never got this code: the mail server kept failing
        log.log(level, "mail %s id=%s kind=%s tries=%s%s", what, message.id, message.kind, message.tries,
                f" error={error}" if error else "")
        if self.on_event:
            self.on_event(what, message, error)
